"""Section 5: Auto-AVSR's state_dict names and shapes, presets, padding invariance, incremental decoding,
loading released weights (--init-from) and exporting them (--mode export)."""
import argparse
import re
from pathlib import Path

import pytest
import torch

from conftest import m

PRESETS, padding_mask, relative_shift = m.PRESETS, m.padding_mask, m.relative_shift
REFERENCE = Path(__file__).with_name("auto_avsr_video_state_dict.tsv")  # copied from ../shared/reference
AUDIO_REFERENCE = Path(__file__).with_name("auto_avsr_audio_state_dict.tsv")
VOCAB_ROWS = {"decoder.embed.0.weight", "decoder.output_layer.weight", "decoder.output_layer.bias",
              "ctc.ctc_lo.weight", "ctc.ctc_lo.bias"}


def reference_shapes(tsv: Path = REFERENCE):
    rows = [line.split("\t") for line in tsv.read_text().splitlines() if not line.startswith("#")]
    return {key: tuple(int(n) for n in re.findall(r"\d+", shape)) for key, shape, _ in rows}


def build_model(arch, vocab_size, preset="tiny", modality="video"):
    return m.build_model(m.Config(arch=arch, preset=preset, modality=modality), vocab_size)


def meta_model(preset, vocab_size, modality="video"):
    with torch.device("meta"):
        return build_model("conformer", vocab_size, preset, modality)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tiny(vocab_size=40):
    torch.manual_seed(0)
    return build_model("conformer", vocab_size).eval()


def test_base_matches_auto_avsr_state_dict():
    ref = reference_shapes()
    assert len(ref) == 767
    assert shapes(meta_model("base", 5049)) == ref
    mine = shapes(meta_model("base", 123))
    assert mine.keys() == ref.keys()
    for key in ref:
        expected = tuple(123 if n == 5049 else n for n in ref[key]) if key in VOCAB_ROWS else ref[key]
        assert mine[key] == expected, key


def test_base_parameter_count():
    assert sum(p.numel() for p in meta_model("base", 5049).parameters()) == 250_383_410


def test_the_audio_model_matches_auto_avsr_audio_state_dict():
    ref = reference_shapes(AUDIO_REFERENCE)
    assert len(ref) == 767 and shapes(meta_model("base", 5049, "audio")) == ref
    assert sum(p.numel() for p in meta_model("base", 5049, "audio").parameters()) == 243_049_202


def test_the_audio_visual_model_is_both_encoders_fused_before_one_decoder():
    video, audio, av = (shapes(meta_model("base", 5049, k)) for k in ("video", "audio", "av"))
    branch = ("frontend.", "proj_encoder.", "encoder.")
    expected = dict(video) | {"aux_" + k: v for k, v in audio.items() if k.startswith(branch)}
    fusion = {k: v for k, v in av.items() if k.startswith("fusion.")}
    assert av == expected | fusion
    assert fusion["fusion.fc1.weight"] == (8192, 1536) and fusion["fusion.bn1.running_mean"] == (8192,)
    assert fusion["fusion.fc2.weight"] == (768, 8192)
    torch.manual_seed(0)
    model = build_model("conformer", 40, modality="av").eval()
    for frames in (1, 29, 38):  # 640 samples make one frame, whatever the length
        assert model.aux_frontend(torch.randn(2, frames * 640), torch.tensor([frames, 1])).shape == (2, frames, 64)
    lengths = torch.tensor([38, 29])
    video, sound = torch.randn(2, 38, 88, 88), torch.randn(2, 38 * 640)
    ctc, dec = model((video, sound), lengths, torch.zeros(2, 5, dtype=torch.long))
    assert ctc.shape == (2, 38, 40) and dec.shape == (2, 5, 40)
    enc, _ = model.encode((video, sound), lengths)  # both senses count: each one changes the result
    assert not torch.allclose(enc, model.encode((video, torch.zeros_like(sound)), lengths)[0])
    assert not torch.allclose(enc, model.encode((torch.zeros_like(video), sound), lengths)[0])


@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_presets_share_base_key_names(preset):
    def key_names(model):
        return {re.sub(r"(encoders|decoders)\.\d+\.", r"\1.N.", k) for k in model.state_dict()}
    assert key_names(meta_model(preset, 50)) == key_names(meta_model("base", 50))


def test_relative_shift_indexes_offset_i_minus_j():
    T = 5
    positions = torch.arange(T - 1, -T, -1).float()  # column k of the scores is position T-1-k
    out = relative_shift(positions.expand(2, 3, T, 2 * T - 1))
    i = torch.arange(T)
    assert torch.equal(out, (i[:, None] - i[None, :]).float().expand(2, 3, T, T))


