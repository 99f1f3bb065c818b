"""Diagnostics section: dataset statistics as numbers (stats.json, console) and as a picture (stats.png)."""
import json
from pathlib import Path

import numpy as np
import torch

from conftest import m


def test_stats_mode_reports_what_seed_001_shows(cfg, synthetic_root, capsys):
    cfg = m.dataclasses.replace(cfg, mode="stats", data_dir=str(synthetic_root))
    stats = m.run_stats(cfg)
    ds = m.load_dataset(cfg, m.load_vocabulary(cfg), torch.device("cpu"))
    frames = [s.frames for s in ds.samples]
    units = [len([i for i in s.ids if i != m.SPECIALS["<space>"]]) for s in ds.samples]
    assert stats["clips"] == 24 and sum(stats["splits"].values()) == 24
    assert (stats["frames"]["min"], stats["frames"]["max"]) == (min(frames), max(frames))
    assert stats["frames"]["mean"] == round(float(np.mean(frames)), 2)
    assert (stats["label_units"]["min"], stats["label_units"]["max"]) == (min(units), max(units))
    assert sum(stats["unit_frequency"].values()) == sum(units)
    assert sum(stats["frames"]["histogram"].values()) == 24
    all_pixels = ds.bank.frames.double() / 255
    assert abs(stats["pixel_mean"] - all_pixels.mean().item()) < 1e-4
    assert abs(stats["pixel_std"] - all_pixels.std().item()) < 1e-3
    out = capsys.readouterr().out
    assert f"frames a clip: min {min(frames)}  max {max(frames)}" in out and "pixel mean" in out
    work = Path(cfg.work_dir)
    assert json.loads((work / "stats.json").read_text(encoding="utf-8")) == json.loads(json.dumps(stats))
    assert (work / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
