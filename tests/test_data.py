"""Section 3: discovery, bad samples, splits, the clip cache, batching and the built-in synthetic clips."""
import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import m


def load(cfg, **changes):
    cfg = m.dataclasses.replace(cfg, **changes)
    return m.load_dataset(cfg, m.load_vocabulary(cfg), torch.device("cpu"))


def report(cfg) -> dict:
    entries = json.loads((Path(cfg.work_dir) / "data_report.json").read_text(encoding="utf-8"))["entries"]
    return {Path(e["file"]).name: e["reason"] for e in entries}


def test_clips_and_labels_pair_by_stem_recursively(cfg, synthetic_root):
    ds = load(cfg, data_dir=str(synthetic_root))
    assert len(ds.samples) == 24
    generated = m.synthesize_dataset(m.Config(synthetic_clips=24, seed=3), m.Vocabulary.seed())
    for sample, (stem, text, frames, _) in zip(ds.samples, generated):
        assert sample.stem == stem and sample.text == text and sample.frames == len(frames)
        decoded = ds.bank.batch([ds.samples.index(sample)])[0][0].numpy()
        assert np.abs(decoded.astype(int) - frames).mean() < 6  # mp4 is lossy, but it is the same clip


def test_arrays_and_text_columns_are_read(cfg, tmp_path):
    clips = m.synthesize_dataset(m.Config(synthetic_clips=3, seed=1), m.Vocabulary.seed())
    root = tmp_path / "arrays"
    (root / "deep" / "er").mkdir(parents=True)
    np.save(root / "deep" / "er" / "a.npy", clips[0][2])
    np.savez(root / "deep" / "b.npz", frames=clips[1][2])
    np.save(root / "c.npy", np.stack([clips[2][2]] * 3, -1))  # T x H x W x 3 becomes gray
    for (stem, text, _, _), name in zip(clips, "abc"):
        (root / f"{name}.csv").write_text("text\n" + text + "\n", encoding="utf-8")
    ds = load(cfg, data_dir=str(root))
    assert [s.stem for s in ds.samples] == ["a", "b", "c"]
    assert [s.text for s in ds.samples] == [c[1] for c in clips]
    assert torch.equal(ds.bank.batch([0])[0][0], torch.from_numpy(clips[0][2]))


def test_ambiguous_stems_stop_before_any_work_and_name_the_folders(cfg, dataset_copy):
    shutil.copytree(dataset_copy / "Preprocessed_Video", dataset_copy / "Video")
    shutil.copytree(dataset_copy / "Csv", dataset_copy / "Csv (with Diacritics)")
    with pytest.raises(m.UserError) as e:
        load(cfg, data_dir=str(dataset_copy))
    message = str(e.value)
    assert "--videos-dir" in message and "Preprocessed_Video" in message and "Video  (24" in message
    assert not (Path(cfg.work_dir) / "cache").exists()
    with pytest.raises(m.UserError, match="--labels-dir") as e:
        load(cfg, data_dir=str(dataset_copy), videos_dir=str(dataset_copy / "Video"))
    assert "Csv (with Diacritics)" in str(e.value)
    ds = load(cfg, data_dir=str(dataset_copy), videos_dir=str(dataset_copy / "Video"),
              labels_dir=str(dataset_copy / "Csv"))
    assert len(ds.samples) == 24


def write_label(path: Path, text: str):
    path.write_text("word\n" + "\n".join(text.split()) + "\n", encoding="utf-8")


