"""Section 10: raw face videos to mouth clips. A real face (scikit-image's `astronaut` photograph, shipped
inside that package) is moved and scaled across frames to make videos; the crop must land on its mouth, and
every kind of bad video gets its line in the report while the run goes on."""
import csv
import os
import signal
import struct
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from conftest import UNIT, m, saying_one_unit

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("dlib")

LIPS = (208, 238, 137, 154)  # x0, x1, y0, y1 of the astronaut's lips in the 512 x 512 photograph, read by eye
EYE_CORNERS = ((195, 101), (255, 104))  # her outer eye corners, read by eye


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2GRAY)


def moves(n: int) -> list[np.ndarray]:
    """2 x 3 maps from the photograph into a 256 x 256 frame: the face drifts right and down and grows."""
    out = []
    for t in range(n):
        s = 1.1 + 0.2 * t / max(n - 1, 1)
        tx, ty = 100 + 40 * t / max(n - 1, 1) - s * 222, 120 + 15 * t / max(n - 1, 1) - s * 127
        out.append(np.array([[s, 0, tx], [0, s, ty]]))
    return out


def face_video(photo: np.ndarray, n: int = 30, size=(256, 256)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    maps = moves(n)
    return [cv2.warpAffine(photo, a, size, borderMode=cv2.BORDER_REFLECT) for a in maps], maps


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25, fourcc: str = "mp4v") -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h), True)
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) if f.ndim == 2 else f)
    writer.release()
    return path


def preprocess(folder: Path, out: Path, **settings) -> dict[str, dict]:
    rows = m.preprocess_videos(m.Config(input=str(folder), workers=1, save_landmarks=True, **settings), out)
    report = list(csv.DictReader(open(out / "preprocess_report.csv", encoding="utf-8-sig")))
    assert [r["video"] for r in report] == [r["video"] for r in rows]
    return {Path(r["video"]).stem: r for r in report}


def apply(a: np.ndarray, x: float, y: float) -> np.ndarray:
    return a @ np.array([x, y, 1.0])


def test_the_crop_lands_on_the_mouth_of_a_moving_face(astronaut, tmp_path):
    frames, maps = face_video(astronaut)
    (tmp_path / "raw").mkdir()
    write_video(tmp_path / "raw" / "face.mp4", frames)
    rows = preprocess(tmp_path / "raw", tmp_path / "out")
    assert rows["face"]["status"] == "done" and rows["face"]["filled"] == "0" and rows["face"]["faces"] == "1"
    assert int(rows["face"]["detections"]) == 3  # every 10th frame; the landmarks followed the face in between
    clip = m.read_video(tmp_path / "out" / "face.mp4")
    assert clip.shape == (30, 112, 112)
    crops = np.load(tmp_path / "out" / "face.npz")["crops"]
    for a, (cx, cy, side, angle) in zip(maps, crops):
        x0, y0 = apply(a, LIPS[0], LIPS[2])
        x1, y1 = apply(a, LIPS[1], LIPS[3])
        assert x0 < cx < x1 and y0 < cy < y1
        eyes = np.linalg.norm(apply(a, *EYE_CORNERS[1]) - apply(a, *EYE_CORNERS[0]))
        assert side == pytest.approx(1.24 * eyes, rel=0.1)
        assert abs(angle - np.degrees(np.arctan2(3, 60))) < 3
    # the picture itself: the lips (darker than the skin around them) sit in the middle rows of the crop
    rows_mean = clip.astype(float).mean(axis=(0, 2))
    assert 40 <= int(np.argmin(rows_mean[20:92])) + 20 <= 72


def test_followed_and_detected_every_frame_give_the_same_crop(astronaut, tmp_path):
    frames, _ = face_video(astronaut)
    (tmp_path / "raw").mkdir()
    write_video(tmp_path / "raw" / "face.mp4", frames)
    followed = preprocess(tmp_path / "raw", tmp_path / "a")
    detected = preprocess(tmp_path / "raw", tmp_path / "b", detect_every=1, detect_scale=1.0)
    assert int(detected["face"]["detections"]) == 30 and int(followed["face"]["detections"]) == 3
    a, b = np.load(tmp_path / "a" / "face.npz")["crops"], np.load(tmp_path / "b" / "face.npz")["crops"]
    assert np.abs(a[:, :2] - b[:, :2]).max() < 2


