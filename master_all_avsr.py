"""master_all_avsr.py: Arabic lip reading on one GPU, in one file.

Mouth-region clips in, diacritized Arabic text out. The file reads top to bottom in pipeline order:

    1. config          one dataclass for every setting, and the small helpers everything shares
    2. vocabulary      diacritized-character units <-> ids
    3. data            finding, checking, caching, splitting and batching clips; built-in synthetic clips
    4. augmentation    per-clip crops, flips, time masks and time warps on the training device
    5. diagnostics     dataset statistics
    6. cli             modes, flags and the entry point

Run `python master_all_avsr.py --help` for the flags, or with no arguments for the built-in demo.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # our own messages name bad files; FFmpeg's noise does not

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# 1. Config: every setting of every mode lives in `Config`; each field is also a command-line flag.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # run
    mode: str = "train"  # train | stats | vocab | synth
    work_dir: str = "runs/demo"  # everything a run writes goes here
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1337
    # data: where clips and labels are
    data: str = "auto"  # auto (files when a folder is given, else synthetic) | files | synthetic
    data_dir: str = ""  # searched recursively for clips and CSV labels, paired by file stem
    videos_dir: str = ""  # settles which folder holds the clips when several do
    labels_dir: str = ""  # settles which folder holds the labels when several do
    cache_dir: str = ""  # decoded clips as uint8; default <work_dir>/cache
    output: str = ""  # --mode synth: where the generated dataset goes
    # data: what a clip and a label must be
    frame_size: int = 112  # clips must be frame_size x frame_size gray mouth crops
    vocab: str = ""  # vocabulary JSON; default vocab.json beside this script, else the built-in one
    units: str = "diacritized"  # diacritized | letters (diacritics stripped, the seed-000 granularity)
    word_boundary: bool = True  # a <space> unit between words; off is the user's original 226-unit setting
    unknown_units: str = "skip"  # skip a clip with a unit outside the vocabulary, or map it to <unk>
    # data: splits
    split_seed: int = 0  # the split depends on this and the clip's stem only, never on the other clips
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_lists: str = ""  # folder with train.txt, val.txt, test.txt (one stem a line) to use instead
    # data: built-in synthetic clips
    synthetic_clips: int = 2000
    synthetic_words: int = 300  # lexicon size: words repeat across clips, as in the real data
    synthetic_speakers: int = 24
    # batching
    max_frames: int = 1200  # frame budget of one batch (clips x padded length)
    # augmentation (training only; validation and test get the center crop and normalisation)
    crop_size: int = 88
    random_crop: bool = True
    hflip_prob: float = 0.5
    mean: float = 0.419232189655303955078125
    std: float = 0.133925855159759521484375
    time_mask: bool = True
    time_mask_window: int = 10  # Auto-AVSR's AdaptiveTimeMask: up to window-1 frames...
    time_mask_stride: int = 25  # ...once per stride frames
    time_warp: bool = False
    time_warp_max: float = 0.1  # speed factor drawn from [1 - max, 1 + max]

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.work_dir) / "cache"


class UserError(Exception):
    """A problem the user can fix: the message says what and how; the CLI prints it without a traceback."""


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` and rename, so a killed run never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the other users of a shared machine
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto.")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------
# 2. Vocabulary: a unit is a base letter with the marks that follow it; ids 1..226 are the user's own.
# ---------------------------------------------------------------------------------------------------------

# The user's 226 units in id order (id = position + 1), exactly as seed 001 numbers them.
SEED_UNITS = """
ٱ يْ يّْ يِّ يُّ يَّ يٌّ يِ يُ يَ يٌ ي ى وْ وِّ وُّ وَّ وِ وُ وَ
وً و هْ هُّ هِ هُ هَ نۢ نْ نِّ نُّ نَّ نِ نُ نَ مْ مّْ مِّ مُّ مَّ
مِ مُ مَ مٍ مٌ مً لْ لّْ لِّ لُّ لَّ لِ لُ لَ لٍ لٌ لً كْ كِّ كَّ
كِ كُ كَ قْ قَّ قِ قُ قَ قٍ قً فْ فِّ فَّ فِ فُ فَ غْ غِ غَ عْ
عَّ عِ عُ عَ عٍ ظْ ظِّ ظَّ ظِ ظُ ظَ طْ طِّ طَّ طِ طُ طَ ضْ ضِّ ضُّ
ضَّ ضِ ضُ ضَ ضً صْ صّْ صِّ صُّ صَّ صِ صُ صَ صٍ صً شْ شِّ شُّ شَّ شِ
شُ شَ سْ سّْ سِّ سُّ سَّ سِ سُ سَ سٍ زْ زَّ زِ زُ زَ رْ رِّ رُّ رَّ
رِ رُ رَ رٍ رٌ رً ذْ ذَّ ذِ ذُ ذَ دْ دِّ دُّ دَّ دًّ دِ دُ دَ دٍ
دٌ دً خْ خِ خُ خَ حْ حَّ حِ حُ حَ جْ جِّ جُّ جَّ جِ جُ جَ ثْ ثِّ
ثُّ ثَّ ثِ ثُ ثَ تْ تِّ تُّ تَّ تِ تُ تَ تٍ تٌ ةْ ةِ ةُ ةَ ةٍ ةٌ
ةً بْ بِّ بَّ بِ بُ بَ بٍ بً ا ئْ ئِ ئَ ئً إِ ؤْ ؤُ ؤَ أْ أُ
أَ آ ءْ ءِ ءَ ءً
""".split()

# Blank is 0 because CTC and padding want it there; the others sit just above the user's ids.
# (Shadda comes first in every unit above: an editor that normalises to NFC would undo that; a test checks.)
SPECIALS = {"<blank>": 0, "<space>": 227, "<unk>": 228, "<sos/eos>": 229}
SHADDA, TATWEEL = "\u0651", "\u0640"


def normalize_unit(unit: str) -> str:
    """One spelling per unit: shadda first, the other marks in their written order (the seed's convention).

    Unicode's canonical order puts the vowel before the shadda; both spellings must find the same id."""
    base, marks = unit[:1], unit[1:]
    return base + "".join(sorted(marks, key=lambda m: m != SHADDA))


def split_units(text: str) -> list[list[str]]:
    """Text -> words -> units. NFC joins decomposed letters (alef + hamza -> أ); tatweel and spacing drop."""
    text = unicodedata.normalize("NFC", text).replace(TATWEEL, "")
    words = []
    for word in text.split():
        units: list[str] = []
        for ch in word:
            if unicodedata.category(ch) == "Mn" and units:
                units[-1] += ch
            else:
                units.append(ch)
        words.append([normalize_unit(u) for u in units])
    return words


def base_letter(unit: str) -> str:
    return unit[:1]


class Vocabulary:
    """Units and special tokens with fixed ids; `view` derives the letters-only vocabulary."""

    def __init__(self, ids: dict[str, int], specials: dict[str, int] = SPECIALS, letters_only: bool = False):
        self.specials, self.letters_only = dict(specials), letters_only
        self.ids = {normalize_unit(u): i for u, i in ids.items()}
        taken = sorted(list(self.ids.values()) + list(self.specials.values()))
        if len(set(taken)) != len(taken):
            raise UserError("The vocabulary gives the same id to two units; every unit needs its own id.")
        self.size = taken[-1] + 1
        self.itos = [""] * self.size
        for u, i in {**self.ids, **self.specials}.items():
            self.itos[i] = u
        self.blank, self.space = specials["<blank>"], specials["<space>"]
        self.unk, self.sos_eos = specials["<unk>"], specials["<sos/eos>"]

    @classmethod
    def seed(cls) -> "Vocabulary":
        return cls({u: i + 1 for i, u in enumerate(SEED_UNITS)})

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(obj["units"], obj["specials"], obj.get("letters_only", False))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"Cannot read the vocabulary {path}: {e}. It must be JSON with 'units' and "
                            "'specials' (unit -> id), as written by --mode vocab.") from e

    def to_json(self) -> dict:
        units = sorted(self.ids.items(), key=lambda kv: kv[1])
        return {"specials": self.specials, "units": dict(units), "letters_only": self.letters_only}

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    def view(self, units: str) -> "Vocabulary":
        """`letters`: every unit collapses to its base letter, numbered in order of first appearance."""
        if units == "diacritized":
            return self
        if units != "letters":
            raise UserError(f"--units {units!r} is not known; use diacritized or letters.")
        letters: dict[str, int] = {}
        for u, _ in sorted(self.ids.items(), key=lambda kv: kv[1]):
            letters.setdefault(base_letter(u), len(letters) + 1)
        n = len(letters)
        return Vocabulary(letters, {"<blank>": 0, "<space>": n + 1, "<unk>": n + 2, "<sos/eos>": n + 3}, True)

    def with_units(self, new_units) -> "Vocabulary":
        """Add units after every id in use, so that ids already known (and trained rows) never move."""
        ids = dict(self.ids)
        for u in new_units:
            if normalize_unit(u) not in ids:
                ids[normalize_unit(u)] = max(list(ids.values()) + list(self.specials.values())) + 1
        return Vocabulary(ids, self.specials, self.letters_only)

    def encode(self, text: str, word_boundary: bool = True) -> tuple[list[int], list[str]]:
        """Ids of `text`, and the units the vocabulary lacks (each one becomes <unk>)."""
        ids, unknown = [], []
        for w, word in enumerate(split_units(text)):
            if w and word_boundary:
                ids.append(self.space)
            for unit in word:
                key = base_letter(unit) if self.letters_only else unit
                if key in self.ids:
                    ids.append(self.ids[key])
                else:
                    ids.append(self.unk)
                    unknown.append(unit)
        return ids, unknown

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.space:
                out.append(" ")
            elif i not in (self.blank, self.sos_eos) and 0 <= i < self.size:
                out.append(self.itos[i])
        return " ".join("".join(out).split())