def test_every_bad_sample_is_skipped_reported_and_the_run_goes_on(cfg, dataset_copy, capsys):
    videos, labels = dataset_copy / "Preprocessed_Video", dataset_copy / "Csv"
    (videos / "synth_00000.mp4").unlink()  # label without clip
    (labels / "synth_00001.csv").unlink()  # clip without label
    (videos / "synth_00002.mp4").write_bytes(os.urandom(3000))  # not a video
    data = (videos / "synth_00003.mp4").read_bytes()
    (videos / "synth_00003.mp4").write_bytes(data[: len(data) // 2])  # cut short
    write_label(labels / "synth_00004.csv", "")  # empty label
    write_label(labels / "synth_00005.csv", " ".join(["\u0642\u064e\u0627\u0644\u064e"] * 12))  # too long
    write_label(labels / "synth_00006.csv", "hello")  # units outside the vocabulary
    big = np.zeros((30, 64, 64), np.uint8)
    (videos / "synth_00007.mp4").unlink()
    np.save(videos / "synth_00007.npy", big)  # wrong frame size
    np.save(videos / "synth_00008.npy", np.zeros((3,), np.float32))  # an array that is no video
    (videos / "synth_00008.mp4").unlink()
    (labels / "synth_00009.csv").write_text("words\nqala\n", encoding="utf-8")  # no `word` column
    (labels / "synth_00010.csv").write_bytes(b"word\n\xff\xfe\n")  # not UTF-8
    (videos / "synth_00011.mp4").unlink()
    np.save(videos / "synth_00011.npy", np.zeros((10_000, 8, 8), np.uint8))  # 6.7 minutes: refused by its header
    ds = load(cfg, data_dir=str(dataset_copy))
    reasons = report(cfg)
    assert reasons == {
        "synth_00000.csv": "no clip: no video with the same name was found",
        "synth_00001.mp4": "no label: no CSV with the same name was found",
        "synth_00002.mp4": reasons["synth_00002.mp4"], "synth_00003.mp4": reasons["synth_00003.mp4"],
        "synth_00004.csv": "empty label: the CSV has no words",
        "synth_00005.csv": reasons["synth_00005.csv"], "synth_00006.csv": reasons["synth_00006.csv"],
        "synth_00007.npy": reasons["synth_00007.npy"], "synth_00008.npy": reasons["synth_00008.npy"],
        "synth_00009.csv": "unreadable label: no 'word' or 'text' column (columns: 'words')",
        "synth_00010.csv": reasons["synth_00010.csv"], "synth_00011.npy": reasons["synth_00011.npy"],
    }
    assert reasons["synth_00011.npy"].startswith("too large: it declares 10000 frames of 8 x 8") and "ffmpeg" in \
        reasons["synth_00011.npy"]
    assert reasons["synth_00010.csv"].startswith("unreadable label: not UTF-8") and "save it as UTF-8" in reasons["synth_00010.csv"]
    assert reasons["synth_00002.mp4"].startswith("unreadable video")
    assert reasons["synth_00003.mp4"].startswith(("unreadable video", "truncated video"))
    assert reasons["synth_00005.csv"].startswith("label too long: 47 CTC steps")
    assert reasons["synth_00006.csv"].startswith("unknown units: e h l o")
    assert reasons["synth_00007.npy"].startswith("wrong frame size: 64 x 64")
    assert reasons["synth_00008.npy"].startswith("unreadable video")
    assert len(ds.samples) == 24 - 12
    assert "Skipped 12 file(s)" in capsys.readouterr().out


def test_direction_marks_and_other_invisible_characters_in_labels_and_headers_are_dropped(cfg, dataset_copy):
    said = "\u0642\u064e\u0627\u0644\u064e"
    (dataset_copy / "Csv" / "synth_00006.csv").write_text(f"\u200fword\n\u200f{said}\u200e\n", encoding="utf-8")
    (dataset_copy / "Csv" / "synth_00007.csv").write_text(f" Text\u00a0\n\ufeff{said}\u200d \u061c{said}\n",
                                                          encoding="utf-8")
    ds = load(cfg, data_dir=str(dataset_copy))
    samples = {s.stem: s for s in ds.samples}
    assert report(cfg) == {}
    assert samples["synth_00006"].text == said and samples["synth_00007"].text == f"{said} {said}"
    assert samples["synth_00006"].ids == m.load_vocabulary(cfg).encode(said)[0]
    (dataset_copy / "Csv" / "synth_00008.csv").write_text("w\u00f6rd\n" + said, encoding="utf-8")
    with pytest.raises(ValueError, match="columns: 'w\u00f6rd'"):
        m.read_label(dataset_copy / "Csv" / "synth_00008.csv")


def test_unknown_units_can_be_mapped_to_unk(cfg, dataset_copy):
    write_label(dataset_copy / "Csv" / "synth_00006.csv", "hello")
    ds = load(cfg, data_dir=str(dataset_copy), unknown_units="map")
    sample = next(s for s in ds.samples if s.stem == "synth_00006")
    assert sample.ids == [m.SPECIALS["<unk>"]] * 5
    assert report(cfg) == {}


def test_a_video_that_decodes_fewer_frames_than_declared_is_truncated(monkeypatch, tmp_path):
    class ShortCapture:  # a faststart mp4 cut short opens, declares its frames and stops early
        def __init__(self, path): self.left = 5
        def isOpened(self): return True
        def get(self, prop): return 30
        def release(self): pass
        def read(self):
            self.left -= 1
            return (self.left >= 0), np.zeros((112, 112, 3), np.uint8)
    import cv2
    monkeypatch.setattr(cv2, "VideoCapture", ShortCapture)
    with pytest.raises(ValueError, match="truncated video: its header declares 30 frames, only 5 decode"):
        m.read_video(tmp_path / "x.mp4")


@pytest.mark.parametrize("declared", [2_000_000, 30])
def test_a_video_too_large_decoded_is_refused_by_its_header_or_where_its_stream_outruns_it(monkeypatch, tmp_path,
                                                                                          declared):
    class EndlessCapture:  # a few kB on disk: a header declaring two million frames, or 30 and a stream without end
        reads = 0
        def __init__(self, path): pass
        def isOpened(self): return True
        def get(self, prop): return {7: declared, 3: 112, 4: 112}.get(prop, 25)  # count, width, height
        def release(self): pass
        def read(self):
            EndlessCapture.reads += 1
            return True, np.zeros((112, 112, 3), np.uint8)
    import cv2
    monkeypatch.setattr(cv2, "VideoCapture", EndlessCapture)
    with pytest.raises(ValueError, match=f"too large: it declares {declared if declared > 30 else 1501} frames"):
        m.read_video(tmp_path / "x.mp4")
    assert EndlessCapture.reads == (0 if declared > 30 else m.LONGEST_CLIP + 1)
    bomb = tmp_path / "bomb.npz"  # what np.savez_compressed writes of 1.4 GiB of zeros (1.5 MB), its header first
    with zipfile.ZipFile(bomb, "w") as archive, archive.open("frames.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (30_000, 224, 224)})
        member.write(bytes(1000))
    with pytest.raises(ValueError, match="too large: it declares 30000 frames of 224 x 224 \\(1.4 GiB decoded\\)"):
        m.read_video(bomb)


def test_split_is_deterministic_balanced_and_stable_when_clips_are_added():
    cfg = m.Config()
    stems = [f"{i:05d}" for i in range(4000)]
    first = {s: m.split_of(s, cfg) for s in stems}
    counts = m.Counter(first.values())
    assert abs(counts["train"] / 4000 - 0.8) < 0.03 and abs(counts["test"] / 4000 - 0.1) < 0.02
    more = {s: m.split_of(s, cfg) for s in stems + [f"new_{i}" for i in range(500)]}
    assert all(more[s] == first[s] for s in stems)
    other_seed = {s: m.split_of(s, m.Config(split_seed=1)) for s in stems}
    assert other_seed != first


def test_split_lists_override_the_hash(cfg, dataset_copy, tmp_path, capsys):
    synthetic_root = dataset_copy
    for folder, ext in (("Preprocessed_Video", ".mp4"), ("Csv", ".csv")):  # a name with a space
        (synthetic_root / folder / f"synth_00022{ext}").rename(synthetic_root / folder / f"synth 22{ext}")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("\n".join(f"synth_{i:05d}" for i in range(20)) + "\n")
    (lists / "val.txt").write_text("synth_00020\r\n  synth_00021.mp4\r\n\r\n")  # Windows' line ends, indented
    (lists / "test.txt").write_text("synth 22\nnot_there\n")
    ds = load(cfg, data_dir=str(synthetic_root), split_lists=str(lists))
    assert [len(ds.subset(s)) for s in ("train", "val", "test")] == [20, 2, 1]
    assert ds.samples[ds.subset("test")[0]].stem == "synth 22"
    assert "1 clip(s) named in" in capsys.readouterr().out
    with pytest.raises(m.UserError, match="test.txt is missing"):
        (lists / "test.txt").unlink()
        load(cfg, data_dir=str(synthetic_root), split_lists=str(lists))


def test_cache_is_reused_and_refreshes_only_a_changed_file(cfg, dataset_copy):
    load(cfg, data_dir=str(dataset_copy))
    cache = m.ClipCache(cfg.cache_path)
    assert len(cache.index) == 24
    clip = dataset_copy / "Preprocessed_Video" / "synth_00005.mp4"
    cache.load(clip)
    assert (cache.hits, cache.misses) == (1, 0)
    np.save(dataset_copy / "Preprocessed_Video" / "synth_00005.npy", np.zeros((33, 112, 112), np.uint8))
    clip.unlink()
    calls = []
    original = m.read_video
    m.read_video = lambda p: calls.append(p.name) or original(p)
    try:
        ds = load(cfg, data_dir=str(dataset_copy))
    finally:
        m.read_video = original
    assert calls == ["synth_00005.npy"]
    assert next(s for s in ds.samples if s.stem == "synth_00005").frames == 33


def test_clip_bank_batches_are_zero_padded_copies_of_the_clips():
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (n, 8, 8), dtype=np.uint8) for n in (5, 9, 7)]
    bank = m.ClipBank(clips, torch.device("cpu"))
    frames, lengths = bank.batch([2, 0, 1])
    assert frames.shape == (3, 9, 8, 8) and lengths.tolist() == [7, 5, 9]
    for b, i in enumerate([2, 0, 1]):
        n = len(clips[i])
        assert torch.equal(frames[b, :n], torch.from_numpy(clips[i]))
        assert frames[b, n:].sum() == 0


def test_frame_budget_batches_cover_every_clip_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(29, 38) for _ in range(300)]
    batches = m.frame_budget_batches(lengths, 400, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(max(lengths[i] for i in b) * len(b) <= 400 for b in batches)
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 2 for b in batches)
    assert batches == m.frame_budget_batches(lengths, 400, random.Random(1))
    assert batches != m.frame_budget_batches(lengths, 400, random.Random(2))


