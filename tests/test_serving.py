"""Section 13: --mode serve. The server is started as a user starts it (its own process, on a free local port)
with a model trained here; the tests drive its JSON API and, in a real headless Chromium, its page."""
import contextlib
import csv
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from conftest import UNIT, free_port, m, saying_one_unit
from test_preprocessing import face_video, pieces_heard, with_sound, write_video

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.xdist_group("serving")  # one server for the module, on one worker (pytest.ini)

FAST = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "24", "--max-frames", "400", "--epochs", "1"]
LIMIT_MB = 2  # the server's upload limit here, so that an oversize upload stays small (and a bomb fits in)
TIMEOUT = 3  # the server's --serve-timeout here: slow clients are cut off within a test's patience


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("serve") / "run"
    m.train(m.parse_config(FAST + ["--work-dir", str(work)]))
    return work


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    m.write_synthetic_dataset(m.Config(output=str(root), synthetic_clips=3, seed=8), m.Vocabulary.seed())
    return root / "Preprocessed_Video"


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2GRAY)


@contextlib.contextmanager
def running_server(tmp_path_factory, settings: list[str]):
    """The server with these settings on a free port, its temporary folder an empty one of its own (nothing may
    land there): its url, port, process and the file its stderr goes to; stopped with Ctrl-C, cleanly."""
    tmp = tmp_path_factory.mktemp("server_tmp")
    port = free_port()
    log_path = tmp_path_factory.mktemp("server_log") / "stderr.txt"
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, m.__file__, "--mode", "serve", "--port", str(port), "--serve-queue", "2",
                             "--max-upload-mb", str(LIMIT_MB), "--serve-timeout", str(TIMEOUT)] + settings,
                            stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/api/health").json() == {"ok": True}:
                break
        except httpx.TransportError:
            assert proc.poll() is None, log.seek(0) or log.read()
            time.sleep(0.1)
    try:
        yield SimpleNamespace(url=url, port=port, proc=proc, log=log_path)
    finally:  # a failed test stops its server too
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        out, _ = proc.communicate(timeout=60)
    log.seek(0)
    errors = log.read()
    assert proc.returncode == 0 and "Traceback" not in errors, errors
    assert f"at {url}/" in out and "warning" not in out  # it says where; on 127.0.0.1, no warning
    assert list(tmp.iterdir()) == []


@pytest.fixture(scope="module")
def live(run_dir, tmp_path_factory):
    with running_server(tmp_path_factory, ["--work-dir", str(run_dir)]) as server:
        yield server


@pytest.fixture(scope="module")
def server(live) -> str:
    return live.url


@pytest.fixture
def serving_here(monkeypatch):
    """m.serve in this process: the temporary folder it takes (TMPDIR, tempfile's) is given back afterwards."""
    monkeypatch.setenv("TMPDIR", tempfile.gettempdir())  # recorded, so restored (or removed again) at the end
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)


def upload(url: str, path: Path, name: str = "", **params) -> httpx.Response:
    return httpx.post(f"{url}/api/jobs", params={"name": name or path.name, **params}, content=path.read_bytes(),
                      timeout=60)


def events(url: str, job_id: str) -> list[dict]:
    """The job's server-sent events until it is finished."""
    seen = []
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    return seen


def wait_for_state(url: str, job_id: str, state: str) -> dict:
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and (now := json.loads(line[6:]))["state"] == state:
                return now
    raise AssertionError(f"job {job_id} finished without being {state}")


def in_order(states: list[str]) -> bool:
    ranks = [m.SERVE_STATES.index(s) for s in states]
    return ranks == sorted(ranks)