def default_vocab_path() -> Path | None:
    here = globals().get("__file__")  # absent when the script runs as a notebook cell
    path = Path(here).with_name("vocab.json") if here else None
    return path if path and path.exists() else None


def load_vocabulary(cfg: Config) -> Vocabulary:
    path = Path(cfg.vocab) if cfg.vocab else default_vocab_path()
    if cfg.vocab and not path.exists():
        raise UserError(f"--vocab {cfg.vocab}: no such file. Build one with --mode vocab --data-dir DIR.")
    return (Vocabulary.load(path) if path else Vocabulary.seed()).view(cfg.units)


# ---------------------------------------------------------------------------------------------------------
# 3. Data: files on disk (or generated clips) -> checked samples -> uint8 frames in memory -> batches.
# ---------------------------------------------------------------------------------------------------------

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".npy", ".npz"}
LABEL_EXTS = {".csv"}


@dataclass
class Sample:
    stem: str
    video: str  # a path, or "synthetic:<stem>"
    text: str
    ids: list[int]
    frames: int


class BadSamples:
    """Every skipped file with its reason; written as JSON to the work dir and summed up on the console."""

    def __init__(self):
        self.entries: list[dict] = []

    def add(self, file, reason: str) -> None:
        self.entries.append({"file": str(file), "reason": reason})

    def write(self, work_dir: Path, found: int) -> None:
        path = Path(work_dir) / "data_report.json"
        write_json(path, {"found": found, "skipped": len(self.entries), "entries": self.entries})
        if self.entries:
            kinds = Counter(e["reason"].split(":")[0] for e in self.entries)
            summary = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
            print(f"Skipped {len(self.entries)} file(s) ({summary}); each one is listed in {path}")


