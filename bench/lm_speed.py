"""What the language model costs in the beam search: clips/s with and without --lm on the same encoder outputs,
the two timed in turn (three times each, the fastest kept), so that a busy machine slows both alike; the
n-gram's table of distributions starts empty each time (a long decoding session fills it and runs faster).

    python bench/lm_speed.py RUN_DIR --data-dir D --videos-dir V [--lm RUN_DIR/lm/lm.pt] [--beams 10,20]
"""
import argparse
import contextlib
import io
import time
from pathlib import Path

import torch

from timing import m

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("run")
parser.add_argument("--data-dir", required=True)
parser.add_argument("--videos-dir", default="")
parser.add_argument("--lm", default="", help="default: RUN/lm/lm.pt")
parser.add_argument("--beams", default="10,20")
parser.add_argument("--split", default="test")
args = parser.parse_args()

run = Path(args.run)
cfg = m.Config(mode="test", work_dir=str(run), data_dir=args.data_dir, videos_dir=args.videos_dir,
               lm=args.lm or str(run / "lm" / "lm.pt"))
device = torch.device("cpu")
model, vocab, model_cfg = m.model_from_checkpoint(m.checkpoint_path(cfg), cfg, device)
with contextlib.redirect_stdout(io.StringIO()):
    ds = m.load_dataset(model_cfg, vocab, device)
    lm = m.load_lm(model_cfg, vocab, device)
index = ds.subset(args.split)
augment = m.Augment(model_cfg, training=False)
with torch.no_grad():
    x, lengths = m.batch_inputs(ds, index, augment, device)
    enc, mask = model.encode(x, lengths)
print(f"{len(index)} {args.split} clips of {run}, {torch.get_num_threads()} threads, {lm.path} at weight {lm.weight}")
print("| beam | clips/s without | with the LM | ratio |\n| --- | --- | --- | --- |")
for beam in map(int, args.beams.split(",")):
    search = m.dataclasses.replace(model_cfg, decoder="beam", beam_size=beam)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(3):
        for with_lm in (False, True):
            getattr(lm.model, "cache", {}).clear()  # the n-gram's distributions are computed anew each time
            t0 = time.perf_counter()
            with torch.no_grad():
                m.decode(model, enc, mask, lengths, vocab, search, lm if with_lm else None)
            best[with_lm] = min(best[with_lm], time.perf_counter() - t0)
    print(f"| {beam} | {len(index) / best[False]:.1f} | {len(index) / best[True]:.1f} | "
          f"{best[True] / best[False]:.2f}x the time |", flush=True)