def test_an_uploaded_clip_is_followed_live_and_read_as_decode_reads_it(server, run_dir, clips):
    clip = clips / "synth_00001.mp4"
    reply = upload(server, clip, beam_size=4, nbest=3)
    assert reply.status_code == 202 and reply.json()["state"] in ("queued", "reading")  # the worker may be quick
    seen = events(server, reply.json()["id"])
    assert in_order([e["state"] for e in seen]) and seen[-1]["state"] == "done", seen
    assert "decoding" in [e["state"] for e in seen[:-1]]
    result = httpx.get(f"{server}/api/jobs/{seen[-1]['id']}").json()
    assert result == seen[-1] and result["frames"] == len(m.read_video(clip)) and len(result["hypotheses"]) == 3
    [(name, hyps)] = m.run_decode(m.parse_config(FAST + ["--mode", "decode", "--work-dir", str(run_dir), "--input",
                                                         str(clip), "--beam-size", "4", "--nbest", "3"]))
    assert [h["text"] for h in result["hypotheses"]] == [text for text, _ in hyps]
    assert [h["score"] for h in result["hypotheses"]] == pytest.approx([score for _, score in hyps], abs=1e-3)
    preview = httpx.get(f"{server}{result['preview']}")
    assert preview.headers["content-type"] == "image/png"
    strip = cv2.imdecode(np.frombuffer(preview.content, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert strip.shape == (112, 112 * m.PREVIEW_FRAMES)
    rows = [r for r in httpx.get(f"{server}/api/results.json").json() if r["job"] == result["id"]]
    assert [(r["rank"], r["text"]) for r in rows] == [(i + 1, h["text"]) for i, h in enumerate(result["hypotheses"])]
    table = httpx.get(f"{server}/api/results.csv")
    assert table.content.startswith(b"\xef\xbb\xbf") and result["hypotheses"][0]["text"] in table.text
    assert result["id"] in m.JobBoard(None, m.Config(work_dir=str(run_dir))).jobs  # a restarted server lists it


def test_a_restarted_server_fails_the_job_it_stopped_in_and_drops_half_an_upload(tmp_path):
    cfg = m.Config(work_dir=str(tmp_path))
    board = m.JobBoard(None, cfg)
    stopped, half = board.new_job("clip.mp4", 5, 1), board.new_job("big.mp4", 5, 1)
    stopped.upload = stopped.folder / "0123.mp4"
    stopped.upload.write_bytes(b"the user's video")
    stopped.set("decoding", "reading the lips")
    board.save(stopped)
    (half.folder / ".upload.part").write_bytes(b"half a vid")
    again = m.JobBoard(None, cfg).jobs
    assert list(again) == [stopped.id] and again[stopped.id].state == "failed"
    assert "stopped before this job finished" in again[stopped.id].detail and stopped.upload.exists()
    assert json.loads((stopped.folder / "result.json").read_text())["state"] == "failed" and not half.folder.exists()


def test_the_events_stream_ends_on_the_finished_state_even_when_it_comes_between_two_looks(tmp_path):
    """A job that finishes just after the stream took its view: the finished state must still be sent."""
    from fastapi.testclient import TestClient

    class Racing(m.JobBoard):
        def view(self, job):
            seen = super().view(job)
            if job.state == "preprocessing":
                job.state, job.detail = "cancelled", "cancelled while preprocessing"  # the worker, meanwhile
            return seen

    cfg = m.Config(work_dir=str(tmp_path))
    reader = type("Reader", (), {"cfg": cfg})()
    board = Racing(None, cfg)
    job = board.new_job("clip.mp4", 5, 1)
    job.state, job.detail = "preprocessing", "finding the mouth"
    board.jobs[job.id] = job
    with TestClient(m.serving_app(reader, board, cfg), base_url="http://127.0.0.1") as client, \
            client.stream("GET", f"/api/jobs/{job.id}/events") as stream:
        sent = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert [e["state"] for e in sent] == ["preprocessing", "cancelled"]


def test_a_face_video_is_cut_to_its_mouth_with_progress_and_the_cut_is_kept(server, astronaut, tmp_path):
    video = write_video(tmp_path / "face.mp4", face_video(astronaut, 150)[0])  # long enough to be seen a few times
    seen = events(server, upload(server, video).json()["id"])
    assert seen[-1]["state"] == "done" and seen[-1]["frames"] == 150 and in_order([e["state"] for e in seen])
    cutting = [(e["detail"], e["progress"]) for e in seen if e["state"] == "preprocessing"][1:]  # after its first
    frames = [int(re.fullmatch(r"finding the mouth: frame (\d+) of 150", detail)[1]) for detail, _ in cutting]
    assert frames and frames == sorted(frames)
    assert [p for _, p in cutting] == pytest.approx([(f - 1) / 150 for f in frames], abs=1e-3)
    again = events(server, upload(server, video, name="same.mp4").json()["id"])
    assert "preprocessing" not in [e["state"] for e in again] and "reused" in again[-1]["notes"]
    assert again[-1]["hypotheses"][0]["text"] == seen[-1]["hypotheses"][0]["text"]


def test_an_audio_visual_model_hears_each_piece_of_an_upload_with_its_own_sound(astronaut, tmp_path, monkeypatch):
    work = tmp_path / "av"
    m.train(m.parse_config(FAST + ["--modality", "av", "--work-dir", str(work)]))
    reader = m.LipReader(m.parse_config(["--work-dir", str(work), "--decoder", "ctc"]))
    heard = pieces_heard(monkeypatch)
    wave = (0.3 * np.random.default_rng(0).standard_normal(80 * 640)).astype(np.float32)
    talk = with_sound(tmp_path / "talk.mp4", face_video(astronaut, 80)[0], wave)
    job = m.Job("a", "talk.mp4", tmp_path, beam_size=1, nbest=1, upload=talk)
    reader.read(job)
    heard_wave = m.read_audio(talk)
    assert job.frames == 80 and [round(p["start"] * 25) for p in job.pieces] == [s for s, _ in heard] and len(heard) >= 2
    assert all(np.array_equal(sound, m.fit_to_frames(heard_wave[s * 640:], len(sound))) for s, sound in heard)
    silent = m.Job("b", "silent.mp4", tmp_path, beam_size=1, nbest=1,
                   upload=write_video(tmp_path / "silent.mp4", face_video(astronaut, 30)[0]))
    with pytest.raises(ValueError, match="no sound: .*silent.mp4: no audio track"):
        reader.read(silent)


def test_a_long_clips_reading_says_which_pieces_are_read_of_how_many(run_dir, tmp_path, monkeypatch):
    said, reader = [], m.LipReader(m.parse_config(["--work-dir", str(run_dir), "--decoder", "ctc", "--max-frames", "200"]))
    monkeypatch.setattr(m.Job, "set", lambda job, state, detail, progress=0.0: said.append((state, detail, progress)))
    still = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (112, 400)).astype(np.uint8), (0, 0), 4)
    np.save(tmp_path / "long.npy", np.stack([still[:, t % 288:t % 288 + 112] for t in range(500)]))  # one mouth, moving
    job = m.Job("a", "long.npy", tmp_path, beam_size=1, nbest=1, upload=tmp_path / "long.npy")
    reader.read(job)
    pieces = len(job.pieces)
    reading = [d for _, d, _ in said]
    assert pieces > 5 and any(re.fullmatch(r"frame \d+ of 500; reading pieces 1-\d+", d) for d in reading), reading
    last = re.fullmatch(rf"reading pieces (\d+)-{pieces} of {pieces} \(500 frames\)", reading[-1])
    assert last and said[-1][0] == "decoding" and said[-1][2] == pytest.approx((int(last[1]) - 1) / pieces)


def test_bad_uploads_get_clear_errors_and_the_server_goes_on(server, run_dir, clips, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 100)
    failed = events(server, upload(server, broken).json()["id"])[-1]
    assert failed["state"] == "failed" and failed["detail"].startswith("broken.mp4: unreadable video")
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(int(1.2 * LIMIT_MB * 2 ** 20)))
    reply = upload(server, big)
    assert reply.status_code == 413 and f"over the upload limit of {LIMIT_MB} MB" in reply.json()["detail"]
    chunks = (big.read_bytes()[i:i + 2 ** 16] for i in range(0, big.stat().st_size, 2 ** 16))  # no length given
    reply = httpx.post(f"{server}/api/jobs", params={"name": "big.mp4"}, content=chunks, timeout=60)
    assert reply.status_code == 413 and "too large" in reply.json()["detail"]
    reply = upload(server, broken, name="notes.txt")
    assert reply.status_code == 415 and ".txt is not a kind this server reads" in reply.json()["detail"]
    assert upload(server, clips / "synth_00000.mp4", beam_size=0).status_code == 422
    reply = httpx.post(f"{server}/api/jobs", params={"name": "empty.mp4"}, content=b"")
    assert reply.status_code == 400 and "empty" in reply.json()["detail"]
    assert httpx.get(f"{server}/api/jobs/nosuchjob").status_code == 404
    assert events(server, upload(server, clips / "synth_00000.mp4").json()["id"])[-1]["state"] == "done"
    for folder in (run_dir / "serve" / "jobs").iterdir():  # refused uploads leave nothing; taken ones their result
        assert (folder / "result.json").exists() and not (folder / ".upload.part").exists()