def test_tiny_forward_shapes():
    model = tiny()
    video, lengths = torch.randn(2, 12, 1, 88, 88), torch.tensor([12, 9])
    ys_in = torch.randint(0, 40, (2, 6))
    ctc_logits, dec_logits = model(video, lengths, ys_in)
    assert ctc_logits.shape == (2, 12, 40) and dec_logits.shape == (2, 6, 40)
    enc, mask = model.encode(video.squeeze(2), lengths)  # B x T x H x W works too
    assert enc.shape == (2, 12, 64) and mask.tolist()[1] == [True] * 9 + [False] * 3


def test_tiny_trains_one_step():
    model = tiny().train()
    ctc_logits, dec_logits = model(torch.randn(2, 6, 1, 88, 88), torch.tensor([6, 4]), torch.randint(0, 40, (2, 3)))
    (ctc_logits.mean() + dec_logits.mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_baseline_forward_shapes():
    model = build_model("baseline", 30).eval()
    ctc_logits, dec_logits = model(torch.randn(2, 10, 1, 88, 88), torch.tensor([10, 7]))
    assert ctc_logits.shape == (2, 10, 30) and dec_logits is None and model.decoder is None


@pytest.mark.parametrize("arch", ["conformer", "baseline"])
def test_clip_alone_equals_clip_in_padded_batch(arch):
    torch.manual_seed(0)
    model = tiny() if arch == "conformer" else build_model("baseline", 40).eval()
    clip, other = torch.randn(1, 7, 1, 88, 88), torch.randn(1, 11, 1, 88, 88)
    batch = torch.cat([torch.cat([clip, torch.randn(1, 4, 1, 88, 88)], dim=1), other])  # padding is noise
    lengths = torch.tensor([7, 11])
    ys_in = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        enc_alone, _ = model.encode(clip, torch.tensor([7]))
        enc_batch, _ = model.encode(batch, lengths)
        assert torch.allclose(enc_alone[0], enc_batch[0, :7], atol=1e-5)
        if arch == "conformer":
            ctc_alone, dec_alone = model(clip, torch.tensor([7]), ys_in[:1])
            ctc_batch, dec_batch = model(batch, lengths, ys_in)
            assert torch.allclose(ctc_alone[0], ctc_batch[0, :7], atol=1e-5)
            assert torch.allclose(dec_alone[0], dec_batch[0], atol=1e-5)


@pytest.mark.parametrize("modality", ["audio", "av"])
def test_sound_alone_equals_sound_in_padded_batch(modality):
    """The sound frontend's convolutions look across time at every stage: a clip's last frames would see its
    batch's padding (noise here) were it not zeroed before each of them."""
    torch.manual_seed(0)
    model = build_model("conformer", 40, modality=modality).eval()
    per_frame = m.SAMPLES_PER_FRAME
    wave, other = torch.randn(1, 7 * per_frame), torch.randn(1, 11 * per_frame)
    waves = torch.cat([torch.cat([wave, torch.randn(1, 4 * per_frame)], dim=1), other])
    video, videos = torch.randn(1, 7, 1, 88, 88), torch.randn(2, 11, 1, 88, 88)
    videos[0, :7] = video[0]
    alone, batch = (wave, waves) if modality == "audio" else ((video, wave), (videos, waves))
    with torch.no_grad():
        enc_alone, _ = model.encode(alone, torch.tensor([7]))
        enc_batch, _ = model.encode(batch, torch.tensor([7, 11]))
    assert torch.allclose(enc_alone[0], enc_batch[0, :7], atol=1e-5)


def test_incremental_decoding_equals_full_recomputation():
    """Stepwise decoding (keys and values cached, the encoder output projected once per clip and shared by
    the clip's rows) gives what the whole prefix gives, for several rows per clip."""
    decoder = tiny().decoder
    memory, memory_mask = torch.randn(3, 10, 64), padding_mask(torch.tensor([10, 6, 8]), 10)
    tokens = torch.randint(0, 40, (6, 7))  # two rows per clip
    with torch.no_grad():
        full = decoder(tokens, memory.repeat_interleave(2, 0), memory_mask.repeat_interleave(2, 0)).log_softmax(-1)
        cache = decoder.start(memory, memory_mask, 6, tokens.size(1))
        for i in range(tokens.size(1)):
            log_probs = decoder.step(tokens[:, i], i, cache)
            assert (cache.rows, cache.length) == (6, i + 1)
            assert torch.allclose(log_probs, full[:, i], atol=1e-5)


def test_incremental_decoding_follows_the_beam_as_it_reorders():
    """As the beam search drives it: only live rows computed (one a clip at the first step, a freed slot
    later), rows that go on from other rows' prefixes (placed where their past is, or given a copy of it), a
    finished clip dropped. Each computed row gets what the whole prefix gives."""
    decoder = tiny().decoder
    memory, memory_mask = torch.randn(3, 10, 64), padding_mask(torch.tensor([10, 6, 8]), 10)
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, 40, (6, 1), generator=g)
    clips = torch.arange(3)
    with torch.no_grad():
        cache = decoder.start(memory, memory_mask, 6, 6)
        beams = m.Beams(torch.randn(3, 40, 10, generator=g).log_softmax(1), torch.tensor([10, 6, 8]), 2, 0, 0, cache)
        for i in range(6):
            n = len(clips)
            live = torch.ones(2 * n, dtype=torch.bool)
            if i == 0:
                live[1::2] = False  # one hypothesis a clip
            if i == 2:
                live[1] = False  # a slot freed by a hypothesis that ended
            rows = live.nonzero().flatten()
            beams.continue_from(rows)
            place = beams.place(rows)
            assert sorted(place.tolist()) == list(range(len(rows)))
            log_probs = decoder.step(history[beams.where, -1], i, cache, beams.where, 2 * n)
            full = decoder(history, memory[clips].repeat_interleave(2, 0), memory_mask[clips].repeat_interleave(2, 0))
            assert torch.allclose(log_probs, full[beams.where, -1].log_softmax(-1), atol=1e-5)
            cached = torch.zeros(2 * n, dtype=torch.long).index_copy_(0, rows, place)
            own_clip = [rows[rows // 2 == r // 2] for r in range(2 * n)]  # each row goes on from a live row of its clip
            parents = torch.stack([c[torch.randint(0, len(c), (1,), generator=g)][0] for c in own_clip])
            beams.continue_from(cached[parents])
            history = torch.cat([history[parents], torch.randint(0, 40, (2 * n, 1), generator=g)], 1)
            if i == 3:  # the middle clip ends
                kept = torch.tensor([True, False, True])
                beams.keep(kept)
                clips, history = clips[kept], history[kept.repeat_interleave(2)]
        assert cache.rows == 4


def test_the_baseline_takes_dropout_from_the_settings():
    model = m.build_model(m.Config(arch="baseline", dropout=0.25), 30)
    assert model.lstm.dropout == 0.25
    assert [layer.p for layer in model.cnn if isinstance(layer, torch.nn.Dropout)] == [0.25]


def test_the_baseline_takes_the_reduced_input_size_too():
    model = build_model("baseline", 30).eval()
    ctc_logits, _ = model(torch.randn(2, 10, 44, 44), torch.tensor([10, 7]))
    assert ctc_logits.shape == (2, 10, 30)


def test_the_noise_frontend_is_fixed_by_each_frame_yet_blind_to_what_it_shows():
    frontend = m.NoiseFrontend(8, 16)
    video = torch.randn(2, 5, 8, 8)
    features = frontend(video)
    assert features.shape == (2, 5, 16) and not list(frontend.parameters())
    assert torch.equal(frontend(video[1:]), features[1:])  # the same frames give the same features in any batch
    nudged = frontend(video + 1e-3 * torch.randn_like(video))  # frames that look the same...
    assert abs(torch.corrcoef(torch.stack([features.flatten(), nudged.flatten()]))[0, 1]) < 0.2  # ...unrelated


def test_the_linear_frontend_and_frozen_parts_in_training_mode():
    model = m.build_model(m.Config(preset="tiny", input_size=44, frontend="linear", freeze="frontend"), 230)
    assert model.frontend.proj.in_features == 44 * 44
    enc, mask = model.encode(torch.randn(2, 6, 44, 44), torch.tensor([6, 4]))
    assert enc.shape == (2, 6, 64)
    cnn = m.build_model(m.Config(preset="tiny"), 230)
    m.set_frozen(cnn, ["frontend", "encoder"])
    m.train_mode(cnn)
    assert cnn.decoder.training and not cnn.frontend.frontend3D[1].training and not cnn.encoder.training
    assert not any(p.requires_grad for p in [*cnn.frontend.parameters(), *cnn.encoder.parameters()])
    assert all(p.requires_grad for p in cnn.decoder.parameters())
    with pytest.raises(m.UserError, match="the baseline has its own CNN"):
        m.build_model(m.Config(arch="baseline", frontend="noise"), 230)


# Released weights ------------------------------------------------------------------------------------------

def reference_checkpoint(path: Path, layout: str, tsv: Path = REFERENCE) -> dict[str, float]:
    """A checkpoint with every key and shape of an Auto-AVSR state_dict listing, each weight filled with its own
    number (stored as one value broadcast, so the 250M-value file takes kilobytes), in one of the three layouts
    Auto-AVSR's files come in. -> the number of each key, under today's names."""
    rows = [line.split("\t") for line in tsv.read_text().splitlines() if not line.startswith("#")]
    numbers, state = {}, {}
    for i, (key, shape, dtype) in enumerate(rows, 1):
        shape = tuple(int(n) for n in re.findall(r"\d+", shape))
        state[key] = (torch.tensor(i) if "int64" in dtype else torch.tensor(i / 1000)).expand(shape)
        numbers[key] = state[key].flatten()[0].item() if state[key].numel() else None
    if layout == "pre-2025":
        state = {re.sub(r"^frontend\.", "encoder.frontend.", re.sub(r"^proj_encoder\.", "encoder.embed.0.", k)): v
                 for k, v in state.items()}
    if layout == "lightning":  # the ModelModule's weights, and the Python objects Lightning keeps beside them
        state = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 74,
                 "hyper_parameters": {"args": argparse.Namespace(modality="video", ctc_weight=0.1)}}
    torch.save(state, path)
    return numbers


@pytest.fixture(scope="module")
def base_model():
    return m.build_model(m.Config(preset="base"), 230)  # initialised: tests check that what is not loaded keeps it


@pytest.mark.parametrize("layout", ["plain", "lightning", "pre-2025"])
def test_auto_avsr_weights_load_into_base_in_each_layout(layout, base_model, tmp_path, capsys):
    """By default every part loads that does not depend on the vocabulary: the decoder's blocks too."""
    path = tmp_path / f"vsr_{layout}.pth"
    numbers = reference_checkpoint(path, layout)
    before = {k: v.clone() for k, v in base_model.state_dict().items() if k in VOCAB_ROWS}
    cfg = m.Config(preset="base", init_from=str(path), work_dir=str(tmp_path / "w"))
    report = m.load_pretrained(base_model, cfg)["init_from"]
    transferable = [k for k in numbers if k not in VOCAB_ROWS]
    assert sum(report["loaded"].values()) == len(transferable) == 762
    assert report["loaded"] == {"frontend": 120, "proj_encoder": 2, "encoder": 482, "decoder": 158}
    assert report["skipped"] == {"vocabulary-sized: 5049 units there, 230 here": [k for k in numbers if k in VOCAB_ROWS]}
    assert report["missing"] == []
    assert ("Lightning" in report["kind"]) == (layout == "lightning")
    assert ("pre-2025" in report["kind"]) == (layout == "pre-2025")
    state = base_model.state_dict()
    for key in transferable:  # every weight landed under its own name, all of it
        assert torch.all(state[key] == numbers[key]), key
    assert all(torch.equal(state[k], v) for k, v in before.items())  # the vocabulary's side starts afresh
    out = capsys.readouterr().out
    assert "762 weights loaded (frontend 120, proj_encoder 2, encoder 482, decoder 158; 238,768,480 values)" in out
    assert "skipped 5, vocabulary-sized" in out and "missing: none" in out
    assert report["objects"] == (["argparse.Namespace"] if layout == "lightning" else [])
    assert ("not built: the Python objects the file names beside its weights (argparse.Namespace)" in out) == (
        layout == "lightning")
    written = (tmp_path / "w" / "diagnostics" / "init_from.txt").read_text(encoding="utf-8")
    assert "skipped (vocabulary-sized: 5049 units there, 230 here): ctc.ctc_lo.weight" in written


def test_init_parts_chooses_what_loads(base_model, tmp_path):
    path = tmp_path / "vsr.pth"
    numbers = reference_checkpoint(path, "plain")
    cfg = m.Config(preset="base", init_from=str(path), init_parts="frontend,proj_encoder,encoder",
                   work_dir=str(tmp_path / "w"))
    report = m.load_pretrained(base_model, cfg)["init_from"]
    assert report["loaded"] == {"frontend": 120, "proj_encoder": 2, "encoder": 482} and report["missing"] == []
    assert report["skipped"] == {"not among the parts loaded (frontend, proj_encoder, encoder)":
                                 [k for k in numbers if k.startswith(("decoder.", "ctc."))]}


def test_weights_that_cannot_load_say_why(tmp_path):
    small = m.Config(preset="small", work_dir=str(tmp_path / "w"))
    model = m.build_model(small, 230)
    reference_checkpoint(tmp_path / "vsr.pth", "plain")
    with pytest.raises(m.UserError, match=r"does not fit --preset small: \d+ weights differ in shape, e\.g\. "
                                          r"frontend\.trunk\.layer1\.0\.conv1\.weight: \(64, 64, 3, 3\) there, "
                                          r"\(32, 32, 3, 3\) here\. Its shapes are those of --preset base"):
        m.load_pretrained(model, m.dataclasses.replace(small, init_from=str(tmp_path / "vsr.pth")))
    audio = Path(__file__).with_name("auto_avsr_audio_state_dict.tsv")
    reference_checkpoint(tmp_path / "asr.pth", "plain", audio)
    with pytest.raises(m.UserError, match="It is an audio model: train with --modality audio, give it to --init-from-audio"):
        m.load_pretrained(m.build_model(m.Config(preset="base"), 230),
                          m.Config(preset="base", init_from=str(tmp_path / "asr.pth")))
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "other.pth")
    with pytest.raises(m.UserError, match="holds dict, not a model's weights .*huggingface.co/tiiuae/visper"):
        m.load_pretrained(model, m.dataclasses.replace(small, init_from=str(tmp_path / "other.pth")))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(m.UserError, match="cannot read it as a PyTorch checkpoint"):
        m.load_pretrained(model, m.dataclasses.replace(small, init_from=str(tmp_path / "notes.pth")))
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pth")
    with pytest.raises(m.UserError, match=r"none of its 1 weights \(e\.g\. linear\.weight\) is one of this model.s parts"):
        m.load_pretrained(model, m.dataclasses.replace(small, init_from=str(tmp_path / "foreign.pth")))
    with pytest.raises(m.UserError, match=r"no such file\. Looked in:(.|\n)*visper_vsr_base\.pth for video"):
        m.load_pretrained(model, m.dataclasses.replace(small, init_from="vsr_trlrs3_base.pth"))
    with pytest.raises(m.UserError, match="fit --arch conformer"):
        m.load_pretrained(m.build_model(m.Config(arch="baseline"), 230),
                          m.Config(arch="baseline", init_parts="cnn", init_from=str(tmp_path / "vsr.pth")))


