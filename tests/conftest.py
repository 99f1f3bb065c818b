"""Shared fixtures: the script imported as a module, and small datasets the tests generate themselves."""
import math
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each (their
    os.environ["OMP_NUM_THREADS"] = "1"  # scripts too), else 2 workers x 2 threads on 2 cores slow each other
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import master_all_avsr as m  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """24 built-in clips written in the real dataset's layout: Preprocessed_Video/*.mp4 + Csv/*.csv."""
    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    m.write_synthetic_dataset(m.Config(output=str(root), synthetic_clips=24, seed=3), m.Vocabulary.seed())
    return root


@pytest.fixture
def dataset_copy(synthetic_root, tmp_path) -> Path:
    """A private copy the test may damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


@pytest.fixture
def cfg(tmp_path) -> m.Config:
    return m.Config(work_dir=str(tmp_path / "work"), synthetic_clips=40, seed=5)


@pytest.fixture(autouse=True)
def no_progress_lines(monkeypatch):
    """Tests read the output line by line: on a slow machine a loop over 60 s would add a progress line."""
    monkeypatch.setattr(m, "PLAIN_PROGRESS_EVERY", math.inf)


def free_port() -> int:
    """A local port no one listens on (for a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UNIT = "\u0628\u064e"  # one unit (a letter and its vowel)


def saying_one_unit(work: Path) -> None:
    """A trained run's CTC head set to say UNIT on every frame: greedy CTC then reads every piece of a video as
    that one unit, a word spanning the whole piece, so where pieces and words fall can be checked exactly."""
    path = work / "checkpoints" / "best.pt"
    state = m.torch.load(path, weights_only=True)
    unit = m.Vocabulary.from_json(state["vocab"]).encode(UNIT)[0][0]
    state["model"]["ctc.ctc_lo.weight"].zero_()
    state["model"]["ctc.ctc_lo.bias"].fill_(-10.0)
    state["model"]["ctc.ctc_lo.bias"][unit] = 10.0
    m.torch.save(state, path)