def test_the_queue_is_bounded_and_a_job_cancels_waiting_or_running(server, astronaut, clips, tmp_path):
    frames = face_video(astronaut, 400)[0]
    long_video = write_video(tmp_path / "long.mp4", frames[:200] + frames[::-1][:200])  # a new video: cut anew
    running = upload(server, long_video).json()["id"]
    wait_for_state(server, running, "preprocessing")
    waiting = [upload(server, clips / f"synth_0000{i}.mp4").json() for i in (1, 2)]
    assert [w["detail"] for w in waiting] == ["next in line", "waiting its turn: 1 ahead"]
    refused = upload(server, clips / "synth_00000.mp4")
    assert refused.status_code == 429 and "2 uploads are already waiting" in refused.json()["detail"]
    cancelled = httpx.post(f"{server}/api/jobs/{waiting[1]['id']}/cancel").json()
    assert cancelled["state"] == "cancelled"
    httpx.post(f"{server}/api/jobs/{running}/cancel")
    stopped = events(server, running)[-1]
    assert stopped["state"] == "cancelled" and stopped["detail"] == "cancelled while preprocessing"
    assert events(server, waiting[0]["id"])[-1]["state"] == "done"
    assert httpx.post(f"{server}/api/jobs/{running}/cancel").status_code == 409  # finished: nothing to cancel
    status = httpx.get(f"{server}/api/status").json()
    assert status["jobs"]["queued"] == 0 and status["queue_limit"] == 2 and status["model"]["preset"] == "tiny"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def need_browser() -> None:
    if CHROMIUM is None:
        if os.environ.get("AVSR_REQUIRE_BROWSER"):  # CI installs it: there, a missing browser is a failure
            pytest.fail("no chromium on PATH: apt-get install chromium")
        pytest.skip("a real browser is needed: apt-get install chromium (Debian's package)")


def run_saying_one_unit(run_dir: Path, tmp_path_factory) -> Path:
    """A copy of the module's run whose model says UNIT on every frame (conftest's saying_one_unit)."""
    work = tmp_path_factory.mktemp("saying") / "run"
    shutil.copytree(run_dir / "checkpoints", work / "checkpoints", ignore=shutil.ignore_patterns("epochs"))
    saying_one_unit(work)
    return work


def mouths(rng, count: int, frames: int) -> list[np.ndarray]:
    """`count` smooth 112 x 112 textures (mouths far apart in look), each held for `frames` frames."""
    textures = [cv2.GaussianBlur(rng.integers(0, 255, (112, 112)).astype(np.float32), (0, 0), 4) for _ in range(count)]
    return [((t - t.min()) / np.ptp(t) * 255).astype(np.uint8) for t in textures for _ in range(frames)]


def test_the_page_in_a_real_browser_shows_the_transcript_and_the_errors(server, clips, tmp_path):
    need_browser()
    from playwright.sync_api import sync_playwright
    # names no other test uploads to this server: the page also lists the jobs of those tests
    clip, broken = tmp_path / "page_clip.mp4", tmp_path / "page_broken.mp4"
    shutil.copyfile(clips / "synth_00002.mp4", clip)
    broken.write_bytes(b"not a video")
    card = "[...document.querySelectorAll('.job')].find(c => c.querySelector('.name').innerText === '{}')"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server)
        page.wait_for_function("document.body.dataset.ready && document.querySelector('#beam').value !== ''")
        page.fill("#nbest", "2")
        page.set_input_files("#files", [str(clip), str(broken)])
        page.wait_for_function(f"{card.format(clip.name)}?.dataset.state === 'done' && "
                               f"{card.format(broken.name)}?.dataset.state === 'failed'", timeout=120_000)
        cards = {c.query_selector(".name").inner_text(): c for c in page.query_selector_all(".job")}
        shown = cards[clip.name].query_selector(".transcript").inner_text()
        assert cards[clip.name].query_selector("img.preview") is not None
        assert "unreadable video" in cards[broken.name].query_selector(".error").inner_text()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    done = [j for j in httpx.get(f"{server}/api/jobs").json() if j["name"] == clip.name]
    assert shown == (done[-1]["hypotheses"][0]["text"] or "(nothing read)") and done[-1]["nbest"] == 2


def test_the_page_plays_a_long_video_with_its_subtitles_and_words_that_seek(run_dir, tmp_path_factory, tmp_path):
    """A 6-second mouth clip (webm, as a browser records) read in pieces by a model that says UNIT on every frame:
    the API gives the pieces and their timed words; the page plays the upload with the subtitles as a track and
    shows the words, a click on one seeking the video to its start."""
    need_browser()
    from playwright.sync_api import sync_playwright
    work = run_saying_one_unit(run_dir, tmp_path_factory)
    rng = np.random.default_rng(1)
    video = write_video(tmp_path / "talk.webm", mouths(rng, 5, 30), fourcc="VP80")  # five mouths, 1.2 s each
    with running_server(tmp_path_factory, ["--work-dir", str(work), "--decoder", "ctc"]) as live:
        done = events(live.url, upload(live.url, video).json()["id"])[-1]
        assert done["state"] == "done" and done["frames"] == 150
        assert [(p["start"], p["end"], p["text"]) for p in done["pieces"]] == [
            (round(k * 1.2, 3), round(k * 1.2 + 1.2, 3), UNIT) for k in range(5)]
        assert [(w["word"], w["start"]) for w in done["words"]] == [(UNIT, round(k * 1.2, 3)) for k in range(5)]
        vtt = httpx.get(f"{live.url}/api/jobs/{done['id']}/subtitles.vtt")
        assert vtt.headers["content-type"].startswith("text/vtt") and vtt.text.startswith("WEBVTT\n\n00:00:00.000 --> ")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(live.url)
            page.wait_for_function("document.querySelector('video.player')?.readyState >= 1", timeout=60_000)
            assert page.eval_on_selector("video.player track", "t => t.track.mode") == "showing"
            cues = vtt.text.count(" --> ")  # 2: a subtitle holds at most 5 seconds
            page.wait_for_function(f"document.querySelector('video.player track').track.cues?.length === {cues}")
            spans = page.query_selector_all(".words span")
            assert [s.get_attribute("data-start") for s in spans] == [f"{round(k * 1.2, 3):g}" for k in range(5)]
            spans[3].click()  # seeks to 3.6 s and plays: the time then runs on inside that word, which is lit
            page.wait_for_function("document.querySelectorAll('.words span')[3].classList.contains('now')")
            at = page.eval_on_selector("video.player", "v => v.currentTime")
            assert 3.6 <= at < 4.8 or page.eval_on_selector("video.player", "v => v.ended"), at
            browser.close()