def files_by_stem(root: Path, exts: set[str], skip: Path | None) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (skip is None or d / n != skip))
        for name in sorted(filenames):
            p = d / name
            if p.suffix.lower() in exts:
                found.setdefault(p.stem, []).append(p)
    return found


def refuse_ambiguous(found: dict[str, list[Path]], what: str, flag: str) -> None:
    """Several files for one stem means the folder holds more than one dataset: make the user choose."""
    clashes = {s: ps for s, ps in found.items() if len(ps) > 1}
    if not clashes:
        return
    folders = Counter(str(p.parent) for ps in clashes.values() for p in ps)
    lines = "\n".join(f"  {folder}  ({n} of them)" for folder, n in folders.most_common())
    example = next(iter(clashes.values()))
    raise UserError(
        f"The same {what} name appears in several places ({len(clashes)} names, e.g. "
        f"{', '.join(str(p) for p in example)}). Candidate folders:\n{lines}\n"
        f"Say which one to use with {flag} FOLDER (e.g. {flag} \"{folders.most_common(1)[0][0]}\").")


def discover_pairs(cfg: Config, bad: BadSamples) -> list[tuple[str, Path, Path]]:
    """(stem, video, label) for every stem with both; a file without its partner is reported, not fatal."""
    root = Path(cfg.data_dir) if cfg.data_dir else None
    video_root = Path(cfg.videos_dir) if cfg.videos_dir else root
    label_root = Path(cfg.labels_dir) if cfg.labels_dir else root
    if video_root is None or label_root is None:
        raise UserError("No data given: pass --data-dir ROOT (or both --videos-dir and --labels-dir), "
                        "or --data synthetic for the built-in clips.")
    for r in (video_root, label_root):
        if not r.is_dir():
            raise UserError(f"Data folder {r} does not exist or is not a folder.")
    work = Path(cfg.work_dir).resolve()
    videos = files_by_stem(video_root, VIDEO_EXTS, work)
    labels = files_by_stem(label_root, LABEL_EXTS, work)
    refuse_ambiguous(videos, "clip", "--videos-dir")
    refuse_ambiguous(labels, "label", "--labels-dir")
    for stem in sorted(set(videos) - set(labels)):
        bad.add(videos[stem][0], "no label: no CSV with the same name was found")
    for stem in sorted(set(labels) - set(videos)):
        bad.add(labels[stem][0], "no clip: no video with the same name was found")
    return [(s, videos[s][0], labels[s][0]) for s in sorted(set(videos) & set(labels))]


def read_label(path: Path) -> str:
    """A CSV with a `word` column (one word a row) or a `text` column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ""
    column = next((c for c in ("word", "text") if c in rows[0]), None)
    if column is None:
        raise ValueError(f"no 'word' or 'text' column (columns: {', '.join(rows[0])})")
    return " ".join((r[column] or "").strip() for r in rows).strip()


def to_gray(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 1:
        return frame[..., 0]
    import cv2
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def read_video(path: Path) -> np.ndarray:
    """T x H x W uint8 from a video file or a saved array; ValueError says what is wrong with it."""
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            arr = np.load(path)
            if suffix == ".npz":
                arr = arr["frames"] if "frames" in arr.files else arr[arr.files[0]]
        except (OSError, EOFError, ValueError, IndexError, KeyError) as e:
            raise ValueError(f"unreadable video: {e}") from e
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
            raise ValueError(f"unreadable video: array of {arr.dtype} {arr.shape}, expected uint8 T x H x W")
        return np.stack([to_gray(f) for f in arr]) if arr.ndim == 4 else arr
    import cv2
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError("unreadable video: it cannot be opened (corrupt, truncated or not a video)")
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(to_gray(frame))
    cap.release()
    if not frames:
        raise ValueError("unreadable video: no frame could be decoded")
    if declared > len(frames):
        raise ValueError(f"truncated video: its header declares {declared} frames, only {len(frames)} decode")
    return np.stack(frames)


def frames_needed(ids: list[int]) -> int:
    """CTC emits one unit a frame and needs a blank between equal neighbours."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


