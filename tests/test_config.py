"""Section 1: files read without running code from them (planted pickles in every kind of file a user names),
and checkpoints of earlier versions."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import m

FAST = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "48", "--max-frames", "400",
        "--warmup-epochs", "1", "--decoder", "ctc"]


class Planted:
    """Pickled as a call of subprocess.run (which torch's own blocklist lets through; pickle names it by its
    Python 2 name, commands.run): loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return subprocess.run, (["touch", str(self.marker)],)


def plant(path: Path, marker: Path, contents=None) -> Path:
    """`contents` (default: the file's own) with a Planted object beside them, saved over `path`."""
    contents = torch.load(path, weights_only=True) if contents is None else contents
    torch.save({**contents, "planted": Planted(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with its epoch weights kept for averaging, and an n-gram language model."""
    work = tmp_path_factory.mktemp("planted") / "run"
    m.run_train(m.parse_config(FAST + ["--epochs", "2", "--average-last", "2", "--work-dir", str(work)]))
    m.main(["--mode", "lm", "--work-dir", str(work)] + FAST)
    return work


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def refused(marker: Path, path: Path, call, capsys=None):
    """`call` stops with a message naming `path` and the code it names (printed by the CLI, when `capsys`)."""
    with pytest.raises(SystemExit if capsys else m.UserError) as e:
        call()
    said = capsys.readouterr().err if capsys else str(e.value)
    assert str(path) in said and "nothing of it ran" in said and "commands.run" in said
    assert not marker.exists()


def test_every_torch_file_the_tool_writes_holds_only_what_a_weights_only_load_reads(trained):
    files = [trained / "checkpoints" / name for name in ("last.pt", "best.pt", "averaged.pt")]
    files += sorted((trained / "checkpoints" / "epochs").glob("epoch_*.pt")) + [trained / "lm" / "lm.pt"]
    assert len(files) == 6
    for path in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        torch.load(path, weights_only=True)  # with torch's own allowlist alone


def test_a_planted_checkpoint_runs_nothing_in_test_decode_serve_resume_or_averaging(run, tmp_path, synthetic_root,
                                                                                    capsys):
    marker = tmp_path / "ran"
    best = plant(run / "checkpoints" / "best.pt", marker)
    cfg = m.parse_config(FAST + ["--work-dir", str(run), "--checkpoint", str(best)])
    refused(marker, best, lambda: m.run_test(cfg))
    refused(marker, best, lambda: m.main(["--mode", "decode", "--work-dir", str(run), "--checkpoint", str(best),
                                          "--input", str(synthetic_root / "Preprocessed_Video")]), capsys)
    refused(marker, best, lambda: m.LipReader(cfg))  # --mode serve's model
    last = plant(run / "checkpoints" / "last.pt", marker)
    refused(marker, last, lambda: m.run_train(m.parse_config(FAST + ["--epochs", "3", "--resume", "--work-dir",
                                                                     str(run)])))
    epoch = next((run / "checkpoints" / "epochs").glob("epoch_*.pt"))
    torch.save({**torch.load(epoch, weights_only=True), "planted": Planted(marker)}, epoch)
    refused(marker, epoch, lambda: m.averaged_weights([epoch]))


def test_a_planted_language_model_runs_nothing(run, tmp_path):
    marker = tmp_path / "ran"
    lm = plant(run / "lm" / "lm.pt", marker)
    refused(marker, lm, lambda: m.read_lm(lm, m.Vocabulary.seed()))
    lstm = run / "lm" / "last.pt"
    torch.save({"planted": Planted(marker)}, lstm)
    refused(marker, lstm, lambda: m.resumable_lm(lstm, m.Config(), m.Vocabulary.seed()))


def test_a_planted_earlier_run_on_kaggle_is_ranked_without_running_it(run, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    attached = tmp_path / "input" / "someones-dataset"
    shutil.copytree(run, attached / "run")
    plant(attached / "run" / "checkpoints" / "last.pt", marker)
    monkeypatch.setattr(m, "KAGGLE_INPUT", tmp_path / "input")
    assert m.earlier_runs() == [attached / "run"]
    assert not marker.exists()


@pytest.mark.parametrize("flag", ["init_from", "init_from_audio"])
def test_released_weights_load_beside_planted_objects_which_stand_in_inert_and_are_named(run, tmp_path, flag):
    marker = tmp_path / "ran"
    released = tmp_path / "released.ckpt"  # a Lightning checkpoint: weights beside the trainer's Python objects
    weights = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    torch.save({"state_dict": weights, "hyper_parameters": Planted(marker)}, released)
    got, kind, skipped, objects = m.read_weights(released, "--" + flag.replace("_", "-"))
    assert not marker.exists() and kind == "Lightning checkpoint" and objects == ["commands.run"] and not skipped
    assert torch.equal(got["ctc.ctc_lo.weight"], weights["ctc.ctc_lo.weight"])
    nothing_else = tmp_path / "only_code.pth"
    torch.save(Planted(marker), nothing_else)
    with pytest.raises(m.UserError, match=f"{nothing_else}: the file holds StandIn, not a model's weights"):
        m.read_weights(nothing_else, "--" + flag.replace("_", "-"))
    assert not marker.exists()


def test_a_checkpoint_of_an_earlier_version_resumes_its_numpy_state_converted(run):
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert isinstance(state["rng"]["numpy"][1], list)  # written as plain data now
    np.random.seed(11)
    state["rng"]["numpy"] = np.random.get_state()  # as versions before 2026-12-07 wrote it: an array
    expected = np.random.rand(4)
    torch.save(state, last)
    loaded = m.load_checkpoint(last)
    m.set_rng_state(loaded["rng"])
    assert np.array_equal(np.random.rand(4), expected)
    result = m.run_train(m.parse_config(FAST + ["--epochs", "3", "--average-last", "2", "--resume", "--work-dir",
                                                str(run)]))
    assert result["history"][-1]["epoch"] == 3


def test_temporary_files_of_a_killed_save_are_removed_when_the_work_dir_is_next_locked(tmp_path, capsys):
    work = tmp_path / "run"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that was killed mid-write: its pid names no live process now
    writing = subprocess.Popen(["sleep", "30"])  # one still writing
    try:
        left = [work / "checkpoints" / f".averaged.pt.{gone.pid}.0a1b2c3d.pt", work / "export" /
                f".encoder.onnx.{gone.pid}.0a1b2c3d.onnx", work / "lm" / f".last.pt.{gone.pid}.0a1b2c3d.pt"]
        kept = [work / "checkpoints" / f".last.pt.{writing.pid}.0a1b2c3d.pt", work / "checkpoints" / ".notes.txt"]
        for path in left + kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
        with m.work_dir_lock(m.Config(work_dir=str(work))):
            assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
        assert f"Removed the temporary files a killed run left in {work}" in capsys.readouterr().out
    finally:
        writing.kill()
