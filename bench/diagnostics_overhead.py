"""What seed 001's per-epoch checklist costs: whole epochs (training, validation, and with diagnostics the
training probe, verdict, worst clips, confusions and their files) timed with --diagnostics on and off, runs
alternated so that a busy machine weighs on both alike; --log-param-updates timed once beside them.
Usage: python bench/diagnostics_overhead.py [--data-dir DATASET [--videos-dir CLIPS]] [--preset tiny]
[--input-size 44] [--epochs 3] [--repeats 2]"""
import argparse
import contextlib
import dataclasses
import io
import statistics
import tempfile
import time

import torch

from timing import m

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--data-dir", default="", help="the user's dataset; default: built-in synthetic clips")
parser.add_argument("--videos-dir", default="", help="the folder of mouth clips, when the dataset has several")
parser.add_argument("--preset", default="tiny")
parser.add_argument("--input-size", type=int, default=44)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--device", default="auto")
args = parser.parse_args()

work = tempfile.mkdtemp(prefix="diag_bench_")
base = m.parse_config(["--preset", args.preset, "--input-size", str(args.input_size), "--epochs", str(args.epochs),
                       "--device", args.device, "--work-dir", work]
                      + (["--data-dir", args.data_dir] if args.data_dir else [])
                      + (["--videos-dir", args.videos_dir] if args.videos_dir else []))
device = m.pick_device(base.device)
vocab = m.load_vocabulary(base)
ds = m.load_dataset(base, vocab, device)  # read once: the runs time epochs, not reading clips


def seconds_an_epoch(name: str, **changes) -> float:
    cfg = dataclasses.replace(base, work_dir=f"{work}/{name}", **changes)
    began = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        m.train(cfg, ds)
    return (time.perf_counter() - began) / args.epochs


print(f"device {device}, {args.preset} at {args.input_size} x {args.input_size}, "
      f"{len(ds.subset('train'))} train / {len(ds.subset('val'))} val clips, {args.epochs} epochs a run, "
      f"{torch.get_num_threads()} threads")
times = {False: [], True: []}
for r in range(args.repeats):
    for diagnostics in (False, True):
        times[diagnostics].append(seconds_an_epoch(f"r{r}_{diagnostics}", diagnostics=diagnostics))
        print(f"  run {r + 1}, diagnostics {'on ' if diagnostics else 'off'}: {times[diagnostics][-1]:.2f} s an epoch",
              flush=True)
off, on = statistics.median(times[False]), statistics.median(times[True])
updates = seconds_an_epoch("updates", log_param_updates=True)
print(f"epoch (median): diagnostics off {off:.2f} s, on {on:.2f} s: {100 * (on / off - 1):+.1f}%")
print(f"with --log-param-updates as well: {updates:.2f} s an epoch ({100 * (updates / off - 1):+.1f}% against off)")