def check_sample(cfg: Config, vocab: Vocabulary, text: str, frames: np.ndarray) -> tuple[list[int], str]:
    """The clip's ids, or '' and the reason to skip it."""
    if not text:
        return [], "empty label: the CSV has no words"
    t, h, w = frames.shape
    if (h, w) != (cfg.frame_size, cfg.frame_size):
        return [], (f"wrong frame size: {w} x {h}, expected {cfg.frame_size} x {cfg.frame_size} mouth crops "
                    "(a raw face video? crop it first, or point --videos-dir at the crops)")
    ids, unknown = vocab.encode(text, cfg.word_boundary)
    if unknown and cfg.unknown_units == "skip":
        return [], (f"unknown units: {' '.join(sorted(set(unknown)))} are not in the vocabulary "
                    "(extend it with --mode vocab, or map them to <unk> with --unknown-units map)")
    if frames_needed(ids) > t:
        return [], f"label too long: {frames_needed(ids)} CTC steps for a clip of {t} frames"
    return ids, ""


class ClipCache:
    """Decoded clips as uint8 .npy files, one per source file, keyed by its path, size and mtime.

    A changed or added file refreshes only its own entry; entries are written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index_path = self.folder / "index.json"
        self.index = json.loads(self.index_path.read_text()) if self.index_path.exists() else {}
        self.hits = self.misses = 0

    def _entry(self, path: Path) -> tuple[str, list]:
        st = path.stat()
        key = str(path.resolve())
        return key, [st.st_size, st.st_mtime_ns]

    def load(self, path: Path) -> np.ndarray:
        key, stamp = self._entry(path)
        file = self.folder / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".npy")
        if self.index.get(key) == stamp and file.exists():
            self.hits += 1
            return np.load(file)
        frames = read_video(path)
        atomic_write(file, lambda tmp: np.save(open(tmp, "wb"), frames))
        self.index[key] = stamp
        self.misses += 1
        return frames

    def save_index(self) -> None:
        if self.misses:
            write_json(self.index_path, self.index)


def split_of(stem: str, cfg: Config) -> str:
    """train/val/test from a hash of the stem alone, so adding clips never moves the others."""
    u = int(hashlib.sha1(f"{cfg.split_seed}:{stem}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return "test" if u < cfg.test_fraction else "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def read_split_lists(folder: Path) -> dict[str, str]:
    stems = {}
    for split in ("train", "val", "test"):
        path = Path(folder) / f"{split}.txt"
        if not path.exists():
            raise UserError(f"--split-lists {folder}: {path.name} is missing; it needs train.txt, val.txt "
                            "and test.txt, one clip name (or path) a line.")
        for line in path.read_text(encoding="utf-8").split():
            stems[Path(line).stem] = split
    return stems


class ClipBank:
    """All clips of a dataset in one uint8 tensor, concatenated over time, on the training device if it fits.

    A batch is one gather from this tensor: no loader processes, no per-batch decoding."""

    def __init__(self, clips: list[np.ndarray], device: torch.device):
        self.lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        frames = torch.from_numpy(np.concatenate(clips)) if clips else torch.zeros(0, 1, 1, dtype=torch.uint8)
        self.device = device if self._fits(frames, device) else torch.device("cpu")
        self.frames = frames.to(self.device)
        if self.device.type == "cpu" and device.type == "cuda":
            self.frames = self.frames.pin_memory()

    @staticmethod
    def _fits(frames: torch.Tensor, device: torch.device) -> bool:
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return frames.numel() < 0.3 * free  # leave the rest to the model

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B x Tmax x H x W uint8 (zero-padded) and the B lengths."""
        idx = torch.as_tensor(index, dtype=torch.long)
        lengths = self.lengths[idx]
        t = torch.arange(int(lengths.max()))
        rows = self.offsets[idx, None] + torch.minimum(t[None], lengths[:, None] - 1)
        out = self.frames[rows.to(self.device)]
        out = out * (t[None] < lengths[:, None]).to(self.device)[..., None, None]
        return out, lengths


@dataclass
class Dataset:
    samples: list[Sample]
    bank: ClipBank
    splits: dict[str, list[int]] = field(default_factory=dict)

    def subset(self, split: str) -> list[int]:
        return self.splits.get(split, [])


def load_dataset(cfg: Config, vocab: Vocabulary, device: torch.device) -> Dataset:
    """Find, check and decode every clip; assign splits; put the frames in memory."""
    bad = BadSamples()
    if data_kind(cfg) == "synthetic":
        generated = synthesize_dataset(cfg, vocab)
        samples, clips, found = [], [], len(generated)
        for stem, text, frames in generated:
            ids, why = check_sample(cfg, vocab, text, frames)
            if why:
                bad.add(f"synthetic:{stem}", why)
                continue
            samples.append(Sample(stem, f"synthetic:{stem}", text, ids, len(frames)))
            clips.append(frames)
    else:
        pairs = discover_pairs(cfg, bad)
        found = len(pairs) + len(bad.entries)
        cache = ClipCache(cfg.cache_path)
        samples, clips = [], []
        for stem, video, label in progress(pairs, "reading clips"):
            try:
                text = read_label(label)
            except (ValueError, UnicodeDecodeError, csv.Error) as e:
                bad.add(label, f"unreadable label: {e}")
                continue
            try:
                frames = cache.load(video)
            except ValueError as e:
                bad.add(video, str(e))
                continue
            ids, why = check_sample(cfg, vocab, text, frames)
            if why:
                bad.add(label if why.startswith(("empty", "unknown", "label")) else video, why)
                continue
            samples.append(Sample(stem, str(video), text, ids, len(frames)))
            clips.append(frames)
        cache.save_index()
    bad.write(cfg.work_dir, found)
    if not samples:
        raise UserError(f"No usable clip was found (see {Path(cfg.work_dir) / 'data_report.json'}).")
    listed = read_split_lists(Path(cfg.split_lists)) if cfg.split_lists else None
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, s in enumerate(samples):
        split = listed.get(s.stem) if listed is not None else split_of(s.stem, cfg)
        if split:
            splits[split].append(i)
    if listed is not None:
        missing = sorted(set(listed) - {s.stem for s in samples})
        if missing:
            print(f"{len(missing)} clip(s) named in {cfg.split_lists} were not found or were skipped, "
                  f"e.g. {', '.join(missing[:5])}")
    return Dataset(samples, ClipBank(clips, device), splits)


