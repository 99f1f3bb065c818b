"""Long videos made of LRC-AR clips joined end to end, transcribed whole (--mode decode: read as a stream, cut into
pieces, words timed) against the same clips decoded one by one.

For each N of --clips: the first N clips of the run's --split (val, to choose settings on; test, once: clips it
never trained on) are joined in name order into one 25 fps video (--form faces: their raw 256 x 256 face videos,
decoded with --preprocess; mouths: their mouth clips) with the joined labels as its reference. Prints per N: the CER of the whole transcript, the CER of the one-by-one transcripts
joined (the goal: the whole within 0.03 of it), the pieces and how many seams (joins of two clips) fell within 3
frames of a cut, the wall time of the whole decode (with dlib for faces) as a real-time factor (seconds taken / seconds of
video), and its peak resident memory. Each decode runs in a process of its own (the memory is its own).

    python bench/long_video.py DATASET_DIR RUN_DIR [--checkpoint averaged] [--split val] [--clips 5 20 100]

Flags after `--` go to the whole video's decode (for example -- --piece-seconds 1.2 --shortest-piece 1.2); the
clips one by one are read whole.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import master_all_avsr as m  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "master_all_avsr.py"
FOLDERS = {"faces": "Video", "mouths": "Preprocessed_Video"}


def clips_of(dataset: Path, checkpoint: Path, split: str) -> list[str]:
    """The clips of the run's split (val: to choose settings on; test: read once), in name order."""
    cfg = m.saved_config(m.load_checkpoint(checkpoint))
    return sorted(p.stem for p in (dataset / "Video").glob("*.mp4") if m.split_of(p.stem, cfg) == split)


def words_of(dataset: Path, name: str) -> list[str]:
    with open(dataset / "Csv (with Diacritics)" / f"{name}.csv", encoding="utf-8-sig") as f:
        return [r["word"] for r in csv.DictReader(f)]


def join(dataset: Path, names: list[str], folder: Path, form: str) -> tuple[Path, list[int]]:
    """One video of the clips end to end, its label beside it; and the frame each clip starts at."""
    import cv2
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"joined{len(names)}.mp4"
    size = 256 if form == "faces" else 112
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size, size), True)
    starts, t = [], 0
    for name in names:
        starts.append(t)
        cap = cv2.VideoCapture(str(dataset / FOLDERS[form] / f"{name}.mp4"))
        fps, frames = cap.get(cv2.CAP_PROP_FPS), []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame.shape[:2] != (size, size):  # a few of the face videos are of another size
                frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
            frames.append(frame)
        for frame in m.at_clip_rate(np.stack(frames), fps):  # 89 of them are at 30 fps: as decode reads them
            writer.write(frame)
            t += 1
    writer.release()
    words = [w for n in names for w in words_of(dataset, n)]
    (folder / f"joined{len(names)}.csv").write_text("word\n" + "\n".join(words) + "\n", encoding="utf-8")
    return path, starts + [t]


def decode(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (GiB) of one decode in a process of its own."""
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--mode", "decode", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - began
    if status:
        raise SystemExit(f"decode failed: {process.stderr.read()}")
    return seconds, usage.ru_maxrss / 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", default="averaged")
    parser.add_argument("--clips", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--form", default="faces", choices=["faces", "mouths"],
                        help="faces: the raw face videos (dlib follows the mouth; a shot cut at every join); mouths: "
                             "the mouth clips, joined without a cut to be seen, so that the pieces come from length alone")
    parser.add_argument("--out", type=Path, default=Path("/tmp/long_video"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]  # after --: flags for the whole video's decode
    checkpoint = args.run / "checkpoints" / f"{args.checkpoint}.pt"
    common = ["--checkpoint", str(checkpoint), "--decoder", "beam"] + (["--preprocess"] if args.form == "faces" else [])
    vocab = m.load_vocabulary(m.Config())
    names = clips_of(args.dataset, checkpoint, args.split)
    print(f"{checkpoint}, {args.split} clips as {args.form}; flags {' '.join(extra) or '(defaults)'}")
    print("| clips | video | CER whole | CER one by one | pieces | seams at a cut | real-time factor | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.clips:
        chosen = names[:n]
        folder = args.out / f"{args.form}_{args.split}{n}"
        video, starts = join(args.dataset, chosen, folder, args.form)
        whole = folder / "whole.json"
        seconds, memory = decode(common + extra + ["--input", str(video), "--work-dir", str(folder / "w"), "--output", str(whole)])
        singles = folder / "singles"
        singles.mkdir(exist_ok=True)
        for name in chosen:
            link = singles / f"{name}.mp4"
            if not link.exists():
                link.symlink_to(args.dataset / FOLDERS[args.form] / f"{name}.mp4")
        decode(common + ["--input", str(singles), "--work-dir", str(folder / "w1"), "--output", str(folder / "singles.json")])
        result = json.loads(whole.read_text(encoding="utf-8"))["videos"][0]
        by_name = {v["name"]: v["text"] for v in json.loads((folder / "singles.json").read_text(encoding="utf-8"))["videos"]}
        reference = " ".join(w for c in chosen for w in words_of(args.dataset, c))
        cuts = {round(p["start"] * 25) for p in result["pieces"]} | {round(p["end"] * 25) for p in result["pieces"]}
        seams = starts[1:-1]
        at_cut = sum(any(abs(s - c) <= 3 for c in cuts) for s in seams)
        cer = lambda text: m.error_rates([vocab.encode(reference)[0]], [vocab.encode(text)[0]], vocab)["cer"]
        duration = starts[-1] / 25
        print(f"| {n} | {duration:.0f} s | {cer(result['text']):.3f} | "
              f"{cer(' '.join(by_name.get(c, '') for c in chosen)):.3f} | {len(result['pieces'])} | {at_cut} of "
              f"{len(seams)} | {seconds / duration:.2f} | {memory:.2f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
