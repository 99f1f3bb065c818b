"""Section 7: greedy decoding, the batched beam search against a one-clip reference of Auto-AVSR's search,
and the error rates on cases worked out by hand."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from beam_reference import beam_search_one_clip
from conftest import m


def test_greedy_ctc_collapses_repeats_and_drops_blanks_within_each_clip():
    path = torch.tensor([[0, 3, 3, 0, 3, 4, 4, 0], [5, 5, 0, 6, 9, 9, 9, 9]])
    logits = torch.nn.functional.one_hot(path, 10).float()
    assert [ids for ids, _ in m.greedy_ctc(logits, torch.tensor([8, 4]), 0)] == [[3, 3, 4], [5, 6]]


def test_error_rates_count_units_without_word_boundaries_words_and_per_clip():
    vocab = m.Vocabulary.seed()
    space = vocab.space
    refs = [[1, 2, space, 3, 4], [5, 6, 7, 8]]
    hyps = [[1, 2, 3, 4], [5, 9, 7]]  # clip 1: only the boundary is missing; clip 2: 1 sub + 1 del
    rates = m.error_rates(refs, hyps, vocab)
    assert rates["cer"] == pytest.approx(2 / 8)
    assert rates["cer_mean_per_clip"] == pytest.approx((0 / 4 + 2 / 4) / 2)
    assert rates["wer"] == pytest.approx((2 + 1) / 3)  # "12 34" -> "1234": 1 sub + 1 del; "5678" -> "597": 1 sub
    assert rates["n"] == 2


def test_greedy_attention_stops_at_eos_and_matches_one_clip_at_a_time():
    torch.manual_seed(0)
    cfg = m.Config(preset="tiny")
    model = m.build_model(cfg, 30).eval()
    x, lengths = torch.randn(3, 14, 88, 88), torch.tensor([14, 9, 11])
    with torch.no_grad():
        enc, mask = model.encode(x, lengths)
        together = m.greedy_attention(model, enc, mask, lengths, 29)
        for b in range(3):
            n = int(lengths[b])
            alone_enc, alone_mask = model.encode(x[b:b + 1, :n], lengths[b:b + 1])
            [(ids, score)] = m.greedy_attention(model, alone_enc, alone_mask, lengths[b:b + 1], 29)
            assert ids == together[b][0] and score == pytest.approx(together[b][1], abs=1e-4)
    assert all(29 not in hyp and len(hyp) <= n for (hyp, _), n in zip(together, lengths.tolist()))


def test_wer_is_not_reported_without_word_boundaries():
    vocab = m.Vocabulary.seed()
    rates = m.error_rates([[1, 2, 3]], [[1, 2]], vocab)
    assert rates["wer"] is None and rates["cer"] == pytest.approx(1 / 3)


# Beam search -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips():
    """Frames of four clips of different lengths, padded into one batch."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([18, 11, 15, 8])
    return torch.randn(4, 18, 44, 44, generator=g), lengths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fitted to 4 built-in clips (60 steps): peaked outputs and hypotheses that end by
    themselves, unlike an untrained model's."""
    torch.manual_seed(0)
    cfg = m.Config(preset="tiny", input_size=44, synthetic_clips=8, lr=3e-3, warmup_epochs=0, ctc_weight=0.3,
                   work_dir=str(tmp_path_factory.mktemp("work")))
    vocab = m.load_vocabulary(cfg)
    ds = m.load_dataset(cfg, vocab, torch.device("cpu"))
    model = m.build_model(cfg, vocab.size)
    optimizer, scheduler = m.make_optimizer(model, cfg, 1000)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, lengths, targets = m.training_batch(ds, [0, 1, 2, 3], m.Augment(cfg, training=False), torch.device("cpu"))
    model.train()
    for _ in range(60):
        m.backward_pass(m.Objective(model, vocab, cfg), x, lengths, targets, cfg, torch.device("cpu"), scaler)
        m.optimizer_step(model, optimizer, scheduler, scaler, cfg)
    model.eval()
    with torch.no_grad():
        hyps = [ids for ids, _ in m.greedy_ctc(model.ctc(model.encode(x, lengths)[0]), lengths, vocab.blank)]
    assert m.error_rates(targets, hyps, vocab)["cer"] < 0.3  # it did learn
    return model, x, lengths


