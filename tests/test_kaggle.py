"""Section 11: the Kaggle kernel folder, a Kaggle session's defaults (data searched, outputs, time budget, resume
from an attached earlier output), starting under torchrun, and the script run as a notebook cell."""
import contextlib
import csv
import importlib
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, free_port, m

KERNEL = ROOT / "kaggle_kernel"
TINY = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "48", "--max-frames", "400",
        "--warmup-epochs", "1", "--decoder", "ctc"]


def test_the_kernel_pushes_the_same_script_as_the_repository():
    assert (KERNEL / "master_all_avsr.py").read_bytes() == (ROOT / "master_all_avsr.py").read_bytes(), \
        "kaggle_kernel/master_all_avsr.py differs: cp master_all_avsr.py kaggle_kernel/"


@pytest.fixture
def kaggle_push(monkeypatch, tmp_path):
    """The kaggle CLI's own `kernels push`, offline: dummy credentials, sockets refused, and the request it
    would send caught where its client sends it."""
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-key")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle_config"))
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("the check went to the network"))
    with contextlib.redirect_stdout(io.StringIO()):
        api_module = importlib.import_module("kaggle.api.kaggle_api_extended")
    from kagglesdk.kernels.services.kernels_api_service import KernelsApiClient

    class Sent(Exception):
        pass

    def send(self, request):
        raise Sent(request)

    monkeypatch.setattr(KernelsApiClient, "save_kernel", send)

    def push(folder: Path):
        api = api_module.KaggleApi()
        api.authenticate()
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                api.kernels_push(str(folder))
            except Sent as sent:
                return sent.args[0]
        pytest.fail("kernels_push sent nothing")
    return push


def test_the_notebook_holds_todays_script_after_its_settings(kaggle_push):
    sys.path.insert(0, str(KERNEL))
    import make_notebook
    written = json.loads((KERNEL / "notebook" / "master_all_avsr.ipynb").read_text(encoding="utf-8"))
    assert written == json.loads(make_notebook.nbformat.writes(make_notebook.notebook())), \
        "kaggle_kernel/notebook is behind the script: python kaggle_kernel/make_notebook.py"
    kinds = [c["cell_type"] for c in written["cells"]]
    assert kinds == ["markdown", "code", "code", "code"] and "SETTINGS = [" in "".join(written["cells"][1]["source"])
    assert "SERVE, TUNNEL, PORT = False" in "".join(written["cells"][3]["source"])
    request = kaggle_push(KERNEL / "notebook")  # and it passes the kaggle CLI's checks as a notebook kernel
    assert request.kernel_type == "notebook" and request.language == "python"
    assert (ROOT / "master_all_avsr.py").read_text(encoding="utf-8") in json.loads(request.text)["cells"][2]["source"]


def test_kernel_metadata_passes_the_kaggle_clis_own_checks(kaggle_push, tmp_path):
    request = kaggle_push(KERNEL)
    assert request.text == (ROOT / "master_all_avsr.py").read_text(encoding="utf-8")
    assert request.language == "python" and request.kernel_type == "script"
    assert request.enable_gpu and not request.enable_internet and not request.enable_tpu
    assert request.machine_shape == "NvidiaTeslaT4"  # "GPU T4 x2"
    assert request.dataset_data_sources  # the clips
    broken = Path(shutil.copytree(KERNEL, tmp_path / "broken"))
    metadata = json.loads((broken / "kernel-metadata.json").read_text())
    (broken / "kernel-metadata.json").write_text(json.dumps(metadata | {"id": "someone/avsr"}))
    with pytest.raises(ValueError, match="five characters"):  # the checks do run
        kaggle_push(broken)
    (broken / "kernel-metadata.json").write_text(json.dumps(metadata | {"code_file": "missing.py"}))
    with pytest.raises(ValueError, match="not found"):
        kaggle_push(broken)


@pytest.fixture
def kaggle(monkeypatch, tmp_path):
    """A Kaggle session in miniature: /kaggle/input, /kaggle/working and the scratch cache under tmp_path."""
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    for name in ("KAGGLE_INPUT", "KAGGLE_WORKING", "KAGGLE_SCRATCH"):
        monkeypatch.setattr(m, name, tmp_path / name.lower())
    (tmp_path / "kaggle_input").mkdir()
    return tmp_path