def test_bad_videos_each_get_a_line_and_the_run_goes_on(astronaut, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    frames, maps = face_video(astronaut)
    write_video(raw / "good.mp4", frames)
    write_video(raw / "noface.mp4", [np.full((256, 256), 120, np.uint8)] * 20)
    lost = [f if not 10 <= t < 15 else np.full_like(f, 90) for t, f in enumerate(frames)]
    write_video(raw / "lost.mp4", lost)
    (raw / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    write_video(raw / "oneframe.mp4", frames[:1])
    write_video(raw / "fast.mp4", face_video(astronaut, 36)[0], fps=30)
    rows = preprocess(raw, tmp_path / "out")
    assert rows["good"]["status"] == "done" and rows["good"]["note"] == ""
    assert rows["noface"]["status"] == "failed" and "no face" in rows["noface"]["note"]
    assert rows["lost"]["status"] == "done" and rows["lost"]["filled"] == "5"
    assert "face lost on frame(s) 10-14 of 30" in rows["lost"]["note"]
    assert rows["corrupt"]["status"] == "failed" and "unreadable" in rows["corrupt"]["note"]
    assert "Re-encode" in rows["corrupt"]["note"]
    assert rows["oneframe"]["status"] == "done" and "single frame" in rows["oneframe"]["note"]
    assert m.read_video(tmp_path / "out" / "oneframe.mp4").shape == (1, 112, 112)
    assert rows["fast"]["frames"] == "30" and "resampled from 30 fps" in rows["fast"]["note"]
    # the lost frames' crops come from their neighbours, so they stay on the mouth's path
    crops = np.load(tmp_path / "out" / "lost.npz")["crops"]
    found = np.load(tmp_path / "out" / "lost.npz")["found"]
    assert found.sum() == 25 and not found[10:15].any()
    for a, (cx, cy, _, _) in zip(maps, crops):
        assert np.linalg.norm(apply(a, 223, 145.5) - (cx, cy)) < 6
    err = capsys.readouterr().err
    for name in ("noface", "lost", "corrupt", "oneframe"):
        assert str(raw / f"{name}.mp4") in err
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no half-written file


def test_of_several_faces_the_largest_is_followed_even_when_another_grows(astronaut, tmp_path):
    frames = []
    for t in range(30):
        frame = np.full((256, 512), 128, np.uint8)
        big = cv2.resize(astronaut[40:230, 130:320], (150, 150))
        side = 110 if t < 15 else 190
        other = cv2.resize(astronaut[40:230, 130:320], (side, side))
        frame[40:190, 20:170] = big
        frame[20:20 + side, 300:300 + side] = other
        frames.append(frame)
    (tmp_path / "raw").mkdir()
    write_video(tmp_path / "raw" / "two.mp4", frames)
    rows = preprocess(tmp_path / "raw", tmp_path / "out")
    assert rows["two"]["status"] == "done" and int(rows["two"]["faces"]) == 2
    assert "2 faces seen: followed the largest" in rows["two"]["note"]
    crops = np.load(tmp_path / "out" / "two.npz")["crops"]
    assert (crops[:, 0] < 170).all()


def test_a_second_run_keeps_what_is_done(astronaut, tmp_path):
    (tmp_path / "raw").mkdir()
    write_video(tmp_path / "raw" / "face.mp4", face_video(astronaut, 12)[0])
    (tmp_path / "raw" / "broken.mp4").write_bytes(b"not a video")
    preprocess(tmp_path / "raw", tmp_path / "out")
    before = (tmp_path / "out" / "face.mp4").stat().st_mtime_ns
    rows = preprocess(tmp_path / "raw", tmp_path / "out")
    assert rows["face"]["status"] == "kept" and rows["broken"]["status"] == "failed"
    assert (tmp_path / "out" / "face.mp4").stat().st_mtime_ns == before


def test_parallel_workers_give_the_same_clips(astronaut, tmp_path):
    (tmp_path / "raw").mkdir()
    for i in range(3):
        write_video(tmp_path / "raw" / f"v{i}.mp4", face_video(astronaut, 10 + i)[0])
    one = preprocess(tmp_path / "raw", tmp_path / "one")
    two = m.preprocess_videos(m.Config(input=str(tmp_path / "raw"), workers=2, save_landmarks=True), tmp_path / "two")
    assert [r["status"] for r in two] == ["done"] * 3 and len(one) == 3
    for i in range(3):
        a, b = np.load(tmp_path / "one" / f"v{i}.npz"), np.load(tmp_path / "two" / f"v{i}.npz")
        assert np.array_equal(a["crops"], b["crops"])


def test_the_landmark_model_is_found_or_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(m.sys, "path", [str(tmp_path / "nothing")])
    monkeypatch.setattr(m, "KAGGLE_INPUT", tmp_path / "kaggle" / "input")
    monkeypatch.setitem(m.__dict__, "__file__", str(tmp_path / "script" / "master_all_avsr.py"))
    with pytest.raises(m.UserError) as e:
        m.find_landmark_model(m.Config())
    assert "pip install face_recognition_models" in str(e.value) and "--landmark-model" in str(e.value)
    assert str(tmp_path / "nothing" / "face_recognition_models" / "models" / m.LANDMARK_FILE) in str(e.value)
    hidden = tmp_path / "kaggle" / "input" / "dlib-models" / "v1" / m.LANDMARK_FILE
    hidden.parent.mkdir(parents=True)
    hidden.write_bytes(b"x")
    assert m.find_landmark_model(m.Config()) == hidden
    package = tmp_path / "site" / "face_recognition_models" / "models" / m.LANDMARK_FILE
    package.parent.mkdir(parents=True)
    package.write_bytes(b"x")
    monkeypatch.setattr(m.sys, "path", [str(tmp_path / "site")])
    assert m.find_landmark_model(m.Config()) == package
    with pytest.raises(m.UserError, match="no such file"):
        m.find_landmark_model(m.Config(landmark_model=str(tmp_path / "missing.dat")))


def test_helpers_fill_smooth_and_name_frame_ranges():
    points = np.zeros((5, 68, 2), np.float32)
    points[:, :, 0] = np.arange(5)[:, None] * 2.0
    points[[0, 2], :, :] = np.nan
    filled = m.fill_gaps(points)
    assert filled[:, 0, 0].tolist() == [2.0, 2.0, 4.0, 6.0, 8.0]
    smooth = m.smooth_over_time(filled, 3)
    assert smooth[:, 0, 0].tolist() == pytest.approx([2.0, 8 / 3, 4.0, 6.0, 8.0])
    assert m.frame_ranges(np.array([3, 4, 5, 9, 11, 12])) == "3-5, 9, 11-12"
    assert len(m.at_clip_rate(np.zeros((60, 2, 2)), 50.0)) == 30 and len(m.at_clip_rate(np.zeros((7, 2, 2)), 25)) == 7


FAST = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "24", "--max-frames", "400", "--epochs", "1"]


@pytest.fixture(scope="module")
def saying_x(tmp_path_factory) -> tuple[Path, list[str]]:
    """A trained tiny run that says UNIT on every frame (conftest's saying_one_unit), and decode's flags for it."""
    work = tmp_path_factory.mktemp("run") / "w"
    m.train(m.parse_config(FAST + ["--work-dir", str(work)]))
    saying_one_unit(work)
    return work, FAST + ["--work-dir", str(work), "--mode", "decode", "--decoder", "ctc"]


def test_decode_cuts_the_mouth_out_of_face_videos_first(astronaut, tmp_path, capsys, saying_x):
    work, fast = saying_x
    (tmp_path / "raw").mkdir()
    write_video(tmp_path / "raw" / "face.mp4", face_video(astronaut)[0])
    (tmp_path / "raw" / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(m.UserError, match="no clip to decode .every one was skipped"):
        m.run_decode(m.parse_config(fast + ["--input", str(tmp_path / "raw")]))
    assert "add --preprocess" in capsys.readouterr().err
    with pytest.raises(m.UserError, match=r"out.txt: decode writes .csv, .jsonl, .json, .srt, .vtt; name the file"):
        m.run_decode(m.parse_config(fast + ["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out.txt")]))
    decoded = m.run_decode(m.parse_config(fast + ["--input", str(tmp_path / "raw"), "--preprocess"]))
    assert decoded == [("face", [(UNIT, decoded[0][1][0][1])])]  # one piece of 30 frames
    out = capsys.readouterr()
    assert "broken.mp4: unreadable video" in out.err and out.out.rstrip("\n").splitlines()[-1] == f"face\t{UNIT}"


def long_face_video(photo: np.ndarray) -> tuple[list[np.ndarray], dict[str, range]]:
    """5.6 s: the face for 30 frames, 20 without it, back for 30, a cut to another shot of it in the same place
    (another light) for 30, then a cut to another face (the first mirrored, elsewhere) for 30; and where each
    part lies."""
    face = face_video(photo, 30)[0]
    light = np.linspace(-60, 60, 256)[None, :]
    relit = [np.clip(f + light, 0, 255).astype(np.uint8) for f in face]
    other = [np.ascontiguousarray(f[:, ::-1]) for f in face]
    blank = [np.full((256, 256), 120, np.uint8)] * 20
    return face + blank + face + relit + other, {"face": range(0, 30), "gap": range(30, 50), "back": range(50, 80),
                                                  "cut": range(80, 110), "other": range(110, 140)}


def test_a_long_face_video_is_read_in_pieces_at_gaps_and_cuts_with_timed_words(astronaut, tmp_path, saying_x):
    work, fast = saying_x
    frames, parts = long_face_video(astronaut)
    video = write_video(tmp_path / "talk.mp4", frames)
    m.run_decode(m.parse_config(fast + ["--input", str(video), "--preprocess", "--output", str(tmp_path / "t.json")]))
    result = m.json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["videos"][0]
    pieces = [(round(p["start"] * 25), round(p["end"] * 25)) for p in result["pieces"]]
    assert [a for a, _ in pieces] == [0, 50, 80, 110]  # a piece ends where the face goes and at the cut
    assert [b for _, b in pieces] == [30, 80, 110, 140] and result["frames"] == 140
    assert [p["face"] for p in result["pieces"]] == [1, 2, 3, 4]
    assert [(w["word"], w["start"], w["end"], w["timed"]) for w in result["words"]] == [
        (UNIT, a / 25, b / 25, "ctc") for a, b in pieces]
    assert result["text"] == " ".join([UNIT] * 4)
    assert "no face on 20 of 140 frames (0.8 s): not read" in result["notes"]
    assert any(n.startswith("4 faces followed one after another") for n in result["notes"])


def test_a_run_longer_than_a_piece_is_cut_at_its_quietest_frame_and_at_a_jump(tmp_path, saying_x):
    """A mouth clip of 100 frames, still but for two bursts of motion (the picture sliding), then a jump to
    another mouth for 30: cut inside the still parts and at the jump, no piece longer than --piece-seconds or
    (but the last of a run) shorter than --shortest-piece, every frame read once."""
    work, fast = saying_x
    rng = np.random.default_rng(0)
    texture = lambda: cv2.GaussianBlur(rng.integers(0, 255, (112, 400)).astype(np.float32), (0, 0), 4)
    first, other = texture(), texture()
    moving = list(range(30, 46)) + list(range(62, 81))  # where cuts every 38 frames would fall
    shifts = np.cumsum([2 * (t in moving) for t in range(100)])
    clip = np.stack([first[:, s:s + 112] for s in shifts] + [other[:, :112]] * 30)
    np.save(tmp_path / "mouth.npy", ((clip - clip.min()) / np.ptp(clip) * 255).astype(np.uint8))
    m.run_decode(m.parse_config(fast + ["--input", str(tmp_path / "mouth.npy"), "--output", str(tmp_path / "t.json")]))
    pieces = [(round(p["start"] * 25), round(p["end"] * 25))
              for p in m.json.loads((tmp_path / "t.json").read_text())["videos"][0]["pieces"]]
    assert pieces[0][0] == 0 and pieces[-1] == (100, 130) and all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:]))
    assert all(20 <= b - a <= 38 for a, b in pieces[:-2]) and not any(a in moving for a, _ in pieces[1:])


