"""Section 4: per-clip crops and flips, normalisation, AdaptiveTimeMask and time warp."""
import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from conftest import m


def frames_with_texture(batch=4, t=30, size=112, seed=0):
    g = torch.Generator().manual_seed(seed)
    clip = torch.randint(0, 256, (batch, 1, size, size), generator=g, dtype=torch.uint8)
    return clip.expand(batch, t, size, size).contiguous()  # every frame of a clip alike


def test_validation_is_a_center_crop_normalised():
    cfg = m.Config()
    frames = frames_with_texture()
    x, lengths = m.Augment(cfg, training=False)(frames, torch.full((4,), 30))
    expected = (frames[:, :, 12:100, 12:100].float() / 255 - cfg.mean) / cfg.std
    assert x.shape == (4, 30, 88, 88) and torch.allclose(x, expected, atol=1e-6)


def test_training_crop_and_flip_are_one_per_clip_and_differ_between_clips():
    torch.manual_seed(0)
    cfg = m.Config(time_mask=False)
    frames = frames_with_texture(batch=8)
    x, _ = m.Augment(cfg, training=True)(frames, torch.full((8,), 30))
    assert torch.equal(x, x[:, :1].expand_as(x))  # all frames of a clip got the same crop and flip
    crops = set()
    for b in range(8):
        found = [(dy, dx, flip) for dy in range(25) for dx in range(25) for flip in (False, True)
                 if torch.allclose(x[b, 0], normalised_crop(frames[b, 0], dy, dx, flip, cfg), atol=1e-5)]
        assert len(found) == 1
        crops.add(found[0])
    assert len(crops) > 4 and {f for _, _, f in crops} == {False, True}


def normalised_crop(frame, dy, dx, flip, cfg):
    crop = frame[dy:dy + 88, dx:dx + 88].float() / 255
    crop = crop.flip(-1) if flip else crop
    return (crop - cfg.mean) / cfg.std


def test_padding_stays_zero_and_each_switch_turns_its_step_off():
    cfg = m.Config(random_crop=False, hflip_prob=0.0, time_mask=False)
    frames = frames_with_texture(batch=2)
    lengths = torch.tensor([30, 20])
    x, _ = m.Augment(cfg, training=True)(frames, lengths)
    assert x[1, 20:].abs().sum() == 0 and x[1, :20].abs().sum() > 0
    assert torch.equal(x, m.Augment(cfg, training=False)(frames, lengths)[0])