def test_audio_and_audio_visual_models_load_their_own_kind_of_weights(tmp_path):
    cfg = m.Config(preset="base", modality="audio", work_dir=str(tmp_path / "w"))
    numbers = reference_checkpoint(tmp_path / "asr.pth", "plain", AUDIO_REFERENCE)
    audio = m.build_model(cfg, 230)
    report = m.load_pretrained(audio, m.dataclasses.replace(cfg, init_from=str(tmp_path / "asr.pth")))["init_from"]
    assert report["missing"] == [] and report["loaded"]["frontend"] == len([k for k in numbers if k.startswith("frontend.")])
    assert torch.all(audio.frontend.trunk.conv1.weight == numbers["frontend.trunk.conv1.weight"])
    reference_checkpoint(tmp_path / "vsr.pth", "plain")
    with pytest.raises(m.UserError, match="It is a video model: train with --modality video or av"):
        m.load_pretrained(audio, m.dataclasses.replace(cfg, init_from=str(tmp_path / "vsr.pth")))
    # Auto-AVSR v1.0.0 names an audio-visual model's video side encoder.*, its sound side aux_encoder.*
    small = m.Config(preset="tiny", modality="av", work_dir=str(tmp_path / "w"))
    torch.manual_seed(1)
    trained = m.build_model(small, 40).state_dict()
    old = {re.sub(r"^(aux_)?frontend\.", r"\1encoder.frontend.", re.sub(r"^(aux_)?proj_encoder\.", r"\1encoder.embed.0.",
                                                                      k)): v for k, v in trained.items()}
    assert "aux_encoder.frontend.trunk.conv1.weight" in old and "encoder.embed.0.weight" in old
    torch.save(old, tmp_path / "avsr_v1.pth")
    torch.manual_seed(2)
    fresh = m.build_model(small, 40)
    report = m.load_pretrained(fresh, m.dataclasses.replace(small, init_from=str(tmp_path / "avsr_v1.pth")))
    report = report["init_from"]  # the default takes every part, the sound side and the fusion too
    assert sum(report["loaded"].values()) == len(trained) and not report["skipped"] and not report["missing"]
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


