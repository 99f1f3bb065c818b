"""How recognition holds up as the sound gets worse: each checkpoint's test-split CER with clean sound, muted,
and babble noise at 20/10/5/0 dB SNR (the noise made of other training clips, as in training), as a markdown
table. The data folder is an argument; nothing of it lives in the project.
Usage: python bench/sound_robustness.py RUN_DIR [RUN_DIR ...] --data-dir D --videos-dir V [--decoder ctc]
[--checkpoint best|last|averaged]"""
import argparse
import contextlib
import io
import random
from pathlib import Path

import torch

from timing import m

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("runs", nargs="+", help="work dirs of trained runs (the checkpoint --checkpoint names is tested)")
parser.add_argument("--checkpoint", default="best", help="which of each run's checkpoints: best, last or averaged")
parser.add_argument("--data-dir", required=True)
parser.add_argument("--videos-dir", default="")
parser.add_argument("--cache-dir", default="")
parser.add_argument("--decoder", default="ctc")
parser.add_argument("--sounds", default="clean,20,10,5,0,mute")
args = parser.parse_args()

sounds = args.sounds.split(",")
rows = []
for run in args.runs:
    cers = []
    for sound in sounds:
        cfg = m.Config(mode="test", work_dir=str(Path("runs") / "robustness" / Path(run).name / sound),
                       checkpoint=str(Path(run) / "checkpoints" / f"{args.checkpoint}.pt"), data_dir=args.data_dir,
                       videos_dir=args.videos_dir, cache_dir=args.cache_dir, decoder=args.decoder, sound=sound)
        torch.manual_seed(0), random.seed(0)  # the same noise for every model
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = m.run_test(cfg)
        cers.append(metrics["cer"])
        print(f"{run} {sound}: CER {metrics['cer']:.3f} (n={metrics['n']}, {metrics['modality']})", flush=True)
    rows.append((f"{Path(run).name} ({args.checkpoint}.pt)", metrics["modality"], cers))

heading = {"clean": "clean", "mute": "muted"}
print("\n| run | modality | " + " | ".join(heading.get(s, f"{s} dB") for s in sounds) + " |")
print("| --- | --- |" + " --- |" * len(sounds))
for name, modality, cers in rows:
    print(f"| {name} | {modality} | " + " | ".join(f"{c:.3f}" for c in cers) + " |")
