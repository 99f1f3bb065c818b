"""Checks on the real LRC-AR clips (the folder is an argument; nothing of it lives in the project):
the ambiguity stop, every label's round trip through the vocabulary, what is skipped, and the figures of the
team's training notes. Usage: python bench/check_lrc_ar.py /path/to/lrc-ar [--work-dir runs/lrc_check]"""
import argparse
import json
import time
from pathlib import Path

import torch

from timing import m

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("root")
parser.add_argument("--work-dir", default="runs/lrc_check")
args = parser.parse_args()
root = Path(args.root)

cfg = m.Config(data_dir=str(root), work_dir=args.work_dir)
try:
    m.load_dataset(cfg, m.load_vocabulary(cfg), torch.device("cpu"))
    print("ambiguity: NOT detected (expected a stop: the set has Video/ and Preprocessed_Video/)")
except m.UserError as e:
    print("ambiguity: stopped before any work, as expected:\n  " + str(e).replace("\n", "\n  "))

cfg = m.dataclasses.replace(cfg, videos_dir=str(root / "Dataset" / "Preprocessed_Video"))
vocab = m.load_vocabulary(cfg)
t0 = time.perf_counter()
ds = m.load_dataset(cfg, vocab, torch.device("cpu"))
print(f"\nloaded {len(ds.samples)} clips in {time.perf_counter() - t0:.1f} s "
      f"(skipped: {json.loads((Path(args.work_dir) / 'data_report.json').read_text())['skipped']})")
mismatches = [s.stem for s in ds.samples if vocab.decode(s.ids) != " ".join(s.text.split())]
print(f"round trip text -> ids -> text: {len(ds.samples) - len(mismatches)} of {len(ds.samples)} labels exact"
      + (f"; differ: {mismatches[:10]}" if mismatches else ""))
stats = m.dataset_stats(ds, vocab)
m.print_stats(stats)
center = ds.bank.frames[:, 12:100, 12:100]
hist = torch.bincount(center.flatten(), minlength=256).double()
levels = torch.arange(256, dtype=torch.float64) / 255
mean = (hist * levels).sum() / hist.sum()
std = ((hist * (levels - mean) ** 2).sum() / hist.sum()).sqrt()
print(f"pixel mean/std of the 88 x 88 center crops: {mean:.4f} / {std:.4f} (the team's: 0.4192 / 0.1339)")