def test_ctc_places_each_unit_in_its_frames_or_says_it_cannot():
    a, b, blank = 3, 4, 0
    frames = [blank, a, a, blank, b, b, blank, a, blank, blank]
    log_probs = m.torch.full((len(frames), 6), -9.0)
    log_probs[range(len(frames)), frames] = -0.1
    assert m.ctc_spans(log_probs, [a, b, a], blank) == [(1, 3), (4, 6), (7, 8)]
    assert m.ctc_spans(log_probs, [], blank) == []
    assert m.ctc_spans(log_probs[:2], [a, a], blank) is None  # a repeated unit needs a blank between: 3 frames
    assert m.ctc_spans(log_probs[:3], [a, a], blank) == [(0, 1), (2, 3)]


def test_words_get_times_and_subtitles_in_both_formats():
    vocab = m.load_vocabulary(m.Config())
    ids = vocab.encode("\u0628\u064e\u0627 \u062a\u064e")[0]
    assert len(ids) == 4  # two units, the space, one unit
    words = m.timed_words(ids, [(2, 4), (4, 6), (6, 9), (9, 12)], 20, 50, vocab)
    assert [(w["word"], w["start"], w["end"]) for w in words] == [("\u0628\u064e\u0627", 2.08, 2.24), ("\u062a\u064e", 2.36, 2.48)]
    even = m.timed_words(ids, None, 20, 50, vocab)
    assert [(w["start"], w["end"], w["timed"]) for w in even] == [(2.0, 2.4, "even"), (2.4, 2.8, "even")]
    many = [{"word": f"w{k}", "start": k * 0.5, "end": k * 0.5 + 0.4} for k in range(9)] + [
        {"word": "late", "start": 3661.5, "end": 3662.25}]
    assert m.subtitles(many, ".srt").split("\n\n")[:3] == [
        "1\n00:00:00,000 --> 00:00:03,400\nw0 w1 w2 w3 w4 w5 w6", "2\n00:00:03,500 --> 00:00:04,400\nw7 w8",
        "3\n01:01:01,500 --> 01:01:02,250\nlate"]
    assert m.subtitles(many, ".vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:03.400\nw0 w1")