def untrained_model():
    torch.manual_seed(2)
    return m.build_model(m.Config(preset="tiny", input_size=44), m.Vocabulary.seed().size).eval()


def searched(model, x, lengths, **settings):
    vocab = m.Vocabulary.seed()
    cfg = m.Config(preset="tiny", input_size=44, **settings)
    with torch.no_grad():
        enc, mask = model.encode(x, lengths)
        return m.beam_search_batch(model, enc, mask, lengths, vocab, cfg)


def reference(model, x, lengths, beam, ctc_weight, **settings):
    vocab, out = m.Vocabulary.seed(), []
    with torch.no_grad():
        for b, n in enumerate(lengths.tolist()):
            enc, _ = model.encode(x[b:b + 1, :n], lengths[b:b + 1])  # the clip alone, as Auto-AVSR decodes
            out.append(beam_search_one_clip(model, enc, beam, ctc_weight, vocab.sos_eos, vocab.blank, **settings))
    return out


@pytest.mark.parametrize("which", ["untrained", "trained"])
@pytest.mark.parametrize("beam", [1, 3, 10])
def test_batched_search_gives_the_one_clip_reference_best_hypothesis_and_score(which, beam, clips, trained):
    model, x, lengths = (untrained_model(), *clips) if which == "untrained" else trained
    eos = m.Vocabulary.seed().sos_eos
    for w in (0.0, 0.1, 0.3, 0.5, 1.0):
        got = searched(model, x, lengths, beam_size=beam, beam_ctc_weight=w)
        for b, ended in enumerate(reference(model, x, lengths, beam, w)):
            best = ended[0]
            assert got[b][0][0] == [t for t in best["yseq"][1:] if t != eos], (which, beam, w, b)
            assert got[b][0][1] == pytest.approx(best["score"], abs=1e-4), (which, beam, w, b)