def write_user_dataset(root: Path) -> Path:
    """The team's layout: mouth crops, raw face videos (other size) and labels with and without diacritics."""
    m.write_synthetic_dataset(m.Config(output=str(root / "crops"), synthetic_clips=12, seed=3), m.Vocabulary.seed())
    data = root / "Dataset"
    shutil.move(str(root / "crops" / "Preprocessed_Video"), data / "Preprocessed_Video")
    shutil.move(str(root / "crops" / "Csv"), data / "Csv (with Diacritics)")
    (data / "Video").mkdir()
    (data / "Csv (without Diacritics)").mkdir()
    for label in sorted((data / "Csv (with Diacritics)").glob("*.csv")):
        np.save(data / "Video" / f"{label.stem}.npy", np.zeros((30, 64, 64), np.uint8))
        words = ["".join(ch for ch in w if unicodedata.category(ch) != "Mn") for w in m.read_label(label).split()]
        with open(data / "Csv (without Diacritics)" / label.name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["word"]] + [[w] for w in words])
    return data


def test_on_kaggle_the_data_is_found_and_outputs_go_to_the_working_folder(kaggle):
    data = write_user_dataset(kaggle / "kaggle_input" / "lrc-ar")
    cfg = m.parse_config([])
    assert Path(cfg.videos_dir) == data / "Preprocessed_Video"  # the crops, not the raw videos beside them
    assert Path(cfg.labels_dir) == data / "Csv (with Diacritics)"
    assert Path(cfg.work_dir) == kaggle / "kaggle_working" / "run" and Path(cfg.cache_dir) == kaggle / "kaggle_scratch"
    assert 0 < cfg.time_budget <= 11 * 60 and cfg.resume is False
    assert Path(m.parse_config(["--units", "letters"]).labels_dir) == data / "Csv (without Diacritics)"
    given = m.parse_config(["--time-budget", "30", "--work-dir", str(kaggle / "mine"), "--data-dir", str(data)])
    assert (given.time_budget, given.work_dir, given.videos_dir) == (30, str(kaggle / "mine"), "")  # flags win
    (kaggle / "kaggle_input" / m.SETTINGS_FILE).write_text(json.dumps({"epochs": 7}))
    assert m.parse_config([]).epochs == 7  # a pushed kernel's settings, from an attached dataset
    assert m.load_dataset(m.parse_config([]), m.Vocabulary.seed(), torch.device("cpu")).samples


def test_on_kaggle_without_data_the_message_says_how_to_attach_it(kaggle):
    with pytest.raises(m.UserError, match="Attach your dataset"):
        m.parse_config([])


def test_on_kaggle_training_continues_the_newest_attached_earlier_run(kaggle, capsys):
    earlier = kaggle / "kaggle_input" / "avsr-output" / "run"
    m.run_train(m.parse_config(TINY + ["--data", "synthetic", "--epochs", "1", "--work-dir", str(earlier)]))
    older = Path(shutil.copytree(earlier, kaggle / "kaggle_input" / "older-output" / "run"))
    state = torch.load(older / "checkpoints" / "last.pt", weights_only=False)
    torch.save(state | {"epoch": 0, "history": []}, older / "checkpoints" / "last.pt")  # fewer epochs: not it
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}

    cfg = m.parse_config(TINY + ["--data", "synthetic", "--epochs", "2"])
    assert cfg.resume
    capsys.readouterr()
    result = m.run_train(cfg)
    out = capsys.readouterr().out
    assert f"continuing the run in {earlier}" in out and "Resumed from" in out
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before  # the input is left alone
    work = Path(cfg.work_dir)
    assert (work / "metrics.csv").exists() and (work / "test_metrics.json").exists()
    # test, diagnose and decode in a fresh session score the attached run's best checkpoint
    shutil.rmtree(work)
    assert m.parse_config(TINY + ["--data", "synthetic", "--mode", "test"]).checkpoint == \
        str(earlier / "checkpoints" / "best.pt")