def data_kind(cfg: Config) -> str:
    if cfg.data != "auto":
        return cfg.data
    return "files" if (cfg.data_dir or cfg.videos_dir or cfg.labels_dir) else "synthetic"


def progress(items, desc: str):
    """tqdm when it is installed and the console is a terminal; the plain list otherwise."""
    try:
        from tqdm.auto import tqdm
        return tqdm(items, desc=desc, leave=False, disable=not sys.stderr.isatty())
    except ImportError:
        return items


def frame_budget_batches(lengths: list[int], max_frames: int, rng: random.Random) -> list[list[int]]:
    """Length-sorted clips (ties shuffled) cut into batches whose padded size stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > max_frames:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


# Built-in synthetic clips -------------------------------------------------------------------------------
# Mouth shapes come from visemes, as on real lips: letters articulated at the same place look the same
# (ب م: closed lips; ت د ط ض ن ل ر ز س ص: teeth; ...), so only the word list tells them apart, and vowels
# change the opening and rounding. Shapes blend from unit to unit over time (coarticulation), units take a
# speaker-dependent number of frames, and speakers differ in position, scale, lighting and noise: no
# per-frame lookup reads the text off a clip.

VISEMES = {  # base letter -> (opening, width, rounding, teeth, tongue), each in [0, 1]
    **dict.fromkeys("بم", (0.0, 0.5, 0.1, 0.0, 0.0)),
    "ف": (0.12, 0.5, 0.0, 1.0, 0.0),
    **dict.fromkeys("ثذظ", (0.25, 0.55, 0.0, 0.6, 1.0)),
    **dict.fromkeys("تدطضنلرزسصة", (0.2, 0.6, 0.0, 0.9, 0.3)),
    **dict.fromkeys("شج", (0.22, 0.35, 0.6, 0.7, 0.0)),
    **dict.fromkeys("كقغخ", (0.4, 0.5, 0.1, 0.3, 0.5)),
    **dict.fromkeys("عحهءأإآؤئ", (0.6, 0.55, 0.1, 0.2, 0.2)),
    **dict.fromkeys("اٱى", (0.75, 0.7, 0.0, 0.3, 0.1)),
    "و": (0.2, 0.2, 1.0, 0.0, 0.0),
    "ي": (0.15, 0.9, 0.0, 0.8, 0.1),
}
VOWELS = {  # mark -> (opening, width, rounding) the vowel moves towards after the consonant
    "\u064e": (0.65, 0.65, 0.0), "\u064b": (0.65, 0.65, 0.0),  # fatha, fathatan
    "\u0650": (0.3, 0.9, 0.0), "\u064d": (0.3, 0.9, 0.0),  # kasra, kasratan
    "\u064f": (0.3, 0.25, 0.9), "\u064c": (0.3, 0.25, 0.9),  # damma, dammatan
}
TANWEEN = "\u064b\u064c\u064d"


def unit_keyframes(unit: str) -> list[tuple[float, np.ndarray]]:
    """(relative duration, shape) targets a unit passes through; unknown letters get a stable made-up viseme."""
    letter = base_letter(unit)
    if letter in VISEMES:
        shape = np.array(VISEMES[letter], np.float32)
    else:
        h = hashlib.sha1(letter.encode()).digest()
        shape = np.array([b / 255 for b in h[:5]], np.float32)
    keys = [(1.0, shape)]
    vowel = next((VOWELS[m] for m in unit[1:] if m in VOWELS), None)
    if vowel is not None:
        keys.append((1.0, np.array([*vowel, shape[3] * 0.5, 0.0], np.float32)))
    if any(m in TANWEEN for m in unit) or "\u06e2" in unit:  # a trailing n (or the small meem) closes in
        keys.append((0.7, np.array(VISEMES["ن"], np.float32)))
    if SHADDA in unit:  # a doubled consonant is held longer
        keys[0] = (2.0, shape)
    return keys


def synthetic_lexicon(vocab: Vocabulary, n_words: int, rng: np.random.Generator) -> list[list[str]]:
    """Arabic-looking words of 2-6 units: consonant + vowel mostly, sukun to close, some with ٱلْ."""
    units = [u for u in vocab.ids if len(u) > 0]
    weights = np.array([3.0 if any(m in VOWELS for m in u[1:]) else 1.0 for u in units])
    words = set()
    while len(words) < n_words:
        n = int(rng.integers(2, 7))
        word = tuple(units[i] for i in rng.choice(len(units), n, p=weights / weights.sum()))
        if rng.random() < 0.25 and "ٱ" in vocab.ids and "لْ" in vocab.ids:
            word = ("ٱ", "لْ") + word[: 4]
        words.add(word)
    return [list(w) for w in sorted(words)]


def speaker_style(rng: np.random.Generator) -> dict:
    return {
        "center": rng.uniform([50, 62], [62, 76]), "scale": rng.uniform(0.8, 1.2),
        "skin": rng.uniform(0.45, 0.62), "lip": rng.uniform(0.28, 0.4), "light": rng.uniform(-0.15, 0.15),
        "noise": rng.uniform(0.01, 0.04), "rate": rng.uniform(0.85, 1.15), "lip_width": rng.uniform(0.9, 1.1),
    }


def shape_track(words: list[list[str]], n_frames: int, style: dict, rng: np.random.Generator) -> np.ndarray:
    """n_frames x 5 mouth parameters: keyframes laid out in time, blended linearly, then smoothed."""
    keys = [(1.5, np.array([0.05, 0.5, 0.1, 0.0, 0.0], np.float32))]  # at rest before speaking
    for w, word in enumerate(words):
        if w:
            keys.append((0.4, np.array([0.1, 0.5, 0.1, 0.0, 0.0], np.float32)))
        for unit in word:
            keys += [(d * rng.uniform(0.7, 1.3), s) for d, s in unit_keyframes(unit)]
    keys.append((1.5, np.array([0.05, 0.5, 0.1, 0.0, 0.0], np.float32)))
    durations = np.array([d for d, _ in keys])
    times = (np.cumsum(durations) - durations / 2) / durations.sum() * (n_frames - 1)
    shapes = np.stack([s for _, s in keys])
    frame_t = np.arange(n_frames)
    track = np.stack([np.interp(frame_t, times, shapes[:, k]) for k in range(shapes.shape[1])], 1)
    kernel = np.array([1, 4, 6, 4, 1]) / 16  # coarticulation: each frame leans towards two neighbours a side
    padded = np.pad(track, ((2, 2), (0, 0)), mode="edge")
    return sum(k * padded[i:i + n_frames] for i, k in enumerate(kernel)).astype(np.float32)


def render_mouth(track: np.ndarray, style: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw lips, cavity, teeth and tongue for every frame at once; T x size x size uint8."""
    t = len(track)
    f32 = lambda v: np.float32(v)
    opening, width, rounding, teeth, tongue = (track[:, k, None, None] for k in range(5))
    drift = np.cumsum(rng.normal(0, 0.4, (t, 2)), 0).astype(np.float32)
    cx = f32(style["center"][0]) + drift[:, 0, None, None]
    cy = f32(style["center"][1]) + drift[:, 1, None, None]
    s = f32(style["scale"] * size / 112)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    half_w = s * (24 + 12 * width - 9 * rounding) * f32(style["lip_width"])
    half_h = s * (1.0 + 15 * opening)
    thick = s * (8 + 4 * rounding)
    inner = ((x - cx) / half_w) ** 2 + ((y - cy) / half_h) ** 2
    outer = ((x - cx) / (half_w + thick)) ** 2 + ((y - cy) / (half_h + thick)) ** 2
    soft = lambda d: np.clip(0.5 - d, 0, 1)  # a one-pixel ramp keeps edges smooth and is cheap
    lips, cavity = soft((outer - 1) * 6), soft((inner - 1) * 6)
    upper = soft((y - (cy - half_h * 0.45)) / s)
    lower = 1 - soft((y - (cy + half_h * 0.3)) / s)
    img = f32(style["skin"]) * (1 + f32(style["light"]) * (x - size / 2) / size)
    img = img * (1 - lips) + f32(style["lip"]) * lips
    inside = np.minimum(0.08 + 0.75 * teeth * upper + 0.3 * tongue * lower, 0.9)
    img = img * (1 - cavity) + inside * cavity
    img += f32(style["noise"]) * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def synthesize_dataset(cfg: Config, vocab: Vocabulary) -> list[tuple[str, str, np.ndarray]]:
    """(stem, text, T x H x W uint8) for cfg.synthetic_clips clips; the same seed gives the same clips."""
    rng = np.random.default_rng(cfg.seed)
    full = Vocabulary.seed() if vocab.letters_only else vocab  # letters are drawn as units, to show vowels
    lexicon = synthetic_lexicon(full, cfg.synthetic_words, rng)
    zipf = 1 / np.arange(1, len(lexicon) + 1) ** 0.7
    speakers = [speaker_style(rng) for _ in range(cfg.synthetic_speakers)]
    out = []
    for n in range(cfg.synthetic_clips):
        style = speakers[int(rng.integers(len(speakers)))]
        n_frames = int(rng.integers(29, 39))
        words = [lexicon[i] for i in rng.choice(len(lexicon), int(rng.integers(1, 6)), p=zipf / zipf.sum())]
        while sum(map(len, words)) + len(words) - 1 > n_frames * 0.7 * style["rate"] and len(words) > 1:
            words.pop()
        track = shape_track(words, n_frames, style, rng)
        out.append((f"synth_{n:05d}", " ".join("".join(w) for w in words),
                    render_mouth(track, style, cfg.frame_size, rng)))
    return out