VISPER = Path(__file__).with_name("visper_video_state_dict.tsv")  # see the files' heads for how they were made
VISPER_AV = Path(__file__).with_name("visper_av_state_dict.tsv")


def todays_name(key):
    return re.sub(r"^(aux_)?encoder\.frontend\.", r"\1frontend.", re.sub(r"^(aux_)?encoder\.embed\.0\.", r"\1proj_encoder.", key))


def test_visper_layouts_are_the_base_models_under_pre_2025_names():
    video, av = reference_shapes(VISPER), reference_shapes(VISPER_AV)
    assert len(video) == 767 and len(av) == 1380
    assert {todays_name(k): v for k, v in video.items()} == shapes(meta_model("base", 21460))
    assert {todays_name(k): v for k, v in av.items()} == shapes(meta_model("base", 21460, "av"))


def test_visper_weights_load_as_lightning_checkpoints_too(base_model, tmp_path, capsys):
    """ViSpeR's ModelModule keeps its search beside the model: a second copy of the decoder, under beam_search."""
    path = tmp_path / "visper_vsr_base.ckpt"
    numbers = {todays_name(k): v for k, v in reference_checkpoint(path, "lightning", VISPER).items()}
    checkpoint = torch.load(path, weights_only=False)
    search = {f"beam_search.nn_dict.decoder.{k.removeprefix('model.decoder.')}": v
              for k, v in checkpoint["state_dict"].items() if k.startswith("model.decoder.")}
    checkpoint["state_dict"] |= search
    torch.save(checkpoint, path)
    report = m.load_pretrained(base_model, m.Config(preset="base", init_from=str(path),
                                                    work_dir=str(tmp_path / "w")))["init_from"]
    assert report["kind"] == "Lightning checkpoint with pre-2025 names" and report["missing"] == []
    assert report["loaded"] == {"frontend": 120, "proj_encoder": 2, "encoder": 482, "decoder": 158}
    assert report["skipped"] == {
        "the Lightning module's beam search: a second copy of its decoder": list(search),
        "vocabulary-sized: 21460 units there, 230 here": [k for k in numbers if k in VOCAB_ROWS]}
    state = base_model.state_dict()
    assert all(torch.all(state[k] == numbers[k]) for k in numbers if k not in VOCAB_ROWS)
    assert "skipped 161, the Lightning module's beam search" in capsys.readouterr().out