def test_ctrl_c_in_a_long_video_keeps_what_was_read_and_says_where_it_stopped(astronaut, tmp_path, saying_x,
                                                                              monkeypatch):
    work, fast = saying_x
    video = write_video(tmp_path / "long.mp4", face_video(astronaut, 100)[0])

    def ctrl_c_at_frame_60(videos, every):
        def tell(stage, info, piece):
            if stage == "frame" and info["frames"] == 60:
                raise KeyboardInterrupt
        return tell
    monkeypatch.setattr(m, "decode_progress", ctrl_c_at_frame_60)
    with pytest.raises(KeyboardInterrupt):
        m.run_decode(m.parse_config(fast + ["--input", str(video), "--preprocess", "--output", str(tmp_path / "t.json")]))
    result = m.json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["videos"][0]
    assert result["frames"] == 60 and result["pieces"][0]["start"] == 0 and result["pieces"][-1]["end"] == 60 / 25
    assert "interrupted (Ctrl-C) at 2.4 s: transcribed up to there" in result["notes"]


def with_sound(path: Path, frames: list[np.ndarray], wave: np.ndarray) -> Path:
    """An mp4 of gray frames (25 fps) with a 16 kHz AAC sound track, as a phone records a face."""
    import av
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.height, video.width = frames[0].shape
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=m.SAMPLE_RATE, layout="mono")
        for f in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.stack([f] * 3, -1), format="rgb24")))
        container.mux(video.encode(None))
        chunk = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
        chunk.sample_rate = m.SAMPLE_RATE
        container.mux([*sound.encode(chunk), *sound.encode(None)])
    return path