def write_synthetic_dataset(cfg: Config, vocab: Vocabulary) -> Path:
    """The built-in clips as files in the real dataset's layout (mp4 + one CSV a clip, column `word`)."""
    import cv2
    if not cfg.output:
        raise UserError("--mode synth needs --output DIR, the folder to write the clips to.")
    root = Path(cfg.output)
    (root / "Preprocessed_Video").mkdir(parents=True, exist_ok=True)
    (root / "Csv").mkdir(parents=True, exist_ok=True)
    for stem, text, frames in synthesize_dataset(cfg, vocab):
        def write_video(tmp, frames=frames):
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), 25, frames.shape[1:][::-1], False)
            for f in frames:
                writer.write(f)
            writer.release()
        atomic_write(root / "Preprocessed_Video" / f"{stem}.mp4", write_video)
        csv_text = "word\n" + "\n".join(text.split()) + "\n"
        atomic_write(root / "Csv" / f"{stem}.csv", lambda tmp: Path(tmp).write_text(csv_text, encoding="utf-8"))
    print(f"Wrote {cfg.synthetic_clips} synthetic clips to {root}")
    return root


# ---------------------------------------------------------------------------------------------------------
# 4. Augmentation: one spatial transform per clip (all its frames alike), on the device the batch is on.
# ---------------------------------------------------------------------------------------------------------