def test_visper_audio_visual_weights_fill_an_av_model_and_only_the_video_side_of_a_video_one(base_model, tmp_path):
    path = tmp_path / "visper_avsr_base.pth"
    numbers = {todays_name(k): v for k, v in reference_checkpoint(path, "plain", VISPER_AV).items()}
    report = m.load_pretrained(base_model, m.Config(preset="base", init_from=str(path),
                                                    work_dir=str(tmp_path / "w")))["init_from"]
    sound = [k for k in numbers if k.startswith(("aux_", "fusion."))]
    assert report["skipped"]["the sound side of an audio-visual model (--modality av uses it)"] == sound
    assert report["loaded"] == {"frontend": 120, "proj_encoder": 2, "encoder": 482, "decoder": 158}
    cfg = m.Config(preset="base", modality="av", init_from=str(path), work_dir=str(tmp_path / "w"))
    with torch.device("meta"):  # memory without a random start: 481M values need no initialising to be loaded into
        av = m.build_model(cfg, 230)
    av = av.to_empty(device="cpu")
    report = m.load_pretrained(av, cfg)["init_from"]
    assert report["loaded"] == {"frontend": 120, "proj_encoder": 2, "encoder": 482, "aux_frontend": 120,
                                "aux_proj_encoder": 2, "aux_encoder": 482, "fusion": 9, "decoder": 158}
    assert list(report["skipped"]) == ["vocabulary-sized: 21460 units there, 230 here"] and report["missing"] == []
    assert torch.all(av.fusion.bn1.running_var == numbers["fusion.bn1.running_var"])
    assert torch.all(av.aux_encoder.encoders[11].conv_module.depthwise_conv.weight ==
                     numbers["aux_encoder.encoders.11.conv_module.depthwise_conv.weight"])