def y4m(path: Path, frames: list[np.ndarray]) -> Path:
    """Gray frames as a YUV4MPEG2 file (what Chromium's fake camera plays), 25 fps, 4:2:0 with neutral colour."""
    h, w = frames[0].shape
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            f.write(b"FRAME\n" + frame.tobytes() + bytes([128]) * (2 * (h // 2) * (w // 2)))
    return path


def test_the_page_records_from_the_camera_and_transcribes_it(run_dir, tmp_path_factory, tmp_path):
    """Chromium's fake camera fed a mouth clip (Y4M): the page records about 3 seconds with MediaRecorder, sends
    them as camera-*.webm, and the transcript comes back in pieces, as for an uploaded video."""
    need_browser()
    from playwright.sync_api import sync_playwright
    work = run_saying_one_unit(run_dir, tmp_path_factory)
    rng = np.random.default_rng(2)
    feed = y4m(tmp_path / "camera.y4m", mouths(rng, 4, 25))
    with running_server(tmp_path_factory, ["--work-dir", str(work), "--decoder", "ctc"]) as live:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={feed}"])
            page = browser.new_page()
            page.goto(live.url)
            page.wait_for_function("document.body.dataset.ready")
            page.click("#record")
            page.wait_for_function("document.querySelector('#camera').currentTime > 3", timeout=30_000)
            page.click("#record")
            page.wait_for_function("[...document.querySelectorAll('.job')].some(c => c.dataset.state === 'done')",
                                   timeout=60_000)
            assert page.eval_on_selector("#camera", "v => v.hidden")
            browser.close()
        [job] = httpx.get(f"{live.url}/api/jobs").json()
    assert re.fullmatch(r"camera-\d{14}\.webm", job["name"]) and job["state"] == "done"
    assert 60 <= job["frames"] <= 110 and job["pieces"] and all(p["text"] == UNIT for p in job["pieces"])


def beside(run_dir: Path, work: Path) -> list[str]:
    """Settings serving run_dir's model from another work dir (the module's server holds run_dir's serve/)."""
    return ["--work-dir", str(work), "--checkpoint", str(run_dir / "checkpoints" / "best.pt")]


def test_serve_binds_this_machine_only_unless_told_and_says_so(run_dir, tmp_path, monkeypatch, capsys, serving_here):
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(m, "in_notebook", lambda: False)  # ipykernel may be imported by another test of this worker
    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: bound.append((host, port)))
    m.serve(m.parse_config(beside(run_dir, tmp_path) + ["--port", str(free_port())]))
    assert bound[-1][0] == "127.0.0.1" and "warning" not in capsys.readouterr().out
    m.serve(m.parse_config(beside(run_dir, tmp_path) + ["--host", "0.0.0.0", "--port", str(free_port())]))
    assert bound[-1][0] == "0.0.0.0" and "warning: serving on 0.0.0.0" in capsys.readouterr().out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(m.UserError, match="is taken"):
            m.serve(m.parse_config(beside(run_dir, tmp_path) + ["--port", str(taken.getsockname()[1])]))


def test_in_a_notebook_the_server_runs_beside_the_kernel(run_dir, clips, tmp_path, monkeypatch, serving_here):
    monkeypatch.setattr(m, "in_notebook", lambda: True)
    port = free_port()
    server = m.serve(m.parse_config(beside(run_dir, tmp_path) + ["--port", str(port)]))  # returns: the cell ends
    try:
        for _ in range(300):
            if server.started:
                break
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        seen = events(url, upload(url, clips / "synth_00000.mp4").json()["id"])
        assert seen[-1]["state"] == "done"
    finally:
        server.should_exit = True


# Hostile use: requests from other sites, slow clients, crowds of uploads, abandoned ones, a second server,
# cancels racing the worker, names and cells meant to run, and decompression bombs ----------------------------

def upload_head(port: int, name: str, length: int) -> bytes:
    return (f"POST /api/jobs?name={name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {length}\r\n\r\n"
            ).encode()


def parts(run_dir: Path) -> list[Path]:
    """The uploads the server is receiving."""
    return sorted((run_dir / "serve" / "jobs").glob("*/.upload.part"))


def soon(condition, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def cut_off(port: int, first: bytes, drip: bytes = b"", patience: float = 20.0) -> tuple[float, bytes]:
    """A connection that sends `first`, then `drip` a byte every 0.25 s: the seconds until the server closed it
    (inf: it never did) and what it answered."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start, heard = time.monotonic(), b""
        s.sendall(first)
        for n in range(int(patience / 0.25)):
            if select.select([s], [], [], 0.25)[0]:
                try:
                    got = s.recv(65536)
                except ConnectionResetError:
                    got = b""
                if not got:
                    return time.monotonic() - start, heard
                heard += got
            elif n < len(drip):
                try:
                    s.sendall(drip[n:n + 1])
                except OSError:
                    return time.monotonic() - start, heard
    return math.inf, heard


def test_only_its_own_names_are_answered_and_other_sites_change_nothing(live, run_dir, clips):
    url, port = live.url, live.port
    for name in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "10.1.2.3"):
        assert httpx.get(f"{url}/api/health", headers={"host": name}).json() == {"ok": True}, name
    for name in ("attacker.example", f"attacker.example:{port}", "localhost.attacker.example", "a b"):
        refused = httpx.get(f"{url}/", headers={"host": name})
        assert refused.status_code == 400 and "--serve-allowed-hosts" in refused.json()["detail"], name
    before = set((run_dir / "serve" / "jobs").iterdir())
    clip = (clips / "synth_00000.mp4").read_bytes()
    for headers in ({"origin": "http://attacker.example"}, {"origin": f"http://127.0.0.1:{port + 1}"},
                    {"origin": "null"}, {"sec-fetch-site": "cross-site"}):
        refused = httpx.post(f"{url}/api/jobs", params={"name": "x.mp4"}, content=clip, headers=headers)
        assert refused.status_code == 403 and "another site" in refused.json()["detail"], headers
        assert httpx.post(f"{url}/api/jobs/nosuchjob/cancel", headers=headers).status_code == 403
    assert set((run_dir / "serve" / "jobs").iterdir()) == before  # nothing was received
    assert httpx.post(f"{url}/api/jobs/nosuchjob/cancel", headers={"origin": url}).status_code == 404  # its own page
    assert httpx.post(f"{url}/api/jobs/nosuchjob/cancel").status_code == 404  # curl, a script
    assert httpx.get(f"{url}/api/status", headers={"sec-fetch-site": "cross-site"}).status_code == 200  # a link


def test_names_the_user_allows_are_answered_as_through_a_tunnel(tmp_path):
    """The Kaggle notebook's tunnel (localtunnel) brings its own name in Host and https in Origin."""
    from fastapi.testclient import TestClient
    cfg = m.Config(work_dir=str(tmp_path), serve_allowed_hosts=" .loca.lt, lips.example ")
    reader = type("Reader", (), {"cfg": cfg})()
    with TestClient(m.serving_app(reader, m.JobBoard(None, cfg), cfg), base_url="https://abc.loca.lt") as client:
        for host in ("abc.loca.lt", "loca.lt", "LIPS.example:8000", "127.0.0.1"):
            assert client.get("/api/health", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "abcloca.lt", "lips.example.evil"):
            assert client.get("/api/health", headers={"host": host}).status_code == 400, host
        page = {"origin": "https://abc.loca.lt", "sec-fetch-site": "same-origin"}
        assert client.post("/api/jobs/nosuchjob/cancel", headers=page).status_code == 404
        other = {"origin": "https://evil.loca.lt", "sec-fetch-site": "same-site"}
        assert client.post("/api/jobs/nosuchjob/cancel", headers=other).status_code == 403


def test_a_silent_or_slow_client_is_cut_off_after_the_serve_timeout(live, run_dir):
    port = live.port
    cases = {"silent": (b"", b""),
             "slow headers": (b"GET /api/health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\nX-Slow: " + b"y" * 200),
             "stalled body": (upload_head(port, "stalled.mp4", 100_000) + b"x" * 1000, b""),
             "slow body": (upload_head(port, "slow.mp4", 100_000), b"x" * 200)}
    with ThreadPoolExecutor(len(cases)) as pool:
        ends = dict(zip(cases, pool.map(lambda case: cut_off(port, *case), cases.values())))
    for case, (seconds, answer) in ends.items():
        assert TIMEOUT - 0.5 < seconds < TIMEOUT + 4, (case, seconds, answer)
    assert ends["silent"][1] == b""
    assert ends["slow headers"][1].startswith(b"HTTP/1.1 408") and b"--serve-timeout" in ends["slow headers"][1]
    for case in ("stalled body", "slow body"):
        assert ends[case][1].startswith(b"HTTP/1.1 408") and b"so it was dropped" in ends[case][1], case
    assert parts(run_dir) == []


def test_uploads_arriving_at_once_hold_places_in_the_queue(live, run_dir, clips):
    """--serve-queue 2: two uploads on their way fill it; a third is refused at once, its body never read."""
    port = live.port
    with socket.create_connection(("127.0.0.1", port)) as a, socket.create_connection(("127.0.0.1", port)) as b:
        for s in (a, b):
            s.sendall(upload_head(port, "arriving.mp4", 100_000) + b"x" * 1000)
        assert soon(lambda: len(parts(run_dir)) == 2)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as third:
            third.sendall(upload_head(port, "third.mp4", 100_000))
            answer = b""
            while b"}" not in answer:
                answer += third.recv(65536)  # a timeout here: the server waited for the body
        assert answer.startswith(b"HTTP/1.1 429") and b"2 uploads are already waiting or arriving" in answer
    assert soon(lambda: parts(run_dir) == [])  # gone with their clients: their places are free again
    assert events(live.url, upload(live.url, clips / "synth_00001.mp4").json()["id"])[-1]["state"] == "done"


def test_an_upload_abandoned_midway_leaves_nothing_and_no_traceback(live, run_dir):
    said_before = live.log.stat().st_size
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(upload_head(live.port, "abandoned.mp4", 100_000) + b"x" * 1000)
        assert soon(lambda: len(parts(run_dir)) == 1)
        folder = parts(run_dir)[0].parent
        cancelled = httpx.post(f"{live.url}/api/jobs/{folder.name}/cancel")  # not a job until it has all come
        assert cancelled.status_code == 404 and "no job" in cancelled.json()["detail"]
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed with a reset
    assert soon(lambda: not folder.exists(), TIMEOUT - 1)  # the client's leaving ended it, not the timeout
    said = lambda: live.log.read_text(encoding="utf-8")[said_before:]
    assert soon(lambda: "\n" in said(), 2) and soon(lambda: said().count("\n") > 1, 0.5) is False
    assert "'abandoned.mp4': its client went away" in said() and "Traceback" not in said()


def test_a_second_server_on_the_work_dir_is_refused_and_names_the_first(live, run_dir):
    second = subprocess.run([sys.executable, m.__file__, "--mode", "serve", "--work-dir", str(run_dir), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and f"in use by another server (process {live.proc.pid} on" in second.stderr
    assert "Traceback" not in second.stderr and "Stop it first" in second.stderr


def test_serving_goes_on_while_a_training_run_holds_the_work_dir(run_dir, tmp_path, monkeypatch, serving_here):
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(m, "in_notebook", lambda: False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    (tmp_path / m.LOCK_FILE).write_text(f"{os.getpid()} {socket.gethostname()}")  # a training run, alive
    m.serve(m.parse_config(beside(run_dir, tmp_path) + ["--port", str(free_port())]))
    assert not (tmp_path / m.SERVE_LOCK).exists() and (tmp_path / m.LOCK_FILE).exists()  # its own lock, given back


def test_a_cancel_as_the_worker_picks_the_job_up_says_what_is_true(tmp_path):
    """The worker takes a job (its reading blocked here); a cancel then must not answer that it never started."""
    from fastapi.testclient import TestClient

    class Reader:
        cfg = m.Config(work_dir=str(tmp_path), beam_size=3)
        picked, go, taken = threading.Event(), threading.Event(), []

        def read(self, job):
            self.taken.append(job.id)
            self.picked.set()
            assert self.go.wait(20)
            job.set("decoding", "decoding")  # where a cancelled job stops

    reader = Reader()
    board = m.JobBoard(reader, reader.cfg)
    try:
        with TestClient(m.serving_app(reader, board, reader.cfg), base_url="http://127.0.0.1") as client:
            send = lambda name: client.post("/api/jobs", params={"name": name}, content=b"frames").json()["id"]
            started = send("started.npy")
            assert reader.picked.wait(20)
            waiting = send("waiting.npy")
            answer = client.post(f"/api/jobs/{started}/cancel").json()
            assert answer["state"] == "reading" and "before it started" not in answer["detail"]
            assert client.post(f"/api/jobs/{waiting}/cancel").json()["detail"] == "cancelled before it started"
            reader.go.set()
            assert soon(lambda: board.jobs[started].state == "cancelled", 20)
        assert board.jobs[started].detail == "cancelled while reading" and reader.taken == [started]
    finally:
        reader.go.set()
        board.stop()


def test_a_csv_cell_a_spreadsheet_would_run_is_prefixed_and_numbers_stay_numbers():
    rows = [{"text": "=1+2", "plus": "+A1", "minus": "-A1", "at": "@SUM(A1)", "tab": "\t=1", "cr": "\r=1",
             "negative": -0.5, "as_text": "-0.5", "fine": "كلمة", "quoted": "'=1"}]
    [read] = list(csv.DictReader(m.csv_text(rows).splitlines(keepends=True)))
    assert read == {"text": "'=1+2", "plus": "'+A1", "minus": "'-A1", "at": "'@SUM(A1)", "tab": "'\t=1",
                    "cr": "'\r=1", "negative": "-0.5", "as_text": "-0.5", "fine": "كلمة", "quoted": "'=1"}


def test_a_job_named_as_a_formula_is_text_in_results_csv(server, clips):
    name = '=HYPERLINK("http://x","y").mp4'
    job = events(server, upload(server, clips / "synth_00002.mp4", name=name).json()["id"])[-1]
    assert job["state"] == "done" and job["name"] == name
    table = httpx.get(f"{server}/api/results.csv").text.lstrip("\ufeff")
    rows = [r for r in csv.DictReader(table.splitlines(keepends=True)) if r["job"] == job["id"]]
    assert rows and all(r["name"] == "'" + name for r in rows)
    assert [r["name"] for r in httpx.get(f"{server}/api/results.json").json() if r["job"] == job["id"]][0] == name


HOSTILE_NAMES = ["../../x.mp4", "<img src=x onerror=alert(1)>.mp4", "nul\x00and\nnewline.mp4"]


def test_names_from_the_client_reach_no_path_and_stay_text(live, run_dir):
    for name in HOSTILE_NAMES:
        reply = httpx.post(f"{live.url}/api/jobs", params={"name": name}, content=b"not a video at all")
        assert reply.status_code == 202 and reply.json()["name"] == name
        job = events(live.url, reply.json()["id"])[-1]
        assert job["state"] == "failed" and job["name"] == name and job["detail"].startswith(name + ": ")
        folder = run_dir / "serve" / "jobs" / job["id"]
        files = sorted(p.name for p in folder.iterdir())
        assert len(files) == 2 and files[1] == "result.json" and re.fullmatch(r"[0-9a-f]{32}\.mp4", files[0])
    assert not list(run_dir.parent.rglob("x.mp4")) and not list(run_dir.parent.rglob("*onerror*"))
    assert not re.search(r"innerHTML\s*=[^;]*\$\{", m.SERVE_PAGE)  # the page's markup never takes data
    if CHROMIUM is None:
        return
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: dialogs.append(d.message) or d.dismiss())
        page.goto(live.url)
        page.wait_for_function("document.body.dataset.ready")
        names = page.eval_on_selector_all(".job .name", "els => els.map(e => e.textContent)")
        assert HOSTILE_NAMES[1] in names and HOSTILE_NAMES[0] in names
        assert page.eval_on_selector_all("img[src='x']", "els => els.length") == 0 and dialogs == []
        browser.close()


def test_a_decompression_bomb_is_refused_by_its_declared_size(live, run_dir, tmp_path):
    bomb = tmp_path / "bomb.npz"  # what np.savez_compressed writes of 1.4 GiB of zeros (1.5 MB), its header first
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("frames.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (30000, 224, 224)})
        for _ in range(64):  # zeros enough to be read if the header were not heeded
            member.write(bytes(2 ** 20))
    assert bomb.stat().st_size < LIMIT_MB * 2 ** 20
    before = set((run_dir / "serve" / "jobs").iterdir())
    peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{live.proc.pid}/status").read_text())[1]) * 1024
    peak_before = peak()
    reply = upload(live.url, bomb)
    assert reply.status_code == 413 and "too large: it declares 30000 frames of 224 x 224" in reply.json()["detail"]
    assert set((run_dir / "serve" / "jobs").iterdir()) == before
    grown = peak() - peak_before  # the model and the libraries are in both (their size differs by torch build)
    assert grown < 2 ** 28, f"the server's peak memory grew by {grown / 2 ** 20:.0f} MB"


# The team's app: its Flutter client, written for their backend (Essa-Ramzy/Arabic-Lip-Reading, backend/main.py),
# must work unchanged against this server. The calls below are the app's; the shapes are their backend's, read from
# its source and written here, so that a renamed field or a changed type fails ----------------------------------

STARTED = {"task_id": str, "message": str, "progress_stream_url": str, "progress_status_url": str}
PROGRESS = {"progress": int, "total_steps": int, "current_step": str, "status": str, "start_time": float,
            "last_update": float, "error": (str, None), "result": (dict, None), "cancelled": bool,
            "elapsed_time": float, "percentage": float}
RESULT = {"raw_transcript": str, "enhanced_transcript": str, "video_hash": str, "enhancements": dict,
          "metadata": {"model_name": str, "diacritized": bool, "beam_size": int, "success": bool, "error": None}}
CANCEL = {"task_id": str, "message": str, "was_running": bool, "success": bool}
CONFIG = {"upload": {"max_size_mb": float, "max_size_bytes": int, "allowed_extensions": list},
          "processing": {"default_beam_size": int, "max_beam_size": int},
          "model": {"default_model": str, "default_landmark_model": str, "default_diacritized": bool,
                    "available_models": list, "available_landmark_models": list},
          "ai": {"gemini_available": bool}}
HEALTH = {"status": str, "timestamp": str, "version": str,
          "services": {"api": str, "gemini_ai": str, "file_upload": str, "logging": str},
          "configuration": {"max_upload_size_mb": float, "default_model": str, "ai_enhancement_available": bool}}
ERROR = {"detail": str}
# the stage the app shows for a current_step: the first of these word groups the step holds, in this order (its
# lib/model/progress_model.dart), or its fallback, "initializing"
APP_STAGES = [("failed", "error"), ("initializing", "starting"), ("uploading", "upload"), ("preprocess",),
              ("analyzing", "frames"), ("landmark", "detecting"), ("mouth", "extracting"),
              ("inference", "lip reading"), ("enhancement", "ai"), ("completed", "success")]
STARTING, ANALYZING, MOUTH, INFERENCE, COMPLETED = 1, 4, 6, 7, 9


def shape_problems(obj, shape: dict, where: str = "") -> list[str]:
    """How obj differs from a shape of their API: a field missing, or of another JSON type (None: null)."""
    problems = []
    for key, kind in shape.items():
        if key not in obj:
            problems.append(f"{where}{key} is missing")
        elif isinstance(kind, dict):
            problems += shape_problems(obj[key], kind, f"{where}{key}.") if isinstance(obj[key], dict) else [
                f"{where}{key} is not an object"]
        elif not any(obj[key] is None if k is None else type(obj[key]) is k for k in
                     (kind if isinstance(kind, tuple) else (kind,))):
            problems.append(f"{where}{key} is {obj[key]!r}, not {kind}")
    return problems


def app_stage(step: str) -> int:
    return next((n for n, words in enumerate(APP_STAGES) if any(w in step.lower() for w in words)), -1)


def transcribe(url: str, clip: Path | None = None, **fields) -> httpx.Response:
    """POST /transcribe/ as the app sends it: a multipart form, booleans as Dart writes them, the video as the
    part named file, its file name the path's last part."""
    parts = [(k, (None, str(v).lower() if isinstance(v, bool) else str(v))) for k, v in fields.items()]
    if clip is not None:
        parts.append(("file", (clip.name, clip.read_bytes(), "application/octet-stream")))
    return httpx.post(f"{url}/transcribe/", files=parts, timeout=60)


def follow_as_the_app(url: str, task_id: str, until=None) -> list[dict]:
    """GET /progress/{id} as the app reads it: HTTP 200, each chunk decoded alone, split into lines, the `data: `
    ones parsed; until the server ends the stream, within a minute (`until(event)`: called on each, it may act
    meanwhile)."""
    seen, deadline = [], time.monotonic() + 60
    with httpx.stream("GET", f"{url}/progress/{task_id}", timeout=120,
                      headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"}) as stream:
        assert stream.status_code == 200
        for chunk in stream.iter_raw():
            assert time.monotonic() < deadline, f"the stream went on after {seen[-1:]}"
            assert chunk.isascii()  # a chunk may end anywhere: only ASCII decodes alone, always
            for line in chunk.decode("utf-8").split("\n"):
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if until:
                        until(seen[-1])
    return seen


@pytest.fixture(scope="module")
def team(run_dir, tmp_path_factory):
    """A server of three models, the app's names for them: conformer (best.pt), conformer without diacritics
    (last.pt) and mstcn (best.pt again: one model loaded, two names); no model of its work dir's own."""
    work = tmp_path_factory.mktemp("team") / "work"
    saved = run_dir / "checkpoints"
    with running_server(tmp_path_factory, ["--work-dir", str(work), "--serve-model", f"conformer={saved / 'best.pt'}",
                                           "--serve-model", f"conformer:nodia={saved / 'last.pt'}",
                                           "--serve-model", f"mstcn={saved / 'best.pt'}"]) as server:
        server.work = work
        yield server


def test_the_team_app_reads_its_config_and_health(team):
    config = httpx.get(f"{team.url}/config").json()
    assert shape_problems(config, CONFIG) == []
    assert config["model"]["available_models"] == ["conformer", "mstcn"] and config["ai"]["gemini_available"] is False
    assert [(s["model_name"], s["diacritized"], Path(s["checkpoint"]).name) for s in config["model"]["loaded"]] == [
        ("conformer", True, "best.pt"), ("conformer", False, "last.pt"), ("mstcn", True, "best.pt")]
    assert config["model"]["default_model"] == "conformer" and config["model"]["default_diacritized"] is True
    assert config["upload"]["max_size_bytes"] == LIMIT_MB * 2 ** 20 and ".mp4" in config["upload"]["allowed_extensions"]
    health = httpx.get(f"{team.url}/health")
    assert health.status_code == 200 and shape_problems(health.json(), HEALTH) == []
    assert health.json()["status"] == "healthy" and health.json()["services"]["gemini_ai"] == "unavailable"
    assert httpx.post(f"{team.url}/enhance-text/", data={"text": "x"}).status_code == 503  # theirs without Gemini


def test_the_team_app_transcribes_a_clip_and_reads_it_again_by_its_hash(team, clips):
    started = transcribe(team.url, clips / "synth_00001.mp4", model_name="conformer", diacritized=True, beam_size=4)
    assert started.status_code == 200 and shape_problems(started.json(), STARTED) == []
    task = started.json()["task_id"]
    assert started.json()["progress_stream_url"] == f"/progress/{task}"
    seen = follow_as_the_app(team.url, task)
    assert [problem for e in seen for problem in shape_problems(e, PROGRESS)] == []
    assert [e["status"] for e in seen[:-1]] == ["processing"] * (len(seen) - 1) and seen[-1]["status"] == "completed"
    stages = [app_stage(e["current_step"]) for e in seen]
    assert stages == sorted(stages) and stages[-1] == COMPLETED and set(stages) <= {STARTING, ANALYZING, INFERENCE,
                                                                                    COMPLETED}, seen
    result = seen[-1]["result"]
    assert shape_problems(result, RESULT) == [] and result["enhancements"] == {}
    assert result["metadata"] == {"model_name": "conformer", "diacritized": True, "beam_size": 4, "success": True,
                                  "error": None}
    job = httpx.get(f"{team.url}/api/jobs/{task}").json()  # a task is a job: the page lists it too
    assert result["raw_transcript"] == result["enhanced_transcript"] == job["hypotheses"][0]["text"]
    assert re.fullmatch(r"[0-9a-f]{16}", result["video_hash"])
    status = httpx.get(f"{team.url}/progress/{task}/status").json()
    assert shape_problems(status, PROGRESS) == [] and status["result"] == result and status["progress"] == 100
    again = transcribe(team.url, file_hash=result["video_hash"].upper(), model_name="conformer", diacritized=False,
                       enhance=True)  # the app reads it again with the other setting: no video sent
    second = follow_as_the_app(team.url, again.json()["task_id"])[-1]
    assert second["status"] == "completed" and second["result"]["video_hash"] == result["video_hash"]
    assert second["result"]["metadata"]["diacritized"] is False and second["result"]["metadata"]["beam_size"] == 20
    assert second["result"]["enhancements"] == {"error": "Gemini service not available"}  # theirs without Gemini
    assert second["result"]["enhanced_transcript"] == second["result"]["raw_transcript"]
    done = httpx.delete(f"{team.url}/progress/{task}/cancel")
    assert done.status_code == 200 and shape_problems(done.json(), CANCEL) == []
    assert done.json() == {"task_id": task, "message": "Task already completed", "was_running": False,
                           "success": False}


def test_a_team_task_cancelled_waiting_or_running_ends_its_stream(team, astronaut, clips):
    frames = face_video(astronaut, 400)[0][::-1]
    long_video = write_video(team.work.parent / "long.mp4", frames)
    running = transcribe(team.url, long_video).json()["task_id"]
    waiting = transcribe(team.url, clips / "synth_00002.mp4", model_name="mstcn").json()["task_id"]
    answers = []

    def cancel_while_cutting(event):
        if app_stage(event["current_step"]) == MOUTH and not answers:
            answers.append(httpx.delete(f"{team.url}/progress/{waiting}/cancel").json())
            answers.append(httpx.delete(f"{team.url}/progress/{running}/cancel").json())
    seen = follow_as_the_app(team.url, running, until=cancel_while_cutting)
    assert answers == [{"task_id": waiting, "message": "Task cancelled successfully", "was_running": False,
                        "success": True},
                       {"task_id": running, "message": "Task cancelled successfully", "was_running": True,
                        "success": True}]
    assert seen[-1]["status"] == "cancelled" and seen[-1]["cancelled"] is True
    assert seen[-1]["current_step"] == "Cancelled by user" and shape_problems(seen[-1], PROGRESS) == []
    assert follow_as_the_app(team.url, waiting)[-1]["status"] == "cancelled"
    again = httpx.delete(f"{team.url}/progress/{running}/cancel").json()
    assert again["message"] == "Task already cancelled" and again["success"] is False
    assert soon(lambda: httpx.get(f"{team.url}/api/jobs/{running}").json()["state"] == "cancelled", 20)


def test_the_team_apps_mistakes_get_their_status_codes_and_change_nothing(team, clips, tmp_path):
    clip, notes, empty = clips / "synth_00000.mp4", tmp_path / "notes.txt", tmp_path / "empty.mp4"
    notes.write_text("not a video")
    empty.touch()
    before = set((team.work / "serve" / "jobs").iterdir())
    bad = {400: [transcribe(team.url, model_name="conformer"),  # neither a file nor a hash
                 transcribe(team.url, clip, file_hash="0123456789abcdef"),
                 transcribe(team.url, file_hash="not-a-hash"),
                 transcribe(team.url, clip, beam_size=0), transcribe(team.url, clip, beam_size=51),
                 transcribe(team.url, clip, model_name="dctcn"),
                 transcribe(team.url, clip, model_name="mstcn", diacritized=False),
                 transcribe(team.url, notes), transcribe(team.url, empty)],
           404: [transcribe(team.url, file_hash="0123456789abcdef")],
           422: [transcribe(team.url, clip, beam_size="ten"), transcribe(team.url, clip, diacritized="maybe")]}
    for status, replies in bad.items():
        for reply in replies:
            assert reply.status_code == status, (status, reply.text)
            assert status == 422 or shape_problems(reply.json(), ERROR) == [], reply.text
    assert "conformer, conformer:nodia, mstcn" in bad[400][5].json()["detail"]
    assert ".mp4" in bad[400][7].json()["detail"] and "empty" in bad[400][8].json()["detail"]
    assert bad[422][0].json()["detail"][0]["loc"] == ["body", "beam_size"]
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(int(1.2 * LIMIT_MB * 2 ** 20)))
    reply = transcribe(team.url, big)
    assert reply.status_code == 413 and "--max-upload-mb" in reply.json()["detail"]
    form = httpx.Request("POST", "http://x", files={"file": ("big.mp4", big.read_bytes())})
    body = form.read()
    chunks = (body[i:i + 2 ** 16] for i in range(0, len(body), 2 ** 16))  # no length given: counted as it comes
    reply = httpx.post(f"{team.url}/transcribe/", content=chunks, timeout=60,
                       headers={"content-type": form.headers["content-type"]})
    assert reply.status_code == 413 and "too large" in reply.json()["detail"]
    refused = httpx.post(f"{team.url}/transcribe/", files={"file": (clip.name, clip.read_bytes())},
                         headers={"origin": "http://attacker.example"})
    assert refused.status_code == 403  # a page of another site: refused as on /api; the app sends no Origin
    stalled = (b"POST /transcribe/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: 100000\r\n\r\n--b\r\n")  # a form that stops after its first boundary
    seconds, answer = cut_off(team.port, stalled)
    assert TIMEOUT - 0.5 < seconds < TIMEOUT + 4 and answer.startswith(b"HTTP/1.1 408"), answer
    lost = follow_as_the_app(team.url, "nosuchtask")
    assert len(lost) == 1 and lost[0]["task_id"] == "nosuchtask" and "Task not found" in lost[0]["error"]
    for reply in (httpx.get(f"{team.url}/progress/nosuchtask/status"),
                  httpx.delete(f"{team.url}/progress/nosuchtask/cancel")):
        assert reply.status_code == 404 and "Task not found" in reply.json()["detail"]
    assert set((team.work / "serve" / "jobs").iterdir()) == before and not list(team.work.rglob("*.part"))


def test_a_team_task_is_read_by_the_model_it_asks_for(tmp_path):
    from fastapi.testclient import TestClient

    class Reader:
        def __init__(self, name):
            self.name, self.cfg, self.checkpoint = name, m.Config(work_dir=str(tmp_path), beam_size=7), name

        def read(self, job):
            job.hypotheses = [{"text": self.name, "score": 0.0}]

    plain, letters = Reader("plain"), Reader("letters")
    cfg = m.Config(work_dir=str(tmp_path))
    board = m.JobBoard(plain, cfg, {("a", True): plain, ("a", False): letters, ("b", True): letters})
    try:
        with TestClient(m.serving_app(plain, board, cfg), base_url="http://127.0.0.1") as client:
            def read_by(**fields) -> dict:
                parts = {k: (None, str(v)) for k, v in fields.items()} | {"file": ("c.npy", b"frames")}
                task = client.post("/transcribe/", files=parts).json()["task_id"]
                assert soon(lambda: board.jobs[task].state == "done", 20)
                return client.get(f"/progress/{task}/status").json()["result"]
            assert read_by()["raw_transcript"] == "plain"  # the first model, diacritized: the defaults
            assert read_by(model_name="a", diacritized="false")["raw_transcript"] == "letters"
            chosen = read_by(model_name="b", diacritized="true", beam_size=3)
            assert chosen["raw_transcript"] == "letters" and chosen["metadata"]["model_name"] == "b"
            assert chosen["metadata"]["beam_size"] == 3 and read_by()["metadata"]["beam_size"] == 7  # --beam-size
        restarted = m.JobBoard(None, cfg).jobs  # a task's choice is kept with its result
        assert sorted(j.asked["model_name"] for j in restarted.values()) == ["a", "a", "a", "b"]
    finally:
        board.stop()


def test_without_python_multipart_the_team_app_is_told_what_is_missing(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    monkeypatch.setattr(m, "form_parsing_missing", lambda: True)
    cfg = m.Config(work_dir=str(tmp_path))
    reader = type("Reader", (), {"cfg": cfg})()
    with TestClient(m.serving_app(reader, m.JobBoard(None, cfg), cfg), base_url="http://127.0.0.1") as client:
        reply = client.post("/transcribe/", files={"file": ("c.mp4", b"video")})
    assert reply.status_code == 501 and "pip install python-multipart" in reply.json()["detail"]


def test_serve_model_settings_that_cannot_work_are_named(run_dir, tmp_path, capsys):
    best = run_dir / "checkpoints" / "best.pt"
    cases = {f"conformer:nodiac={best}": "write NAME=PATH", f"={best}": "write NAME=PATH",
             f"a={tmp_path / 'none.pt'}": "is not there", f"a={run_dir}": "is a folder"}
    for given, why in cases.items():
        with pytest.raises(m.UserError, match=why):
            m.served_model_entries(m.Config(serve_model=[given]))
    with pytest.raises(m.UserError, match="a:nodia is given twice"):
        m.served_model_entries(m.Config(serve_model=[f"a:nodia={best}", f"a:nodia={best}"]))
    assert m.served_model_entries(m.Config(serve_model=[f"a={best}", f"a:nodia={best}", f"b:dia={best}"])) == [
        ("a", True, best), ("a", False, best), ("b", True, best)]
    assert m.parse_config(["--serve-model", f"a={best}", "--serve-model", f"b={best}"]).serve_model == [
        f"a={best}", f"b={best}"]
    served = m.served_models(m.Config(work_dir=str(tmp_path), serve_model=[f"a:nodia={best}", f"b={best}"]))
    assert served["a", False] is served["b", True]  # one file, loaded once
    assert f"note: --serve-model a:nodia answers diacritized=false with a model of --units diacritized ({best})" in \
        capsys.readouterr().out