def adaptive_time_mask(clip: torch.Tensor, length: int, window: int, stride: int) -> torch.Tensor:
    """Auto-AVSR's AdaptiveTimeMask on the first `length` frames, draw for draw (torch for the two widths,
    Python's `random` for the start), so the same seeds mask the same frames as Auto-AVSR does."""
    n_masks = int((length + stride - 0.1) // stride)
    for t, t_len in torch.randint(0, window, (n_masks, 2)).tolist():
        if length - t <= 0:
            continue
        start = random.randrange(0, length - t)
        if t == 0:
            continue
        clip[start:start + t_len] = 0
    return clip


def time_warp_lengths(lengths: torch.Tensor, min_lengths: torch.Tensor, max_change: float) -> torch.Tensor:
    """New clip lengths for a random speed change, never shorter than the label needs."""
    factor = 1 + (torch.rand(len(lengths)) * 2 - 1) * max_change
    return torch.maximum((lengths.float() / factor).round().long(), torch.minimum(min_lengths, lengths))


def resample_frames(frames: torch.Tensor, lengths: torch.Tensor, new_lengths: torch.Tensor) -> torch.Tensor:
    """Speed change by picking frames: clip b's new frame j shows old frame floor(j * L_b / L'_b)."""
    t = torch.arange(int(new_lengths.max()))
    src = (t[None] * lengths[:, None] / new_lengths[:, None]).floor().long()
    src = torch.minimum(src, lengths[:, None] - 1).to(frames.device)
    out = torch.gather(frames, 1, src[..., None, None].expand(-1, -1, *frames.shape[2:]))
    return out * (t[None] < new_lengths[:, None]).to(frames.device)[..., None, None]


class Augment:
    """uint8 B x T x H x W -> float B x T x crop x crop, normalised; padded frames are 0.

    Frames become channels for Kornia, so its per-sample crop and flip move every frame of a clip alike."""

    def __init__(self, cfg: Config, train: bool):
        import kornia.augmentation as K
        self.cfg, self.train = cfg, train
        crop = (cfg.crop_size, cfg.crop_size)
        self.crop = K.RandomCrop(crop) if train and cfg.random_crop else K.CenterCrop(crop)
        self.flip = K.RandomHorizontalFlip(p=cfg.hflip_prob) if train and cfg.hflip_prob > 0 else None

    def __call__(self, frames: torch.Tensor, lengths: torch.Tensor, min_lengths: torch.Tensor | None = None):
        cfg = self.cfg
        if self.train and cfg.time_warp:
            needed = min_lengths if min_lengths is not None else torch.ones_like(lengths)
            new_lengths = time_warp_lengths(lengths, needed, cfg.time_warp_max)
            frames, lengths = resample_frames(frames, lengths, new_lengths), new_lengths
        x = self.crop(frames.float() / 255)
        if self.flip is not None:
            x = self.flip(x)
        if self.train and cfg.time_mask:
            for b, length in enumerate(lengths.tolist()):
                adaptive_time_mask(x[b], length, cfg.time_mask_window, cfg.time_mask_stride)
        x = (x - cfg.mean) / cfg.std
        valid = torch.arange(x.shape[1], device=x.device)[None] < lengths.to(x.device)[:, None]
        return x * valid[..., None, None], lengths


# ---------------------------------------------------------------------------------------------------------
# 5. Diagnostics: what the data looks like (seed 001's figures), as numbers and as a picture.
# ---------------------------------------------------------------------------------------------------------


def pixel_mean_std(bank: ClipBank) -> tuple[float, float]:
    """Exact, from the 256-bin histogram of all frames (/255)."""
    hist = torch.bincount(bank.frames.flatten(), minlength=256).double().cpu()
    levels = torch.arange(256, dtype=torch.float64) / 255
    n = hist.sum().clamp(min=1)
    mean = (hist * levels).sum() / n
    return mean.item(), ((hist * (levels - mean) ** 2).sum() / n).sqrt().item()


def dataset_stats(ds: Dataset, vocab: Vocabulary) -> dict:
    frames = np.array([s.frames for s in ds.samples])
    units = [[i for i in s.ids if i != vocab.space] for s in ds.samples]
    label_lengths = np.array([len(u) for u in units])
    freq = Counter(vocab.itos[i] for u in units for i in u)
    mean, std = pixel_mean_std(ds.bank)
    describe = lambda a: {"min": int(a.min()), "max": int(a.max()), "mean": round(float(a.mean()), 2),
                          "histogram": {int(k): int(n) for k, n in sorted(Counter(a.tolist()).items())}}
    return {
        "clips": len(ds.samples), "splits": {k: len(v) for k, v in ds.splits.items()},
        "frames": describe(frames), "label_units": describe(label_lengths),
        "distinct_units": len(freq), "vocabulary_units": len(vocab.ids),
        "pixel_mean": round(mean, 4), "pixel_std": round(std, 4),
        "unit_frequency": dict(freq.most_common()),
    }


def plot_stats(stats: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1, 1, 2.5]})
    for ax, key, title in ((axes[0], "frames", "frames a clip"), (axes[1], "label_units", "units a label")):
        hist = stats[key]["histogram"]
        ax.bar(list(hist), list(hist.values()))
        ax.set_title(f"{title} (mean {stats[key]['mean']})")
        ax.set_ylabel("clips")
    top = list(stats["unit_frequency"].values())[:60]
    axes[2].bar(range(1, len(top) + 1), top)
    axes[2].set_title(f"unit frequency by rank, top {len(top)} of {stats['distinct_units']} (names in stats.json)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def print_stats(stats: dict) -> None:
    f, u = stats["frames"], stats["label_units"]
    print(f"clips {stats['clips']}  (train/val/test {'/'.join(str(n) for n in stats['splits'].values())})")
    print(f"frames a clip: min {f['min']}  max {f['max']}  mean {f['mean']}")
    print(f"units a label: min {u['min']}  max {u['max']}  mean {u['mean']}")
    print(f"pixel mean {stats['pixel_mean']}  std {stats['pixel_std']}  (/255)")
    print(f"{stats['distinct_units']} distinct units of {stats['vocabulary_units']} in the vocabulary; "
          "most frequent:")
    for unit, n in list(stats["unit_frequency"].items())[:20]:
        print(f"  {unit}\t{n}")


# ---------------------------------------------------------------------------------------------------------
# 6. CLI: flags from the Config fields, one function per mode, and the entry point.
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Arabic lip reading: data, training, decoding and diagnostics in one file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="JSON file of settings; flags given here win over it")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=f"(default: {f.default})")
    return parser


