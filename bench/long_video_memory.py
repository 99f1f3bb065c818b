"""Memory and speed of --mode decode --preprocess on a long 720p face video: scikit-image's astronaut photograph
moved and scaled across 1280 x 720 frames for --minutes minutes (25 fps), transcribed by a run's model in a
process of its own. Prints the video's length and size, the decode's wall time as a real-time factor and its peak
resident memory, beside the same for a 1-minute video (what grows with the length, if anything).

    python bench/long_video_memory.py RUN_DIR [--minutes 10] [--out /tmp/long_memory]
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data

SCRIPT = Path(__file__).resolve().parent.parent / "master_all_avsr.py"


def write_face_video(path: Path, minutes: float) -> int:
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    frames = int(minutes * 60 * 25)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (1280, 720), True)
    for t in range(frames):
        phase = 2 * np.pi * t / 250  # the face drifts and breathes in scale over 10 s
        s = 1.0 + 0.15 * np.sin(phase)
        a = np.array([[s, 0, 640 + 120 * np.sin(phase / 3) - s * 222], [0, s, 360 + 40 * np.cos(phase) - s * 127]])
        writer.write(cv2.cvtColor(cv2.warpAffine(photo, a, (1280, 720), borderMode=cv2.BORDER_REFLECT), cv2.COLOR_GRAY2BGR))
    writer.release()
    return frames


def decode(run: Path, video: Path, out: Path) -> tuple[float, float]:
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--mode", "decode", "--work-dir", str(run), "--input",
                                str(video), "--preprocess", "--output", str(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(process.stderr.read())
    return time.perf_counter() - began, usage.ru_maxrss / 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/long_memory"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| video | file | frames | decode wall time | real-time factor | peak memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for minutes in (1.0, args.minutes):
        video = args.out / f"face_{minutes:g}min_720p.mp4"
        frames = write_face_video(video, minutes) if not video.exists() else int(minutes * 60 * 25)
        seconds, memory = decode(args.run, video, args.out / f"face_{minutes:g}min.json")
        print(f"| {minutes:g} min, 1280 x 720 | {video.stat().st_size / 2 ** 20:.0f} MB | {frames} | {seconds:.0f} s | "
              f"{seconds / (minutes * 60):.2f} | {memory:.2f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
