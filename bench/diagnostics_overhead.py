"""What the per-epoch debugging checklist costs: whole epochs (training, validation, and with diagnostics the
training probe, verdict, worst clips, confusions and their files) timed with --diagnostics on and off, runs
alternated so that a busy machine weighs on both alike; --log-param-updates timed once beside them.
Usage: python bench/diagnostics_overhead.py [--data-dir DATASET [--videos-dir CLIPS]] [--preset tiny]
[--input-size 44] [--epochs 3] [--repeats 2] [--checkpoint TRAINED.pt]"""
import argparse
import contextlib
import dataclasses
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from timing import m

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--data-dir", default="", help="a dataset folder; default: built-in synthetic clips")
parser.add_argument("--videos-dir", default="", help="the folder of mouth clips, when the dataset has several")
parser.add_argument("--preset", default="tiny")
parser.add_argument("--input-size", type=int, default=44)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--device", default="auto")
parser.add_argument("--checkpoint", default="", help="a trained model of the same preset and input size: its "
                    "checklist calls are timed too (a trained model's hypotheses are longer than a fresh one's)")
args = parser.parse_args()

work = tempfile.mkdtemp(prefix="diag_bench_")
base = m.parse_config(["--preset", args.preset, "--input-size", str(args.input_size), "--epochs", str(args.epochs),
                       "--device", args.device, "--work-dir", work]
                      + (["--data-dir", args.data_dir] if args.data_dir else [])
                      + (["--videos-dir", args.videos_dir] if args.videos_dir else []))
device = m.pick_device(base.device)
vocab = m.load_vocabulary(base)
ds = m.load_dataset(base, vocab, device)  # read once: the runs time epochs, not reading clips


# The checklist's own calls are timed inside the runs too: a figure that the machine's noise between whole runs
# (several percent on a shared machine) cannot blur.
own = {"probe": 0.0, "diagnose_epoch": 0.0, "confusions.png": 0.0}
probes: list = []


def timed(name, function):
    def run(*a, **k):
        began = time.perf_counter()
        result = function(*a, **k)
        if name != "evaluate" or (probes and a[2] is probes[-1]):
            own["probe" if name == "evaluate" else name] += time.perf_counter() - began
        return result
    return run


training_probe = m.training_probe
m.training_probe = lambda *a: probes.append(training_probe(*a)) or probes[-1]
m.evaluate = timed("evaluate", m.evaluate)
m.diagnose_epoch = timed("diagnose_epoch", m.diagnose_epoch)
m.plot_confusions = timed("confusions.png", m.plot_confusions)


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
pairs = [100 * (b / a - 1) for a, b in zip(times[False], times[True])]
print(f"epoch, median: diagnostics off {off:.2f} s, on {on:.2f} s: {100 * (on / off - 1):+.1f}%")
print(f"epoch, fastest: off {min(times[False]):.2f} s, on {min(times[True]):.2f} s: "
      f"{100 * (min(times[True]) / min(times[False]) - 1):+.1f}%; run by run: "
      + ", ".join(f"{d:+.1f}%" for d in pairs))
runs_on = args.repeats * args.epochs
inside = {k: v / runs_on for k, v in own.items()}
print("inside the runs with diagnostics, an epoch: " + ", ".join(f"{k} {v:.3f} s" for k, v in inside.items())
      + f"; together {sum(inside.values()):.2f} s = {100 * sum(inside.values()) / off:.1f}% of an epoch without them")
updates = seconds_an_epoch("updates", log_param_updates=True)
print(f"with --log-param-updates as well: {updates:.2f} s an epoch ({100 * (updates / off - 1):+.1f}% against the "
      "median without diagnostics)")


def fastest(function, times=3) -> float:
    best = float("inf")
    for _ in range(times):
        began = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - began)
    return best


if args.checkpoint:
    model, _, cfg = m.model_from_checkpoint(Path(args.checkpoint), base, device)
    val = m.evaluate(model, ds, ds.subset("val"), vocab, cfg, device)
    probe = m.training_probe(ds, cfg)
    row = {"epoch": 1, "ctc_share": 0.5, "train_ctc": 1.0, "train_att": 1.0, "train_cer_ctc": 0.8,
           "train_cer_att": 0.8, "val_cer_ctc": val["ctc"]["cer"], "val_cer_att": val["attention"]["cer"],
           **{f"grad_{g}": 1.0 for g in m.module_groups(model)}}
    with contextlib.redirect_stdout(io.StringIO()):
        probe_s = fastest(lambda: m.evaluate(model, ds, probe, vocab, cfg, device))
        diagnose_s = fastest(lambda: m.diagnose_epoch([dict(row)], val, ds, vocab, model, cfg))
        pairs = m.diagnose_epoch([dict(row)], val, ds, vocab, model, cfg)[1]
        heatmap_s = fastest(lambda: m.plot_confusions(pairs, Path(work) / "confusions.png"))
    print(f"on the trained model {args.checkpoint}: training probe {probe_s:.2f} s, diagnose_epoch {diagnose_s:.2f} s "
          f"= {100 * (probe_s + diagnose_s) / off:.1f}% of an epoch without diagnostics; confusions.png {heatmap_s:.2f} s, "
          f"drawn at most every {m.REDRAW_HEATMAP:.0f} s ({100 * heatmap_s / m.REDRAW_HEATMAP:.1f}% of that time)")