def test_an_av_model_takes_its_sound_side_from_an_audio_models_file(tmp_path):
    audio_cfg = m.Config(preset="tiny", modality="audio")
    torch.manual_seed(1)
    heard = m.build_model(audio_cfg, 40).state_dict()
    torch.save(heard, tmp_path / "asr.pth")
    torch.manual_seed(2)
    seen = m.build_model(m.Config(preset="tiny"), 40).state_dict()
    torch.save(seen, tmp_path / "vsr.pth")
    cfg = m.validate(m.Config(preset="tiny", modality="av", init_from=str(tmp_path / "vsr.pth"),
                              init_from_audio=str(tmp_path / "asr.pth"), work_dir=str(tmp_path / "w")))
    av = m.build_model(cfg, 40)
    reports = m.load_pretrained(av, cfg)
    state = av.state_dict()
    assert all(torch.equal(state[k], v) for k, v in seen.items())
    assert all(torch.equal(state["aux_" + k], v) for k, v in heard.items() if k.startswith(("frontend", "proj_", "encoder")))
    assert reports["init_from"]["missing"] == [k for k in state if k.startswith(("aux_", "fusion"))]
    audio = reports["init_from_audio"]
    assert audio["loaded"] == {"aux_frontend": 120, "aux_proj_encoder": 2, "aux_encoder": 82} and not audio["missing"]
    assert list(audio["skipped"]) == ["not among the parts loaded (aux_frontend, aux_proj_encoder, aux_encoder)"]
    assert "--init-from-audio" in (tmp_path / "w" / "diagnostics" / "init_from_audio.txt").read_text(encoding="utf-8")
    with pytest.raises(m.UserError, match="--init-from-audio fills an audio-visual model's sound side"):
        m.validate(m.dataclasses.replace(cfg, modality="video"))


@pytest.mark.parametrize("modality,encoder", [("video", "conformer"), ("av", "conformer"), ("video", "mstcn"),
                                              ("video", "dctcn")])
