"""Shared fixtures: the script imported as a module, and small datasets the tests generate themselves."""
import shutil
import sys
from pathlib import Path

import pytest

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