def test_synthetic_clips_look_like_the_real_ones_and_are_seeded():
    vocab = m.Vocabulary.seed()
    clips = m.synthesize_dataset(m.Config(synthetic_clips=60, seed=9), vocab)
    for stem, text, frames, _ in clips:
        assert frames.dtype == np.uint8 and frames.shape[1:] == (112, 112) and 29 <= len(frames) <= 38
        assert 1 <= len(text.split()) <= 5
        ids, unknown = vocab.encode(text)
        assert not unknown and m.frames_needed(ids) <= len(frames)
    again = m.synthesize_dataset(m.Config(synthetic_clips=60, seed=9), vocab)
    assert all(np.array_equal(a[2], b[2]) and a[1] == b[1] for a, b in zip(clips, again))
    words = m.Counter(w for _, text, _, _ in clips for w in text.split())
    assert words.most_common(1)[0][1] >= 5  # a lexicon: words repeat across clips, as in the real data


def test_synthetic_mouths_follow_visemes_and_blend_between_units():
    track = lambda text: m.shape_track(m.split_units(text), 30, np.random.default_rng(1))[0]
    ba, ma, bu = "\u0628\u064e", "\u0645\u064e", "\u0628\u064f"
    same_class = np.abs(track(ba) - track(ma)).max()  # b and m: closed lips, alike but not identical
    other_vowel = np.abs(track(ba) - track(bu)).max()  # the vowel changes opening and rounding
    assert 0 < same_class <= 2 * m.LETTER_OFFSET and other_vowel > 3 * same_class
    # coarticulation: the same unit looks different next to different neighbours, so no per-frame lookup
    wa, yi = "\u0648\u064f", "\u064a\u0650"
    rounded, spread = track(wa + ba + wa), track(yi + ba + yi)
    closure = 8 + int(rounded[8:22, 0].argmin())  # the frame where the lips close for b
    assert not np.allclose(rounded[closure], spread[closure], atol=0.02)