def test_export_writes_weights_both_ways_and_an_onnx_encoder(tmp_path, capsys, modality, encoder):
    import onnxruntime
    work = tmp_path / "run"
    cfg = m.Config(preset="tiny", input_size=44, synthetic_clips=24, max_frames=300, epochs=1, decoder="ctc",
                   diagnostics=False, work_dir=str(work), modality=modality, encoder=encoder)
    m.train(cfg)
    files = m.run_export(m.dataclasses.replace(cfg, mode="export"))
    model, vocab, _ = m.model_from_checkpoint(work / "checkpoints" / "best.pt", cfg, torch.device("cpu"))
    # the state dict: plain tensors under Auto-AVSR's names, loading strictly into a fresh model
    weights = torch.load(files["state_dict"], weights_only=True)
    assert weights.keys() == model.state_dict().keys()
    fresh = m.build_model(cfg, m.Vocabulary.load(Path(files["vocab"])).size)
    fresh.load_state_dict(weights)
    named = {"video": torch.randn(3, 41, 44, 44), "audio": torch.randn(3, 41 * 640),
             "lengths": torch.tensor([41, 17, 30])}  # not the shapes it was traced with
    inputs = {k: named[k] for k in m.export_inputs(cfg)}
    expected = m.EncoderForExport(model)(*inputs.values())
    assert all(torch.equal(a, b) for a, b in zip(m.EncoderForExport(fresh.eval())(*inputs.values()), expected))
    # the ONNX encoder gives the same outputs at another batch size and length
    session = onnxruntime.InferenceSession(files["onnx"])
    names = [o.name for o in session.get_outputs()]
    assert [i.name for i in session.get_inputs()] == list(inputs) == (["video", "audio", "lengths"] if modality == "av"
                                                                       else ["video", "lengths"])
    outputs = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert names == ["encoder_out", "ctc_log_probs"]
    for got, want in zip(outputs, expected):
        assert got.shape == tuple(want.shape)
        assert abs(got - want.detach().numpy()).max() < 1e-4
    # and --init-from takes the export back, every weight of it
    report = m.load_pretrained(m.build_model(cfg, vocab.size), m.dataclasses.replace(
        cfg, init_from=files["state_dict"]))["init_from"]
    assert sum(report["loaded"].values()) == len(weights) and not report["skipped"] and not report["missing"]
    assert "encoder_out, ctc_log_probs" in capsys.readouterr().out


# The team's three encoders (Essa-Ramzy/Arabic-Lip-Reading) and their checkpoints ---------------------------

TEAM = {(encoder, units): Path(__file__).with_name(f"team_{encoder}_{'dia' if units == 'diacritized' else 'nodia'}"
                                                   "_state_dict.tsv")
        for encoder in ("conformer", "mstcn", "dctcn") for units in ("diacritized", "letters")}


def team_model(encoder, units, device="meta"):
    cfg = m.Config(preset="base", encoder=encoder, units=units)
    with torch.device(device):
        return m.build_model(cfg, m.load_vocabulary(cfg).size)


@pytest.mark.parametrize("encoder,units", list(TEAM))
def test_the_base_model_with_each_encoder_has_the_team_models_names_and_shapes(encoder, units):
    theirs = {k.replace("frontend.resnet_trunk.", "frontend.trunk."): v for k, v in reference_shapes(TEAM[encoder, units]).items()}
    assert shapes(team_model(encoder, units)) == theirs