@pytest.fixture(scope="module")
def hearing(tmp_path_factory) -> list[str]:
    """decode's flags for a tiny audio-visual run (trained on generated clips and their sound)."""
    work = tmp_path_factory.mktemp("av") / "w"
    m.train(m.parse_config(FAST + ["--modality", "av", "--work-dir", str(work)]))
    return FAST + ["--modality", "av", "--work-dir", str(work), "--mode", "decode", "--decoder", "ctc"]


def pieces_heard(monkeypatch) -> list[tuple[int, np.ndarray]]:
    """Filled as the run reads: each piece's first frame and the sound the model hears with it."""
    heard, read = [], m.read_pieces
    def spy(model, pieces, *args):
        heard.extend((p.start, p.sound) for p in pieces)
        return read(model, pieces, *args)
    monkeypatch.setattr(m, "read_pieces", spy)
    return heard


def test_an_audio_visual_model_hears_each_piece_of_a_long_video_with_its_own_sound(astronaut, tmp_path, hearing,
                                                                                 monkeypatch):
    """A face video with its sound and one without; a mouth clip whose sound, in a wav of its name beside it, ends
    before its picture does."""
    heard = pieces_heard(monkeypatch)
    rng = np.random.default_rng(0)
    frames = face_video(astronaut, 60)[0] + [np.full((256, 256), 120, np.uint8)] * 20 + face_video(astronaut, 60)[0]
    talk = with_sound(tmp_path / "talk.mp4", frames, (0.3 * rng.standard_normal(140 * 640)).astype(np.float32))
    write_video(tmp_path / "silent.mp4", frames[:30])
    m.run_decode(m.parse_config(hearing + ["--input", str(tmp_path), "--preprocess", "--output", str(tmp_path / "t.json")]))
    [result] = m.json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["videos"]
    wave = m.read_audio(talk)  # the sound as the whole file decodes
    assert result["name"] == "talk" and len(heard) == len(result["pieces"]) >= 4
    assert [s for s, _ in heard] == [round(p["start"] * 25) for p in result["pieces"]]
    assert heard[-1][0] >= 80  # pieces after the gap hear their own stretch, not the next in line
    for start, sound in heard:
        assert np.array_equal(sound, m.fit_to_frames(wave[start * 640:], len(sound)))
    heard.clear()
    clip = np.stack(m.read_video(tmp_path / "talk.mp4")[:100, 72:184, 72:184])
    np.save(tmp_path / "mouth.npy", clip)
    m.write_wav(tmp_path / "mouth.wav", (0.3 * rng.standard_normal(50 * 640)).astype(np.float32))
    m.run_decode(m.parse_config(hearing + ["--input", str(tmp_path / "mouth.npy"), "--output", str(tmp_path / "m.json")]))
    [result] = m.json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["videos"]
    wave = m.read_audio(tmp_path / "mouth.wav")
    assert [s for s, _ in heard] == [round(p["start"] * 25) for p in result["pieces"]] and heard[-1][0] > 50
    for start, sound in heard:
        assert np.array_equal(sound, m.fit_to_frames(wave[start * 640:], len(sound)))
    assert "its sound ends at 2.0 s, its picture at 4.0 s: the pieces after it were heard as silence" in result["notes"]


