"""The beam search of two versions of the script, side by side in one process: the same model, clips and
encoder outputs, each search timed in turn (best of 3), their clips/s, the ratio, and whether every clip got the
same best hypothesis (and the largest score gap). Timed by the thread's CPU time (one thread), which another
process on the machine moves far less than the wall clock; the wall clock's ratio is printed beside it.
--trained fits the model to 4 clips first (bench/timing.py's quick_fit), so its searches end early.
For a change to the search, against the code before it:
    git show 4d55cc5:master_all_avsr.py > /tmp/before.py
    OMP_NUM_THREADS=1 python bench/search_versions.py /tmp/before.py --preset tiny --beams 10,40
"""
import argparse
import dataclasses
import importlib.util
import sys
import time

import torch

from timing import m, quick_fit

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("before", help="the other version of master_all_avsr.py")
parser.add_argument("--preset", default="tiny")
parser.add_argument("--beams", default="10,40")
parser.add_argument("--ctc-weights", default="0.1,0.3")
parser.add_argument("--clips", type=int, default=64)
parser.add_argument("--input-size", type=int, default=44)
parser.add_argument("--trained", action="store_true", help="fit the model to 4 clips for 30 steps first")
args = parser.parse_args()

spec = importlib.util.spec_from_file_location("before", args.before)
before = importlib.util.module_from_spec(spec)
sys.modules["before"] = before
spec.loader.exec_module(before)

vocab, device = m.Vocabulary.seed(), torch.device("cpu")
cfg = m.Config(preset=args.preset, input_size=args.input_size, synthetic_clips=args.clips, decoder="beam",
               work_dir="runs/bench_versions")
ds = m.load_dataset(cfg, vocab, device)
index = list(range(min(args.clips, len(ds.samples))))
x, lengths, targets = m.training_batch(ds, index, m.Augment(cfg, training=False), device)
torch.manual_seed(0)
model = m.build_model(cfg, vocab.size)
if args.trained:
    quick_fit(model, dataclasses.replace(cfg, lr=3e-3, warmup_epochs=0, amp="off"), vocab, x[:4], lengths[:4],
              targets[:4], 30, device)
model.eval()
old_cfg = before.Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(before.Config) if hasattr(cfg, f.name)})
models = {"now": model, "before": before.build_model(old_cfg, vocab.size).eval()}
models["before"].load_state_dict(model.state_dict())  # the same weights, in each version's own classes
with torch.no_grad():
    enc, mask = model.encode(x, lengths)
print(f"{args.preset}, {'trained' if args.trained else 'untrained'}, {len(index)} clips, {torch.get_num_threads()} thread(s); before = {args.before}")
for beam in map(int, args.beams.split(",")):
    for w in map(float, args.ctc_weights.split(",")):
        runs = {"now": dataclasses.replace(cfg, beam_size=beam, beam_ctc_weight=w),
                "before": dataclasses.replace(old_cfg, beam_size=beam, beam_ctc_weight=w)}
        cpu, wall, out = {"before": [], "now": []}, {"before": [], "now": []}, {}
        for _ in range(3):
            for name, module in (("before", before), ("now", m)):
                t0, w0 = time.thread_time(), time.perf_counter()
                with torch.no_grad():
                    out[name] = module.decode(models[name], enc, mask, lengths, vocab, runs[name])
                cpu[name].append(time.thread_time() - t0)
                wall[name].append(time.perf_counter() - w0)
        same = sum(a[0][0] == b[0][0] for a, b in zip(out["before"], out["now"]))
        gap = max(abs(a[0][1] - b[0][1]) for a, b in zip(out["before"], out["now"]))
        rate = {k: len(index) / min(v) for k, v in cpu.items()}
        wall_ratio = min(wall["before"]) / min(wall["now"])
        print(f"beam {beam:3d}, CTC weight {w}: before {rate['before']:.1f} clips per CPU second, now "
              f"{rate['now']:.1f} ({rate['now'] / rate['before']:.2f}x; wall clock {wall_ratio:.2f}x); same best "
              f"{same}/{len(index)}, score gap {gap:.1e}", flush=True)