def perturbed(model, seed: int, scale: float = 0.05):
    """A copy of the model, every weight moved a little: another model that agrees with it in part."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other.eval()


def test_an_ensemble_averages_its_models_probabilities_per_frame_and_per_step(trained):
    model, x, lengths = trained
    models = [model, perturbed(model, 1), untrained_model()]
    ensemble = m.Ensemble(models).eval()
    with torch.no_grad():
        enc, mask = ensemble.encode(x, lengths)
        alone = [mm.encode(x, lengths)[0] for mm in models]
        mean = lambda lps: torch.stack([lp.exp() for lp in lps]).mean(0).log()
        ctc = mean([mm.ctc(e).log_softmax(-1) for mm, e in zip(models, alone)])
        assert torch.allclose(ensemble.ctc(enc), ctc, atol=1e-5)
        ys = torch.tensor([[m.Vocabulary.seed().sos_eos, 5, 9, 12]] * len(lengths))
        dec = mean([mm.decoder(ys, e, mask).log_softmax(-1) for mm, e in zip(models, alone)])
        assert torch.allclose(ensemble.decoder(ys, enc, mask), dec, atol=1e-5)
        cache = ensemble.decoder.start(enc, mask, len(lengths), 8)
        steps = [ensemble.decoder.step(ys[:, k], k, cache) for k in range(ys.size(1))]
        assert torch.allclose(torch.stack(steps, 1), dec, atol=1e-4)  # step by step as on whole prefixes


@pytest.mark.parametrize("beam", [1, 4])
def test_the_batched_search_of_an_ensemble_gives_the_one_clip_reference_clip_for_clip(beam, trained):
    model, x, lengths = trained
    ensemble = m.Ensemble([model, perturbed(model, 1), perturbed(model, 2, 0.1)]).eval()
    eos, differs = m.Vocabulary.seed().sos_eos, 0
    for w in (0.0, 0.3, 1.0):
        got, alone = searched(ensemble, x, lengths, beam_size=beam, beam_ctc_weight=w), searched(model, x, lengths,
                                                                                            beam_size=beam, beam_ctc_weight=w)
        for b, ended in enumerate(reference(ensemble, x, lengths, beam, w)):
            best = ended[0]
            assert got[b][0][0] == [t for t in best["yseq"][1:] if t != eos], (beam, w, b)
            assert got[b][0][1] == pytest.approx(best["score"], abs=1e-4), (beam, w, b)
            differs += got[b][0][1] != pytest.approx(alone[b][0][1], abs=1e-3)
    assert differs  # the ensemble is not its first model


FAST = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "24", "--max-frames", "400", "--epochs", "1"]


def test_test_decode_and_serve_read_an_ensemble_and_refuse_models_that_do_not_match(tmp_path, capsys):
    runs = {}
    for name, extra in (("a", []), ("b", ["--lr", "3e-3"]), ("letters", ["--units", "letters"]),
                        ("small", ["--input-size", "40"]), ("other_split", ["--split-seed", "9"])):
        runs[name] = tmp_path / name
        m.train(m.parse_config(FAST + extra + ["--work-dir", str(runs[name])]))
    read = lambda *flags: m.parse_config(FAST + ["--work-dir", str(runs["a"]), "--decoder", "beam", "--beam-size", "3",
                                                  *flags])
    alone = m.run_test(read())
    rows = (runs["a"] / "predictions.csv").read_text(encoding="utf-8")
    itself = m.run_test(read("--ensemble", str(runs["a"] / "checkpoints" / "best.pt")))  # the mean of one model twice
    assert itself["cer"] == alone["cer"] and (runs["a"] / "predictions.csv").read_text(encoding="utf-8") == rows
    both = m.run_test(read("--ensemble", str(runs["b"])))  # a run folder: its checkpoint as --checkpoint picks it
    assert f"ensemble: {runs['a'] / 'checkpoints'}" in capsys.readouterr().err and both["n"] == alone["n"]
    assert (runs["a"] / "predictions.csv").read_text(encoding="utf-8") != rows
    clips = tmp_path / "clips"
    m.write_synthetic_dataset(m.Config(output=str(clips), synthetic_clips=2, seed=4), m.Vocabulary.seed())
    decoded = m.run_decode(read("--mode", "decode", "--ensemble", str(runs["b"]), "--input", str(clips / "Preprocessed_Video")))
    assert [name for name, _ in decoded] == ["synth_00000", "synth_00001"]
    assert isinstance(m.LipReader(read("--ensemble", str(runs["b"]))).model, m.Ensemble)
    with pytest.raises(m.UserError, match=r"letters/checkpoints/best.pt reads \d+ units, .*a/checkpoints/best.pt reads "
                                          r"\d+: an ensemble's models must share their vocabulary"):
        m.run_decode(read("--mode", "decode", "--ensemble", str(runs["letters"]), "--input", str(clips)))
    with pytest.raises(m.UserError, match="was trained otherwise than .*: input_size 40 against 44. An ensemble's "
                                          "models must see the same input."):
        m.run_decode(read("--mode", "decode", "--ensemble", str(runs["small"]), "--input", str(clips)))
    m.run_decode(read("--mode", "decode", "--ensemble", str(runs["other_split"]), "--input", str(clips)))  # no split here
    with pytest.raises(m.UserError, match="split_seed 9 against 0. An ensemble's models must see the same input and "
                                          "hold out the same clips"):
        m.run_test(read("--ensemble", str(runs["other_split"])))
    with pytest.raises(m.UserError, match="--ensemble joins others to the run's model; --serve-model serves"):
        read("--ensemble", str(runs["b"]), "--serve-model", f"x={runs['b']}")


def language_model(kind):
    """An LSTM of random weights, or a 3-gram of random sentences: both have something to say."""
    vocab, g = m.Vocabulary.seed(), torch.Generator().manual_seed(3)
    if kind == "ngram":
        sentences = [torch.randint(1, vocab.size - 1, (int(n),), generator=g).tolist()
                     for n in torch.randint(3, 12, (40,), generator=g)]
        return m.NgramLM(m.ngram_tables(sentences, 3, vocab.size, vocab.sos_eos), 3, vocab.size, vocab.sos_eos)
    torch.manual_seed(3)
    return m.UnitLM(vocab.size, 32, 2, 0.0).eval()


@pytest.mark.parametrize("kind", ["lstm", "ngram"])
@pytest.mark.parametrize("beam", [1, 4])
def test_the_language_models_term_follows_the_reference(trained, beam, kind):
    """The batched search steps the language model once a token, its state following each row's parent; the
    reference reads every prefix whole. Both add L x log p_lm before the pre-beam, as ESPnet does."""
    model, x, lengths = trained
    lm, eos = language_model(kind), m.Vocabulary.seed().sos_eos
    vocab = m.Vocabulary.seed()
    for w, weight in ((0.3, 0.5), (1.0, 0.3), (0.0, 1.0)):
        cfg = m.Config(preset="tiny", input_size=44, beam_size=beam, beam_ctc_weight=w)
        with torch.no_grad():
            enc, mask = model.encode(x, lengths)
            got = m.beam_search_batch(model, enc, mask, lengths, vocab, cfg, m.LanguageModel(lm, weight, Path("lm.pt")))
            plain = m.beam_search_batch(model, enc, mask, lengths, vocab, cfg)
        for b, ended in enumerate(reference(model, x, lengths, beam, w, lm=lm, lm_weight=weight)):
            assert got[b][0][0] == [t for t in ended[0]["yseq"][1:] if t != eos], (beam, w, b)
            assert got[b][0][1] == pytest.approx(ended[0]["score"], abs=1e-4), (beam, w, b)
        assert [g[0][1] for g in got] != [p[0][1] for p in plain]  # the term counts


def kneser_ney_reference(sentences, order, vocab_size, sos, context, discount=0.75):
    """Interpolated Kneser-Ney counted the plain way, in dicts of tuples: p(. | context) over the vocabulary."""
    grams = m.Counter()
    for ids in sentences:
        seq = [sos] * (order - 1) + ids + [sos]
        grams.update(tuple(seq[i:i + order]) for i in range(len(seq) - order + 1))
    by_order = {}
    for n in range(order, 0, -1):
        by_order[n] = grams
        grams = m.Counter(gram[1:] for gram in grams)
    p = [1.0 / vocab_size] * vocab_size
    for n in range(1, order + 1):
        history = tuple(context[len(context) - n + 1:]) if n > 1 else ()
        follow = {g[-1]: c for g, c in by_order[n].items() if g[:-1] == history}
        if follow:
            total = sum(follow.values())
            p = [q * discount * len(follow) / total + max(follow.get(u, 0) - discount, 0) / total
                 for u, q in enumerate(p)]
    return p


def test_the_ngram_models_counted_tables_give_kneser_ney_as_counted_in_dicts_and_load_without_counting(
        tmp_path, monkeypatch):
    vocab, g = m.Vocabulary.seed(), torch.Generator().manual_seed(5)
    sentences = [torch.randint(1, 12, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (60,), generator=g)]
    for order in (1, 2, 4):
        lm = m.NgramLM(m.ngram_tables(sentences, order, vocab.size, vocab.sos_eos), order, vocab.size, vocab.sos_eos)
        contexts = [tuple(s[-order + 1:]) if order > 1 else () for s in sentences[:10]] + [(vocab.sos_eos,) * (order - 1)]
        for context in contexts + [(11, 200, 3)[:order - 1]]:
            context = ((vocab.sos_eos,) * order + context)[len(context) + 1:] if order > 1 else ()
            expected = kneser_ney_reference(sentences, order, vocab.size, vocab.sos_eos, context)
            assert lm.log_probs(context) == pytest.approx(np.log(expected), abs=1e-12), (order, context)
    path = tmp_path / "lm.pt"
    torch.save(m.lm_file(lm, m.Config(), vocab, 0, 9.0), path)
    monkeypatch.setattr(m, "ngram_tables", lambda *a: pytest.fail("counted again at load"))
    loaded, _ = m.read_lm(path, vocab)
    assert np.array_equal(loaded.log_probs((3, 1, 2)), lm.log_probs((3, 1, 2)))
    monkeypatch.undo()
    earlier = tmp_path / "earlier.pt"  # as versions before 2026-12-07 wrote it: the sentences, counted at load
    torch.save({"kind": "ngram", "sentences": sentences, "order": 4, "discount": 0.75, "vocab": vocab.to_json(),
                "val_perplexity": 9.0}, earlier)
    again, _ = m.read_lm(earlier, vocab)
    assert np.array_equal(again.log_probs((3, 1, 2)), lm.log_probs((3, 1, 2)))


def test_a_language_model_of_another_vocabulary_is_refused_with_both_sizes(tmp_path, monkeypatch):
    vocab = m.Vocabulary.seed()
    cfg = m.Config(lm_dim=32, lm_layers=1, lm_dropout=0.0)
    bigger = vocab.with_units(["zz"])
    lm = m.UnitLM(bigger.size, 32, 1, 0.0)
    torch.save(m.lm_file(lm, cfg, bigger, 1, 9.0), tmp_path / "lm.pt")
    with pytest.raises(m.UserError, match=f"trained over {bigger.size} units, this model reads {vocab.size}"):
        m.load_lm(m.Config(lm=str(tmp_path / "lm.pt")), vocab, torch.device("cpu"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(m.UserError, match="not a language model of --mode lm"):
        m.load_lm(m.Config(lm=str(tmp_path / "other.pt")), vocab, torch.device("cpu"))
    with pytest.raises(m.UserError, match="no such file. Looked in"):
        m.load_lm(m.Config(lm="nowhere_lm.pt", work_dir=str(tmp_path)), vocab, torch.device("cpu"))
    torch.save(m.lm_file(m.UnitLM(vocab.size, 32, 1, 0.0), cfg, vocab, 1, 9.0), tmp_path / "lm.pt")
    found = m.load_lm(m.Config(lm=str(tmp_path / "lm.pt")), vocab, torch.device("cpu"))
    assert found.weight == 0.1  # --lm without --lm-weight: the weight measured best
    attached = tmp_path / "kaggle_input" / "my-lm" / "lm.pt"  # on Kaggle, an attached dataset's file by name
    attached.parent.mkdir(parents=True)
    attached.write_bytes((tmp_path / "lm.pt").read_bytes())
    monkeypatch.setattr(m, "KAGGLE_INPUT", tmp_path / "kaggle_input")
    monkeypatch.chdir(tmp_path / "kaggle_input")
    assert m.load_lm(m.Config(lm="lm.pt", lm_weight=0.2, work_dir=str(tmp_path / "w")), vocab, "cpu").path == attached


def test_length_bonus_and_max_length_ratio_follow_the_reference(trained):
    model, x, lengths = trained
    eos = m.Vocabulary.seed().sos_eos
    for settings in ({"length_bonus": 2.0}, {"max_length_ratio": 0.3}):
        got = searched(model, x, lengths, beam_size=4, beam_ctc_weight=0.3, **settings)
        for b, ended in enumerate(reference(model, x, lengths, 4, 0.3, **settings)):
            assert got[b][0][0] == [t for t in ended[0]["yseq"][1:] if t != eos]
            assert got[b][0][1] == pytest.approx(ended[0]["score"], abs=1e-4)


def test_end_detection_needs_each_of_the_last_three_lengths_ended_far_below_the_best():
    """ESPnet's end_detect (M = 3, D = -10) on a clip's best ended score by length."""
    far = {5: -1.0, 8: -20.0, 9: -15.0, 10: -30.0}
    assert m.end_detected(far, 10)
    assert not m.end_detected({**far, 9: -5.0}, 10)  # length 9 came within 10 of the best
    assert not m.end_detected({k: v for k, v in far.items() if k != 8}, 10)  # nothing ended at length 8
    assert not m.end_detected(far, 11) and not m.end_detected({}, 10)


def test_a_finished_hypothesis_ctc_prefix_score_is_minus_its_ctc_loss(trained):
    """With CTC alone, a hypothesis that chose eos scores the sum of its CTC steps: log p_ctc(tokens | clip)."""
    model, x, lengths = trained
    vocab = m.Vocabulary.seed()
    nbest = searched(model, x, lengths, beam_size=5, beam_ctc_weight=1.0, nbest=5)
    with torch.no_grad():
        log_probs = model.ctc(model.encode(x, lengths)[0]).log_softmax(-1)
    checked = 0
    for b, hyps in enumerate(nbest):
        for ids, score in hyps:
            if not ids or len(ids) >= int(lengths[b]) - 1:  # empty or cut at the last step: not ended by eos
                continue
            loss = torch.nn.functional.ctc_loss(log_probs[b:b + 1, :lengths[b]].transpose(0, 1),
                                                torch.tensor([ids]), lengths[b:b + 1], torch.tensor([len(ids)]),
                                                blank=vocab.blank, reduction="sum")
            assert score == pytest.approx(-loss.item(), abs=1e-3)
            checked += 1
    assert checked >= 4


def test_nbest_lists_are_distinct_and_sorted_and_min_length_holds(trained):
    model, x, lengths = trained
    nbest = searched(model, x, lengths, beam_size=6, beam_ctc_weight=0.3, nbest=4)
    for hyps in nbest:
        assert 1 <= len(hyps) <= 4
        assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        assert len({tuple(ids) for ids, _ in hyps}) == len(hyps)
    longer = searched(model, x, lengths, beam_size=6, beam_ctc_weight=0.3, min_length_ratio=0.5)
    assert all(len(hyps[0][0]) >= int(0.5 * n) for hyps, n in zip(longer, lengths.tolist()))


def test_chunks_give_the_same_answers_as_one_search(trained, monkeypatch):
    model, x, lengths = trained
    vocab = m.Vocabulary.seed()
    cfg = m.Config(preset="tiny", input_size=44, beam_size=5, nbest=3)
    with torch.no_grad():
        enc, mask = model.encode(x, lengths)
        whole = m.decode(model, enc, mask, lengths, vocab, cfg)
        monkeypatch.setattr(m, "BEAM_MEMORY", 1)  # one clip a chunk
        assert m.beam_chunk_clips(model, cfg, vocab.size, enc.size(1)) == 1
        chunked = m.decode(model, enc, mask, lengths, vocab, cfg)
    assert [[ids for ids, _ in h] for h in chunked] == [[ids for ids, _ in h] for h in whole]
    assert [s for h in chunked for _, s in h] == pytest.approx([s for h in whole for _, s in h], abs=1e-4)
    lm = m.LanguageModel(language_model("lstm"), 0.3, Path("lm.pt"))  # with a language model, its state counts
    monkeypatch.setattr(m, "BEAM_MEMORY", 2 ** 30)
    plain = m.beam_chunk_clips(model, cfg, vocab.size, enc.size(1))
    assert m.beam_chunk_clips(model, cfg, vocab.size, enc.size(1), lm) < plain
    with torch.no_grad():
        whole = m.decode(model, enc, mask, lengths, vocab, cfg, lm)
        monkeypatch.setattr(m, "BEAM_MEMORY", 1)
        chunked = m.decode(model, enc, mask, lengths, vocab, cfg, lm)
    assert [[ids for ids, _ in h] for h in chunked] == [[ids for ids, _ in h] for h in whole]


def test_one_entry_point_for_every_decoder_and_a_ctc_search_for_the_baseline(trained):
    model, x, lengths = trained
    vocab = m.Vocabulary.seed()
    with torch.no_grad():
        enc, mask = model.encode(x, lengths)
        ctc = m.decode(model, enc, mask, lengths, vocab, m.Config(decoder="ctc"))
        att = m.decode(model, enc, mask, lengths, vocab, m.Config(decoder="attention"))
        assert ctc == [[h] for h in m.greedy_ctc(model.ctc(enc), lengths, vocab.blank)]
        assert att == [[h] for h in m.greedy_attention(model, enc, mask, lengths, vocab.sos_eos)]
        baseline = m.build_model(m.Config(arch="baseline", preset="tiny", input_size=44), vocab.size).eval()
        enc, mask = baseline.encode(x, lengths)
        beam = m.decode(baseline, enc, mask, lengths, vocab, m.Config(decoder="beam", beam_size=3))
    assert len(beam) == 4 and all(len(h) == 1 and vocab.blank not in h[0][0] for h in beam)