def test_two_formats_of_one_clip_in_one_folder_say_keep_one(cfg, dataset_copy):
    frames = np.zeros((30, 112, 112), np.uint8)
    np.save(dataset_copy / "Preprocessed_Video" / "synth_00003.npy", frames)
    with pytest.raises(m.UserError, match="sit in one folder.*Keep one of them"):
        load(cfg, data_dir=str(dataset_copy))


def test_a_work_dir_inside_a_relative_data_dir_is_not_read_as_data(dataset_copy, monkeypatch):
    monkeypatch.chdir(dataset_copy.parent)
    cfg = m.Config(data_dir="data", work_dir="data/run")
    load(cfg)  # fills data/run/cache with .npy files and writes data/run/data_report.json
    (dataset_copy / "run" / "predictions.csv").write_text("id,reference\n", encoding="utf-8")
    ds = load(cfg)
    assert len(ds.samples) == 24 and report(cfg) == {}


def test_damaged_cache_entries_are_decoded_again(cfg, synthetic_root):
    load(cfg, data_dir=str(synthetic_root))
    for entry in cfg.cache_path.glob("*.npy"):
        entry.write_bytes(b"broken")
    (cfg.cache_path / "index.json").write_text("{not json")
    assert len(load(cfg, data_dir=str(synthetic_root)).samples) == 24
    load(cfg, data_dir=str(synthetic_root))
    cache = m.ClipCache(cfg.cache_path)
    cache.load(next((synthetic_root / "Preprocessed_Video").glob("*.mp4")))
    assert cache.hits == 1


