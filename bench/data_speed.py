"""Where data time goes: decoding clips vs the cache, and the share of a training step spent waiting for a
batch (gather from memory + augmentation) with the batches kept in memory.
Usage: python bench/data_speed.py [--data-dir ROOT --videos-dir DIR] [--presets tiny,small]"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

from timing import m, time_training_steps

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--data-dir", default="")
parser.add_argument("--videos-dir", default="")
parser.add_argument("--presets", default="tiny,small")
parser.add_argument("--input-sizes", default="88,44")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--device", default="auto")
args = parser.parse_args()

device = m.pick_device(args.device)
vocab = m.Vocabulary.seed()
scratch = Path(tempfile.mkdtemp())
data_dir = args.data_dir
if not data_dir:  # built-in clips written as mp4 files, so that decoding is measured too
    data_dir = str(m.write_synthetic_dataset(m.Config(output=str(scratch / "data"), synthetic_clips=400), vocab))
cfg = m.Config(data_dir=data_dir, videos_dir=args.videos_dir, work_dir=str(scratch / "work"))

for label in ("first run (decode every clip, fill the cache)", "later runs (from the cache)"):
    t0 = time.perf_counter()
    ds = m.load_dataset(cfg, vocab, device)
    seconds = time.perf_counter() - t0
    print(f"{label}: {len(ds.samples)} clips in {seconds:.2f} s ({1000 * seconds / len(ds.samples):.2f} ms a clip)")

print(f"\nbatches from memory on {device}, frame budget {cfg.max_frames}:")
print(f"{'preset':8} {'input':>6} {'batch':>6} {'data ms':>8} {'step s':>8} {'data %':>7}")
for size in map(int, args.input_sizes.split(",")):
    sized = m.dataclasses.replace(cfg, input_size=size)
    ds = m.load_dataset(sized, vocab, device)  # from the cache; the bank keeps frames at the scale they are used
    for preset in args.presets.split(","):
        r = time_training_steps(m.dataclasses.replace(sized, preset=preset), ds, vocab, device, steps=args.steps)
        print(f"{preset:8} {size:6d} {r['batch']:6.0f} {r['data_ms']:8.1f} {r['step_s']:8.2f} "
              f"{100 * r['data_share']:6.1f}%", flush=True)
shutil.rmtree(scratch)