def test_a_kaggle_kernel_with_two_gpus_starts_itself_under_torchrun(kaggle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    start = lambda *args: m.processes_to_start(m.parse_config(TINY + ["--data", "synthetic", *args]))
    assert start() == 2
    assert start("--processes", "1") == 1 and start("--device", "cpu") == 1 and start("--mode", "test") == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert start() == 1  # already one of torchrun's processes
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    assert start() == 1  # elsewhere torchrun is the user's to call


def test_train_starts_its_own_processes_and_rank_0_tests(tmp_path):
    work = tmp_path / "work"
    run = subprocess.run([sys.executable, str(ROOT / "master_all_avsr.py"), "--mode", "train", *TINY, "--data",
                          "synthetic", "--epochs", "2", "--processes", "2", "--device", "cpu", "--work-dir",
                          str(work)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Starting 2 training processes" in run.stdout and "x 2 processes" in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("CER=")
    assert len(list(csv.DictReader(open(work / "metrics.csv", encoding="utf-8-sig")))) == 2
    assert json.loads((work / "test_metrics.json").read_text())["n"] > 0


def test_the_notebook_runs_with_its_settings_cell_edited(tmp_path):
    """kaggle_kernel's notebook as a user runs it: the settings cell edited (a tiny run here), then the script's
    cell, its serving cell switched on; and the script's main() called from a later cell."""
    import nbformat
    from nbclient import NotebookClient
    work, clip = tmp_path / "work", tmp_path / "clip.npy"
    np.save(clip, np.zeros((30, 112, 112), np.uint8))
    notebook = nbformat.read(KERNEL / "notebook" / "master_all_avsr.ipynb", as_version=4)
    settings = notebook.cells[1].source
    notebook.cells[1].source = re.sub(r"SETTINGS = \[.*?\]", f"SETTINGS = {TINY + ['--epochs', '2', '--work-dir', str(work)]!r}",
                                      settings, flags=re.S)
    assert notebook.cells[1].source != settings
    port = free_port()
    notebook.cells[3].source = notebook.cells[3].source.replace("SERVE, TUNNEL, PORT = False, False, 8000",
                                                                f"SERVE, TUNNEL, PORT = True, False, {port}")
    notebook.cells.append(nbformat.v4.new_code_cell(
        f"decoded = main(['--mode', 'decode', '--work-dir', '{work}', '--input', '{clip}'])\nprint(len(decoded))\n"
        "import time, urllib.request\nfor _ in range(100):\n    time.sleep(0.1)\n    if server.started: break\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/api/health').read().decode())"))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    out = "".join(o.get("text", "") for o in notebook.cells[2].outputs if o.output_type == "stream")
    assert "epoch   2/" in out and out.strip().splitlines()[-1].startswith("CER=")
    assert not any(o.output_type == "error" for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert len(list(csv.DictReader(open(work / "metrics.csv", encoding="utf-8-sig")))) == 2
    assert (work / "checkpoints" / "best.pt").exists() and (work / "test_metrics.json").exists()
    assert "It runs while this kernel does" in "".join(o.get("text", "") for o in notebook.cells[3].outputs)
    last = "".join(o.get("text", "") for o in notebook.cells[4].outputs if o.get("name") == "stdout").split()
    assert last[-2:] == ["1", '{"ok":true}']  # a clip decoded; the page's server answers from the kernel


def test_a_missing_or_too_old_package_is_named_before_any_work(monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    m.check_packages(m.Config())
    stated = capsys.readouterr().out
    assert stated.startswith("Kaggle: Python ") and f"torch {torch.__version__}" in stated and "kornia " in stated
    monkeypatch.setitem(m.PACKAGES, "not_a_package_here", "not-a-package-here")
    with pytest.raises(m.UserError, match="missing: not-a-package-here: pip install not-a-package-here. On Kaggle "
                                          "with the internet off"):
        m.check_packages(m.Config())
    monkeypatch.delitem(m.PACKAGES, "not_a_package_here")
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(m.UserError, match=r"torch 2.4.1\+cu121 is older than any this script was tested with "
                                          r"\(2.13.0, and 2.10.0 as on Kaggle's image\)"):
        m.check_packages(m.Config())