# Sound (--modality audio / av) -------------------------------------------------------------------------------

def tone(seconds: float, rate: int, hz: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def write_wav(path: Path, channels: list[np.ndarray], rate: int) -> None:
    import wave
    with wave.open(str(path), "wb") as f:
        f.setnchannels(len(channels))
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.stack(channels, 1) * 32767).astype("<i2").tobytes())


def write_aac(path: Path, wave: np.ndarray, rate: int) -> None:
    """AAC in an mp4/m4a container, as the raw LRC-AR videos carry their sound."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def loudest_hz(wave: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave))) * m.SAMPLE_RATE / len(wave))


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_sound_of_any_rate_is_read_at_16_khz(tmp_path, rate):
    write_wav(tmp_path / "a.wav", [tone(1.0, rate, 440)], rate)
    wave = m.read_audio(tmp_path / "a.wav")
    assert wave.dtype == np.float32 and abs(len(wave) - 16000) <= 16
    assert loudest_hz(wave) == pytest.approx(440, abs=2) and np.abs(wave).max() == pytest.approx(0.5, abs=0.03)


def test_stereo_is_mixed_down_and_aac_in_mp4_is_read(tmp_path):
    write_wav(tmp_path / "s.wav", [tone(1.0, 44100, 440), tone(1.0, 44100, 1000)], 44100)
    spectrum = np.abs(np.fft.rfft(m.read_audio(tmp_path / "s.wav")))  # 1 Hz a bin for one second
    assert spectrum[440] > 0.3 * spectrum.max() and spectrum[1000] > 0.3 * spectrum.max()  # both channels heard
    write_aac(tmp_path / "v.mp4", tone(1.0, 44100, 440), 44100)
    wave = m.read_audio(tmp_path / "v.mp4")
    assert 15500 <= len(wave) <= 17500 and loudest_hz(wave[:16000]) == pytest.approx(440, abs=2)


def test_missing_silent_or_broken_sound_says_what_is_wrong(tmp_path, synthetic_root):
    write_wav(tmp_path / "silent.wav", [np.zeros(16000, np.float32)], 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00junk")
    cases = {synthetic_root / "Preprocessed_Video" / "synth_00000.mp4": "no audio track",  # cv2 wrote no sound
             tmp_path / "silent.wav": "empty or silent", tmp_path / "broken.wav": "unreadable sound",
             tmp_path / "long.wav": "too large: its sound lasts 70 s"}
    write_wav(tmp_path / "long.wav", [np.random.default_rng(0).uniform(-1, 1, 70 * 8000).astype(np.float32)], 8000)
    for path, why in cases.items():
        with pytest.raises(ValueError, match=why):
            m.read_audio(path)


def test_clips_pair_with_their_sound_and_clips_without_are_skipped_in_audio_modes_only(cfg, dataset_copy):
    clips = dataset_copy / "Preprocessed_Video"
    (clips / "synth_00001.wav").unlink()  # no sound at all
    write_wav(clips / "synth_00002.wav", [tone(0.3, 16000, 440)], 16000)  # far shorter than its clip
    raw = dataset_copy / "Video"  # the LRC-AR layout: the sound is in the raw video of the same name
    raw.mkdir()
    moved = m.read_audio(clips / "synth_00003.wav")
    write_aac(raw / "synth_00003.mp4", moved, 16000)
    (clips / "synth_00003.wav").unlink()
    video = load(cfg, data_dir=str(dataset_copy), videos_dir=str(clips))
    assert len(video.samples) == 24 and video.sound is None
    for modality in ("audio", "av"):
        ds = load(cfg, data_dir=str(dataset_copy), videos_dir=str(clips), modality=modality)
        assert {s.stem for s in video.samples} - {s.stem for s in ds.samples} == {"synth_00001", "synth_00002"}
        reasons = report(m.dataclasses.replace(cfg))
        assert reasons["synth_00001.mp4"].startswith("no sound: ") and "no audio track" in reasons["synth_00001.mp4"]
        assert "0.30 s of sound" in reasons["synth_00002.mp4"]
        # each clip's sound is the generated one (16-bit wav), frames x 640 samples
        generated = {g[0]: g[3] for g in m.synthesize_dataset(m.Config(synthetic_clips=24, seed=3),
                                                               m.Vocabulary.seed(), sound=True)}
        for i, s in enumerate(ds.samples):
            wave, lengths = ds.sound.batch([i])
            assert wave.shape == (1, s.frames, 640) and lengths.tolist() == [s.frames]
            if s.stem != "synth_00003":
                assert np.abs(wave[0].numpy() - generated[s.stem]).max() < 1e-3
        from_raw = ds.sound.batch([[s.stem for s in ds.samples].index("synth_00003")])[0][0].flatten().numpy()
        # AAC is lossy, and this writer keeps the encoder's 1024 priming samples (LRC-AR's files have them trimmed)
        n = len(from_raw) - 1024
        assert max(np.corrcoef(from_raw[lag:lag + n], moved[:n])[0, 1] for lag in (0, 1024)) > 0.9


def test_generated_sound_follows_the_units_and_leaves_the_frames_unchanged():
    vocab = m.Vocabulary.seed()
    silent = m.synthesize_dataset(m.Config(synthetic_clips=5, seed=4), vocab)
    heard = m.synthesize_dataset(m.Config(synthetic_clips=5, seed=4), vocab, sound=True)
    for (stem, text, frames, none), (_, _, same, wave) in zip(silent, heard):
        assert none is None and np.array_equal(frames, same) and wave.shape == (len(frames), 640)
        assert 0.01 < np.abs(wave).mean() < 1
    # letters that look alike on the lips sound different: b and m share a viseme, not their tones
    assert m.letter_sound("\u0628")[:2] != m.letter_sound("\u0645")[:2]


@pytest.fixture(scope="session")
def extra_root(tmp_path_factory) -> Path:
    """A second generated set, other speakers and sentences: clips labelled elsewhere, to train on as well."""
    root = tmp_path_factory.mktemp("extra") / "dataset"
    m.write_synthetic_dataset(m.Config(output=str(root), synthetic_clips=20, seed=11), m.Vocabulary.seed())
    return root


def test_extra_clips_only_train_and_each_source_is_counted(cfg, synthetic_root, extra_root, tmp_path, capsys):
    extra = Path(shutil.copytree(extra_root, tmp_path / "extra"))
    main_only = load(cfg, data_dir=str(synthetic_root))
    val_stem = main_only.samples[main_only.subset("val")[0]].stem
    for name in (f"Preprocessed_Video/{val_stem}.mp4", f"Csv/{val_stem}.csv"):  # a validation clip among them
        copy = extra / name
        shutil.copy(synthetic_root / name, copy.with_name(f"copy_{copy.name}"))
    ds = load(cfg, data_dir=str(synthetic_root), extra_data_dir=[str(extra)])
    assert "extra clips: 20 of 21" in capsys.readouterr().out
    for split in ("train", "val", "test"):  # the main data's splits are those it has alone
        assert [ds.samples[i].stem for i in ds.subset(split)] == [main_only.samples[i].stem for i in main_only.subset(split)]
    assert len(ds.subset("extra")) == 20 and not set(ds.subset("extra")) & set(range(len(main_only.samples)))
    assert report(cfg)[f"copy_{val_stem}.mp4"].startswith(f"same frames as a main clip: {val_stem} (val)")
    sources = json.loads((Path(cfg.work_dir) / "data_report.json").read_text(encoding="utf-8"))["sources"]
    assert [(s["found"], s["usable"], s["splits"]) for s in sources] == [(24, 24, "train/val/test"), (21, 20, "extra")]
    assert m.training_probe(ds, cfg) == m.training_probe(main_only, cfg)
    frames, _ = ds.bank.batch(ds.subset("extra")[:1])
    assert frames.shape[-1] == m.stored_size(cfg)


def test_an_epoch_draws_extra_clips_by_their_weight_afresh_each_epoch_and_alike_on_resume(cfg, synthetic_root,
                                                                                         extra_root):
    ds = load(cfg, data_dir=str(synthetic_root), extra_data_dir=[str(extra_root)])
    train, extra = ds.subset("train"), ds.subset("extra")
    fifth = m.dataclasses.replace(cfg, extra_weight=0.2)
    one, two = m.epoch_clips(ds, fifth, 1), m.epoch_clips(ds, fifth, 2)
    assert one[:len(train)] == train and len(one) == len(train) + 4 and set(one[len(train):]) <= set(extra)
    assert len(set(one[len(train):])) == 4 and one != two and one == m.epoch_clips(ds, fifth, 1)
    more = m.epoch_clips(ds, m.dataclasses.replace(cfg, extra_weight=2.5), 1)[len(train):]
    assert len(more) == 50 and {more.count(i) for i in extra} <= {2, 3} and sum(more.count(i) == 3 for i in extra) == 10
    assert m.epoch_clips(ds, m.dataclasses.replace(cfg, extra_weight=0), 1) == train
    assert m.epoch_clips(load(cfg, data_dir=str(synthetic_root)), fifth, 1) == train


def test_extra_folders_take_their_own_clip_and_label_folders_in_order(cfg, synthetic_root, extra_root):
    ds = load(cfg, data_dir=str(synthetic_root), extra_data_dir=[str(extra_root), str(extra_root)],
              extra_videos_dir=[str(extra_root / "Preprocessed_Video"), str(extra_root / "Preprocessed_Video")],
              extra_labels_dir=[str(extra_root / "Csv"), str(extra_root / "Csv")])
    assert len(ds.subset("extra")) == 40
    with pytest.raises(m.UserError, match="one each, in the same order"):
        m.parse_config(["--extra-data-dir", "a", "--extra-data-dir", "b", "--extra-videos-dir", "a/v"])


def test_labels_saved_as_utf16_are_read_cp1256_is_refused_with_the_fix_and_unquoted_commas_keep_words(tmp_path):
    text = "قَالَ ٱلْوَزِيرُ"
    (tmp_path / "u16.csv").write_text("word\n" + text.replace(" ", "\n") + "\n", encoding="utf-16")
    assert m.read_label(tmp_path / "u16.csv") == text
    (tmp_path / "bom.csv").write_text("word\n" + text.replace(" ", "\n") + "\n", encoding="utf-8-sig")
    assert m.read_label(tmp_path / "bom.csv") == text
    (tmp_path / "w.csv").write_text("word\nقَالَ,ٱلْوَزِيرُ\n", encoding="utf-8")  # a row "w1,w2": both words
    assert m.read_label(tmp_path / "w.csv") == text
    (tmp_path / "cp.csv").write_bytes("word\nقال\n".encode("cp1256"))
    with pytest.raises(ValueError, match="not UTF-8 .*save it as UTF-8"):
        m.read_label(tmp_path / "cp.csv")


def test_a_broken_link_is_reported_and_a_linked_folder_of_clips_is_read(cfg, dataset_copy):
    videos = dataset_copy / "Preprocessed_Video"
    (videos / "synth_00000.mp4").unlink()
    (videos / "synth_00000.mp4").symlink_to(dataset_copy / "gone.mp4")
    elsewhere = dataset_copy.parent / "more"
    elsewhere.mkdir()
    shutil.move(videos / "synth_00001.mp4", elsewhere / "synth_00001.mp4")
    (videos / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(videos, target_is_directory=True)  # followed once, not for ever
    ds = load(cfg, data_dir=str(dataset_copy))
    assert "synth_00001" in {s.stem for s in ds.samples} and len(ds.samples) == 23
    assert report(cfg)["synth_00000.mp4"].startswith("broken link: it points to")