def read_config_file(path: str) -> dict:
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--config {path}: cannot read it as JSON ({e}).") from e
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see --help for the names.")
    return settings


def parse_config(argv: list[str]) -> Config:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    settings = read_config_file(config_file) if config_file else {}
    settings.update({k: v for k, v in args.items() if v is not None})
    return Config(**settings)


def run_stats(cfg: Config) -> dict:
    vocab = load_vocabulary(cfg)
    stats = dataset_stats(load_dataset(cfg, vocab, torch.device("cpu")), vocab)
    print_stats(stats)
    work = Path(cfg.work_dir)
    write_json(work / "stats.json", stats)
    plot_stats(stats, work / "stats.png")
    print(f"Wrote {work / 'stats.json'} and {work / 'stats.png'}")
    return stats


def run_vocab(cfg: Config) -> Vocabulary:
    """Extend the vocabulary with the units of another dataset's labels; known units keep their ids."""
    root = Path(cfg.labels_dir or cfg.data_dir or ".")
    if not (cfg.labels_dir or cfg.data_dir) or not root.is_dir():
        raise UserError("--mode vocab needs --data-dir (or --labels-dir): the folder whose CSV labels to read.")
    labels = files_by_stem(root, LABEL_EXTS, Path(cfg.work_dir).resolve())
    refuse_ambiguous(labels, "label", "--labels-dir")
    counts: Counter = Counter()
    for paths in labels.values():
        try:
            counts.update(u for word in split_units(read_label(paths[0])) for u in word)
        except (ValueError, UnicodeDecodeError, csv.Error) as e:
            print(f"Skipped {paths[0]}: {e}")
    known = load_vocabulary(dataclasses.replace(cfg, units="diacritized"))
    vocab = known.with_units(u for u, _ in counts.most_common())
    added = [u for u in vocab.ids if u not in known.ids]
    path = Path(cfg.work_dir) / "vocab.json"
    vocab.save(path)
    print(f"{len(labels)} labels, {len(counts)} distinct units: {len(counts) - len(added)} already known, "
          f"{len(added)} new ({' '.join(added[:30])}{' ...' if len(added) > 30 else ''}).")
    print(f"Wrote {path} ({len(vocab.ids)} units); use it with --vocab {path}")
    return vocab


def run_synth(cfg: Config) -> Path:
    return write_synthetic_dataset(cfg, load_vocabulary(cfg))


MODES = {"stats": run_stats, "vocab": run_vocab, "synth": run_synth}


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


def main(argv: list[str] | None = None):
    """Run one mode; a notebook cell's own arguments (the kernel's) are ignored."""
    if argv is None:
        argv = [] if in_notebook() else sys.argv[1:]
    try:
        cfg = parse_config(argv)
        if cfg.mode not in MODES:
            raise UserError(f"--mode {cfg.mode!r} is not known; choose one of {', '.join(MODES)}.")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        return MODES[cfg.mode](cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if in_notebook():
            raise
        sys.exit(2)


if __name__ == "__main__":
    main()
