"""Section 7: greedy decoding and the error rates, on cases worked out by hand."""
import pytest
import torch

from conftest import m


def test_greedy_ctc_collapses_repeats_and_drops_blanks_within_each_clip():
    path = torch.tensor([[0, 3, 3, 0, 3, 4, 4, 0], [5, 5, 0, 6, 9, 9, 9, 9]])
    logits = torch.nn.functional.one_hot(path, 10).float()
    assert m.greedy_ctc(logits, torch.tensor([8, 4]), 0) == [[3, 3, 4], [5, 6]]


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
            assert m.greedy_attention(model, alone_enc, alone_mask, lengths[b:b + 1], 29) == [together[b]]
    assert all(29 not in hyp and len(hyp) <= n for hyp, n in zip(together, lengths.tolist()))


def test_wer_is_not_reported_without_word_boundaries():
    vocab = m.Vocabulary.seed()
    rates = m.error_rates([[1, 2, 3]], [[1, 2]], vocab)
    assert rates["wer"] is None and rates["cer"] == pytest.approx(1 / 3)