def auto_avsr_time_mask(video, window, stride):
    """Auto-AVSR's loop as its repository writes it, for comparison."""
    masked = video.clone()
    length = masked.size(0)
    n_mask = int((length + stride - 0.1) // stride)
    ts = torch.randint(0, window, size=(n_mask, 2))
    for t, t_end in ts:
        if length - t <= 0:
            continue
        t_start = random.randrange(0, length - t)
        if t_start == t_start + t:
            continue
        t_end += t_start
        masked[t_start:t_end] = 0
    return masked


@pytest.mark.parametrize("length", [1, 10, 29, 38, 60])
def test_adaptive_time_mask_matches_auto_avsr_draw_for_draw(length):
    for seed in range(20):
        video = torch.rand(length, 4, 4) + 1
        torch.manual_seed(seed), random.seed(seed)
        ours = m.adaptive_time_mask(video.clone(), length, 10, 25)
        torch.manual_seed(seed), random.seed(seed)
        assert torch.equal(ours, auto_avsr_time_mask(video, 10, 25))


def test_time_mask_zeroes_whole_frames_before_normalisation():
    torch.manual_seed(1), random.seed(1)
    cfg = m.Config(random_crop=False, hflip_prob=0.0, time_mask_window=8, time_mask_stride=10)
    frames = torch.full((6, 30, 112, 112), 200, dtype=torch.uint8)
    x, _ = m.Augment(cfg, training=True)(frames, torch.full((6,), 30))
    per_frame = x.flatten(2)
    masked = torch.isclose(per_frame, torch.tensor((0 - cfg.mean) / cfg.std)).all(-1)
    kept = torch.isclose(per_frame, torch.tensor((200 / 255 - cfg.mean) / cfg.std)).all(-1)
    assert torch.all(masked | kept) and masked.any() and kept.any()


def test_time_warp_changes_speed_within_bounds_and_keeps_labels_possible():
    torch.manual_seed(0)
    lengths = torch.tensor([30, 38, 29, 33] * 50)
    needed = torch.tensor([28, 10, 29, 5] * 50)
    new = m.time_warp_lengths(lengths, needed, 0.2)
    assert torch.all(new >= needed) and (new != lengths).any()
    assert torch.all(new <= (lengths / 0.8).ceil()) and torch.all(new >= torch.minimum(needed, (lengths / 1.2).floor()))
    frames = torch.arange(38, dtype=torch.uint8)[None, :, None, None].expand(4, 38, 2, 2).clone()
    warped = m.resample_frames(frames, lengths[:4], new[:4])
    for b in range(4):
        shown = warped[b, : new[b], 0, 0]
        assert shown[0] == 0 and torch.all(shown[1:] >= shown[:-1]) and shown[-1] <= lengths[b] - 1
        assert warped[b, new[b]:].sum() == 0


def test_time_warp_runs_in_the_augmentation_when_switched_on():
    torch.manual_seed(3)
    cfg = m.Config(time_warp=True, time_warp_max=0.3, time_mask=False)
    frames = frames_with_texture(batch=16)
    lengths = torch.full((16,), 30)
    x, new = m.Augment(cfg, training=True)(frames, lengths, torch.full((16,), 12))
    assert (new != 30).any() and x.shape[1] == int(new.max()) and torch.all(new >= 12)


def test_frames_kept_shrunk_give_the_input_the_full_size_path_gives():
    """With input 44 from crop 88, the bank keeps 56 x 56 frames and cuts 44 directly: the same picture as
    cutting 88 from 112 and area-resizing, up to uint8 rounding."""
    cfg = m.Config(input_size=44)
    assert m.stored_size(cfg) == 56 and m.stored_size(m.Config(input_size=40)) == 112
    rng = __import__("numpy").random.default_rng(0)
    clips = [rng.integers(0, 256, (n, 112, 112), dtype="uint8") for n in (30, 25)]
    full = m.ClipBank(clips, torch.device("cpu")).batch([0, 1])
    small = m.ClipBank(clips, torch.device("cpu"), m.stored_size(cfg)).batch([0, 1])
    assert small[0].shape == (2, 30, 56, 56)
    expected, _ = m.Augment(cfg, training=False)(*full)
    x, _ = m.Augment(cfg, training=False)(*small)
    assert x.shape == expected.shape == (2, 30, 44, 44)
    assert (x - expected).abs().max() < 1 / (255 * cfg.std) + 1e-5
    assert x[1, 25:].abs().sum() == 0


def test_cached_features_get_the_same_time_masking_and_warping_as_frames():
    """A frozen frontend's features (B x T x C) are masked and warped along time as frames would be, with the
    same draws: masked frames get zero features."""
    cfg = m.Config(time_warp=True, time_warp_max=0.3)
    features = torch.randn(8, 30, 16) + 5  # no feature is 0 by chance
    lengths, needed = torch.full((8,), 30), torch.full((8,), 12)
    torch.manual_seed(4)
    random.seed(4)
    x, new = m.Augment(cfg, training=True).features(features.clone(), lengths, needed)
    torch.manual_seed(4)
    random.seed(4)
    frames = m.resample_frames(torch.arange(1, 31)[None, :, None].expand(8, 30, 1), lengths, m.time_warp_lengths(
        lengths, needed, cfg.time_warp_max))  # the frame each warped position shows, before masking
    assert (new != 30).any() and x.shape == (8, int(new.max()), 16) and torch.all(new >= 12)
    zeroed = (x == 0).all(-1)
    assert zeroed.any() and torch.all((x == 0).any(-1) == zeroed)  # whole frames, never single features
    for b in range(8):
        shown = frames[b, :new[b], 0] - 1
        kept = ~zeroed[b, :new[b]]
        assert torch.equal(x[b, :new[b]][kept], features[b, shown[kept]])
        assert torch.all(x[b, new[b]:] == 0)
    plain = m.Augment(m.Config(), training=False).features(features.clone(), lengths)
    assert torch.equal(plain[0], features) and torch.equal(plain[1], lengths)


# Sound ---------------------------------------------------------------------------------------------------------

def speech_batch(lengths=(30, 21, 34), seed=0):
    """B x Tmax x 640 noise-like 'speech' of different loudness, zero past each clip's length."""
    g = torch.Generator().manual_seed(seed)
    wave = torch.randn(len(lengths), max(lengths), 640, generator=g) * torch.tensor([0.1, 1.0, 3.0])[:, None, None]
    lengths = torch.tensor(lengths)
    return wave * (torch.arange(max(lengths))[None] < lengths[:, None])[..., None], lengths


def test_noise_is_mixed_at_each_clips_snr_over_its_own_samples():
    wave, lengths = speech_batch()
    speech = wave.flatten(1)
    valid = torch.arange(speech.shape[1])[None] < (lengths * 640)[:, None]
    noise = torch.randn_like(speech) * 7
    snrs = torch.tensor([0.0, 12.5, math.inf])
    mixed = m.mix_at_snr(speech, noise, valid, snrs)
    added = mixed - speech
    for b in range(2):
        n = int(valid[b].sum())
        measured = 10 * torch.log10(speech[b, :n].pow(2).mean() / added[b, :n].pow(2).mean())
        assert measured.item() == pytest.approx(snrs[b].item(), abs=0.01)
    assert torch.equal(mixed[2], speech[2]) and not added[~valid].any()  # +inf: clean; padding untouched


def test_sound_is_normalised_per_clip_and_muted_or_noisy_as_sound_says():
    wave, lengths = speech_batch()
    valid = torch.arange(wave.shape[1] * 640)[None] < (lengths * 640)[:, None]
    clean = m.Augment(m.Config(), training=False).sound(wave, lengths, None)
    for b, n in enumerate((lengths * 640).tolist()):
        assert clean[b, :n].mean().abs() < 1e-5 and clean[b, :n].std(unbiased=False) == pytest.approx(1, abs=1e-4)
    assert not clean[~valid].any()
    assert torch.allclose(clean, m.normalize_sound(wave.flatten(1), valid))
    assert not m.Augment(m.Config(sound="mute"), training=False).sound(wave, lengths, None).any()
    track = torch.randn(100_000)
    noisy = m.Augment(m.Config(sound="0"), training=False).sound(wave, lengths, track)
    # at 0 dB half the power is noise: the normalised clean sound explains half of the noisy one
    share = (noisy * clean).sum(1) / (clean * clean).sum(1)
    assert torch.allclose(share, torch.full((3,), 0.5 ** 0.5), atol=0.05)


def test_modality_dropout_takes_one_sense_from_a_clip_at_the_rates_asked():
    cfg = m.Config(modality="av", drop_sound=0.3, drop_video=0.2)
    video, audio = torch.rand(4000, 3, 2, 2) + 0.1, torch.rand(4000, 5) + 0.1
    torch.manual_seed(0)
    seen, heard = m.Augment(cfg, training=True).drop_senses(video, audio)
    deaf, blind = (heard == 0).all(1), (seen == 0).flatten(1).all(1)
    assert not (deaf & blind).any()  # never both
    assert deaf.float().mean() == pytest.approx(0.3, abs=0.03) and blind.float().mean() == pytest.approx(0.2, abs=0.03)
    assert torch.equal(seen[~blind], video[~blind]) and torch.equal(heard[~deaf], audio[~deaf])
    kept = m.Augment(cfg, training=False).drop_senses(video, audio)  # evaluation hears and sees what --sound says
    assert kept[0] is video and kept[1] is audio
    with pytest.raises(m.UserError, match="need --modality av"):
        m.validate(m.Config(drop_sound=0.5))
    with pytest.raises(m.UserError, match="add up to at most 1"):
        m.validate(m.Config(modality="av", drop_sound=0.7, drop_video=0.5))
    assert "sound p 0.3 and video p 0.2 dropped from epoch 11" in m.augmentation_line(cfg)


def test_modality_dropout_starts_after_a_third_of_the_epochs_or_where_drop_from_says():
    assert m.drop_start(m.Config(epochs=30)) == 11 and m.drop_start(m.Config(epochs=60)) == 21
    assert m.drop_start(m.Config(epochs=30, drop_from=4)) == 4
    video, audio = torch.rand(64, 3, 2, 2) + 0.1, torch.rand(64, 5) + 0.1
    cfg = m.Config(modality="av", drop_sound=0.5)
    before = m.Augment(cfg, training=True, drop=False).drop_senses(video, audio)  # noise and crops, senses kept
    assert before[0] is video and before[1] is audio
    heard = m.Augment(cfg, training=True).drop_senses(video, audio)[1]
    assert (heard == 0).all(1).any()
    line = m.augmentation_line(dataclasses.replace(cfg, augment_from=3, drop_from=7, random_crop=False))
    assert line.endswith("from epoch 3 (the center crop before); sound p 0.5 dropped from epoch 7")
    with pytest.raises(m.UserError, match="--drop-from is an epoch"):
        m.validate(m.Config(drop_from=-1))


def test_training_masks_the_waveform_and_draws_each_clips_snr(monkeypatch):
    wave, lengths = speech_batch(lengths=(40, 40, 40))
    quiet = m.Config(noise_snrs="inf")
    torch.manual_seed(3), random.seed(3)
    masked = m.Augment(quiet, training=True).sound(wave, lengths, None)
    # zeroed before normalisation, masked samples share one value; the random speech has no repeats
    zeroed = [int(torch.unique(row, return_counts=True)[1].max()) for row in masked]
    assert max(zeroed) > 1 and max(zeroed) <= 2 * 6399  # two masks in 1.6 s, each under 0.4 s
    unmasked = m.Augment(m.dataclasses.replace(quiet, time_mask=False), training=True).sound(wave, lengths, None)
    assert torch.allclose(unmasked, m.Augment(quiet, training=False).sound(wave, lengths, None))
    drawn = []
    monkeypatch.setattr(m, "mix_at_snr", lambda s, n, v, snrs: drawn.append(snrs.tolist()) or s)
    loud = m.Augment(m.Config(noise_snrs="-5,20", time_mask=False), training=True)
    for _ in range(20):
        loud.sound(wave, lengths, None)
    assert {v for row in drawn for v in row} == {-5.0, 20.0}


def test_noise_tracks_babble_of_training_clips_white_or_a_folder(tmp_path):
    clips = [np.random.default_rng(i).standard_normal(19_200).astype(np.float32) * (i + 1) for i in range(40)]
    cfg = m.Config()
    babble = m.noise_track(cfg, clips, torch.device("cpu"))
    assert len(babble) >= 0.99 * min(m.BABBLE_SECONDS * 16_000, 40 * 19_200)
    assert babble.std().item() == pytest.approx(m.BABBLE_VOICES ** 0.5, rel=0.1)  # six unit-power voices at once
    assert torch.equal(babble, m.noise_track(cfg, clips, torch.device("cpu")))  # seeded
    assert m.noise_track(m.Config(noise="white"), clips, torch.device("cpu")) is None
    folder = tmp_path / "noise"
    folder.mkdir()
    m.write_wav(folder / "fan.wav", np.full(8000, 0.25, np.float32))
    (folder / "broken.flac").write_bytes(b"not sound")
    recorded = m.noise_track(m.Config(noise=str(folder)), clips, torch.device("cpu"))
    assert len(recorded) == 8000 and recorded.mean().item() == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(m.UserError, match="not a folder"):
        m.noise_track(m.Config(noise=str(tmp_path / "nowhere")), clips, torch.device("cpu"))
    (folder / "fan.wav").unlink()
    with pytest.raises(m.UserError, match="no readable recording"):
        m.noise_track(m.Config(noise=str(folder)), clips, torch.device("cpu"))
