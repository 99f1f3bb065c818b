"""Section 13: --mode serve. The server is started as a user starts it (its own process, on a free local port)
with a model trained here; the tests drive its JSON API and, in a real headless Chromium, its page."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import free_port, m
from test_preprocessing import face_video, write_video

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.xdist_group("serving")  # one server for the module, on one worker (pytest.ini)

FAST = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "24", "--max-frames", "400", "--epochs", "1"]
LIMIT_MB = 1  # the server's upload limit here, so that an oversize upload stays small


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


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """The server on a free port, its temporary folder an empty one of its own (nothing may land there)."""
    tmp = tmp_path_factory.mktemp("server_tmp")
    port = free_port()
    log = open(tmp_path_factory.mktemp("server_log") / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, m.__file__, "--mode", "serve", "--work-dir", str(run_dir), "--port",
                             str(port), "--serve-queue", "2", "--max-upload-mb", str(LIMIT_MB)],
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
    yield url
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
    out, _ = proc.communicate(timeout=60)
    log.seek(0)
    errors = log.read()
    assert proc.returncode == 0 and "Traceback" not in errors, errors
    assert f"at {url}/" in out and "warning" not in out  # it says where; on 127.0.0.1, no warning
    assert list(tmp.iterdir()) == []


@pytest.fixture
def serving_here(monkeypatch):
    """m.serve in this process: the temporary folder it takes (TMPDIR, tempfile's) is given back afterwards."""
    monkeypatch.delenv("TMPDIR", raising=False)  # restored, or removed again, at the end
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
    assert reply.status_code == 202 and reply.json()["state"] == "queued"
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
    with TestClient(m.serving_app(reader, board, cfg)) as client, \
            client.stream("GET", f"/api/jobs/{job.id}/events") as stream:
        sent = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert [e["state"] for e in sent] == ["preprocessing", "cancelled"]


def test_a_face_video_is_cut_to_its_mouth_with_progress_and_the_cut_is_kept(server, astronaut, tmp_path):
    video = write_video(tmp_path / "face.mp4", face_video(astronaut, 60)[0])
    seen = events(server, upload(server, video).json()["id"])
    assert seen[-1]["state"] == "done" and seen[-1]["frames"] == 60 and in_order([e["state"] for e in seen])
    cutting = [(e["detail"], e["progress"]) for e in seen if e["state"] == "preprocessing"][1:]  # after its first
    frames = [int(re.fullmatch(r"finding the mouth: frame (\d+) of 60", detail)[1]) for detail, _ in cutting]
    assert frames and frames == sorted(frames)
    assert [p for _, p in cutting] == pytest.approx([(f - 1) / 60 for f in frames], abs=1e-3)
    again = events(server, upload(server, video, name="same.mp4").json()["id"])
    assert "preprocessing" not in [e["state"] for e in again] and "reused" in again[-1]["notes"]
    assert again[-1]["hypotheses"][0]["text"] == seen[-1]["hypotheses"][0]["text"]


def test_bad_uploads_get_clear_errors_and_the_server_goes_on(server, run_dir, clips, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 100)
    failed = events(server, upload(server, broken).json()["id"])[-1]
    assert failed["state"] == "failed" and failed["detail"].startswith("broken.mp4: unreadable video")
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(int(1.2 * LIMIT_MB * 2 ** 20)))
    reply = upload(server, big)
    assert reply.status_code == 413 and "over the upload limit of 1 MB" in reply.json()["detail"]
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


def test_the_page_in_a_real_browser_shows_the_transcript_and_the_errors(server, clips, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("AVSR_REQUIRE_BROWSER"):  # CI installs it: there, a missing browser is a failure
            pytest.fail("no chromium on PATH: apt-get install chromium")
        pytest.skip("a real browser is needed: apt-get install chromium (Debian's package)")
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


def test_serve_binds_this_machine_only_unless_told_and_says_so(run_dir, monkeypatch, capsys, serving_here):
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(m, "in_notebook", lambda: False)  # ipykernel may be imported by another test of this worker
    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: bound.append((host, port)))
    m.serve(m.parse_config(["--work-dir", str(run_dir), "--port", str(free_port())]))
    assert bound[-1][0] == "127.0.0.1" and "warning" not in capsys.readouterr().out
    m.serve(m.parse_config(["--work-dir", str(run_dir), "--host", "0.0.0.0", "--port", str(free_port())]))
    assert bound[-1][0] == "0.0.0.0" and "warning: serving on 0.0.0.0" in capsys.readouterr().out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(m.UserError, match="is taken"):
            m.serve(m.parse_config(["--work-dir", str(run_dir), "--port", str(taken.getsockname()[1])]))


def test_in_a_notebook_the_server_runs_beside_the_kernel(run_dir, clips, monkeypatch, serving_here):
    monkeypatch.setattr(m, "in_notebook", lambda: True)
    port = free_port()
    server = m.serve(m.parse_config(["--work-dir", str(run_dir), "--port", str(port)]))  # returns: the cell ends
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
