"""Preprocessing speed: frames per second of the face follower (--mode preprocess's defaults: the detector on a
half-size frame every 10 frames, the landmarks following the face in between) against a plain loop that runs
dlib's detector on every full-size frame (upsampled once, as dlib's landmark example does, and not upsampled),
one process each, video decoding included, the fastest of 3 passes; and how far the crop centres of the two land apart.
Usage: python bench/preprocess_speed.py /path/to/face/videos [--clips 40]"""
import argparse
import time
from pathlib import Path

import numpy as np

from timing import m

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("videos", help="a folder of face videos")
parser.add_argument("--clips", type=int, default=40)
args = parser.parse_args()
import cv2  # noqa: E402

cv2.setNumThreads(1)
videos = sorted(p for p in Path(args.videos).rglob("*") if p.suffix.lower() in m.RAW_VIDEO_EXTS)[:args.clips]
model = m.find_landmark_model(m.Config())


class EveryFrame(m.FaceFollower):
    """The plain loop: a detection on every full-size frame, the largest face's landmarks."""

    def __init__(self, upsample: int):
        super().__init__(model, m.Config())
        self.upsample = upsample

    def track(self, frames):
        points = np.full((len(frames), 68, 2), np.nan, np.float32)
        for t, gray in enumerate(frames):
            faces = self.detector(gray, self.upsample)
            if faces:
                f = max(faces, key=lambda f: f.area())
                points[t] = self.landmarks(gray, np.array([f.left(), f.top(), f.right(), f.bottom()]))
        return m.FaceTrack(points, len(frames), 1)


def run(follower, repeats: int = 3) -> tuple[float, int, list[np.ndarray]]:
    """The fastest of `repeats` passes, so that no loop pays for reading the files from disk first."""
    best = float("inf")
    for _ in range(repeats):
        t0, frames, crops = time.perf_counter(), 0, []
        for v in videos:
            clip = m.at_clip_rate(*m.read_frames(v))
            track = follower.track(clip)
            crops.append(m.mouth_crops(m.smooth_over_time(m.fill_gaps(track.points), 5), 1.24))
            frames += len(clip)
        best = min(best, time.perf_counter() - t0)
    return best, frames, crops


fast_s, n, fast = run(m.FaceFollower(model, m.Config()))
print(f"{len(videos)} videos, {n} frames")
print(f"follower (detect every 10, half size): {n / fast_s:7.1f} frames/s")
for upsample in (1, 0):
    plain_s, _, plain = run(EveryFrame(upsample))
    shift = np.concatenate([np.linalg.norm(a[:, :2] - b[:, :2], axis=1) for a, b in zip(fast, plain)])
    side = np.concatenate([np.abs(a[:, 2] - b[:, 2]) for a, b in zip(fast, plain)])
    print(f"every frame, upsample {upsample}:        {n / plain_s:7.1f} frames/s -> follower {plain_s / fast_s:.1f}x "
          f"faster; crop centres apart: mean {shift.mean():.2f} px, max {shift.max():.2f} px; "
          f"crop sides apart: mean {side.mean():.2f} px")
