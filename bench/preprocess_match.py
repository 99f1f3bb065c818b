"""How close the preprocessing's crops come to LRC-AR's own: every raw face video of LRC-AR
(Dataset/Video) is cut with --mode preprocess's code, and each frame is compared with the same moment of the
LRC-AR's crop (Dataset/Preprocessed_Video) by normalised cross-correlation (1 = the same picture up to brightness
and contrast). Prints the mean, median, 10th percentile and worst clips of the per-clip mean.
Usage: python bench/preprocess_match.py /path/to/lrc-ar/Dataset [--every 1] [--smooth-frames 5] [--workers 2]"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from timing import m

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("dataset", help="the folder holding Video/ and Preprocessed_Video/")
parser.add_argument("--every", type=int, default=1, help="every n-th video only (1: all)")
parser.add_argument("--smooth-frames", default="5", help="comma-separated values to compare")
parser.add_argument("--mouth-scale", default="1.24", help="comma-separated values to compare")
parser.add_argument("--workers", type=int, default=0)
args = parser.parse_args()
root = Path(args.dataset)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-9))


def clip_match(ours: Path, theirs: Path) -> float:
    """Mean correlation over our frames, each against LRC-AR's frame nearest in time (theirs keep the
    camera's rate, 25 or 30 fps; ours are 25)."""
    a, (b, fps) = m.read_video(ours), m.read_frames(theirs)
    at = np.minimum((np.arange(len(a)) * fps / m.CLIP_FPS).round().astype(int), len(b) - 1)
    return float(np.mean([ncc(x, b[j]) for x, j in zip(a, at)]))


videos = sorted((root / "Video").glob("*.mp4"))[::args.every]
with tempfile.TemporaryDirectory() as tmp:
    subset = Path(tmp) / "videos"
    subset.mkdir()
    for v in videos:
        (subset / v.name).symlink_to(v.resolve())
    for smooth in map(int, args.smooth_frames.split(",")):
        for scale in map(float, args.mouth_scale.split(",")):
            out = Path(tmp) / f"s{smooth}_{scale}"
            cfg = m.Config(input=str(subset), smooth_frames=smooth, mouth_scale=scale, workers=args.workers)
            t0 = time.perf_counter()
            rows = m.preprocess_videos(cfg, out)
            seconds = time.perf_counter() - t0
            scores = {Path(r["output"]).stem: clip_match(Path(r["output"]), root / "Preprocessed_Video" /
                                                          Path(r["output"]).name) for r in rows if r["output"]}
            values = np.array(list(scores.values()))
            worst = sorted(scores.items(), key=lambda kv: kv[1])[:5]
            print(f"smooth {smooth} scale {scale}: {len(values)} of {len(videos)} clips, per-clip mean NCC: "
                  f"mean {values.mean():.4f} median {np.median(values):.4f} p10 {np.percentile(values, 10):.4f} "
                  f"min {values.min():.4f}; {seconds:.0f} s; worst: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in worst), flush=True)