def test_an_audio_visual_model_names_a_video_without_sound_and_reads_the_rest(astronaut, tmp_path, hearing, capsys):
    write_video(tmp_path / "silent.mp4", face_video(astronaut, 30)[0])
    with_sound(tmp_path / "talk.mp4", face_video(astronaut, 30)[0], np.zeros(30 * 640, np.float32))
    decoded = m.run_decode(m.parse_config(hearing + ["--input", str(tmp_path), "--preprocess"]))
    assert [name for name, _ in decoded] == ["talk"]
    assert f"Skipped {tmp_path / 'silent.mp4'}: no sound: {tmp_path / 'silent.mp4'}: no audio track" in capsys.readouterr().err


def test_a_two_hour_video_shows_its_progress_stops_on_ctrl_c_and_holds_few_frames(tmp_path, saying_x, monkeypatch,
                                                                                    capsys):
    """Two hours of mouth frames, made as they are read (no file that long is written): progress says how far of
    the 7,200 s, Ctrl-C at 4 minutes keeps what was read, and of the 6,000 frames streamed by then few are alive."""
    work, fast = saying_x
    still = np.random.default_rng(0).integers(0, 255, (112, 400)).astype(np.uint8)
    alive = []

    def two_hours(path, info):
        info.update(fps=25.0, rotation=0, declared=2 * 3600 * 25, read=0)
        for t in range(info["declared"]):
            frame = np.ascontiguousarray(still[:, t % 288:t % 288 + 112])
            alive.append(weakref.ref(frame))
            info["read"] += 1
            yield frame
    monkeypatch.setattr(m, "stream_frames", two_hours)
    shown = m.decode_progress

    def stop_at_4_minutes(videos, every):
        show = shown(videos, 0.0)  # every call prints
        def tell(stage, info, piece):
            show(stage, info, piece)
            if stage == "frame" and info["frames"] == 6000:
                held.append(sum(r() is not None for r in alive))
                raise KeyboardInterrupt
        return tell
    held = []
    monkeypatch.setattr(m, "decode_progress", stop_at_4_minutes)
    (tmp_path / "talk.mp4").touch()
    with pytest.raises(KeyboardInterrupt):
        m.run_decode(m.parse_config(fast + ["--input", str(tmp_path / "talk.mp4"), "--output", str(tmp_path / "t.json")]))
    err = capsys.readouterr().err
    assert "decode: video 1 of 1, 1 s of 7200 s read" in err and "decode: video 1 of 1, 240 s of 7200 s read" in err
    assert len(alive) == 6000 and held[0] <= 2 * round(m.Config.piece_seconds * 25)  # a piece's frames, no more
    [result] = m.json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["videos"]
    assert result["frames"] == 6000 and result["pieces"][-1]["end"] == 240.0
    assert result["text"].split() == [UNIT] * len(result["pieces"]) and len(result["pieces"]) >= 6000 // 38
    assert "interrupted (Ctrl-C) at 240.0 s: transcribed up to there" in result["notes"]