@pytest.mark.parametrize("encoder", ["mstcn", "dctcn"])
def test_a_tcn_encodes_a_clip_alike_alone_and_in_a_padded_batch(encoder):
    torch.manual_seed(0)
    model = m.build_model(m.Config(preset="tiny", encoder=encoder), 40).eval()
    for module in model.modules():  # statistics that are not 0 and 1, weights that excite: padding would show
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
        if isinstance(module, m.SqueezeExcite):
            for layer in (module.fc[0], module.fc[2]):
                layer.weight.data.normal_(0, 1)
    lengths = torch.tensor([21, 9, 14])
    video = torch.randn(3, 21, 88, 88) * padding_mask(lengths, 21)[:, :, None, None]
    with torch.no_grad():
        batch, _ = model.encode(video, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone, _ = model.encode(video[b:b + 1, :n], lengths[b:b + 1])
            assert torch.allclose(batch[b, :n], alone[0], atol=1e-5), (encoder, b)
        noisy = video.clone()
        noisy[1, 9:] = 5.0  # what lies past a clip's end changes nothing of it
        assert torch.allclose(model.encode(noisy, lengths)[0][1, :9], batch[1, :9], atol=1e-5)


def team_file(tmp_path, encoder, units, generator):
    """A state dict with the team's names and shapes, random values, their tokens' order."""
    path = tmp_path / f"{encoder}_{units}.pth"
    weights = {k: torch.randn(v, generator=generator) if v else torch.tensor(3)
               for k, v in reference_shapes(TEAM[encoder, units]).items()}
    torch.save(weights, path)
    return path, weights


@pytest.mark.parametrize("encoder,units", [("mstcn", "diacritized"), ("dctcn", "letters")])
def test_the_team_models_load_with_their_token_rows_moved_to_this_vocabulary(encoder, units, tmp_path, capsys):
    path, theirs = team_file(tmp_path, encoder, units, torch.Generator().manual_seed(1))
    cfg = m.Config(preset="base", encoder=encoder, units=units, init_from=str(path), work_dir=str(tmp_path / "w"))
    vocab = m.load_vocabulary(cfg)
    model = team_model(encoder, units, "cpu")
    report = m.load_pretrained(model, cfg, vocab)["init_from"]
    assert not report["skipped"] and not report["missing"] and report["kind"].startswith(f"the team's {encoder} model")
    ours = model.state_dict()
    tokens = m.team_tokens(vocab)
    assert len(tokens) == vocab.size and tokens[1:-3] == vocab.itos[1:-3]  # their units' ids are this vocabulary's
    unit = vocab.ids[tokens[7]]
    for key in ("ctc.ctc_lo.weight", "decoder.output_layer.bias", "decoder.embed.0.weight"):
        assert torch.equal(ours[key][unit], theirs[key][7]) and torch.equal(ours[key][0], theirs[key][0])
    sos, eos, unk = vocab.size - 2, vocab.size - 1, vocab.specials["<unk>"]  # their ids of <sos>, <eos>; ours of <unk>
    assert torch.equal(ours["decoder.output_layer.weight"][vocab.sos_eos], theirs["decoder.output_layer.weight"][eos])
    assert torch.equal(ours["decoder.embed.0.weight"][vocab.sos_eos], theirs["decoder.embed.0.weight"][sos])
    assert torch.equal(ours["ctc.ctc_lo.weight"][unk], theirs["ctc.ctc_lo.weight"][sos])
    assert torch.equal(ours["frontend.trunk.layer1.0.conv1.weight"], theirs["frontend.resnet_trunk.layer1.0.conv1.weight"])
    assert f"the team's {encoder} model ({vocab.size} tokens" in capsys.readouterr().out


def test_a_team_model_asks_for_its_encoder_and_token_set(tmp_path):
    path, _ = team_file(tmp_path, "mstcn", "letters", torch.Generator().manual_seed(2))
    model = team_model("conformer", "letters", "cpu")
    cfg = m.Config(preset="base", units="letters", init_from=str(path), work_dir=str(tmp_path / "w"))
    with pytest.raises(m.UserError, match="the team's model with the mstcn encoder: train it with --encoder mstcn"):
        m.load_pretrained(model, cfg)
    model = team_model("mstcn", "diacritized", "cpu")
    with pytest.raises(m.UserError, match="the team's model reads 41 tokens; with --units diacritized they are 230.*"
                                          "pass --units letters"):
        m.load_pretrained(model, m.dataclasses.replace(cfg, encoder="mstcn", units="diacritized"))


def test_a_team_model_decodes_as_it_is_with_their_normalisation_and_crop(tmp_path, synthetic_root, capsys):
    path, theirs = team_file(tmp_path, "mstcn", "letters", torch.Generator().manual_seed(3))
    clips = tmp_path / "clips"
    clips.mkdir()
    for source in sorted((synthetic_root / "Preprocessed_Video").glob("*.mp4"))[:2]:
        (clips / source.name).write_bytes(source.read_bytes())
    cfg = m.Config(mode="decode", checkpoint=str(path), work_dir=str(tmp_path / "w"), decoder="ctc")
    model, vocab, model_cfg = m.model_from_checkpoint(path, cfg, torch.device("cpu"))
    assert (model_cfg.encoder, model_cfg.units, vocab.size, model_cfg.preset) == ("mstcn", "letters", 41, "base")
    assert (model_cfg.mean, model_cfg.std, model_cfg.crop_size, model_cfg.input_size) == (*m.TEAM_NORMALISATION, 103, 88)
    assert torch.equal(model.state_dict()["encoder.hidden_proj.weight"], theirs["encoder.hidden_proj.weight"])
    capsys.readouterr()
    m.main(["--mode", "decode", "--checkpoint", str(path), "--work-dir", str(tmp_path / "w"), "--input", str(clips),
            "--decoder", "ctc"])
    out = capsys.readouterr()
    assert f"{path}: the team's mstcn model over 41 tokens" in out.out
    assert [line.split("\t")[0] for line in out.out.splitlines() if "\t" in line] == sorted(p.stem for p in clips.iterdir())