def rotation_tagged(path: Path, degrees: int) -> Path:
    """The mp4 at path with its track's display matrix set to turn it by `degrees` (90 or 270) when played."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd") + 4 + 4 + 20 + 16  # version 0: flags, times, track id, duration; layer, volume
    one = 65536 if degrees == 90 else -65536
    data[at:at + 36] = struct.pack(">9i", 0, one, 0, -one, 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


def test_a_phone_video_recorded_sideways_is_read_upright(astronaut, tmp_path, saying_x):
    work, fast = saying_x
    sideways = [np.ascontiguousarray(np.rot90(f)) for f in face_video(astronaut, 30, size=(320, 256))[0]]
    plain = write_video(tmp_path / "plain.mp4", sideways)
    tagged = rotation_tagged(write_video(tmp_path / "tagged.mp4", sideways), 90)
    notes = {}
    for video, expected in ((plain, ""), (tagged, UNIT)):
        m.run_decode(m.parse_config(fast + ["--input", str(video), "--preprocess", "--output", str(tmp_path / "t.json")]))
        result = m.json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["videos"][0]
        assert result["text"] == expected, result["notes"]
        notes[video.stem] = result["notes"]
    assert notes["plain"] == ["no face found on any of its 30 frames: the detector needs a frontal face about 40 "
                              "pixels wide or more"]  # sideways, dlib finds none
    assert "turned upright by 90 degrees, as its rotation tag says" in notes["tagged"]


def test_a_corrupt_tail_keeps_what_came_before_and_says_where_it_ends(astronaut, tmp_path, saying_x):
    work, fast = saying_x
    video = write_video(tmp_path / "cut.mp4", face_video(astronaut, 100)[0])
    data = bytearray(video.read_bytes())
    mdat = data.find(b"mdat")
    end = mdat - 4 + int.from_bytes(data[mdat - 4:mdat], "big")
    data[(mdat + end) // 2:end] = bytes(end - (mdat + end) // 2)  # the second half of the frames' data zeroed
    video.write_bytes(bytes(data))
    for out in ("t.srt", "t.json"):
        m.run_decode(m.parse_config(fast + ["--input", str(video), "--preprocess", "--output", str(tmp_path / out)]))
    srt = (tmp_path / "t.srt").read_text(encoding="utf-8")
    assert srt.startswith("1\n00:00:00,000 --> ") and UNIT in srt
    result = m.json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["videos"][0]
    assert 25 <= result["frames"] < 75 and result["pieces"][-1]["end"] == result["frames"] / 25
    assert any(n.startswith("truncated: its header declares 100 frames") for n in result["notes"])


def test_a_face_that_leaves_for_half_the_video_a_codec_opencv_lacks_and_an_oversize_frame_are_each_said(
        astronaut, tmp_path, saying_x, monkeypatch, capsys):
    import av
    work, fast = saying_x
    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in" / "half.mp4", face_video(astronaut, 50)[0] + [np.full((256, 256), 90, np.uint8)] * 50)
    with av.open(str(tmp_path / "m4.mkv"), "w") as container:  # MPEG-4 in Matroska, its codec then renamed
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 64
        for f in [np.full((64, 64, 3), 9 * i, np.uint8) for i in range(10)] + [None]:
            container.mux(stream.encode(f if f is None else av.VideoFrame.from_ndarray(f, format="rgb24")))
    data = (tmp_path / "m4.mkv").read_bytes()
    (tmp_path / "in" / "unknown.mkv").write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_QQQQQ/ISO/ASP"))
    m.run_decode(m.parse_config(fast + ["--input", str(tmp_path / "in"), "--preprocess", "--output", str(tmp_path / "t.json")]))
    err = capsys.readouterr().err
    assert (f"Skipped {tmp_path / 'in' / 'unknown.mkv'}: unreadable video: its picture is coded as a codec FFmpeg does "
            "not know, which this OpenCV cannot decode: re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)") in err
    [half] = m.json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["videos"]
    assert half["pieces"][-1]["end"] == 2.0 and half["words"][-1]["end"] <= 2.0 and half["frames"] == 100
    assert half["notes"] == ["no face on 50 of 100 frames (2.0 s): not read"]
    assert "half.mp4: no face on 50 of 100 frames (2.0 s): not read" in err
    monkeypatch.setattr(m, "LARGEST_FRAME", 256 * 255)
    with pytest.raises(m.UserError, match="every one was skipped"):
        m.run_decode(m.parse_config(fast + ["--input", str(tmp_path / "in" / "half.mp4"), "--preprocess"]))
    assert "half.mp4: too large: frames of 256 x 256; up to 8K (65,280 pixels) are read: scale it down first" in (
        capsys.readouterr().err)


def test_a_clip_that_does_not_read_back_whole_is_not_kept(astronaut, tmp_path, monkeypatch):
    frames = np.stack(face_video(astronaut, 8)[0])[:, :112, :112]
    real = m.read_frames
    monkeypatch.setattr(m, "read_frames", lambda path: (real(path)[0][:3], 25.0))  # as a full disk leaves it
    with pytest.raises(m.UserError, match="reads back with 3 of its 8 frames"):
        m.write_clip(tmp_path / "clip.mp4", frames)
    assert list(tmp_path.iterdir()) == []


def preprocessing_in_background(photo, folder: Path, videos: int, frames: int, **popen):
    """`--mode preprocess --workers 2` started as a user would, on `videos` face videos written into folder/raw."""
    (folder / "raw").mkdir()
    for i in range(videos):
        write_video(folder / "raw" / f"v{i:02d}.mp4", face_video(photo, frames)[0])
    return subprocess.Popen([sys.executable, str(Path(m.__file__)), "--mode", "preprocess", "--input",
                             str(folder / "raw"), "--output", str(folder / "out"), "--workers", "2"], **popen)


def test_workers_end_with_their_parent_killed(astronaut, tmp_path):
    parent = preprocessing_in_background(astronaut, tmp_path, 8, 60, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
    workers = []
    while len(workers) < 2 and parent.poll() is None:
        time.sleep(0.1)
        workers = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert len(workers) == 2
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and "Z" not in
                                         Path(f"/proc/{w}/stat").read_text().split()[2] for w in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
                   for w in workers)


def test_the_report_is_rewritten_while_workers_run(astronaut, tmp_path, monkeypatch):
    (tmp_path / "raw").mkdir()
    for i in range(3):
        write_video(tmp_path / "raw" / f"v{i}.mp4", face_video(astronaut, 8)[0])
    writes, real = [], m.write_csv
    monkeypatch.setattr(m, "REPORT_EVERY", 0.0)
    monkeypatch.setattr(m, "write_csv", lambda path, rows: (writes.append(len(rows)), real(path, rows)))
    m.preprocess_videos(m.Config(input=str(tmp_path / "raw"), workers=2), tmp_path / "out")
    assert writes[:-1] and writes[-1] == 3 and writes[0] < 3  # so far, then all


def test_ctrl_c_stops_preprocessing_in_order_with_its_report(astronaut, tmp_path):
    # started as a shell starts it, Ctrl-C at its default: a test process may have come to ignore it (seen in CI,
    # once other tests had run in the same worker), and an ignored SIGINT is inherited
    run = preprocessing_in_background(astronaut, tmp_path, 12, 80, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not list((tmp_path / "out").glob("*.mp4")) and run.poll() is None:
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole group, workers too
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err and "Interrupted" in err, (
        f"exit {run.returncode}, this test's SIGINT handler {signal.getsignal(signal.SIGINT)}: {err}{out}")
    done = list(csv.DictReader(open(tmp_path / "out" / "preprocess_report.csv", encoding="utf-8-sig")))
    assert 1 <= len(done) < 12 and all((tmp_path / "out" / f"{Path(r['video']).stem}.mp4").exists() for r in done)
