"""master_all_avsr.py: Arabic lip reading on one GPU, in one file.

Mouth-region clips in, diacritized Arabic text out. The file reads top to bottom in pipeline order:

    1. config          one dataclass for every setting, and the small helpers everything shares
    2. vocabulary      diacritized-character units <-> ids
    3. data            finding, checking, caching, splitting and batching clips; built-in synthetic clips
    4. augmentation    per-clip crops, flips, time masks and time warps on the training device
    5. model           Auto-AVSR's CNN + Conformer encoder + Transformer decoder + CTC; the BiLSTM baseline
    6. loss            w * CTC + (1 - w) * label-smoothed attention
    7. decoding        greedy and batched beam search decoding, CER / WER
    8. training        optimizer, schedule, mixed precision, checkpoints, resume, time budget, several GPUs
    9. diagnostics     dataset statistics; the debugging checklist for a stuck model (every epoch, and --mode
                       diagnose / sanity): curves and a verdict, gradient flow, worst clips, confusions
   10. training run    setup (fresh, pretrained or resumed) and the loop over epochs
   11. preprocessing   raw face videos -> mouth clips (dlib landmarks, followed from frame to frame)
   12. kaggle          a Kaggle session's defaults: data searched, outputs kept, 12 h, resume, all its GPUs
   13. serving         --mode serve: a page and a JSON API that lip-read uploads, followed live
   14. cli             modes, flags and the entry point

Run `python master_all_avsr.py --help` for the flags. With no arguments it trains the default (small) model on
built-in synthetic clips, a GPU's demo; on a CPU, README.md's first command is the quick one.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # our own messages name bad files; FFmpeg's noise does not

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# 1. Config: every setting of every mode lives in `Config`; each field is also a command-line flag.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # run
    mode: str = "train"  # what this run does (the examples at the end of --help show each mode)
    work_dir: str = "runs/demo"  # everything a run writes goes here
    device: str = "auto"  # auto: a CUDA GPU where torch sees one, else the CPU
    seed: int = 1337  # seeds weights, batches, augmentation and dropout: the same seed, the same run (on CPU)
    # data: where clips and labels are
    data: str = "auto"  # auto (files when a folder is given, else synthetic) | files | synthetic
    data_dir: str = ""  # searched recursively for clips and CSV labels, paired by file stem
    videos_dir: str = ""  # settles which folder holds the clips when several do
    labels_dir: str = ""  # settles which folder holds the labels when several do
    extra_data_dir: list[str] = field(default_factory=list)  # more labelled clips, which only train
    extra_videos_dir: list[str] = field(default_factory=list)  # the clips' folder of each --extra-data-dir, in order
    extra_labels_dir: list[str] = field(default_factory=list)  # the labels' folder of each --extra-data-dir
    extra_weight: float = 0.2  # an extra clip is drawn this often relative to a main one (the team's published run: 1 in 5)
    cache_dir: str = ""  # decoded clips as uint8; default <work_dir>/cache
    output: str = ""  # synth: the dataset's folder; export: the files' folder; decode: results .csv/.jsonl (decode.csv)
    # data: what a clip and a label must be
    frame_size: int = 112  # clips must be frame_size x frame_size gray mouth crops
    vocab: str = ""  # vocabulary JSON; default vocab.json beside this script, else the built-in one
    units: str = "diacritized"  # diacritized | letters (diacritics stripped, as the team's CNN + BiLSTM baseline read them)
    word_boundary: bool = True  # a <space> unit between words; off is the team's original 226-unit setting
    unknown_units: str = "skip"  # skip a clip with a unit outside the vocabulary, or map it to <unk>
    # data: splits
    split_seed: int = 0  # the split depends on this and the clip's stem only, never on the other clips
    val_fraction: float = 0.1  # share of clips for validation (picks best.pt, early stopping)
    test_fraction: float = 0.1  # share of clips held out for the test after training
    split_lists: str = ""  # folder with train.txt, val.txt, test.txt (one stem a line) to use instead
    # data: built-in synthetic clips
    synthetic_clips: int = 2000  # how many built-in clips to generate
    synthetic_words: int = 100  # lexicon size: words repeat across clips, as in the real data
    synthetic_speakers: int = 24  # speakers differing in position, scale, lighting and noise
    # sound (--modality audio / av): read from a file of the clip's name, mixed with noise when training
    modality: str = "video"  # video (lip reading) | audio (speech recognition) | av (both, fused)
    audio_dir: str = ""  # where a clip's sound is: wav/flac/m4a or the raw face video of its name; default --data-dir
    noise: str = "babble"  # babble (other training clips spoken at once) | white | a folder of noise recordings
    noise_snrs: str = "-5,0,5,10,15,20,inf"  # training draws one per clip (dB; inf: clean), Auto-AVSR's levels
    sound: str = "clean"  # what test, decode and validation hear: clean | mute | an SNR in dB (noise as --noise)
    drop_sound: float = 0.0  # --modality av, training: a clip's sound is silenced with this probability, and best.pt weighs validation muted by it
    drop_video: float = 0.0  # ...and its video blanked with this one (never both): the model learns each alone
    drop_from: int = 0  # the epoch the dropout starts in, so the model first learns to use both (0: after a third of --epochs)
    # batching
    max_frames: int = 1200  # frame budget of one batch (clips x padded length)
    # augmentation (training only; validation and test get the center crop and normalisation)
    crop_size: int = 88  # pixels: the square cut from each frame (random when training, the center otherwise)
    input_size: int = 88  # the crop is area-resized to this before the model (44: 4x less compute, for CPUs)
    random_crop: bool = True  # training crops at random places (off: the center crop)
    hflip_prob: float = 0.5  # probability a training clip is mirrored left to right
    mean: float = 0.419232189655303955078125  # pixel mean (0..1) subtracted before the model: the team's (Auto-AVSR's is 0.421)
    std: float = 0.133925855159759521484375  # pixel standard deviation divided by: the team's (Auto-AVSR's is 0.165)
    time_mask: bool = True  # Auto-AVSR's AdaptiveTimeMask: training frames blanked in short runs
    time_mask_window: int = 10  # Auto-AVSR's AdaptiveTimeMask: up to window-1 frames...
    time_mask_stride: int = 25  # ...once per stride frames
    time_warp: bool = False  # training clips sped up or slowed down (frames resampled)
    augment_from: int = 1  # the epoch augmentation starts in; earlier ones see the center crop alone
    time_warp_max: float = 0.1  # speed factor drawn from [1 - max, 1 + max]
    # model
    arch: str = "conformer"  # conformer (Auto-AVSR's) | baseline (the team's earlier CNN + BiLSTM, CTC only; its dropout was 0.3)
    preset: str = "small"  # tiny | mini | small | base (base has the exact shapes of Auto-AVSR's released model)
    frontend: str = "cnn"  # cnn | noise (features fixed by each frame's pixels, no visual sense) | linear (pixels)
    encoder: str = "conformer"  # the temporal encoder: conformer (Auto-AVSR's) | mstcn (multi-scale temporal convolutions) | dctcn (densely connected ones): the team's three
    dropout: float = 0.1  # in the encoder, decoder and CTC head (--arch baseline: after its CNN, between its LSTMs)
    # model: starting from released weights (Auto-AVSR's model zoo), freezing and unfreezing
    init_from: str = ""  # weights to start from: ViSpeR's visper_vsr_base.pth, Auto-AVSR's .pth/.ckpt, or ours
    init_from_audio: str = ""  # --modality av: its sound side (aux_*) from an audio model's file (Auto-AVSR's asr_*)
    init_parts: str = ""  # parts --init-from loads (empty: all it has that fit; vocabulary-sized layers need equal V)
    freeze: str = ""  # parts whose weights stay fixed (BatchNorm statistics too), e.g. frontend or frontend,encoder
    unfreeze_at: int = 0  # from this epoch on the --freeze parts train too (0: never)
    unfreeze_lr: float = 0.1  # their learning rate once unfrozen, as a share of the schedule's
    feature_views: int = 4  # a frozen frontend's features are cached for this many crop/flip views a clip (0: no cache)
    # loss: ctc_weight * CTC + (1 - ctc_weight) * label-smoothed attention loss
    ctc_weight: float = 0.3  # measured on LRC-AR against Auto-AVSR's 0.1 (README)
    teacher: str = ""  # a trained run (its folder) or checkpoint of any modality (video, audio, av) whose posteriors on each training clip become soft targets beside the labels (cross-modal distillation); the run trained still reads lips alone
    teacher_weight: float = 0.5  # the share of the loss that matches the teacher (the rest is the labels' joint loss)
    teacher_temperature: float = 1.0  # both sides' posteriors softened by it before they are compared (the term x its square)
    ctc_weight_schedule: str = ""  # by epoch, e.g. 1-20:0.7,21-40:0.5,41-:0.4>0.2 (a>b: linear); elsewhere --ctc-weight
    label_smoothing: float = 0.1  # Auto-AVSR's; 0 and 0.2 measured no different on LRC-AR (README)
    # training
    epochs: int = 30  # passes over the training clips; the learning-rate schedule ends with the last
    time_budget: float = 0.0  # minutes; stop with a checkpoint before they run out (0: no limit)
    fit_budget: bool = False  # with --time-budget: after the warmup, --epochs is cut to what the budget holds at the pace so far, so the schedule and --average-last end inside it
    lr: float = 1e-3  # peak learning rate of AdamW, reached after the warmup, then cosine to 0
    warmup_epochs: float = 3.0  # epochs of linear warmup (fractions allowed)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    adam_eps: float = 1e-9  # AdamW's epsilon (Auto-AVSR's)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.98  # AdamW's second-moment decay (Auto-AVSR's)
    grad_clip: float = 10.0  # gradients are scaled down to this total norm at most
    accum_steps: int = 1  # optimizer step every accum_steps batches
    amp: str = "auto"  # auto: bf16 where the GPU has it, fp16 + GradScaler where not (T4, P100) | bf16 | fp16 | off; CPU: fp32
    resume: bool = False  # continue from <work_dir>/checkpoints/last.pt
    stop_after: int = 0  # stop after this many epochs without a better validation CER (0: never)
    average_last: int = 0  # the last N epochs' weights averaged into checkpoints/averaged.pt after training (0: none)
    processes: int = 0  # train in N processes under torchrun (one per GPU); 0: one per GPU on Kaggle, else 1
    compile: bool = False  # torch.compile the encoding (not on GPUs before compute capability 7); not measured faster
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics of the global batch, not of each share
    # diagnostics (the debugging checklist), every epoch and in --mode diagnose / sanity
    diagnostics: bool = True  # off: no training-subset scores, gradient flow, worst clips or confusions
    verbose: bool = False  # the checklist's detail (gradients, loss shares, worst clips, confusions) on the console too
    train_eval_clips: int = 64  # fixed training clips scored without augmentation each epoch (learning curves)
    worst_k: int = 5  # worst validation clips shown each epoch
    patience: int = 3  # epochs the over/under-fitting verdict looks back over
    log_param_updates: bool = False  # per optimizer step: gradient, parameter and update norms a module group
    sanity_clips: int = 10  # --mode sanity: training clips to overfit
    sanity_epochs: int = 300  # --mode sanity: at most this many passes over them (one optimizer step each)
    # test and decode
    checkpoint: str = ""  # default <work_dir>/checkpoints/best.pt
    ensemble: list[str] = field(default_factory=list)  # another run (its folder) or checkpoint read together with --checkpoint (or the run's) by test, decode, diagnose and serve: the models' CTC and decoder posteriors averaged per frame and per step in every search; the same units and input (modality, frame and input size, normalisation) required
    split: str = "test"  # the clips test and diagnose read (all: every split)
    input: str = ""  # --mode decode: a clip or a folder of clips
    decoder: str = "beam"  # beam (Auto-AVSR's joint CTC/attention search) | attention | ctc (greedy); picks best.pt
    beam_size: int = 20  # measured on LRC-AR (README): 10 is 1 point of CER worse and twice as fast
    beam_ctc_weight: float = 0.3  # CTC's share of the search score (1: a CTC prefix search); Auto-AVSR's is 0.1
    max_length_ratio: float = 0.0  # units per frame at most; 0: one a frame, stopping once longer ones fall behind
    min_length_ratio: float = 0.0  # units per frame at least (no end before)
    length_bonus: float = 0.0  # added per unit; > 0 favours longer hypotheses
    nbest: int = 1  # hypotheses kept per clip (nbest.csv, decode's output)
    lm: str = ""  # a language model (lm/lm.pt of --mode lm) scored in the beam search beside decoder and CTC
    lm_weight: float = 0.1  # with --lm, its weight L: (1-w) dec + w CTC + L lm + bonus x len (0.1: best measured)
    # language model (--mode lm): a unit-level model over the run's vocabulary, written to <work_dir>/lm/lm.pt
    lm_kind: str = "ngram"  # ngram (Kneser-Ney: trained at once) | lstm (epochs; for large --lm-text); README
    lm_text: list[str] = field(default_factory=list)  # a text file of more sentences to learn from, one a line
    lm_order: int = 7  # ngram: units of context + 1 (7: the lowest validation perplexity on LRC-AR)
    lm_dim: int = 256  # lstm: its embedding and LSTM width
    lm_layers: int = 2  # lstm: its layers
    lm_dropout: float = 0.3  # lstm: dropout on its embeddings, between its layers and before its output
    lm_epochs: int = 40  # lstm: passes over its sentences; the one of lowest validation perplexity is kept
    # preprocessing: raw face videos -> mouth clips (--mode preprocess --input RAW --output DIR)
    landmark_model: str = ""  # dlib's shape_predictor_68_face_landmarks.dat; searched for when not given
    detect_every: int = 10  # the face detector runs every N frames; the landmarks follow the face in between
    detect_scale: float = 0.5  # the detector sees the frame shrunk by this (the full frame when it finds nothing)
    mouth_scale: float = 1.24  # crop side / distance between the outer eye corners: LRC-AR's crops (README)
    smooth_frames: int = 5  # landmarks averaged over this many neighbouring frames before the cut
    save_landmarks: bool = False  # also write <stem>.npz: landmarks, frames with a face, the crop of every frame
    workers: int = 0  # preprocessing processes; 0: one per CPU core
    preprocess: bool = False  # --mode decode: --input holds raw face videos; cut their mouths out first
    piece_seconds: float = 1.5  # --mode decode, the page: a video is read in pieces of at most this long (the model knows 1.2 s clips), each cut at its quietest frame
    shortest_piece: float = 0.8  # seconds: a long run is not cut before this (as long as --piece-seconds: pieces of one length)
    bridge_seconds: float = 0.4  # a face missing this long or less is bridged (landmarks drawn across); a longer gap ends a piece
    # serving (--mode serve): a page and a JSON API that lip-read uploaded videos with the run's model
    host: str = "127.0.0.1"  # the address served; 0.0.0.0 opens it to every network this machine is on
    port: int = 8000  # the port served
    max_upload_mb: float = 10.0  # larger uploads are refused (HTTP 413), as in the team's own backend
    serve_jobs: int = 1  # videos read at once (with 2, one's preprocessing overlaps another's decoding)
    serve_queue: int = 16  # uploads waiting their turn or still arriving at most; more are refused (HTTP 429) until some are done
    serve_timeout: float = 30.0  # seconds a client may take to send a request's headers, or pause an upload; an upload gets this much per MB (HTTP 408 after)
    serve_allowed_hosts: str = ""  # names the page may be reached by besides IP addresses and localhost, comma-separated (.example.com: it and its subdomains; *: any), a guard against DNS rebinding
    serve_model: list[str] = field(default_factory=list)  # NAME=PATH, or NAME:nodia=PATH: a checkpoint (this tool's, or one of the team's .pth) the team's app may ask for by model_name NAME (with :nodia, for diacritized=false); without any, the run's model answers as conformer, both ways

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.work_dir) / "cache"


# Defaults measured for one modality (MEASUREMENTS.md): a flag or --config still wins. Config keeps the value every
# modality can run with, so a video run never inherits an av-only setting
MODALITY_DEFAULTS = {"av": {"drop_sound": 0.2}}


class UserError(Exception):
    """A problem the user can fix: the message says what and how; the CLI prints it without a traceback."""


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` and rename, so a killed run never leaves a half-written file. A folder
    that cannot be written, or a full disk, stops the run with what to do; the file keeps its earlier content."""
    path = Path(path)
    # named before it exists, so that an interrupt (Ctrl-C) at any point after leaves it to `finally`
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))  # readable by a shared machine's users
        write(tmp)
        if os.path.getsize(tmp) == 0:  # every file the tool makes holds something
            raise OSError(28, "nothing was written: the disk may be full")
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if isinstance(e, RuntimeError) and shutil.disk_usage(path.parent).free > 2 ** 26:
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the disk is full"
        raise UserError(f"Cannot write {path} ({why}); {'its earlier content is kept' if path.exists() else 'nothing was written'}. "
                        "Free some space or make the folder writable, or choose another --work-dir (--output for "
                        "synth and export).") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


def checkpoints_of(work_dir) -> Path:
    """A run's checkpoints folder: last.pt, best.pt, averaged.pt and the kept epoch weights."""
    return Path(work_dir) / "checkpoints"


CSV_ENCODING = "utf-8-sig"  # with a BOM: Excel then shows the Arabic as Arabic (and reading it accepts no BOM too)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula


def csv_cell(value):
    """A text cell a spreadsheet would run as a formula (a job named =HYPERLINK(...), say), prefixed with ' so
    that it shows as text (OWASP's advice); numbers, and text that reads as a number (-0.5), stay as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as CSV text; the columns, unless given, are every key any row has, in order of appearance."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns or list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
    return text.getvalue()


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows to CSV, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(csv_text(rows), encoding=CSV_ENCODING, newline=""))


# Reading torch files: nothing in a file runs -----------------------------------------------------------------
# A .pt or .pth file is a pickle, and a pickle can name any function to be called as it loads: a downloaded or
# shared weights file could run code. Every file is read by torch's weights-only unpickler, which builds tensors
# and plain data (dicts, lists, numbers, strings) and refuses the rest. NumPy's arrays are allowed too (their
# items go through the same unpickler): checkpoints written before 2026-12-07 keep NumPy's random state as one.

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy._core.multiarray._reconstruct (numpy.core under NumPy 1)
NUMPY_ARRAYS = [(_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
                *{type(np.dtype(code)) for code in "?bBhHiIlLqQefd"}]  # numbers' dtypes, built by their type


class StandIn:
    """What a Python object of a foreign file becomes: nothing it names is called, nothing of it is kept."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def code_in(path: Path) -> list[str]:
    """The functions and classes a torch file names beyond tensors, plain data and NumPy arrays."""
    allowed = {name for entry in NUMPY_ARRAYS if isinstance(entry, tuple) for name in entry[1:]}
    allowed |= {"numpy.ndarray", "numpy.dtype"}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # not a zip-format torch file: the load itself says what it is
        return []


def load_torch_file(path: Path, what: str, hint: str, *, stand_ins: bool = False, mmap: bool = False):
    """The contents of a torch.save file, read without running anything from it. A file that names functions or
    classes is refused, its names given; with `stand_ins` (weights released by other tools, whose Lightning
    checkpoints keep their settings as Python objects), those objects become StandIn and the rest loads.
    -> (contents, the names that were stood in for)."""
    names = code_in(path) if stand_ins else []
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS + [(StandIn, name) for name in names]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), names
    except Exception as e:  # a file cut short or of another kind; torch raises many types here
        reason = next((line.strip() for line in str(e).split("WeightsUnpickler error:")[-1].splitlines()
                       if line.strip()), type(e).__name__)
        named = code_in(path) or re.findall(r"GLOBAL (\S+)", reason)
        if named or reason.startswith(("Can only", "Trying to call reduce")):  # the unpickler refused an object
            raise UserError(f"{what} {path} names Python code to run as it loads ({', '.join(named[:5]) or reason}); this "
                            "tool never runs code from a file, so it was not read, and nothing of it ran. Ask whoever "
                            "made it for the weights alone (a state dict), or use a file this tool wrote.") from e
        raise UserError(f"{what} {path}: cannot read it as a PyTorch checkpoint ({reason}). {hint}") from e


# Files the script uses but never downloads -------------------------------------------------------------------

KAGGLE_INPUT = Path("/kaggle/input")  # attached datasets, earlier outputs, the landmark model


def kaggle_files(pattern: str) -> list[Path]:
    return sorted(KAGGLE_INPUT.rglob(pattern)) if KAGGLE_INPUT.is_dir() else []


def find_on_disk(name: str, *folders: Path) -> tuple[Path | None, list[Path]]:
    """A file the script can use but never downloads (weights, dlib's landmark model): the first `name` in the
    working folder, beside this script or in `folders`, else anywhere under /kaggle/input; and where it looked."""
    here = globals().get("__file__")
    places = [folder / name for folder in dict.fromkeys([Path.cwd(), *([Path(here).resolve().parent] if here else []),
                                                         *folders])]
    found = next((p for p in places if p.is_file()), None)
    if found is None and KAGGLE_INPUT.is_dir():
        found = next(iter(kaggle_files(name)), None)
        places.append(KAGGLE_INPUT / "**" / name)
    return found, places


def find_given(name: str, flag: str, hint: str, *folders: Path) -> Path:
    """A file a flag names: as given, else one of that name where find_on_disk looks; else what to do."""
    if Path(name).is_file():
        return Path(name)
    found, places = find_on_disk(Path(name).name, *folders)
    if found is None:
        looked = "\n  ".join(map(str, [name, *places]))
        raise UserError(f"{flag} {name}: no such file. Looked in:\n  {looked}\n{hint}")
    return found


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


# One run at a time in a work dir -----------------------------------------------------------------------------
# Two runs writing into one folder would leave a mixture of both. The lock names its process and machine; a lock
# whose process is gone (killed, or on another machine, as in a Kaggle session continuing an earlier one's output)
# is taken over. Processes a run starts itself (torchrun's) find their starter named in LOCK_OWNER and go ahead.

LOCK_FILE, LOCK_OWNER = ".lock", "MASTER_ALL_AVSR_LOCK"


def lock_holder(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text(encoding="utf-8").split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed process nobody has reaped yet (a container without init) is gone all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}(\.\w+)?$")  # atomic_write's .NAME.PID.RANDOM.SUFFIX


def remove_temporaries(folder: Path) -> int:
    """Delete what atomic_write left under `folder` when its process was killed mid-write (that process gone);
    -> how many."""
    removed = 0
    for root, _, files in os.walk(folder):
        for name in files:
            found = TEMPORARY.match(name)
            if found and int(found[1]) != os.getpid() and not alive(int(found[1]), socket.gethostname()):
                with contextlib.suppress(FileNotFoundError):  # another process of the run may have got there first
                    os.remove(os.path.join(root, name))
                    removed += 1
    return removed


@contextlib.contextmanager
def work_dir_lock(cfg: Config):
    """Held while a mode writes into --work-dir; a second run there stops at once and names the first."""
    path = Path(cfg.work_dir) / LOCK_FILE
    holder = lock_holder(path)
    if holder and str(holder[0]) == os.environ.get(LOCK_OWNER):  # our own starter's
        yield
        return
    with held_lock(path, cfg.work_dir, "run", "Wait for it to end, or use another --work-dir; to test or decode its "
                   "checkpoints meanwhile, pass --checkpoint with another --work-dir."):
        os.environ[LOCK_OWNER] = str(os.getpid())
        if remove_temporaries(Path(cfg.work_dir)):
            print(f"Removed the temporary files a killed run left in {cfg.work_dir}.")
        try:
            yield
        finally:
            os.environ.pop(LOCK_OWNER, None)


@contextlib.contextmanager
def held_lock(path: Path, where: str, by: str, instead: str):
    """The lock file `path` names this process until the block ends; while a live process holds it, stop at once
    and name that process (`where` is in use by another `by`; `instead` says what to do)."""
    mine = f"{os.getpid()} {socket.gethostname()}"
    holder = lock_holder(path)
    if holder and alive(*holder):
        raise UserError(f"{where} is in use by another {by} (process {holder[0]} on {holder[1]}; {path}). {instead}")
    if holder:
        print(f"Taking over {path}: its process {holder[0]} on {holder[1]} is gone.")
    write_text(path, mine)
    if lock_holder(path) != (os.getpid(), socket.gethostname()):  # another one took it at the same moment
        raise UserError(f"{where} was taken by another {by} starting at the same time ({path}).")
    try:
        yield
    finally:
        if lock_holder(path) == (os.getpid(), socket.gethostname()):
            path.unlink(missing_ok=True)


def pick_device(name: str) -> torch.device:
    """cpu or cuda; under torchrun, the GPU of this process's local rank. A GPU this torch build cannot run
    stops here, with the fix, rather than deep in the first batch."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto.")
    rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if rank >= gpus:
        raise UserError(f"torchrun started more processes on this machine than it has GPUs ({gpus}): start one per "
                        f"GPU (--processes {gpus}, or torchrun --nproc_per_node {gpus}), or train on CPU with --device cpu.")
    device = torch.device("cuda", rank)
    problem = gpu_build_problem(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device),
                                torch.cuda.get_arch_list(), torch.__version__, torch.version.cuda)
    if problem:
        raise UserError(problem)
    torch.cuda.set_device(device)
    return device


# CUDA 12.8+ builds of torch dropped Maxwell and Pascal (compute capability 5.x-6.x, the P100); 12.6 builds keep them
OLD_GPU_BUILD = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126"


def gpu_build_problem(name: str, capability: tuple[int, int], arch_list: list[str], version: str,
                      cuda: str | None) -> str | None:
    """Why this torch build cannot run on this GPU, or None. A GPU runs code built for its own major version
    and an equal or lower minor one (sm_XY), or PTX for an equal or lower capability (compute_XY), JIT-compiled."""
    major, minor = capability
    built = [(a.split("_")[0], int(a.split("_")[1][:-1]), int(a.split("_")[1][-1])) for a in arch_list]
    if not built or any((kind == "sm" and a == major and b <= minor) or (kind == "compute" and (a, b) <= (major, minor))
                        for kind, a, b in built):
        return None
    fix = (f"install a build that has it: {OLD_GPU_BUILD} (CUDA 12.6 builds still run compute capability 5.0-6.x)"
           if 5 <= major < 7 else "install the torch build for this GPU (https://pytorch.org/get-started/locally)")
    return (f"The GPU {name} (compute capability {major}.{minor}) cannot run this torch {version} (CUDA {cuda}, "
            f"built for {' '.join(arch_list)}). To use it, {fix}; on Kaggle, choose GPU T4 x2; or run with "
            "--device cpu.")


# ---------------------------------------------------------------------------------------------------------
# 2. Vocabulary: a unit is a base letter with the marks that follow it; ids 1..226 are LRC-AR's own.
# ---------------------------------------------------------------------------------------------------------

# LRC-AR's 226 units in id order (id = position + 1), exactly as the team's training code numbers them.
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

# Blank is 0 because CTC and padding want it there; the others sit just above LRC-AR's ids.
# (Shadda comes first in every unit above: an editor that normalises to NFC would undo that; a test checks.)
SPECIALS = {"<blank>": 0, "<space>": 227, "<unk>": 228, "<sos/eos>": 229}
SHADDA, TATWEEL = "\u0651", "\u0640"


def normalize_unit(unit: str) -> str:
    """One spelling per unit: shadda first, the other marks in their written order (the seed's convention).

    Unicode's canonical order puts the vowel before the shadda; both spellings must find the same id."""
    base, marks = unit[:1], unit[1:]
    return base + "".join(sorted(marks, key=lambda m: m != SHADDA))


def drop_invisible(text: str) -> str:
    """Text without Unicode's format characters (category Cf): the direction marks an editor adds around Arabic
    (U+200E, U+200F, U+061C), zero-width joiners, a stray BOM. They carry no sound, and would each be an unknown,
    invisible unit."""
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def split_units(text: str) -> list[list[str]]:
    """Text -> words -> units. NFC joins decomposed letters (alef + hamza -> أ); tatweel, spacing and invisible
    format characters drop."""
    text = drop_invisible(unicodedata.normalize("NFC", text)).replace(TATWEEL, "")
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
    def from_json(cls, obj: dict) -> "Vocabulary":
        return cls(obj["units"], obj["specials"], obj.get("letters_only", False))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
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
CLIP_FPS = 25  # LRC-AR's clips, and what preprocessing writes
LABEL_EXTS = {".csv"}


@dataclass
class Sample:
    stem: str
    text: str
    ids: list[int]
    frames: int


class BadSamples:
    """Every skipped file with its reason; written as JSON to the work dir and summed up on the console."""

    def __init__(self):
        self.entries: list[dict] = []

    def add(self, file, reason: str) -> None:
        self.entries.append({"file": str(file), "reason": reason})

    def write(self, work_dir: Path, found: int, sources: list[dict]) -> None:
        path = Path(work_dir) / "data_report.json"
        write_json(path, {"found": found, "skipped": len(self.entries), "sources": sources, "entries": self.entries})
        if self.entries:
            kinds = Counter(e["reason"].split(":")[0] for e in self.entries)
            summary = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
            print(f"Skipped {len(self.entries)} file(s) ({summary}); each one is listed in {path}")


def files_by_stem(root: Path, exts: set[str], skip: set[Path], bad: BadSamples | None = None) -> dict[str, list[Path]]:
    """Files under root by stem, leaving out our own outputs (`skip`), hidden files and macOS metadata; linked
    folders are followed (once each), links to nothing reported in `bad` (else printed) and left out."""
    found: dict[str, list[Path]] = {}
    seen = set()
    for dirpath, dirnames, filenames in os.walk(Path(root).resolve(), followlinks=True):
        d = Path(dirpath)
        seen.add(d.resolve())
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and n != "__MACOSX" and d / n not in skip
                             and (d / n).resolve() not in seen)
        for name in sorted(filenames):
            p = d / name
            if p.suffix.lower() not in exts or name.startswith("."):
                continue
            if not p.exists():
                why = f"broken link: it points to {os.readlink(p)}, which does not exist"
                if bad is None:
                    print(f"Skipped {p}: {why}")
                else:
                    bad.add(p, why)
                continue
            found.setdefault(p.stem, []).append(p)
    return found


def own_outputs(cfg: Config) -> set[Path]:
    return {Path(cfg.work_dir).resolve(), cfg.cache_path.resolve()}


def refuse_ambiguous(found: dict[str, list[Path]], what: str, flag: str) -> None:
    """Several files for one stem means the folder holds more than one dataset: make the user choose."""
    clashes = {s: ps for s, ps in found.items() if len(ps) > 1}
    if not clashes:
        return
    same_folder = next((ps for ps in clashes.values() if len({p.parent for p in ps}) < len(ps)), None)
    if same_folder:
        raise UserError(f"Two {what}s of the same name sit in one folder: {', '.join(map(str, same_folder))}. "
                        f"Keep one of them (or move the other format elsewhere).")
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
    videos = files_by_stem(video_root, VIDEO_EXTS, own_outputs(cfg), bad)
    labels = files_by_stem(label_root, LABEL_EXTS, own_outputs(cfg), bad)
    refuse_ambiguous(videos, "clip", "--videos-dir")
    refuse_ambiguous(labels, "label", "--labels-dir")
    for stem in sorted(set(videos) - set(labels)):
        bad.add(videos[stem][0], "no label: no CSV with the same name was found")
    for stem in sorted(set(labels) - set(videos)):
        bad.add(labels[stem][0], "no clip: no video with the same name was found")
    return [(s, videos[s][0], labels[s][0]) for s in sorted(set(videos) & set(labels))]


def label_encoding(raw: bytes) -> str:
    """UTF-8 (with or without its BOM) or UTF-16 with its BOM, as Excel and Notepad save; anything else is
    refused with what to do (a Windows-1256 file would otherwise be read as other letters)."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start}; Windows-1256 perhaps): save it as UTF-8") from None
    return "utf-8-sig"


def read_label(path: Path) -> str:
    """A CSV with a `word` column (one word a row) or a `text` column; a row with more fields than the header
    (`w1,w2` unquoted) gives all its words."""
    raw = Path(path).read_bytes()
    rows = list(csv.DictReader(drop_invisible(raw.decode(label_encoding(raw))).splitlines()))
    if not rows:
        return ""
    names = {c.strip().lower(): c for c in rows[0] if c is not None}  # " Word" as Excel may save it
    column = names.get("word", names.get("text"))
    if column is None:  # repr: a name with an invisible or odd character shows it
        raise ValueError(f"no 'word' or 'text' column (columns: {', '.join(map(repr, rows[0]))})")
    return " ".join(" ".join([r[column] or "", *r.get(None, [])]).strip() for r in rows).strip()


def to_gray(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 1:
        return frame[..., 0]
    import cv2
    return cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2GRAY)


# A file small on disk can decode to gigabytes (an .npz of zeros, a video declaring millions of frames): each is
# refused by the size it declares before a frame is read, and a video whose stream outruns its header by what
# it holds. Longer videos are cut first (ffmpeg's -ss and -t).
LONGEST_CLIP = 1500  # frames: a minute at 25 fps; LRC-AR's clips have 29-38
LARGEST_DECODED = 2 ** 30  # bytes of gray frames (T x H x W): a minute of 720p


def array_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy (or an .npz's clip) declares, from its header alone."""
    with contextlib.ExitStack() as stack:
        if path.suffix.lower() == ".npz":
            archive = stack.enter_context(zipfile.ZipFile(path))
            names = archive.namelist()
            member = "frames.npy" if "frames.npy" in names else names[0]
            f = stack.enter_context(archive.open(member))
        else:
            f = stack.enter_context(open(path, "rb"))
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)(f)
    return shape, dtype


def size_problem(frames: int, height: int, width: int) -> str:
    """Why a clip of this declared size is not read, or ''."""
    decoded = frames * height * width
    if frames <= LONGEST_CLIP and decoded <= LARGEST_DECODED:
        return ""
    return (f"too large: it declares {frames} frames of {width} x {height} ({decoded / 2 ** 30:.1f} GiB decoded); "
            f"clips up to {LONGEST_CLIP} frames ({LONGEST_CLIP // CLIP_FPS} s at {CLIP_FPS} fps) and "
            f"{LARGEST_DECODED / 2 ** 30:g} GiB are read: cut it into shorter pieces first (ffmpeg -ss START -t 60)")


def declared_size_problem(path: Path) -> str:
    """Why a clip is refused by the size it declares, read from its header alone, or ''. A header that cannot be
    read is left to reading the file, which says what is wrong with it."""
    if path.suffix.lower() in (".npy", ".npz"):
        try:
            shape, _ = array_header(path)
        except (OSError, EOFError, ValueError, IndexError, KeyError, zipfile.BadZipFile):
            return ""
        return size_problem(*(list(shape) + [1, 1, 1])[:3]) if shape else ""
    import cv2
    video = cv2.VideoCapture(str(path))
    try:
        if not video.isOpened():
            return ""
        return size_problem(*(int(video.get(p)) for p in (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FRAME_HEIGHT,
                                                          cv2.CAP_PROP_FRAME_WIDTH)))
    finally:
        video.release()


def unopened(path: Path) -> str:
    """Why OpenCV cannot open a video, as far as PyAV (FFmpeg's own reader) can tell."""
    try:
        import av
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "unreadable video: it holds no picture"
            codec = container.streams.video[0].codec_context
            return (f"unreadable video: its picture is coded as {codec.name if codec else 'a codec FFmpeg does not know'}, "
                    "which this OpenCV cannot decode")
    except Exception:  # PyAV absent, or it cannot open it either
        return "unreadable video: it cannot be opened (corrupt, truncated or not a video)"


def read_video(path: Path) -> np.ndarray:
    """T x H x W uint8 from a video file or a saved array; ValueError says what is wrong with it."""
    return read_frames(path)[0]


def read_frames(path: Path) -> tuple[np.ndarray, float]:
    """Gray frames and frames per second (a saved array counts as 25 fps)."""
    suffix, problem = path.suffix.lower(), declared_size_problem(path)
    if problem:
        raise ValueError(problem)
    if suffix in (".npy", ".npz"):
        try:
            arr = np.load(path)
            if suffix == ".npz":
                arr = arr["frames"] if "frames" in arr.files else arr[arr.files[0]]
        except (OSError, EOFError, ValueError, IndexError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"unreadable video: {e}") from e
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or len(arr) == 0 or (arr.ndim == 4 and arr.shape[3] > 4):
            raise ValueError(f"unreadable video: array of {arr.dtype} {arr.shape}, expected uint8 T x H x W")
        return (np.stack([to_gray(f) for f in arr]) if arr.ndim == 4 else arr), CLIP_FPS
    import cv2
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(unopened(path))
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while not problem:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(to_gray(frame))
        problem = size_problem(len(frames), *frames[0].shape) if len(frames) > LONGEST_CLIP else ""
    cap.release()
    if problem:
        raise ValueError(problem)
    if not frames:
        raise ValueError("unreadable video: no frame could be decoded")
    if declared > len(frames) + max(1, declared // 20):  # some containers only estimate their frame count
        raise ValueError(f"truncated video: its header declares {declared} frames, only {len(frames)} decode")
    return np.stack(frames), (fps if 1 <= fps <= 1000 else CLIP_FPS)


SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = SAMPLE_RATE // CLIP_FPS  # 640: the audio frontend turns them into one 25 Hz frame
SOUND_EXTS = {".wav", ".flac", ".m4a", ".mp3", ".ogg", ".opus", ".aac"}
SOUND_IN_VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def sound_too_long(seconds: float) -> str:
    return (f"too large: its sound lasts {seconds:.0f} s or more; sound up to {LONGEST_CLIP // CLIP_FPS} s is read: cut "
            "it into shorter pieces first (ffmpeg -ss START -t 60)")


def import_av():
    try:
        import av
    except ImportError as e:  # a Kaggle image may lack it
        raise UserError("Sound is read with PyAV: `pip install av` (in a notebook: !pip install av).") from e
    return av


def sound_chunks(av, container):
    """A container's first sound track as it decodes: 16 kHz mono float32 pieces (stereo mixed down)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    for frame in container.decode(container.streams.audio[0]):
        yield from (out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
    yield from (out.to_ndarray().reshape(-1) for out in resampler.resample(None))


def read_audio(path: Path) -> np.ndarray:
    """A file's first sound track (a clip's: up to the longest clip read) as 16 kHz mono float32; ValueError
    says what is wrong with it."""
    av = import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError("no audio track")
            longest = LONGEST_CLIP / CLIP_FPS  # seconds: the sound of the longest clip read
            declared = (container.duration or 0) / av.time_base
            if declared > longest:
                raise ValueError(sound_too_long(declared))
            chunks, samples = [], 0
            for chunk in sound_chunks(av, container):
                chunks.append(chunk)
                samples += len(chunk)
                if samples > longest * SAMPLE_RATE * 1.5:  # a stream that outruns its header
                    raise ValueError(sound_too_long(samples / SAMPLE_RATE))
    except av.error.FFmpegError as e:
        raise ValueError(f"unreadable sound ({e})") from e
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if not np.isfinite(wave).all() or not np.abs(wave).max(initial=0) > 0:
        raise ValueError("the audio track is empty or silent")
    return wave.astype(np.float32)


def stream_sound(path: Path):
    """A file's first sound track of any length, chunk by chunk as it decodes (as read_audio reads it)."""
    av = import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError("no audio track")
            yield from sound_chunks(av, container)
    except av.error.FFmpegError as e:
        raise ValueError(f"unreadable sound ({e})") from e


def write_wav(path: Path, wave: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Mono 16-bit PCM (samples in [-1, 1]), atomically."""
    import wave as wav

    def write(tmp):
        with wav.open(tmp, "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes((np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes())
    atomic_write(path, write)


def fit_to_frames(wave: np.ndarray, frames: int) -> np.ndarray:
    """`frames` x 640 samples: the sound of the clip's frames, cut or zero-padded at the end."""
    n = frames * SAMPLES_PER_FRAME
    return np.pad(wave[:n], (0, max(0, n - len(wave)))).reshape(frames, SAMPLES_PER_FRAME)


def sound_problem(wave: np.ndarray, frames: int) -> str:
    """Why a clip's sound cannot be used with its frames ('' if it can)."""
    covered = len(wave) / (frames * SAMPLES_PER_FRAME)
    if covered < 0.5:  # LRC-AR's 37-38 frame clips carry 1.16 s of sound (78%): the rest is silence
        return (f"{len(wave) / SAMPLE_RATE:.2f} s of sound for {frames} frames ({frames / CLIP_FPS:.2f} s): is it the "
                "sound of this clip?")
    return ""


def sound_candidates(cfg: Config, clips: dict[str, Path]) -> dict[str, list[Path]]:
    """Per clip stem, the files that may hold its sound, best first: a sound file of that name, the clip itself,
    a (raw) video of that name under --audio-dir (default --data-dir)."""
    roots = {Path(r) for r in (cfg.audio_dir or cfg.data_dir, cfg.videos_dir) if r}
    found: dict[str, set[Path]] = {}
    for root in roots:
        if not root.is_dir():
            raise UserError(f"--audio-dir {root} does not exist or is not a folder.")
        for stem, paths in files_by_stem(root, SOUND_EXTS | SOUND_IN_VIDEO_EXTS, own_outputs(cfg)).items():
            found.setdefault(stem, set()).update(paths)
    order = lambda clip: lambda p: (p.suffix.lower() not in SOUND_EXTS, p != clip, str(p))
    itself = lambda clip: {clip.resolve()} if clip.suffix.lower() in SOUND_IN_VIDEO_EXTS else set()
    return {stem: sorted(found.get(stem, set()) | itself(clip), key=order(clip.resolve()))
            for stem, clip in clips.items()}


def clip_sound(load, candidates: list[Path], frames: int) -> tuple[np.ndarray | None, str]:
    """The clip's sound (frames x 640) from the first candidate whose sound `load(path)` reads and that fits,
    or None and why none does."""
    tried = []
    for path in candidates:
        try:
            wave = load(path)
            problem = sound_problem(wave, frames)
        except ValueError as e:
            problem = str(e)
        if not problem:
            return fit_to_frames(wave, frames), ""
        tried.append(f"{path}: {problem}")
    return None, no_sound(tried)


def no_sound(tried: list[str]) -> str:
    return ("no sound: " + ("; ".join(tried) if tried else "no sound file or video of its name was found")
            + " (the model hears as it reads lips: give the video with its sound, or put a wav/flac/m4a of its name "
            "beside it, or point --audio-dir at the raw videos)")


BABBLE_VOICES, BABBLE_SECONDS = 6, 60


def babble(waves: list[np.ndarray], seed: int) -> np.ndarray:
    """BABBLE_SECONDS of six voices at once, each a random sequence of the clips, every clip at unit power."""
    rng, voices = np.random.default_rng(seed), []
    for _ in range(BABBLE_VOICES):
        voice, n = [], 0
        for i in rng.permutation(len(waves)):
            voice.append(waves[i] / (waves[i].std() + 1e-8))
            n += len(waves[i])
            if n >= BABBLE_SECONDS * SAMPLE_RATE:
                break
        voices.append(np.concatenate(voice))
    n = min(map(len, voices))
    return sum(v[:n] for v in voices)


def noise_recordings(folder: Path) -> np.ndarray:
    """Every readable recording under `folder`, one after the other; an unreadable one is named and skipped."""
    tracks = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in SOUND_EXTS | SOUND_IN_VIDEO_EXTS):
        try:
            tracks.append(read_audio(path))
        except ValueError as e:
            print(f"--noise: skipped {path}: {e}", file=sys.stderr)
    if not tracks:
        raise UserError(f"--noise {folder}: no readable recording in it (wav, flac, m4a, mp3, ogg or a video with "
                        "sound). Give a folder of noise recordings, or --noise babble / white.")
    return np.concatenate(tracks)


def noise_track(cfg: Config, waves: list[np.ndarray], device: torch.device) -> torch.Tensor | None:
    """What --noise names as one 16 kHz track: babble made of `waves` (the training clips), the recordings of a
    folder, or None (white noise, drawn as needed)."""
    if cfg.noise == "white" or (cfg.noise == "babble" and not waves):
        return None
    if cfg.noise == "babble":
        track = babble(waves, cfg.seed)
    elif Path(cfg.noise).is_dir():
        track = noise_recordings(Path(cfg.noise))
    else:
        raise UserError(f"--noise {cfg.noise}: not a folder. Give babble, white or a folder of noise recordings.")
    track = torch.from_numpy(track.astype(np.float32))
    return track.to(device_with_room(track.numel() * 4, device))


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
    """Decoded clips (uint8 frames) and sound (16 kHz float32) as .npy files, one per source file and kind, keyed
    by its path, size and mtime.

    A changed or added file refreshes only its own entry; entries are written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index_path = self.folder / "index.json"
        try:
            self.index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or damaged: every clip is decoded again
            self.index = {}
        self.hits = self.misses = 0

    def _entry(self, path: Path, kind: str) -> tuple[str, list]:
        st = path.stat()
        key = str(path.resolve()) + ("" if kind == "frames" else f"#{kind}")
        return key, [st.st_size, st.st_mtime_ns]

    def load(self, path: Path, kind: str = "frames") -> np.ndarray:
        key, stamp = self._entry(path, kind)
        file = self.folder / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".npy")
        if self.index.get(key) == stamp:
            try:
                decoded = np.load(file)
                self.hits += 1
                return decoded
            except (OSError, ValueError, EOFError):  # a damaged entry is decoded again
                pass
        decoded = read_video(path) if kind == "frames" else read_audio(path)
        try:
            atomic_write(file, lambda tmp: np.save(tmp, decoded))
        except UserError as e:
            raise UserError(f"Cannot write the clip cache in {self.folder} ({e.__cause__}). Free some space, or point "
                            "--cache-dir at a writable folder.") from e
        self.index[key] = stamp
        self.misses += 1
        return decoded

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
        try:  # a line a name: names may hold spaces
            names = [line.strip() for line in drop_invisible(path.read_text(encoding="utf-8-sig")).splitlines()
                     if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"Cannot read {path} ({e}); it needs one clip name a line, in UTF-8.") from e
        for line in names:
            if stems.setdefault(Path(line).stem, split) != split:
                raise UserError(f"{Path(line).stem} is listed in both {stems[Path(line).stem]}.txt and {path.name}.")
    return stems


def stored_size(cfg: Config) -> int:
    """Frames are kept at the scale the model sees them (112 -> 56 when 88-pixel crops are shrunk to 44), so a
    crop is cut at its final size: four times fewer bytes per batch and no resize on the training device."""
    size = cfg.frame_size * cfg.input_size / cfg.crop_size
    return int(size) if size.is_integer() else cfg.frame_size


def shrink(clip: np.ndarray, size: int) -> np.ndarray:
    import cv2
    if clip.shape[1:] == (size, size):
        return clip
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in clip])


def device_with_room(nbytes: int, device: torch.device) -> torch.device:
    """`device` if `nbytes` take less than 30% of its free memory (the rest is the model's), else the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes < 0.3 * free else torch.device("cpu")


def padded_rows(offsets: torch.Tensor, lengths: torch.Tensor, index: list[int]):
    """For clips concatenated over time: the rows of a zero-padded batch of `index` (B x Tmax, padding repeats a
    clip's last row), where the padding is (B x Tmax), and the B lengths."""
    idx = torch.as_tensor(index, dtype=torch.long)
    lengths = lengths[idx]
    t = torch.arange(int(lengths.max()))
    return offsets[idx, None] + torch.minimum(t[None], lengths[:, None] - 1), t[None] >= lengths[:, None], lengths


class ClipBank:
    """All clips of a dataset in one tensor, concatenated over time, on the training device if it fits: uint8
    frames (T x H x W a clip), or sound as one row of 640 samples a frame (T x 640).

    A batch is one gather from this tensor: no loader processes, no per-batch decoding."""

    def __init__(self, clips: list[np.ndarray], device: torch.device, size: int | None = None):
        if size is not None:
            clips = [shrink(c, size) for c in clips]
        self.lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        frames = torch.from_numpy(np.concatenate(clips)) if clips else torch.zeros(0, 1, 1, dtype=torch.uint8)
        self.device = device_with_room(frames.numel(), device)
        self.frames = frames.to(self.device)

    def batch(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B x Tmax x H x W (or B x Tmax x 640), zero-padded, and the B lengths."""
        rows, padding, lengths = padded_rows(self.offsets, self.lengths, index)
        out = self.frames.index_select(0, rows.flatten().to(self.device))  # 3x faster than indexing with rows
        out = out.view(*rows.shape, *self.frames.shape[1:])
        out.masked_fill_(padding.to(self.device).view(*padding.shape, *[1] * (out.dim() - 2)), 0)
        return out, lengths


@dataclass
class Dataset:
    samples: list[Sample]
    bank: ClipBank
    splits: dict[str, list[int]] = field(default_factory=dict)
    sound: ClipBank | None = None  # --modality audio / av: each clip's sound, 640 samples a frame
    noise: torch.Tensor | None = None  # what --noise mixes in (None: white noise)

    def subset(self, split: str) -> list[int]:
        return self.splits.get(split, [])

    def trained(self) -> list[int]:
        """Every clip that may train: the training split and the extra clips."""
        return self.subset("train") + self.subset("extra")

    def batches(self, index: list[int], max_frames: int, seed: int = 0) -> list[list[int]]:
        """The clips `index` cut into batches within the frame budget (frame_budget_batches; `seed` orders
        clips of equal length)."""
        return frame_budget_batches([self.samples[i].frames for i in index], max_frames, random.Random(seed))


@dataclass
class Source:
    """The clips of one data folder (or of the built-in generator) that passed the checks."""
    name: str
    found: int = 0
    samples: list[Sample] = field(default_factory=list)
    clips: list[np.ndarray] = field(default_factory=list)
    waves: list = field(default_factory=list)
    files: list = field(default_factory=list)  # where each clip came from

    def add(self, sample: Sample, frames: np.ndarray, wave, file) -> None:
        self.samples.append(sample)
        self.clips.append(frames)
        self.waves.append(wave)
        self.files.append(file)


def generated_source(cfg: Config, vocab: Vocabulary, bad: BadSamples, hears: bool) -> Source:
    generated = synthesize_dataset(cfg, vocab, sound=hears)
    source = Source("built-in synthetic clips", len(generated))
    for stem, text, frames, wave in generated:
        ids, why = check_sample(cfg, vocab, text, frames)
        if why:
            bad.add(f"synthetic:{stem}", why)
            continue
        source.add(Sample(stem, text, ids, len(frames)), frames, wave, f"synthetic:{stem}")
    return source


def files_source(cfg: Config, vocab: Vocabulary, bad: BadSamples, hears: bool) -> Source:
    """The clips and labels of cfg's folders, each checked; a bad one is reported in `bad` and left out."""
    skipped = len(bad.entries)
    pairs = discover_pairs(cfg, bad)
    source = Source(cfg.data_dir or cfg.videos_dir, len(pairs) + len(bad.entries) - skipped)
    cache = ClipCache(cfg.cache_path)
    sounds = sound_candidates(cfg, {stem: video for stem, video, _ in pairs}) if hears else {}
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
        wave, why = clip_sound(lambda p: cache.load(p, "sound"), sounds[stem], len(frames)) if hears else (None, "")
        if why:
            bad.add(video, why)
            continue
        source.add(Sample(stem, text, ids, len(frames)), frames, wave, video)
    cache.save_index()
    return source


def extra_sources(cfg: Config) -> list[Config]:
    """The settings that read each --extra-data-dir: its own folders, its sound beside it."""
    n = len(cfg.extra_data_dir)
    videos, labels = cfg.extra_videos_dir or [""] * n, cfg.extra_labels_dir or [""] * n
    return [dataclasses.replace(cfg, data_dir=d, videos_dir=v, labels_dir=l, audio_dir="", split_lists="")
            for d, v, l in zip(cfg.extra_data_dir, videos, labels)]


def frames_digest(frames: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frames).tobytes()).hexdigest()


def leave_out_evaluated(extra: Source, held_out: dict[str, str], bad: BadSamples) -> Source:
    """Extra clips whose frames are those of a validation or test clip are left out: they would leak into the
    scores."""
    kept = Source(extra.name, extra.found)
    for sample, frames, wave, file in zip(extra.samples, extra.clips, extra.waves, extra.files):
        twin = held_out.get(frames_digest(frames))
        if twin:
            bad.add(file, f"same frames as a main clip: {twin}; left out so that it cannot leak into validation "
                          "or test")
            continue
        kept.add(sample, frames, wave, file)
    return kept


def load_dataset(cfg: Config, vocab: Vocabulary, device: torch.device) -> Dataset:
    """Find, check and decode every clip (and the extra clips, which only train); assign splits; put the frames
    in memory."""
    bad, hears = BadSamples(), cfg.modality != "video"
    read = generated_source if data_kind(cfg) == "synthetic" else files_source
    own = read(cfg, vocab, bad, hears)
    samples, clips, waves = own.samples, own.clips, own.waves
    if not samples:
        bad.write(cfg.work_dir, own.found, [])
        raise UserError(f"No usable clip was found (see {Path(cfg.work_dir) / 'data_report.json'}).")
    listed = read_split_lists(Path(cfg.split_lists)) if cfg.split_lists else None
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, s in enumerate(samples):
        split = listed.get(s.stem) if listed is not None else split_of(s.stem, cfg)
        if split:
            splits[split].append(i)
    if listed is not None:
        unlisted = sum(1 for s in samples if s.stem not in listed)
        if unlisted:
            print(f"{unlisted} usable clip(s) are in none of the lists in {cfg.split_lists} and are left out.")
        missing = sorted(set(listed) - {s.stem for s in samples})
        if missing:
            print(f"{len(missing)} clip(s) named in {cfg.split_lists} were not found or were skipped, "
                  f"e.g. {', '.join(missing[:5])}")
    held_out = {frames_digest(clips[i]): f"{samples[i].stem} ({split})" for split in ("val", "test")
                for i in splits[split]}
    report = [{"data": own.name, "found": own.found, "usable": len(own.samples), "splits": "train/val/test"}]
    splits["extra"] = []
    for extra_cfg in extra_sources(cfg):
        extra = leave_out_evaluated(files_source(extra_cfg, vocab, bad, hears), held_out, bad)
        splits["extra"] += range(len(samples), len(samples) + len(extra.samples))
        samples, clips, waves = samples + extra.samples, clips + extra.clips, waves + extra.waves
        report.append({"data": extra.name, "found": extra.found, "usable": len(extra.samples), "splits": "extra"})
        print(f"extra clips: {len(extra.samples)} of {extra.found} in {extra.name} usable; they only train")
    bad.write(cfg.work_dir, sum(r["found"] for r in report), report)
    if not hears:
        return Dataset(samples, ClipBank(clips, device, stored_size(cfg)), splits)
    speech = [waves[i].reshape(-1) for i in splits["train"] or range(len(waves))]
    return Dataset(samples, ClipBank(clips, device, stored_size(cfg)), splits, ClipBank(waves, device),
                   noise_track(cfg, speech, device))


def data_kind(cfg: Config) -> str:
    if cfg.data != "auto":
        return cfg.data
    return "files" if (cfg.data_dir or cfg.videos_dir or cfg.labels_dir) else "synthetic"


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


PLAIN_PROGRESS_EVERY = 60.0  # seconds between progress lines in a log


def progress(items, desc: str):
    """tqdm bars in a terminal or a notebook; in a log (a pushed Kaggle kernel, nohup) a plain line now and then."""
    if sys.stderr.isatty() or in_notebook():
        try:
            from tqdm.auto import tqdm
            return tqdm(items, desc=desc, leave=False)
        except ImportError:
            pass
    return plain_progress(items, desc)


def plain_progress(items, desc: str):
    """The items, with `desc: n/total, elapsed` printed at most every PLAIN_PROGRESS_EVERY seconds."""
    total = f"/{len(items)}" if hasattr(items, "__len__") else ""
    began = last = time.time()
    for n, item in enumerate(items, 1):
        yield item
        if time.time() - last >= PLAIN_PROGRESS_EVERY:
            last = time.time()
            print(f"  {desc}: {n}{total}, {duration(last - began)}", flush=True)


def epoch_clips(ds: Dataset, cfg: Config, epoch: int) -> list[int]:
    """The clips training epoch `epoch` sees: every training clip once, and --extra-weight times as many extra
    clips as there are, drawn without repeats (whole passes first where the weight is above 1), afresh each
    epoch from the seed and the epoch, so that a resumed run and every torchrun process draw the same."""
    extra = ds.subset("extra")
    count = round(cfg.extra_weight * len(extra))
    if not count:
        return ds.subset("train")
    rng = random.Random(f"extra:{cfg.seed}:{epoch}")
    return ds.subset("train") + sorted(extra * (count // len(extra)) + rng.sample(extra, count % len(extra)))


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


# Built-in synthetic clips ------------------------------------------------------------------------------------
# Mouth shapes come from visemes, as on real lips: letters articulated at the same place look nearly the same
# (ب م: closed lips; ت د ط ض ن ل ر ز س ص: teeth; ...; each letter differs from its class by a small offset),
# so the word list does much of the telling apart, and vowels change the opening and rounding. Shapes blend
# from unit to unit over time (coarticulation), units take a varying number of frames (fast speakers fit more
# words into a clip), and speakers differ in position, scale, lighting and noise: no per-frame lookup reads
# the text off a clip. Their sound (for --modality audio / av) follows the same timing: every letter has its
# own pair of tones, every vowel its formants, voiced at the speaker's pitch, so sound tells apart what the
# lips confuse, as on real speech.

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
LETTER_OFFSET = 0.12  # how far a letter's shape strays from its viseme class
SPEECH_RATE = 0.5  # units (and word boundaries) a frame at most; the real clips average 0.46 units a frame


VOWEL_FORMANTS = {"\u064e": (700, 1200), "\u064b": (700, 1200), "\u0650": (300, 2300), "\u064d": (300, 2300),
                  "\u064f": (320, 800), "\u064c": (320, 800)}  # a, i, u (Hz)
SILENT = (0.0, 0.0, 0.0)  # (tone 1, tone 2, loudness) of a key without sound: the mouth at rest


def letter_sound(letter: str) -> tuple[float, float, float]:
    h = np.frombuffer(hashlib.sha1(("sound" + letter).encode()).digest()[:2], np.uint8) / 255
    return 200 + 900 * float(h[0]), 1300 + 1700 * float(h[1]), 0.6


def unit_keyframes(unit: str) -> list[tuple[float, np.ndarray, tuple]]:
    """(relative duration, shape, sound) targets a unit passes through; unknown letters get a stable made-up
    viseme."""
    letter = base_letter(unit)
    h = np.frombuffer(hashlib.sha1(letter.encode()).digest()[:5], np.uint8) / 255
    if letter in VISEMES:  # alike within the class, not identical: a letter's own small offset
        shape = np.clip(np.array(VISEMES[letter]) + LETTER_OFFSET * (2 * h - 1), 0, 1).astype(np.float32)
    else:
        shape = h.astype(np.float32)
    keys = [(1.0, shape, letter_sound(letter))]
    vowel = next((m for m in unit[1:] if m in VOWELS), None)
    if vowel is not None:
        keys.append((1.0, np.array([*VOWELS[vowel], shape[3] * 0.5, 0.0], np.float32), (*VOWEL_FORMANTS[vowel], 1.0)))
    if any(m in TANWEEN for m in unit) or "\u06e2" in unit:  # a trailing n (or the small meem) closes in
        keys.append((0.7, np.array(VISEMES["ن"], np.float32), letter_sound("ن")))
    if SHADDA in unit:  # a doubled consonant is held longer
        keys[0] = (2.0, shape, keys[0][2])
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
        "center": rng.uniform([50, 54], [62, 64]), "scale": rng.uniform(0.8, 1.2),
        "skin": rng.uniform(0.45, 0.62), "lip": rng.uniform(0.28, 0.4), "light": rng.uniform(-0.15, 0.15),
        "noise": rng.uniform(0.01, 0.04), "rate": rng.uniform(0.85, 1.15), "lip_width": rng.uniform(0.9, 1.1),
    }


def shape_track(words: list[list[str]], n_frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n_frames x 5 mouth parameters (keyframes laid out in time, blended linearly, then smoothed), and the
    keys' timing and sound for `render_sound` (K x 5: center and length in frames, tones and loudness)."""
    rest = lambda opening: np.array([opening, 0.5, 0.1, 0.0, 0.0], np.float32)
    keys = [(1.5, rest(0.05), SILENT)]  # at rest before speaking
    for w, word in enumerate(words):
        if w:
            keys.append((0.4, rest(0.1), SILENT))
        for unit in word:
            keys += [(d * rng.uniform(0.7, 1.3), s, sound) for d, s, sound in unit_keyframes(unit)]
    keys.append((1.5, rest(0.05), SILENT))
    durations = np.array([d for d, _, _ in keys])
    times = (np.cumsum(durations) - durations / 2) / durations.sum() * (n_frames - 1)
    shapes = np.stack([s for _, s, _ in keys])
    frame_t = np.arange(n_frames)
    track = np.stack([np.interp(frame_t, times, shapes[:, k]) for k in range(shapes.shape[1])], 1)
    kernel = np.array([1, 2, 1]) / 4  # coarticulation: each frame leans towards its neighbours
    padded = np.pad(track, ((1, 1), (0, 0)), mode="edge")
    timeline = np.column_stack([times, durations / durations.sum() * (n_frames - 1), [k[2] for k in keys]])
    return sum(k * padded[i:i + n_frames] for i, k in enumerate(kernel)).astype(np.float32), timeline


def render_sound(timeline: np.ndarray, n_frames: int, pitch: float, rng: np.random.Generator) -> np.ndarray:
    """n_frames x 640 samples at 16 kHz: each key's two tones under a bell as long as the key, voiced at
    `pitch` Hz, over a little background noise."""
    t = np.arange(n_frames * SAMPLES_PER_FRAME, dtype=np.float32) / SAMPLE_RATE
    center, length, tone1, tone2, loud = (timeline[:, k, None].astype(np.float32) for k in range(5))
    bell = np.exp(-0.5 * ((t - center / CLIP_FPS) / (0.5 * length / CLIP_FPS)) ** 2)
    tones = np.sin(2 * np.pi * tone1 * t) + 0.5 * np.sin(2 * np.pi * tone2 * t)
    wave = (loud * bell * tones).sum(0) * (1 + 0.5 * np.sin(2 * np.pi * pitch * t))
    wave += 0.05 * rng.standard_normal(len(t), dtype=np.float32)
    return (0.3 * wave).astype(np.float32).reshape(n_frames, SAMPLES_PER_FRAME)


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


def synthesize_dataset(cfg: Config, vocab: Vocabulary, sound: bool = False) -> list[tuple]:
    """(stem, text, T x H x W uint8, T x 640 sound or None) for cfg.synthetic_clips clips; the same seed gives the
    same clips (and the same frames with or without sound)."""
    rng = np.random.default_rng(cfg.seed)
    full = Vocabulary.seed() if vocab.letters_only else vocab  # letters are drawn as units, to show vowels
    lexicon = synthetic_lexicon(full, cfg.synthetic_words, rng)
    zipf = 1 / np.arange(1, len(lexicon) + 1) ** 0.7
    speakers = [speaker_style(rng) for _ in range(cfg.synthetic_speakers)]
    out = []
    for n in range(cfg.synthetic_clips):
        speaker = int(rng.integers(len(speakers)))
        style = speakers[speaker]
        n_frames = int(rng.integers(29, 39))
        words = [lexicon[i] for i in rng.choice(len(lexicon), int(rng.integers(1, 6)), p=zipf / zipf.sum())]
        while sum(map(len, words)) + len(words) - 1 > n_frames * SPEECH_RATE * style["rate"] and len(words) > 1:
            words.pop()
        track, timeline = shape_track(words, n_frames, rng)
        pitch = 100 + 120 * (speaker * 0.618 % 1)  # the speaker's own voice, drawn outside rng: frames unchanged
        wave = render_sound(timeline, n_frames, pitch, np.random.default_rng([cfg.seed, n])) if sound else None
        out.append((f"synth_{n:05d}", " ".join("".join(w) for w in words),
                    render_mouth(track, style, cfg.frame_size, rng), wave))
    return out


def write_synthetic_dataset(cfg: Config, vocab: Vocabulary) -> Path:
    """The built-in clips as files in the real dataset's layout (mp4 + one CSV a clip, column `word`), each
    with its sound in a wav beside it."""
    import cv2
    if not cfg.output:
        raise UserError("--mode synth needs --output DIR, the folder to write the clips to.")
    root = Path(cfg.output)
    (root / "Preprocessed_Video").mkdir(parents=True, exist_ok=True)
    (root / "Csv").mkdir(parents=True, exist_ok=True)
    for stem, text, frames, wave in synthesize_dataset(cfg, vocab, sound=True):
        def write_video(tmp, frames=frames):
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), 25, frames.shape[1:][::-1], False)
            if not writer.isOpened():
                raise UserError("This OpenCV build cannot write mp4 (codec mp4v); install opencv-python-headless.")
            for f in frames:
                writer.write(f)
            writer.release()
        atomic_write(root / "Preprocessed_Video" / f"{stem}.mp4", write_video)
        write_wav(root / "Preprocessed_Video" / f"{stem}.wav", wave.reshape(-1))
        csv_text = "word\n" + "\n".join(text.split()) + "\n"
        write_text(root / "Csv" / f"{stem}.csv", csv_text)
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
    trailing = [1] * (frames.dim() - 2)  # frames (B x T x H x W) or features (B x T x C)
    out = torch.gather(frames, 1, src.view(*src.shape, *trailing).expand(-1, -1, *frames.shape[2:]))
    return out * (t[None] < new_lengths[:, None]).to(frames.device).view(*src.shape, *trailing)


def snr_levels(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def is_number_list(text: str) -> bool:
    try:
        return bool(snr_levels(text))
    except ValueError:
        return False


def noise_pieces(track: torch.Tensor | None, count: int, length: int, device) -> torch.Tensor:
    """count x length noise: random stretches of `track` (repeated when shorter), or white noise without one."""
    if track is None:
        return torch.randn(count, length, device=device)
    if len(track) <= length:
        track = track.repeat(length // len(track) + 2)
    starts = torch.randint(0, len(track) - length, (count,))
    rows = starts[:, None] + torch.arange(length)[None]
    return track[rows.to(track.device)].to(device)


def mix_at_snr(speech: torch.Tensor, noise: torch.Tensor, valid: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """speech + noise scaled so that each row's speech-to-noise power ratio (over its valid samples) is snr_db;
    rows at +inf stay clean."""
    power = lambda x: (x * x * valid).sum(1) / valid.sum(1).clamp(min=1)
    scale = torch.sqrt(power(speech) / (power(noise).clamp(min=1e-12) * 10 ** (snr_db / 10)))
    return speech + torch.where(torch.isinf(snr_db), 0.0, scale)[:, None] * noise * valid


def normalize_sound(wave: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each clip to zero mean and unit variance over its own samples (Auto-AVSR's layer norm); padding stays 0."""
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (wave * valid).sum(1, keepdim=True) / n
    var = ((wave - mean) ** 2 * valid).sum(1, keepdim=True) / n
    return (wave - mean) / torch.sqrt(var + 1e-8) * valid


def crop_and_flip(frames: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, flip: torch.Tensor):
    """B x T x H x W -> B x T x size x size: clip b cut at (top[b], left[b]) and mirrored where flip[b]. Exact
    pixels (no interpolation), in the frames' own dtype; a slice per clip beats one broadcast gather 6x."""
    out = torch.stack([clip[:, y:y + size, x:x + size] for clip, y, x in zip(frames, top.tolist(), left.tolist())])
    flip = flip.to(out.device)
    out[flip] = out[flip].flip(-1)
    return out


def drop_start(cfg: Config) -> int:
    """The first epoch of modality dropout: --drop-from, else the first after a third of the epochs. Dropped
    from the first epoch, an av model started from two trained sides lost 1.7 points of CER with its sound
    (MEASUREMENTS.md); from epoch 11 of 30 it kept its clean CER and read muted clips as video alone does."""
    return cfg.drop_from or cfg.epochs // 3 + 1


class Augment:
    """uint8 B x T x H x W -> float B x T x input_size x input_size, normalised; padded frames are 0. Frames
    come at frame_size or already shrunk by input_size / crop_size (see `stored_size`).

    Kornia's samplers draw each clip's crop box and flip (frames are its channels, so one draw covers a whole
    clip); the pixels are then cut from the uint8 frames, which is exact and, on a CPU, several times faster
    than Kornia's warp of float frames. Only the crop is converted to float."""

    def __init__(self, cfg: Config, training: bool, drop: bool | None = None):
        import kornia.augmentation as K
        self.cfg, self.train = cfg, training
        self.drop = training if drop is None else drop  # modality dropout has its own start (--drop-from)
        self.snrs = snr_levels(cfg.noise_snrs)
        self.random_crops = {}  # one Kornia sampler per crop size met (full or shrunken frames)
        self.flip = K.RandomHorizontalFlip(p=cfg.hflip_prob) if training and cfg.hflip_prob > 0 else None

    def crop_boxes(self, shape: torch.Size, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top, left and flip of every clip: drawn when training, the center crop otherwise."""
        import kornia.augmentation as K
        batch = shape[0]
        if self.train and self.cfg.random_crop:
            if size not in self.random_crops:
                self.random_crops[size] = K.RandomCrop((size, size))
            corner = self.random_crops[size].forward_parameters(shape)["src"][:, 0].long()  # B x (x, y)
            top, left = corner[:, 1], corner[:, 0]
        else:
            top, left = torch.full((batch,), (shape[2] - size) // 2), torch.full((batch,), (shape[3] - size) // 2)
        flip = torch.zeros(batch, dtype=torch.bool)
        if self.flip is not None:
            flip = self.flip.forward_parameters(shape)["batch_prob"].bool()
        return top, left, flip

    def warp_time(self, x: torch.Tensor, lengths: torch.Tensor, min_lengths: torch.Tensor | None):
        if not (self.train and self.cfg.time_warp):
            return x, lengths
        needed = min_lengths if min_lengths is not None else torch.ones_like(lengths)
        new_lengths = time_warp_lengths(lengths, needed, self.cfg.time_warp_max)
        return resample_frames(x, lengths, new_lengths), new_lengths

    def mask_time(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.train and self.cfg.time_mask:
            for b, length in enumerate(lengths.tolist()):
                adaptive_time_mask(x[b], length, self.cfg.time_mask_window, self.cfg.time_mask_stride)
        return x

    def features(self, x: torch.Tensor, lengths: torch.Tensor, min_lengths: torch.Tensor | None = None):
        """The time augmentations alone, on a frozen frontend's cached features (B x T x C): masked frames get
        zero features rather than the features of a black frame."""
        x, lengths = self.warp_time(x, lengths, min_lengths)
        return self.mask_time(x, lengths), lengths

    def __call__(self, frames: torch.Tensor, lengths: torch.Tensor, min_lengths: torch.Tensor | None = None):
        cfg = self.cfg
        frames, lengths = self.warp_time(frames, lengths, min_lengths)
        crop = round(cfg.crop_size * frames.shape[-1] / cfg.frame_size)  # the bank may hold shrunken frames
        top, left, flip = self.crop_boxes(frames.shape, crop)
        x = crop_and_flip(frames, top, left, crop, flip)
        x = self.mask_time(x, lengths).float()  # zeroed frames stay black, before normalisation, as in Auto-AVSR
        if crop != cfg.input_size:
            x = F.interpolate(x, size=(cfg.input_size, cfg.input_size), mode="area")
        x = x.mul_(1 / (255 * cfg.std)).sub_(cfg.mean / cfg.std)  # (x / 255 - mean) / std in two passes
        valid = torch.arange(x.shape[1], device=x.device)[None] < lengths.to(x.device)[:, None]
        return x * valid[..., None, None], lengths

    def sound_snrs(self, batch: int) -> torch.Tensor:
        """Each clip's SNR in dB: drawn from --noise-snrs when training, --sound's otherwise (+inf: clean)."""
        if self.train:
            return torch.tensor([random.choice(self.snrs) for _ in range(batch)])
        return torch.full((batch,), math.inf if self.cfg.sound in ("clean", "mute") else float(self.cfg.sound))

    def drop_senses(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality dropout: when training, each clip loses its sound (all zeros, what --sound mute feeds) with
        probability --drop-sound, else its video (the mean gray, zero once normalised) with --drop-video."""
        if not self.drop or not (self.cfg.drop_sound or self.cfg.drop_video):
            return video, audio
        draw = torch.rand(len(video)).to(video.device)
        deaf = draw < self.cfg.drop_sound
        blind = ~deaf & (draw < self.cfg.drop_sound + self.cfg.drop_video)
        return (video * (~blind).view(-1, *[1] * (video.dim() - 1)).to(video.dtype),
                audio * (~deaf).view(-1, 1).to(audio.dtype))

    def sound(self, wave: torch.Tensor, lengths: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """B x T x 640 samples -> B x (T x 640) float, normalised per clip: when training, Auto-AVSR's
        AdaptiveTimeMask on the waveform (up to 0.4 s a second) and noise at an SNR drawn per clip; otherwise
        what --sound says (clean, mute, or noise at that SNR)."""
        x = wave.flatten(1).float()
        samples = lengths * SAMPLES_PER_FRAME
        valid = (torch.arange(x.shape[1])[None] < samples[:, None]).to(x.device)
        if self.train and self.cfg.time_mask:
            for b, n in enumerate(samples.tolist()):
                adaptive_time_mask(x[b], n, 6400, SAMPLE_RATE)
        if not self.train and self.cfg.sound == "mute":
            return torch.zeros_like(x)
        snrs = self.sound_snrs(len(x))
        if not torch.isinf(snrs).all():
            x = mix_at_snr(x, noise_pieces(noise, *x.shape, x.device), valid, snrs.to(x.device))
        return normalize_sound(x, valid)


# The model's input -------------------------------------------------------------------------------------------

def batch_inputs(ds: Dataset, chosen: list[int], augment: Augment, device, min_lengths=None) -> tuple:
    """The model's input for clips `chosen` from memory, augmented on the device: frames (video), samples
    (audio) or the pair (av); and the lengths in frames."""
    modality = augment.cfg.modality
    if modality != "video":
        wave, lengths = ds.sound.batch(chosen)
        audio = augment.sound(wave.to(device, non_blocking=True), lengths, ds.noise)
        if modality == "audio":
            return audio, lengths
    frames, lengths = ds.bank.batch(chosen)
    video, lengths = augment(frames.to(device, non_blocking=True), lengths, min_lengths)
    return augment.drop_senses(video, audio) if modality == "av" else video, lengths


# ---------------------------------------------------------------------------------------------------------
# 5. Model: Auto-AVSR's models under their own state_dict names (a 3D-conv + ResNet-18 frontend for video, a
#    1-D ResNet for sound, Conformer encoder, Transformer decoder, CTC head; for both, two encoders fused), in
#    four sizes, and the team's earlier CNN + BiLSTM baseline.
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelDims:
    """What a model's shapes are built from (as nanoGPT's GPTConfig): a preset's sizes, the vocabulary's, and
    the settings that change the layers (model_dims makes it from the Config)."""
    vocab_size: int
    d_model: int
    n_heads: int
    d_ff: int
    n_encoder_layers: int
    n_decoder_layers: int
    conv_kernel: int  # the Conformer's depthwise convolution over time
    frontend_channels: tuple[int, ...]  # the ResNet's four stages (the sound frontend's too)
    fusion_hidden: int  # av: the fusion MLP's width
    dropout: float = 0.1
    frontend: str = "cnn"
    input_size: int = 88
    modality: str = "video"
    encoder: str = "conformer"


PRESETS = {
    "base": dict(d_model=768, n_heads=12, d_ff=3072, n_encoder_layers=12, n_decoder_layers=6,
                 conv_kernel=31, frontend_channels=(64, 128, 256, 512), fusion_hidden=8192),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=6, n_decoder_layers=3,
                  conv_kernel=31, frontend_channels=(32, 64, 128, 256), fusion_hidden=2048),
    # sized for ~2,000 clips and a CPU hour: small's width, a quarter of its frontend, fewer layers (README)
    "mini": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=4, n_decoder_layers=2,
                 conv_kernel=15, frontend_channels=(16, 32, 64, 128), fusion_hidden=1024),
    "tiny": dict(d_model=64, n_heads=2, d_ff=256, n_encoder_layers=2, n_decoder_layers=1,
                 conv_kernel=15, frontend_channels=(8, 16, 32, 64), fusion_hidden=256),
}


def padding_mask(lengths, max_len):
    """B x max_len, True at real frames/tokens."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def causal_mask(size, device):
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def sinusoids(positions, d):
    """ESPnet's table: sin(pos * f_i) at even channels, cos(pos * f_i) at odd ones."""
    freqs = torch.exp(torch.arange(0, d, 2, device=positions.device) * -(math.log(10000.0) / d))
    angles = positions.float()[:, None] * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


def layer_norm(d):
    return nn.LayerNorm(d, eps=1e-12)


# Frontend ----------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet's block over images (dims 2) or over time (dims 1, the sound frontend)."""

    def __init__(self, c_in, c_out, stride, dims=2):
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x, ends=nn.Identity()):
        """`ends` zeroes what lies past each clip's end (the sound frontend's): every convolution then sees the
        zeros a clip alone would be padded with, so its batch does not change it."""
        residual = x if self.downsample is None else self.downsample(x)
        out = ends(F.silu(self.bn1(self.conv1(x))))
        return ends(F.silu(self.bn2(self.conv2(out)) + residual))


def resnet_layer(c_in, c_out, stride, dims=2):
    return nn.Sequential(BasicBlock(c_in, c_out, stride, dims), BasicBlock(c_out, c_out, 1, dims))


class ResNetTrunk(nn.Module):
    """ResNet-18 on single frames, globally average-pooled to one vector per frame."""

    def __init__(self, channels, dims=2):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.layer1 = resnet_layer(c0, c0, 1, dims)
        self.layer2 = resnet_layer(c0, c1, 2, dims)
        self.layer3 = resnet_layer(c1, c2, 2, dims)
        self.layer4 = resnet_layer(c2, c3, 2, dims)

    def layers(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.layers(x).mean(dim=(2, 3))


class ClipEnds(nn.Module):
    """Zeroes the steps of B x C x n past each clip's end, n being a whole number of steps a frame (every stage
    of the sound frontend keeps time in step with the frames: 640, 160, 80, 40 and 20 a frame)."""

    def __init__(self, lengths, frames):
        super().__init__()
        self.lengths, self.frames = lengths, frames

    def forward(self, x):
        steps = torch.arange(x.size(-1), device=x.device)
        return x * (steps < self.lengths[:, None] * (x.size(-1) // self.frames)).unsqueeze(1).to(x.dtype)


class WaveformTrunk(ResNetTrunk):
    """Auto-AVSR's ResNet1D: an 80-tap stem striding 4 samples, the ResNet in 1-D (8 times fewer steps), and an
    average over 20 steps: one vector per 640 samples, the 25 Hz of the video."""

    def __init__(self, channels):
        super().__init__(channels, dims=1)
        self.conv1 = nn.Conv1d(1, channels[0], 80, 4, 38, bias=False)
        self.bn1 = nn.BatchNorm1d(channels[0])

    def forward(self, wave, lengths):
        ends = ClipEnds(lengths, wave.size(1) // SAMPLES_PER_FRAME)
        x = ends(F.silu(self.bn1(self.conv1(ends(wave[:, None])))))
        for block in (b for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for b in layer):
            x = block(x, ends)
        return F.avg_pool1d(x, 20).transpose(1, 2)


class AudioFrontend(nn.Module):
    """B x (T x 640) normalised 16 kHz samples and the lengths in frames -> B x T x channels[-1]."""

    def __init__(self, channels):
        super().__init__()
        self.trunk = WaveformTrunk(channels)

    def forward(self, wave, lengths):
        return self.trunk(wave, lengths)


class VideoFrontend(nn.Module):
    """B x T x 1 x H x W (or B x T x H x W) gray frames -> B x T x channels[-1]."""

    def __init__(self, channels):
        super().__init__()
        c0 = channels[0]
        self.trunk = ResNetTrunk(channels)  # registered first, as in auto_avsr's state_dict
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, c0, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False),
            nn.BatchNorm3d(c0),
            nn.SiLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        )

    def forward(self, video):
        if video.dim() == 4:
            video = video.unsqueeze(2)
        B, T = video.shape[:2]
        x = self.frontend3D(video.transpose(1, 2))  # B x C x T x H' x W'
        x = self.trunk(x.transpose(1, 2).flatten(0, 1))  # per frame
        return x.view(B, T, -1)


class NoiseFrontend(nn.Module):
    """`--frontend noise`: random features fixed by each frame's pixels. Nothing visual survives (frames that
    look alike get unrelated features), yet a clip always gives the same features, so a sanity run can still
    memorise its clips: what the rest of the model learns without sight."""

    def __init__(self, frame_size: int, out_dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("key", torch.randn(frame_size * frame_size, generator=g, dtype=torch.float64), False)
        self.register_buffer("freqs", 1e3 + 1e4 * torch.rand(out_dim, generator=g, dtype=torch.float64), False)
        self.register_buffer("phases", 2 * math.pi * torch.rand(out_dim, generator=g, dtype=torch.float64), False)

    def forward(self, video):
        key = video.flatten(2).double() @ self.key  # B x T; float64 stays out of autocast
        return (math.sqrt(2) * torch.sin(key[..., None] * self.freqs + self.phases)).float()


class LinearFrontend(nn.Module):
    """`--frontend linear`: a learned linear map of each frame's pixels, the simplest frontend that can see."""

    def __init__(self, frame_size: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(frame_size * frame_size, out_dim)

    def forward(self, video):
        return self.proj(video.flatten(2))


def make_frontend(dims: ModelDims) -> nn.Module:
    out_dim = dims.frontend_channels[-1]
    if dims.frontend == "noise":
        return NoiseFrontend(dims.input_size, out_dim)
    if dims.frontend == "linear":
        return LinearFrontend(dims.input_size, out_dim)
    return VideoFrontend(dims.frontend_channels)


# Attention ---------------------------------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """Masks are boolean, True where attending is allowed, broadcastable to B x heads x Tq x Tk."""

    def __init__(self, d, n_heads, dropout):
        super().__init__()
        self.n_heads, self.d_head, self.dropout = n_heads, d // n_heads, dropout
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)

    def split_heads(self, x):  # B x T x d -> B x heads x T x d_head
        return x.view(x.size(0), -1, self.n_heads, self.d_head).transpose(1, 2)

    def merge_heads(self, y):  # B x heads x T x d_head -> B x T x d, projected
        return self.linear_out(y.transpose(1, 2).flatten(2))

    def attend(self, q, k, v, mask):
        dropout = self.dropout if self.training else 0.0
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout))

    def project(self, query, key, value):
        split = self.split_heads
        return split(self.linear_q(query)), split(self.linear_k(key)), split(self.linear_v(value))

    def forward(self, query, key, value, mask=None):
        return self.attend(*self.project(query, key, value), mask)

    def project_memory(self, memory):
        """The keys (transposed: B x heads x d_head x T) and values (B x heads x T x d_head) of a memory that
        many steps attend to, each laid out for attend_few's products to read in place."""
        return (self.split_heads(self.linear_k(memory)).transpose(-2, -1).contiguous(),
                self.split_heads(self.linear_v(memory)).contiguous())

    def attend_few(self, q, keys_t, v, bias=None):
        """Attention for a few queries a row, written out (on a CPU, scaled_dot_product_attention's kernel
        takes twice as long at these sizes). keys_t: the keys transposed, ... x d_head x T; bias: added to the
        scores (-inf where not allowed)."""
        scores = q @ keys_t / math.sqrt(self.d_head)
        return (scores if bias is None else scores + bias).softmax(-1) @ v

    def attend_grouped(self, query, k, v, bias, where=None, layout: int = 0):
        """query: R x 1 x d, rows `where` of a clips x beam layout of `layout` rows (None: the layout itself);
        k, v: projected once per clip (project_memory); bias: clips x 1 x 1 x T. A clip's rows ask its keys
        together, as the query positions of one attention (layout rows not asked for ask with zeros, and their
        answers are dropped)."""
        n = k.size(0)
        q = self.linear_q(query)
        if where is not None:
            q = q.new_zeros(layout, *q.shape[1:]).index_copy_(0, where, q)
        q = self.split_heads(q).reshape(n, -1, self.n_heads, self.d_head).transpose(1, 2)
        y = self.attend_few(q, k, v, bias)  # clips x heads x beam x d_head
        y = y.transpose(1, 2).flatten(0, 1).flatten(1)
        return self.linear_out((y if where is None else y[where])[:, None])


def relative_shift(scores):
    """B x h x T x (2T-1) scores against positions T-1 .. -(T-1) -> B x h x T x T scores for offset i - j."""
    T = scores.size(-2)
    i = torch.arange(T, device=scores.device)
    index = (T - 1) - i[:, None] + i[None, :]
    return scores.gather(-1, index.expand(*scores.shape[:2], T, T))


class RelPositionAttention(MultiHeadAttention):
    """Transformer-XL self-attention, ESPnet's current variant: (q+u).k + (q+v).W_pos p(i-j)."""

    def __init__(self, d, n_heads, dropout):
        super().__init__(d, n_heads, dropout)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.d_head))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x, pos_emb, mask):
        q, k, v = self.project(x, x, x)
        p = self.split_heads(self.linear_pos(pos_emb))
        position_scores = (q + self.pos_bias_v[:, None]) @ p.transpose(-2, -1)
        position_scores = relative_shift(position_scores) / math.sqrt(self.d_head)
        position_scores = position_scores.masked_fill(~mask, float("-inf"))
        return self.attend(q + self.pos_bias_u[:, None], k, v, position_scores)


# Encoder -----------------------------------------------------------------------------------------------------

class FeedForward(nn.Module):
    def __init__(self, d, d_ff, dropout):
        super().__init__()
        self.w_1 = nn.Linear(d, d_ff)
        self.w_2 = nn.Linear(d_ff, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class ConvModule(nn.Module):
    def __init__(self, d, kernel):
        super().__init__()
        self.pointwise_cov1 = nn.Conv1d(d, 2 * d, 1)  # "cov" (sic): ESPnet's state_dict name
        self.depthwise_conv = nn.Conv1d(d, d, kernel, padding=(kernel - 1) // 2, groups=d)
        self.norm = nn.BatchNorm1d(d)
        self.pointwise_cov2 = nn.Conv1d(d, d, 1)

    def forward(self, x, mask):  # x: B x T x d, mask: B x T
        x = F.glu(self.pointwise_cov1(x.transpose(1, 2)), dim=1)
        x = x.masked_fill(~mask[:, None, :], 0.0)  # padded frames would leak into real ones through the kernel
        x = F.silu(self.norm(self.depthwise_conv(x)))
        return self.pointwise_cov2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        d = dims.d_model
        self.self_attn = RelPositionAttention(d, dims.n_heads, 0.0)  # Auto-AVSR drops no encoder attention weights
        self.feed_forward = FeedForward(d, dims.d_ff, dims.dropout)
        self.conv_module = ConvModule(d, dims.conv_kernel)
        self.norm_ff = layer_norm(d)
        self.norm_mha = layer_norm(d)
        self.feed_forward_macaron = FeedForward(d, dims.d_ff, dims.dropout)
        self.norm_ff_macaron = layer_norm(d)
        self.norm_conv = layer_norm(d)
        self.norm_final = layer_norm(d)
        self.dropout = nn.Dropout(dims.dropout)

    def forward(self, x, pos_emb, mask):
        x = x + 0.5 * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x)))
        x = x + self.dropout(self.self_attn(self.norm_mha(x), pos_emb, mask[:, None, None, :]))
        x = x + self.dropout(self.conv_module(self.norm_conv(x), mask))
        x = x + 0.5 * self.dropout(self.feed_forward(self.norm_ff(x)))
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dropout = nn.Dropout(dims.dropout)
        self.encoders = nn.ModuleList(ConformerBlock(dims) for _ in range(dims.n_encoder_layers))
        self.after_norm = layer_norm(dims.d_model)

    def forward(self, x, mask):  # x: B x T x d, mask: B x T
        T, d = x.shape[1:]
        offsets = torch.arange(T - 1, -T, -1, device=x.device)
        pos_emb = self.dropout(sinusoids(offsets, d).to(x.dtype)[None])
        x = self.dropout(x * math.sqrt(d))
        for block in self.encoders:
            x = block(x, pos_emb, mask)
        return self.after_norm(x)


# Temporal convolutions: the team's MS-TCN and DC-TCN ---------------------------------------------------------
# Their published models put one of three encoders after the same frontend: Auto-AVSR's Conformer, a multi-scale
# temporal convolutional network (4 levels of parallel kernels 3/5/7/9 at dilations 1/2/4/8) or a densely
# connected one (4 blocks of 4 such layers, each reading all earlier outputs of its block, with squeeze-and-
# excitation). Names are theirs, so their checkpoints load by name. Each convolution is "same" over time and
# sees the zeros a lone clip sees past its end: padded frames are zeroed before every one, and averages over
# time are taken over a clip's own frames, so a clip encodes alike alone and in a padded batch.

TCN_KERNELS = (3, 5, 7, 9)
TCN_DILATIONS = (1, 2, 4, 8)


def tcn_channels(dims: ModelDims) -> int:
    """The width of a TCN level (DC-TCN's growth rate): 512 at d_model 768, as the team's; two thirds of d_model,
    a multiple of the four branches."""
    return 2 * dims.d_model // 3 // len(TCN_KERNELS) * len(TCN_KERNELS)


class TemporalConv(nn.Module):
    """Conv1d -> BatchNorm -> SiLU over time (MS-TCN's names); a doubly padded output chomped symmetrically, as
    theirs is, is this convolution padded by half."""

    def __init__(self, c_in, c_out, kernel, dilation):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=(kernel - 1) * dilation // 2, dilation=dilation)
        self.batchnorm = nn.BatchNorm1d(c_out)

    def forward(self, x, keep):  # x: B x C x T; keep: B x 1 x T, 1 at a clip's frames
        return F.silu(self.batchnorm(self.conv(x * keep)))


class DenseConv(nn.Module):
    """The same convolution under DC-TCN's names (net.0, net.1)."""

    def __init__(self, c_in, c_out, kernel, dilation):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(c_in, c_out, kernel, padding=(kernel - 1) * dilation // 2,
                                           dilation=dilation), nn.BatchNorm1d(c_out))

    def forward(self, x, keep):
        return F.silu(self.net(x * keep))


class SqueezeExcite(nn.Module):
    """Channels reweighted by what the clip holds on average (over its own frames)."""

    def __init__(self, c, reduction=16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // reduction, bias=False), nn.SiLU(),
                                nn.Linear(c // reduction, c, bias=False), nn.Sigmoid())

    def forward(self, x, keep):
        mean = (x * keep).sum(-1) / keep.sum(-1)
        return x * self.fc(mean)[..., None]


class MultiScaleBlock(nn.Module):
    """Two rounds of parallel convolutions, one branch a kernel size, each a quarter of the channels, and a 1 x 1
    residual: an MS-TCN level, or a DC-TCN dense layer (which squeezes and excites its input per branch)."""

    def __init__(self, c_in, c_out, dilation, dropout, conv=TemporalConv, squeeze=False):
        super().__init__()
        branch, self.squeeze = c_out // len(TCN_KERNELS), squeeze
        for k, kernel in enumerate(TCN_KERNELS):
            if squeeze:
                self.add_module(f"cbcr0_se_{k}", SqueezeExcite(c_in))
            self.add_module(f"cbcr0_{k}", conv(c_in, branch, kernel, dilation))
        for k, kernel in enumerate(TCN_KERNELS):
            self.add_module(f"cbcr1_{k}", conv(branch * len(TCN_KERNELS), branch, kernel, dilation))
        self.dropout = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(c_in, c_out, 1)

    def branches(self, round_: int, x, keep):
        excite = lambda k, x: getattr(self, f"cbcr0_se_{k}")(x, keep) if self.squeeze and round_ == 0 else x
        return self.dropout(torch.cat([getattr(self, f"cbcr{round_}_{k}")(excite(k, x), keep)
                                       for k in range(len(TCN_KERNELS))], 1))

    def forward(self, x, keep):
        return F.silu(self.branches(1, self.branches(0, x, keep), keep) + self.downsample(x))


class MSTCNEncoder(nn.Module):
    """The team's multi-scale TCN: 4 levels at dilations 1, 2, 4, 8, then a projection back to d_model."""

    def __init__(self, dims: ModelDims):
        super().__init__()
        c = tcn_channels(dims)
        self.encoder_trunk = nn.Module()
        self.encoder_trunk.network = nn.ModuleList(
            MultiScaleBlock(dims.d_model if i == 0 else c, c, dilation, dims.dropout)
            for i, dilation in enumerate(TCN_DILATIONS))
        self.hidden_proj = nn.Linear(c, dims.d_model)

    def forward(self, x, mask):  # x: B x T x d, mask: B x T
        keep, x = mask[:, None, :].to(x.dtype), x.transpose(1, 2)
        for level in self.encoder_trunk.network:
            x = level(x, keep)
        return self.hidden_proj(x.transpose(1, 2))


class Transition(nn.Sequential):
    """DC-TCN's 1 x 1 reduction between blocks (PReLU at the entry, SiLU after a block)."""

    def __init__(self, c_in, c_out, entry: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, 1, bias=False)
        self.norm = nn.BatchNorm1d(c_out)
        if entry:
            self.prelu = nn.PReLU(c_out)
        else:
            self.swish = nn.SiLU()


class DCTCNEncoder(nn.Module):
    """The team's densely connected TCN: an entry reduction, then 4 blocks of 4 layers (dilations 1, 2, 4, 8),
    each layer reading its block's input and every earlier layer's output; reductions between blocks, a
    BatchNorm after the last, then a projection back to d_model."""

    def __init__(self, dims: ModelDims):
        super().__init__()
        d, growth, blocks = dims.d_model, tcn_channels(dims), len(TCN_DILATIONS)
        wide = d + len(TCN_DILATIONS) * growth  # a block's output: its input and its layers'
        features = {"transition0": Transition(d, d, entry=True)}
        for b in range(1, blocks + 1):
            features[f"denseblock{b}"] = nn.ModuleDict({
                f"denselayer{i + 1}": MultiScaleBlock(d + i * growth, growth, dilation, dims.dropout, DenseConv, True)
                for i, dilation in enumerate(TCN_DILATIONS)})
            features[f"transition{b}" if b < blocks else "norm5"] = (Transition(wide, d, entry=False) if b < blocks
                                                                     else nn.BatchNorm1d(wide))
        self.encoder_trunk = nn.Module()
        self.encoder_trunk.features = nn.ModuleDict(features)
        self.hidden_proj = nn.Linear(wide, d)

    def forward(self, x, mask):
        keep, x = mask[:, None, :].to(x.dtype), x.transpose(1, 2)
        for name, part in self.encoder_trunk.features.items():
            if name.startswith("denseblock"):
                outputs = [x]
                for layer in part.values():
                    outputs.append(layer(torch.cat(outputs, 1), keep))
                x = torch.cat(outputs, 1)
            else:
                x = part(x)
        return self.hidden_proj(x.transpose(1, 2))


ENCODERS = {"conformer": ConformerEncoder, "mstcn": MSTCNEncoder, "dctcn": DCTCNEncoder}


def make_encoder(dims: ModelDims) -> nn.Module:
    return ENCODERS[dims.encoder](dims)


# Decoder -----------------------------------------------------------------------------------------------------

class PositionalEncoding(nn.Module):
    def __init__(self, d, dropout):
        super().__init__()
        self.d = d
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, offset: int = 0):
        pe = sinusoids(torch.arange(offset, offset + x.size(1), device=x.device), self.d).to(x.dtype)
        return self.dropout(x * math.sqrt(self.d) + pe)


class DecoderBlock(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        d = dims.d_model
        self.self_attn = MultiHeadAttention(d, dims.n_heads, dims.dropout)
        self.src_attn = MultiHeadAttention(d, dims.n_heads, dims.dropout)
        self.feed_forward = FeedForward(d, dims.d_ff, dims.dropout)
        self.norm1 = layer_norm(d)
        self.norm2 = layer_norm(d)
        self.norm3 = layer_norm(d)
        self.dropout = nn.Dropout(dims.dropout)

    def forward(self, x, self_mask, memory, memory_mask):
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, h, self_mask))
        x = x + self.dropout(self.src_attn(self.norm2(x), memory, memory, memory_mask))
        return x + self.dropout(self.feed_forward(self.norm3(x)))

    def step(self, x, cache: "DecoderCache", i: int, where=None, layout: int = 0):
        """The newest position only (x: R x 1 x d, a row of `cache` each), attending to its row's earlier
        positions, whose keys and values block i keeps in `cache`; `where`: each row's row in a clips x beam
        layout of `layout` rows (None: the rows are that layout)."""
        h = self.norm1(x)
        q, k, v = self.self_attn.project(h, h, h)
        x = x + self.self_attn.merge_heads(self.self_attn.attend_few(q, *cache.append(i, k, v)))
        x = x + self.src_attn.attend_grouped(self.norm2(x), *cache.memory[i], cache.memory_bias, where, layout)
        return x + self.feed_forward(self.norm3(x))


@dataclass
class DecoderCache:
    """What incremental decoding keeps between steps: every block's projected encoder output (one copy per
    clip, shared by the clip's rows) and the self-attention keys and values of each row's positions so far.
    Those live in buffers made once for the longest search (a new tensor every step costs several times the
    copying: fresh memory must be mapped in), two a block, positions first (positions x rows x heads x
    d_head), so that a step writes one block of memory and a search maps in only the positions it reaches.
    Rows are places in these buffers (a beam search decides which hypothesis each holds: Beams.place)."""
    memory: list[tuple[torch.Tensor, torch.Tensor]]
    memory_bias: torch.Tensor  # clips x 1 x 1 x T: 0 at a clip's frames, -inf past its end
    past: list[torch.Tensor]  # block i's keys at 2i, values at 2i + 1
    rows: int = 0  # rows in use
    length: int = 0  # positions written

    def keep_clips(self, clips: torch.Tensor, frames: int) -> None:
        self.memory = [(k[clips, ..., :frames], v[clips, :, :frames]) for k, v in self.memory]
        self.memory_bias = self.memory_bias[clips, ..., :frames]

    def copy_rows(self, to: torch.Tensor, source: torch.Tensor) -> None:
        """Rows `to` get the pasts of rows `source`."""
        for past in self.past:
            past[:self.length].index_copy_(1, to, past[:self.length].index_select(1, source))

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's keys and values of the newest position (R x heads x 1 x d_head) added -> all of them, as
        attend_few reads them: keys R x heads x d_head x positions, values R x heads x positions x d_head."""
        keys, values = (past[:self.length + 1, :self.rows] for past in self.past[2 * i:2 * i + 2])
        keys[-1], values[-1] = k[:, :, 0], v[:, :, 0]
        return keys.permute(1, 2, 3, 0), values.permute(1, 2, 0, 3)


class TransformerDecoder(nn.Module):
    """Token ids must be valid everywhere; pad ys_in with eos as ESPnet does, targets with ignore_id."""

    def __init__(self, dims: ModelDims):
        super().__init__()
        d = dims.d_model
        self.embed = nn.Sequential(nn.Embedding(dims.vocab_size, d), PositionalEncoding(d, dims.dropout))
        self.decoders = nn.ModuleList(DecoderBlock(dims) for _ in range(dims.n_decoder_layers))
        self.after_norm = layer_norm(d)
        self.output_layer = nn.Linear(d, dims.vocab_size)

    def forward(self, ys_in, memory, memory_mask=None):
        """Teacher forcing: B x L tokens -> B x L x V logits. Padded tokens trail the real ones, so the
        causal mask already keeps them out of every real position (ESPnet's target mask adds nothing)."""
        self_mask = causal_mask(ys_in.size(1), ys_in.device)
        memory_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        x = self.embed(ys_in)
        for block in self.decoders:
            x = block(x, self_mask, memory, memory_mask)
        return self.output_layer(self.after_norm(x))

    def start(self, memory, memory_mask, rows: int, positions: int) -> DecoderCache:
        """Incremental decoding of up to `rows` rows (a multiple of the clips) for up to `positions` steps
        begins: the encoder output is projected once per block, not once per step."""
        heads = self.decoders[0].self_attn.n_heads
        projected = [block.src_attn.project_memory(memory) for block in self.decoders]
        buffers = [projected[0][0].new_empty(positions, rows, heads, memory.size(2) // heads)
                   for _ in range(2 * len(self.decoders))]
        bias = torch.zeros(memory_mask.shape, device=memory.device).masked_fill(~memory_mask, -math.inf)
        return DecoderCache(projected, bias[:, None, None, :], buffers)

    def cache_values(self) -> int:
        """Values the cache holds per row and position: keys and values of every block."""
        return 2 * len(self.decoders) * self.output_layer.in_features

    def step(self, tokens, position: int, cache: DecoderCache, where=None, layout: int = 0) -> torch.Tensor:
        """R newest tokens (at `position`), one for each of the cache's rows (in a beam search `where` says
        which row of its clips x beam layout each is) -> R x V log-probs of the next ones, the same as
        `forward` on the whole prefixes gives; `cache` moves one position on."""
        cache.rows = len(tokens)
        x = self.embed[1](self.embed[0](tokens[:, None]), offset=position)
        for i, block in enumerate(self.decoders):
            x = block.step(x, cache, i, where, layout)
        cache.length += 1
        return self.output_layer(self.after_norm(x[:, 0])).log_softmax(-1)


# Whole models ------------------------------------------------------------------------------------------------

class CTCHead(nn.Module):
    def __init__(self, d, vocab_size, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ctc_lo = nn.Linear(d, vocab_size)

    def forward(self, x):  # B x T x d -> B x T x V logits
        return self.ctc_lo(self.dropout(x))


class FusionHead(nn.Module):
    """Auto-AVSR's audio-visual fusion (v1.0.0's MLPHead): both encoders' outputs side by side, through
    Linear -> BatchNorm -> ReLU -> Linear back to d."""

    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(2 * d, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, seen, heard):
        x = self.fc1(torch.cat([seen, heard], -1))
        return self.fc2(F.relu(self.bn1(x.transpose(1, 2)).transpose(1, 2)))


class AVSRModel(nn.Module):
    """Video: frames -> frontend -> proj_encoder -> encoder. Audio: the same with the sound frontend. Both (av):
    the video model's encoder and a second one for sound (aux_*, Auto-AVSR v1.0.0's names), fused per frame.
    One decoder and one CTC head read the result."""

    def __init__(self, dims: ModelDims):
        super().__init__()
        self.modality = dims.modality
        self.frontend = AudioFrontend(dims.frontend_channels) if dims.modality == "audio" else make_frontend(dims)
        self.proj_encoder = nn.Linear(dims.frontend_channels[-1], dims.d_model)
        self.encoder = make_encoder(dims)
        if dims.modality == "av":
            self.aux_frontend = AudioFrontend(dims.frontend_channels)
            self.aux_proj_encoder = nn.Linear(dims.frontend_channels[-1], dims.d_model)
            self.aux_encoder = make_encoder(dims)
            self.fusion = FusionHead(dims.d_model, dims.fusion_hidden)
        self.decoder = TransformerDecoder(dims)
        self.ctc = CTCHead(dims.d_model, dims.vocab_size, dims.dropout)

    def encode(self, inputs, lengths):
        """Frames (video: B x T x H x W), samples (audio: B x (T x 640)) or the pair of them (av) -> (B x T x d,
        B x T mask True at real frames); time is never subsampled."""
        if self.modality == "audio":
            return self.encode_features(self.frontend(inputs, lengths), lengths)
        video, audio = inputs if self.modality == "av" else (inputs, None)
        mask = padding_mask(lengths, video.size(1))
        # the stem's temporal kernel reaches 2 frames past a clip's end: make them the zeros a lone clip sees
        video = video * mask.view(*mask.shape, *[1] * (video.dim() - 2)).to(video.dtype)
        seen, mask = self.encode_features(self.frontend(video), lengths)
        if audio is None:
            return seen, mask
        heard = self.aux_encoder(self.aux_proj_encoder(self.aux_frontend(audio, lengths)), mask)
        return self.fusion(seen, heard), mask

    def encode_features(self, features, lengths):
        """The encoding from per-frame frontend features on (B x T x channels, a frozen frontend's cache)."""
        mask = padding_mask(lengths, features.size(1))
        return self.encoder(self.proj_encoder(features), mask), mask

    def forward(self, inputs, lengths, ys_in):
        """-> (B x T x V CTC logits, B x L x V decoder logits)."""
        enc, mask = self.encode(inputs, lengths)
        return self.ctc(enc), self.decoder(ys_in, enc, mask)


class BaselineModel(nn.Module):
    """The earlier per-frame CNN + BiLSTM + CTC model, for 88x88 frames; CTC only (decoder is None)."""

    decoder = None

    def __init__(self, vocab_size, dropout):
        super().__init__()
        layers, c_in = [], 1
        for c in (32, 64, 96, 128):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        # 88 x 88 frames pool to 5 x 5, as in the seed; the adaptive pool lets --input-size 44 in as well
        self.cnn = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(5), nn.Flatten(), nn.Linear(128 * 5 * 5, 512),
                                 nn.ReLU(), nn.Dropout(dropout))
        self.lstm = nn.LSTM(512, 256, num_layers=2, batch_first=True, bidirectional=True, dropout=dropout)
        self.ctc = CTCHead(512, vocab_size, 0.0)

    def encode(self, video, lengths):
        """-> (B x T x 512, B x T mask True at real frames)."""
        B, T = video.shape[:2]
        x = self.cnn(video.reshape(B * T, 1, *video.shape[-2:])).view(B, T, -1)
        # packing keeps the backward LSTM from starting in the padding
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        x, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=T)
        return x, padding_mask(lengths, T)

    def forward(self, video, lengths, ys_in=None):
        """-> (B x T x V CTC logits, None)."""
        return self.ctc(self.encode(video, lengths)[0]), None


# Several trained models read as one (--ensemble) ---------------------------------------------------------------
# Each model encodes the clip; their CTC heads' frame posteriors and their decoders' next-unit posteriors are
# averaged, as probabilities (fairseq's ensembles: the log of the mean, so each stays a distribution), per frame and
# per step. Every decoder and search then reads the ensemble as it reads one model. The encodings travel side by
# side, B x T x (the models' widths together), each head reading its own model's share.

def mean_of_probs(log_probs: list[torch.Tensor]) -> torch.Tensor:
    return torch.logsumexp(torch.stack([lp.float() for lp in log_probs]), 0) - math.log(len(log_probs))


class EnsembleCTC(nn.Module):
    def __init__(self, heads: list[nn.Module], widths: list[int]):
        super().__init__()
        self.heads, self.widths = nn.ModuleList(heads), widths

    def forward(self, enc):  # B x T x sum(widths) -> B x T x V log-probs
        return mean_of_probs([h(x).float().log_softmax(-1) for h, x in zip(self.heads, enc.split(self.widths, -1))])


@dataclass
class EnsembleCache:
    """Each decoder's cache, moved together: rows and positions are the same in all of them."""
    caches: list[DecoderCache]

    @property
    def rows(self) -> int:
        return self.caches[0].rows

    @property
    def length(self) -> int:
        return self.caches[0].length

    def keep_clips(self, clips: torch.Tensor, frames: int) -> None:
        for cache in self.caches:
            cache.keep_clips(clips, frames)

    def copy_rows(self, to: torch.Tensor, source: torch.Tensor) -> None:
        for cache in self.caches:
            cache.copy_rows(to, source)


class EnsembleDecoder(nn.Module):
    def __init__(self, decoders: list[TransformerDecoder], widths: list[int]):
        super().__init__()
        self.members, self.widths = nn.ModuleList(decoders), widths

    def cache_values(self) -> int:
        return sum(d.cache_values() for d in self.members)

    def forward(self, ys_in, memory, memory_mask=None):
        return mean_of_probs([d(ys_in, x, memory_mask).float().log_softmax(-1)
                              for d, x in zip(self.members, memory.split(self.widths, -1))])

    def start(self, memory, memory_mask, rows: int, positions: int) -> EnsembleCache:
        return EnsembleCache([d.start(x, memory_mask, rows, positions)
                              for d, x in zip(self.members, memory.split(self.widths, -1))])

    def step(self, tokens, position: int, cache: EnsembleCache, where=None, layout: int = 0) -> torch.Tensor:
        return mean_of_probs([d.step(tokens, position, c, where, layout) for d, c in zip(self.members, cache.caches)])


class Ensemble(nn.Module):
    """The models read as one: encode, ctc and decoder as one model has them (decoder None if any model lacks
    one: the search is then CTC's alone)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)
        widths = [m.ctc.ctc_lo.in_features for m in models]
        self.ctc = EnsembleCTC([m.ctc for m in models], widths)
        self.decoder = (EnsembleDecoder([m.decoder for m in models], widths)
                        if all(m.decoder is not None for m in models) else None)

    def encode(self, inputs, lengths):
        encoded = [m.encode(inputs, lengths) for m in self.models]
        return torch.cat([enc for enc, _ in encoded], -1), encoded[0][1]

    def forward(self, inputs, lengths, ys_in):
        enc, mask = self.encode(inputs, lengths)
        return self.ctc(enc), None if self.decoder is None else self.decoder(ys_in, enc, mask)


class UnitLM(nn.Module):
    """A language model of the run's units (word spaces included): sos, the units, eos, as the decoder reads
    them. An LSTM, for --lm-kind lstm: where much text is added and n-gram counts run out (on LRC-AR's labels
    alone the 7-gram predicts as well and is the default; MEASUREMENTS.md)."""

    def __init__(self, vocab_size: int, dim: int, layers: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(dim, dim, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.output = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor, state=None):
        """B x L tokens (and the LSTM's state after what came before) -> B x L x V log-probs of the next unit,
        and the state after these tokens."""
        h, state = self.lstm(self.drop(self.embed(tokens)), state)
        return self.output(self.drop(h)).float().log_softmax(-1), state

    def state_size(self) -> int:
        """Values of one row's state (its h and c in every layer)."""
        return 2 * self.lstm.num_layers * self.lstm.hidden_size


def ngram_tables(sentences: list[list[int]], order: int, vocab_size: int, sos_eos: int) -> dict[str, torch.Tensor]:
    """The counts of an n-gram model, made once (--mode lm) and saved as the lookup reads them: for each order n,
    the contexts seen (their n-1 units as one int64, digits in base vocab_size), sorted, where each one's followers
    start, and the followers with their counts (below the top order, continuation counts: in how many contexts
    the n-gram's last unit follows). Each sentence is read after order-1 sos and before its eos."""
    if vocab_size ** order >= 2 ** 63:
        raise UserError(f"--lm-order {order} over {vocab_size} units does not fit this model's 64-bit keys: use at "
                        f"most {int(63 / math.log2(vocab_size))}.")
    pad = order - 1
    flat = np.concatenate([np.array([sos_eos] * pad + ids + [sos_eos], np.int64) for ids in sentences] or
                          [np.zeros(0, np.int64)])
    sentence = np.repeat(np.arange(len(sentences)), [len(ids) + order for ids in sentences])
    starts = np.arange(max(len(flat) - pad, 0))
    keys = np.zeros(len(starts), np.int64)  # each window of `order` units as one number
    for j in range(order):  # Horner's rule, a unit at a time: no windows x order array
        keys = keys * vocab_size + flat[j:len(starts) + j]
    keys, counts = np.unique(keys[sentence[starts] == sentence[starts + pad]], return_counts=True)  # within a sentence
    tables = {}
    for n in range(order, 0, -1):
        context = keys // vocab_size  # sorted with the keys
        first = np.flatnonzero(np.r_[True, context[1:] != context[:-1]])
        tables |= {f"contexts_{n}": torch.from_numpy(context[first]),
                   f"first_{n}": torch.from_numpy(np.append(first, len(keys))),
                   f"next_{n}": torch.from_numpy((keys % vocab_size).astype(np.int32)),
                   f"counts_{n}": torch.from_numpy(counts.astype(np.int64))}
        keys, counts = np.unique(keys % vocab_size ** (n - 1), return_counts=True)  # continuation counts below
    return tables


class NgramLM(nn.Module):
    """Interpolated Kneser-Ney over the units (one discount): each order's counts discounted, the mass taken
    given to the next lower order, whose counts are continuation counts (in how many contexts a unit follows);
    below the unigrams, the uniform. The same calls as UnitLM: its state is each row's last order-1 tokens.
    Reads ngram_tables as they are (memory-mapped from lm.pt): a context's followers by binary search."""

    def __init__(self, tables: dict[str, torch.Tensor], order: int, vocab_size: int, sos_eos: int, discount=0.75):
        super().__init__()
        self.tables, self.order, self.vocab_size, self.sos = tables, order, vocab_size, sos_eos
        self.discount, self.cache = discount, {}
        self.register_buffer("where", torch.zeros(0), persistent=False)  # follows .to(device): the outputs' device
        self.followers = {n: [tables[f"{part}_{n}"].numpy() for part in ("contexts", "first", "next", "counts")]
                          for n in range(1, order + 1)}

    def log_probs(self, context: tuple) -> np.ndarray:
        if context not in self.cache:
            p = np.full(self.vocab_size, 1.0 / self.vocab_size)
            for n in range(1, self.order + 1):
                contexts, first, ids, counts = self.followers[n]
                key = functools.reduce(lambda k, unit: k * self.vocab_size + unit, context[len(context) - n + 1:]
                                       if n > 1 else (), 0)
                i = np.searchsorted(contexts, key)
                if i < len(contexts) and contexts[i] == key:
                    seen, count = ids[first[i]:first[i + 1]], counts[first[i]:first[i + 1]].astype(np.float64)
                    total = count.sum()
                    p = p * (self.discount * len(seen) / total)
                    p[seen] += np.maximum(count - self.discount, 0) / total
            self.cache[context] = np.log(p)
        return self.cache[context]

    def forward(self, tokens: torch.Tensor, state=None):
        """B x L tokens (and the state after what came before) -> B x L x V log-probs of the next unit, and the
        state after these tokens: ((1 x B x order-1 tokens),), rows on dim 1 as an LSTM's."""
        context = (state[0][0] if state is not None else
                   torch.full((len(tokens), self.order - 1), self.sos, dtype=torch.long)).cpu()
        out = []
        for t in range(tokens.size(1)):
            context = torch.cat([context[:, 1:], tokens[:, t:t + 1].cpu()], 1)
            out.append(np.stack([self.log_probs(tuple(row)) for row in context.tolist()]))
        log_probs = torch.from_numpy(np.stack(out, 1)).float().to(self.where.device)
        return log_probs, (context[None].to(self.where.device),)

    def state_size(self) -> int:
        return self.order - 1


def model_dims(cfg: Config, vocab_size: int) -> ModelDims:
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset {cfg.preset!r} is not known; choose one of {', '.join(PRESETS)}.")
    return ModelDims(vocab_size=vocab_size, dropout=cfg.dropout, frontend=cfg.frontend, input_size=cfg.input_size,
                     modality=cfg.modality, encoder=cfg.encoder, **PRESETS[cfg.preset])


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    if cfg.arch == "conformer":
        return AVSRModel(model_dims(cfg, vocab_size))
    if cfg.frontend != "cnn":
        raise UserError(f"--frontend {cfg.frontend} swaps the conformer's frontend; the baseline has its own CNN.")
    return BaselineModel(vocab_size, cfg.dropout)


def parts_of(cfg: Config) -> tuple[str, ...]:
    """The model's top-level parts, the units of freezing, loading and gradient flow."""
    if cfg.arch == "baseline":
        return "cnn", "lstm", "ctc"
    sound = ("aux_frontend", "aux_proj_encoder", "aux_encoder", "fusion") if cfg.modality == "av" else ()
    return "frontend", "proj_encoder", "encoder", *sound, "decoder", "ctc"


def part_names(parts: str) -> list[str]:
    return [n.strip() for n in parts.split(",") if n.strip()]


def module_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by the model's top-level part (a part without parameters is left out)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(p)
    return groups


def frozen_in(cfg: Config, epoch: int) -> list[str]:
    """The parts that stay fixed during `epoch`: --freeze's, until --unfreeze-at."""
    return [] if cfg.unfreeze_at and epoch >= cfg.unfreeze_at else part_names(cfg.freeze)


def set_frozen(model: nn.Module, parts: list[str]) -> None:
    for name, child in model.named_children():
        child.requires_grad_(name not in parts)


def frozen_parts(model: nn.Module) -> list[str]:
    return [n for n, params in module_groups(model).items() if not any(p.requires_grad for p in params)]


def train_mode(model: nn.Module) -> None:
    """Training mode, except frozen parts: their BatchNorm statistics and dropout stay as they are."""
    model.train()
    for n in frozen_parts(model):
        getattr(model, n).eval()


# Released weights (--init-from) ------------------------------------------------------------------------------
# Auto-AVSR's and ViSpeR's state_dict names are this model's, so their released checkpoints load by name. Only
# the parts that do not depend on the vocabulary carry over to a new one; the rest start afresh.

AUTO_AVSR_URL = "https://github.com/mpc001/auto_avsr"
VISPER_URL = "https://huggingface.co/tiiuae/visper"
OLD_NAMES = (("encoder.frontend.", "frontend."), ("encoder.embed.0.", "proj_encoder."),  # before 2025, ViSpeR
             ("aux_encoder.frontend.", "aux_frontend."), ("aux_encoder.embed.0.", "aux_proj_encoder."))  # av
VOCAB_SIZED = ("decoder.embed.0.", "decoder.output_layer.", "ctc.ctc_lo.")
SOUND_SIDE = ("aux_frontend", "aux_proj_encoder", "aux_encoder", "fusion")
WHERE_TO_GET = (f"ViSpeR's models, trained on 1,200 h of Arabic among five languages (visper_vsr_base.pth for "
                f"video, visper_avsr_base.pth audio-visual), are at {VISPER_URL}; Auto-AVSR's English ones "
                f"(vsr_trlrs3_base.pth, asr_*.pth, ...) in the model zoo of {AUTO_AVSR_URL}. Download one where "
                "there is internet and pass its path (on Kaggle, attach it as a dataset: it is then found by name).")


# The team's own models (Essa-Ramzy/Arabic-Lip-Reading): the same frontend and decoder (their ResNet under
# "resnet_trunk"), one of three encoders under its own names, and tokens of their own order: the blank, the units
# in descending string order, the space, then <sos> and <eos> as two ids. Their units' ids are this vocabulary's
# (both came from the same labels); where this one has <unk> and one <sos/eos>, the rows are moved by name.
TEAM_URL = "https://github.com/Essa-Ramzy/Arabic-Lip-Reading"
TEAM_NAMES = (("frontend.resnet_trunk.", "frontend.trunk."),)
TEAM_ENCODERS = {"encoder.encoder_trunk.network.": "mstcn", "encoder.encoder_trunk.features.": "dctcn",
                 "encoder.encoders.": "conformer"}
TEAM_NORMALISATION = (0.40947135433671134, 0.15003469454968454)  # their mean and std of LRC-AR's frames


def team_encoder(weights: dict[str, torch.Tensor]) -> str | None:
    """Which of the team's encoders a state dict (under today's names) holds, or None: not one of theirs."""
    if not any(k.startswith(TEAM_NAMES[0][0]) for k in weights):
        return None
    return next((name for prefix, name in TEAM_ENCODERS.items() if any(k.startswith(prefix) for k in weights)), None)


def team_tokens(vocab: Vocabulary) -> list[str]:
    """The team's token list for this vocabulary's units: their order, by which their rows are numbered."""
    units = [u for u in vocab.itos if u and u not in vocab.specials]
    return [""] + sorted(units, reverse=True) + [" ", "<sos>", "<eos>"]


def team_weights(weights: dict[str, torch.Tensor], vocab: Vocabulary, flag: str, path: Path) -> dict[str, torch.Tensor]:
    """The team's weights under this model's names, their vocabulary-sized rows moved to this vocabulary's ids:
    each unit's to its own, the blank and space to theirs; their <eos> predicts this <sos/eos>, their <sos>
    embeds it; this <unk> takes the row left over (their <sos> as an output, never predicted; their <eos> as an
    input, never read)."""
    tokens, rows = team_tokens(vocab), weights["ctc.ctc_lo.weight"].shape[0]
    if rows != len(tokens):
        raise UserError(f"{flag} {path}: the team's model reads {rows} tokens; with --units {'letters' if vocab.letters_only else 'diacritized'} "
                        f"they are {len(tokens)}. Their models with diacritics have 230, without 41: pass "
                        f"--units {'diacritized' if rows > len(tokens) else 'letters'} (or the --vocab it was trained with).")
    blank, space, unk, sos_eos = (vocab.specials[k] for k in ("<blank>", "<space>", "<unk>", "<sos/eos>"))
    ids = {"": blank, " ": space, **vocab.ids}
    predicts = [ids.get(t, {"<sos>": unk, "<eos>": sos_eos}.get(t)) for t in tokens]
    embeds = [ids.get(t, {"<sos>": sos_eos, "<eos>": unk}.get(t)) for t in tokens]
    moved = {}
    for key, value in weights.items():
        if key.startswith(VOCAB_SIZED):
            order = embeds if key.startswith("decoder.embed.") else predicts
            value = value.new_zeros((vocab.size, *value.shape[1:])).index_copy(0, torch.tensor(order), value)
        for old, new in TEAM_NAMES:
            key = new + key.removeprefix(old) if key.startswith(old) else key
        moved[key] = value
    return moved


def team_checkpoint(weights: dict[str, torch.Tensor], path: Path, cfg: Config) -> dict:
    """One of the team's models as a checkpoint of this tool, to test, decode, serve or export as it is: the base
    preset with its encoder and token set, their normalisation, and their crop (the centre 88 of a 96-pixel
    crop: at --frame-size F, the centre F x 88/96, resized to 88); trained for no epoch here."""
    letters = weights["ctc.ctc_lo.weight"].shape[0] == len(team_tokens(Vocabulary.seed().view("letters")))
    mean, std = TEAM_NORMALISATION
    settings = dataclasses.replace(cfg, arch="conformer", preset="base", frontend="cnn", modality="video",
                                   encoder=team_encoder(weights), units="letters" if letters else "diacritized",
                                   mean=mean, std=std, crop_size=round(cfg.frame_size * 88 / 96), input_size=88)
    vocab = load_vocabulary(settings)
    print(f"{path}: the team's {settings.encoder} model over {vocab.size} tokens ({TEAM_URL}), read with their "
          f"normalisation and crop")
    return {"model": team_weights(weights, vocab, "--checkpoint", path), "config": dataclasses.asdict(settings),
            "vocab": vocab.to_json(), "epoch": 0, "history": []}


def read_weights(path: Path, flag: str) -> tuple[dict[str, torch.Tensor], str, dict[str, list[str]], list[str]]:
    """The state dict in a checkpoint file under today's names, what kind of file it was, the entries that are
    no model weights (by reason), and the Python objects beside them that stood in inert (by name)."""
    state, stood_in = load_torch_file(path, flag, "Give a released model (.pth or .ckpt) or a checkpoint of this "
                                      f"script. {WHERE_TO_GET}", stand_ins=True)
    kind = "state dict"
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state, kind = state["state_dict"], "Lightning checkpoint"
    elif isinstance(state, dict) and isinstance(state.get("model"), dict) and "vocab" in state:
        state, kind = state["model"], "checkpoint of this script"
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path}: the file holds {type(state).__name__}, not a model's weights (a dict of "
                        f"tensors). Give a released model or a checkpoint of this script. {WHERE_TO_GET}")
    weights, dropped, renamed = {}, {}, False
    for key, value in state.items():
        key = key.removeprefix("module.")  # DataParallel's wrapper
        if key.startswith("beam_search."):
            dropped.setdefault("the Lightning module's beam search: a second copy of its decoder", []).append(key)
            continue
        key = key.removeprefix("model.")  # Lightning's ModelModule
        for old, new in OLD_NAMES:
            if key.startswith(old):
                key, renamed = new + key.removeprefix(old), True
        weights[key] = value
    team = team_encoder(weights)
    if team:
        kind = f"the team's {team} model ({weights['ctc.ctc_lo.weight'].shape[0]} tokens; {TEAM_URL})"
    return weights, kind + (" with pre-2025 names" if renamed else ""), dropped, stood_in


def fitting_presets(weights: dict[str, torch.Tensor], cfg: Config, vocab_size: int) -> list[str]:
    """The presets whose shapes match the weights (vocabulary-sized layers aside), tried on the meta device."""
    fits = []
    for preset in PRESETS:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in build_model(dataclasses.replace(cfg, preset=preset),
                                                          vocab_size).state_dict().items()}
        if all(shapes[k] == v.shape for k, v in weights.items() if k in shapes and not k.startswith(VOCAB_SIZED)):
            fits.append(preset)
    return fits


def shape_problem(flag: str, path: Path, wrong: list[str], weights: dict, own: dict, cfg: Config) -> UserError:
    key = wrong[0]
    fits = fitting_presets(weights, cfg, own["ctc.ctc_lo.weight"].shape[0])
    heard = "frontend.trunk.conv1.weight" in weights  # the 1-D stem that reads waveforms
    if heard and cfg.modality != "audio":
        hint = ("It is an audio model: train with --modality audio, give it to --init-from-audio with --modality "
                "av, or start this model from a video model (visper_vsr_base.pth, vsr_*.pth).")
    elif not heard and cfg.modality == "audio" and any(k.startswith("frontend.frontend3D.") for k in weights):
        hint = ("It is a video model: train with --modality video or av, or start this model from one of "
                "Auto-AVSR's audio models (asr_*.pth).")
    elif fits:
        hint = f"Its shapes are those of --preset {fits[0]}: train with --preset {fits[0]}."
    else:
        hint = "No preset of this script has its shapes; leave the parts that differ out of --init-parts."
    return UserError(f"{flag} {path} does not fit --preset {cfg.preset}: {len(wrong)} weights differ in shape, "
                     f"e.g. {key}: {tuple(weights[key].shape)} there, {tuple(own[key].shape)} here. {hint}")


def loaded_parts(cfg: Config) -> list[str]:
    """--init-parts, or by default every part a released file can fill (a non-CNN frontend has none of its)."""
    return part_names(cfg.init_parts) or [p for p in parts_of(cfg) if p != "frontend" or cfg.frontend == "cnn"]


def choose_weights(weights: dict, own: dict, parts: list[str], cfg: Config):
    """-> the weights that load, those skipped (by reason) and those whose shapes are wrong. By default a decoder
    that does not fit is skipped (its file's decoder may be another size); a frontend or encoder that does not
    fit means another preset, and named --init-parts must fit."""
    chosen, skipped, wrong = {}, {}, []
    for key, value in weights.items():
        part = key.split(".")[0]
        if key not in own:
            why = ("the sound side of an audio-visual model (--modality av uses it)" if part in SOUND_SIDE
                   else "not a weight of this model")
            skipped.setdefault(why, []).append(key)
        elif part not in parts:
            skipped.setdefault(f"not among the parts loaded ({', '.join(parts)})", []).append(key)
        elif value.shape == own[key].shape:
            chosen[key] = value
        elif key.startswith(VOCAB_SIZED):
            why = f"vocabulary-sized: {value.shape[0]} units there, {own[key].shape[0]} here"
            skipped.setdefault(why, []).append(key)
        elif part == "decoder" and not cfg.init_parts:
            skipped.setdefault("the decoder's shapes differ (another size): it starts afresh", []).append(key)
        else:
            wrong.append(key)
    return chosen, skipped, wrong


def load_pretrained(model: nn.Module, cfg: Config, vocab: Vocabulary | None = None) -> dict:
    """--init-from and --init-from-audio into `model`: every weight of the parts chosen whose shape fits. -> by
    setting, what was loaded, skipped (with the reason) and missing, also printed and written to
    <work_dir>/diagnostics/init_from.txt (init_from_audio.txt)."""
    if cfg.arch != "conformer":
        raise UserError("--init-from loads Auto-AVSR's or ViSpeR's weights, which fit --arch conformer; the "
                        "baseline has none of their parts.")
    reports = {}
    if cfg.init_from:
        reports["init_from"] = load_weights_file(model, cfg, "init_from", loaded_parts(cfg), lambda key: key,
                                                 vocab or load_vocabulary(cfg))
    if cfg.init_from_audio:
        reports["init_from_audio"] = load_weights_file(model, cfg, "init_from_audio", list(SOUND_SIDE[:3]),
                                                       sound_side_name, vocab or load_vocabulary(cfg))
    return reports


def sound_side_name(key: str) -> str:
    """An audio model's encoder weights under the audio-visual model's names for its sound side."""
    return "aux_" + key if key.startswith(("frontend.", "proj_encoder.", "encoder.")) else key


def load_weights_file(model: nn.Module, cfg: Config, name: str, parts: list[str], rename, vocab: Vocabulary) -> dict:
    """The file of setting `name` into the `parts` of `model`, its keys renamed by `rename`; reported."""
    flag = "--" + name.replace("_", "-")
    path = find_given(getattr(cfg, name), flag, WHERE_TO_GET, Path(cfg.work_dir))
    weights, kind, skipped, objects = read_weights(path, flag)
    team = team_encoder(weights)
    if team and team != cfg.encoder:
        raise UserError(f"{flag} {path} is the team's model with the {team} encoder: train it with --encoder {team} "
                        "--preset base.")
    if team:
        weights = team_weights(weights, vocab, flag, path)
    weights = {rename(k): v for k, v in weights.items()}
    own = model.state_dict()
    chosen, more, wrong = choose_weights(weights, own, parts, cfg)
    for why, keys in more.items():
        skipped.setdefault(why, []).extend(keys)
    if wrong:
        raise shape_problem(flag, path, wrong, weights, own, cfg)
    if not chosen:
        raise UserError(f"{flag} {path}: none of its {len(weights)} weights (e.g. {', '.join(list(weights)[:3])}) "
                        f"is one of this model's parts ({', '.join(parts)}). Is it a model of another kind "
                        f"(video, audio, audio-visual)?")
    model.load_state_dict(chosen, strict=False)
    missing = [k for k in own if k.split(".")[0] in parts and k not in weights]
    report = {"file": str(path), "kind": kind, "loaded": dict(Counter(k.split(".")[0] for k in chosen)),
              "values": sum(v.numel() for v in chosen.values()), "skipped": skipped, "missing": missing,
              "objects": objects}
    write_init_report(report, flag, Path(cfg.work_dir) / "diagnostics" / f"{name}.txt")
    return report


def write_init_report(report: dict, flag: str, path: Path) -> None:
    """A summary printed; every key named in the file."""
    by_part = lambda keys: ", ".join(f"{p} {n}" for p, n in Counter(k.split(".")[0] for k in keys).items())
    head = [f"{flag} {report['file']} ({report['kind']}): {sum(report['loaded'].values())} weights loaded "
            f"({', '.join(f'{p} {n}' for p, n in report['loaded'].items())}; {report['values']:,} values)"]
    head += [f"  skipped {len(keys)}, {why}: {by_part(keys)}" for why, keys in report["skipped"].items()]
    if report["objects"]:  # a Lightning checkpoint's settings, say: what the file names is never called
        head.append(f"  not built: the Python objects the file names beside its weights ({', '.join(report['objects'])}); "
                    "nothing of them ran")
    head.append(f"  missing {len(report['missing'])} (they keep their random start): {by_part(report['missing'])}"
                if report["missing"] else "  missing: none")
    print("\n".join(head))
    detail = head + [""] + [f"skipped ({why}): {k}" for why, keys in report["skipped"].items() for k in keys]
    detail += [f"missing: {k}" for k in report["missing"]]
    write_text(path, "\n".join(detail) + "\n")


class EncoderForExport(nn.Module):
    """What the ONNX file computes: normalised frames (B x T x H x W, as evaluation feeds the model: the center
    crop, /255, mean and std of the settings) and/or normalised sound (B x T*640, each clip to zero mean and unit
    variance), and the lengths in frames -> the encoder's output (B x T x d) and CTC log-probabilities (B x T x V;
    their greedy path is a transcript)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        *x, lengths = inputs
        enc, _ = self.model.encode(x[0] if len(x) == 1 else tuple(x), lengths)
        return enc, self.model.ctc(enc).log_softmax(-1)


def export_inputs(cfg: Config) -> dict[str, torch.Tensor]:
    """Example inputs the exporter traces with, by name, the modality's own."""
    named = {"video": torch.zeros(2, 30, cfg.input_size, cfg.input_size),
             "audio": torch.randn(2, 30 * SAMPLES_PER_FRAME), "lengths": torch.tensor([30, 20])}
    return {k: v for k, v in named.items() if k == "lengths" or cfg.modality in (k, "av")}


def export_onnx(model: nn.Module, cfg: Config, path: Path) -> None:
    """The encoder as ONNX, for any batch size and clip length, through torch's exporter."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it and says so less plainly)
    except ImportError as e:
        raise UserError("ONNX export needs the onnx and onnxscript packages: `pip install onnx onnxscript`.") from e
    from torch.nn.attention import SDPBackend, sdpa_kernel
    inputs = export_inputs(cfg)
    batch, frames = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("frames", min=2, max=100_000)
    axes = {"video": {0: batch, 1: frames}, "audio": {0: batch, 1: SAMPLES_PER_FRAME * frames}, "lengths": {0: batch}}
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():  # the fused kernels' layouts trip the exporter
        warnings.simplefilter("ignore")  # its notes on axis names and deprecations ask nothing of whoever exports
        program = torch.onnx.export(EncoderForExport(model).eval(), tuple(inputs.values()), dynamo=True,
                                    verbose=False, input_names=list(inputs),
                                    output_names=["encoder_out", "ctc_log_probs"],
                                    dynamic_shapes=(tuple(axes[k] for k in inputs),))  # forward(*inputs)
    atomic_write(path, program.save)


# Mixed precision ---------------------------------------------------------------------------------------------

def amp_dtype(device: torch.device, cfg: Config):
    """bf16 where the GPU has it (compute capability 8+), fp16 where not (T4, P100), none on CPU; --amp fp16 on
    a newer GPU runs as a T4 would."""
    if cfg.amp == "off" or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if cfg.amp == "bf16" and major < 8:
        raise UserError(f"--amp bf16: the {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                        "has no bf16 arithmetic; use --amp fp16 (or auto, which picks it here).")
    return torch.bfloat16 if cfg.amp == "bf16" or (cfg.amp == "auto" and major >= 8) else torch.float16


def autocast(device: torch.device, cfg: Config):
    dtype = amp_dtype(device, cfg)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------------------
# 6. Loss: Auto-AVSR's joint objective, w * CTC + (1 - w) * label-smoothed attention, both summed / batch.
# ---------------------------------------------------------------------------------------------------------

IGNORE = -1  # target padding, as in ESPnet


def decoder_io(targets: list[list[int]], sos_eos: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: input [sos] + y padded with eos, output y + [eos] padded with IGNORE."""
    longest = max(len(t) for t in targets) + 1
    ys_in = torch.full((len(targets), longest), sos_eos, dtype=torch.long)
    ys_out = torch.full((len(targets), longest), IGNORE, dtype=torch.long)
    for b, t in enumerate(targets):
        ys_in[b, 1:len(t) + 1] = torch.tensor(t, dtype=torch.long)
        ys_out[b, :len(t) + 1] = torch.tensor(t + [sos_eos], dtype=torch.long)
    return ys_in.to(device), ys_out.to(device)


def ctc_loss(ctc_logits: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]], blank: int):
    log_probs = ctc_logits.float().log_softmax(-1).transpose(0, 1)
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    loss = F.ctc_loss(log_probs, flat, lengths.cpu(), target_lengths, blank=blank, reduction="sum",
                      zero_infinity=True)
    return loss / len(targets)


def attention_loss(dec_logits: torch.Tensor, ys_out: torch.Tensor, smoothing: float) -> torch.Tensor:
    """KL divergence to a smoothed target (1 - s on the token, s / (V - 1) on every other), as ESPnet."""
    log_probs = dec_logits.float().log_softmax(-1)
    vocab_size = log_probs.size(-1)
    keep = ys_out != IGNORE
    target_lp = log_probs.gather(-1, ys_out.clamp(min=0)[..., None])[..., 0]
    confidence, spread = 1.0 - smoothing, smoothing / (vocab_size - 1)
    xlogx = lambda p: p * math.log(p) if p > 0 else 0.0
    entropy_term = xlogx(confidence) + (vocab_size - 1) * xlogx(spread)
    cross = confidence * target_lp + spread * (log_probs.sum(-1) - target_lp)
    return ((entropy_term - cross) * keep).sum() / ys_out.size(0)


def ctc_weight_ranges(schedule: str, epochs: int) -> list[tuple[int, int, float, float]]:
    """--ctc-weight-schedule as (first epoch, last epoch, weight at the first, weight at the last) ranges: `a-b:w`
    holds w over epochs a..b, `a-b:w>v` goes linearly from w to v, `a-:...` runs to --epochs, `a:w` is one epoch.
    Raises ValueError saying which part is wrong."""
    ranges = []
    for part in (p.strip() for p in schedule.split(",") if p.strip()):
        span, colon, value = part.partition(":")
        first, dash, last = span.partition("-")
        start, _, end = value.partition(">")
        try:
            first = int(first)
            last = int(last) if last.strip() else max(epochs, first) if dash else first
            start = float(start)
            end = float(end) if end.strip() else start
        except ValueError:
            raise ValueError(f"{part!r} is not EPOCHS:WEIGHT (e.g. 1-20:0.7, 41-:0.4>0.2)") from None
        if not colon or not 1 <= first <= last:
            raise ValueError(f"{part!r}: epochs count from 1, a range from low to high, then ':' and the weight")
        if not (0 <= start <= 1 and 0 <= end <= 1):
            raise ValueError(f"{part!r}: a CTC weight lies in [0, 1]")
        if any(first <= b and a <= last for a, b, _, _ in ranges):
            raise ValueError(f"{part!r} overlaps an earlier range")
        ranges.append((first, last, start, end))
    return ranges


def ctc_weight_at(cfg: Config, epoch: int) -> float:
    """The CTC weight of the loss in `epoch` (counted from 1): the schedule's where it has the epoch, else --ctc-weight."""
    for first, last, start, end in ctc_weight_ranges(cfg.ctc_weight_schedule, cfg.epochs):
        if first <= epoch <= last:
            return start + (end - start) * (epoch - first) / max(last - first, 1)
    return cfg.ctc_weight


def at_epoch(cfg: Config, epoch: int) -> Config:
    """The settings that train `epoch`: the same, with that epoch's CTC weight."""
    return dataclasses.replace(cfg, ctc_weight=ctc_weight_at(cfg, epoch))


def ctc_share(ctc: float, att: float, cfg: Config) -> float:
    """CTC's weighted part of the joint objective (the rest is attention's)."""
    weighted_ctc = cfg.ctc_weight * ctc
    return weighted_ctc / max(weighted_ctc + (1 - cfg.ctc_weight) * att, 1e-12)


@dataclass
class SoftTargets:
    """A teacher's posteriors for one batch (TeacherTargets.batch): log-probs at the temperature per frame (CTC)
    and per label position (decoder), with where each is known."""
    ctc: torch.Tensor  # B x T x V
    ctc_known: torch.Tensor  # B x T
    dec: torch.Tensor | None  # B x (L + 1) x V: each unit of the label, then the end
    dec_known: torch.Tensor | None


def distillation(logits: torch.Tensor, teacher: torch.Tensor, known: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened posteriors, summed over the known frames or positions / batch, x
    the temperature squared (Hinton et al.: the gradients keep their size as the temperature changes)."""
    student = (logits.float() / temperature).log_softmax(-1)
    n = min(student.size(1), teacher.size(1))
    kl = (teacher[:, :n].exp() * (teacher[:, :n] - student[:, :n])).sum(-1)
    return (kl * known[:, :n]).sum() / len(logits) * temperature ** 2


def joint_loss(model: nn.Module, enc, mask, ctc_logits, lengths, targets, vocab: Vocabulary, cfg: Config,
               soft: SoftTargets | None = None) -> dict:
    """{'loss', 'ctc', 'att'} from the encoder's output; a CTC-only model (the baseline) has att = 0. With a
    teacher's `soft` targets, also 'kd' (its CTC and decoder terms weighted as the labels' are), and the loss is
    (1 - --teacher-weight) x the labels' + --teacher-weight x kd."""
    ctc = ctc_loss(ctc_logits, lengths, targets, vocab.blank)
    dec_logits, w = None, 1.0
    parts = {"loss": ctc, "ctc": ctc, "att": ctc.new_zeros(())}
    if model.decoder is not None:
        ys_in, ys_out = decoder_io(targets, vocab.sos_eos, enc.device)
        dec_logits, w = model.decoder(ys_in, enc, mask), cfg.ctc_weight
        att = attention_loss(dec_logits, ys_out, cfg.label_smoothing)
        parts.update(loss=w * ctc + (1 - w) * att, att=att)
    if soft is not None:
        kd = w * distillation(ctc_logits, soft.ctc, soft.ctc_known, cfg.teacher_temperature)
        if dec_logits is not None and soft.dec is not None:
            kd = kd + (1 - w) * distillation(dec_logits, soft.dec, soft.dec_known, cfg.teacher_temperature)
        parts.update(loss=(1 - cfg.teacher_weight) * parts["loss"] + cfg.teacher_weight * kd, kd=kd)
    return parts


# ---------------------------------------------------------------------------------------------------------
# 7. Decoding and scoring: greedy CTC, greedy attention and the joint CTC/attention beam search, each over a
#    whole batch of clips at once; CER, WER, per-clip CER.
# ---------------------------------------------------------------------------------------------------------


def greedy_ctc(ctc_logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[tuple[list[int], float]]:
    """The best label of every frame, repeats merged and blanks dropped; scored by its path's log-prob."""
    best_lp, best = ctc_logits.float().log_softmax(-1).max(-1)
    out = []
    for b, n in enumerate(lengths.tolist()):
        path = best[b, :n].tolist()
        out.append(([t for i, t in enumerate(path) if t != blank and (i == 0 or t != path[i - 1])],
                    float(best_lp[b, :n].sum())))
    return out


@torch.no_grad()
def greedy_attention(model: nn.Module, enc, mask, lengths, sos_eos: int) -> list[tuple[list[int], float]]:
    """The decoder's best next token, step by step for all clips at once, up to one token a frame."""
    n = enc.size(0)
    tokens = torch.full((n, 1), sos_eos, dtype=torch.long, device=enc.device)
    score = torch.zeros(n, device=enc.device)
    done = torch.zeros(n, dtype=torch.bool, device=enc.device)
    cache = model.decoder.start(enc, mask, n, int(lengths.max()))
    for step in range(int(lengths.max())):
        best_lp, token = model.decoder.step(tokens[:, -1], step, cache).float().max(-1)
        score += best_lp.masked_fill(done | (step >= lengths), 0.0)
        token = token.masked_fill(done, sos_eos)
        tokens = torch.cat([tokens, token[:, None]], 1)
        done |= token == sos_eos
        if done.all():
            break
    out = []
    for row, n_frames, sc in zip(tokens[:, 1:].tolist(), lengths.tolist(), score.tolist()):
        out.append(((row[:row.index(sos_eos)] if sos_eos in row else row)[:n_frames], sc))
    return out


# Joint CTC/attention beam search -----------------------------------------------------------------------------
# Auto-AVSR's search (ESPnet's BatchBeamSearch with CTCPrefixScorer) gives each clip its own search; here one
# search runs a whole batch: rows are (clip, beam slot) pairs, a free slot carries the score -inf.

LOGZERO = -1e10  # ESPnet's log(0): finite, so impossible tokens keep comparable (and identical) scores


def ctc_log_probs(model: nn.Module, enc: torch.Tensor, lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """B x T x V log-probs; past a clip's end only blank is possible (at no cost), so the prefix recursion
    runs through the padding without changing a clip's scores."""
    lp = model.ctc(enc).float().log_softmax(-1)
    pad = torch.arange(lp.size(1), device=lp.device)[None] >= lengths.to(lp.device)[:, None]
    lp = lp.masked_fill(pad[..., None], LOGZERO)
    lp[..., blank] = lp[..., blank].masked_fill(pad, 0.0)
    return lp


def end_detected(best_at: dict[int, float], step: int, m: int = 3, d_end: float = -10.0) -> bool:
    """ESPnet's end detection: the best hypotheses that ended in each of the last m steps all score d_end or
    more below the best ended so far. `best_at`: a clip's best ended score by length (with sos and eos)."""
    if not best_at:
        return False
    best = max(best_at.values())
    return all(length in best_at and best_at[length] - best < d_end for length in range(step, step - m, -1))


class Beams:
    """The search state of a batch of clips, K rows per clip (row = clip * K + slot)."""

    def __init__(self, lp, lengths, beam: int, sos: int, blank: int, decoder_cache: DecoderCache | None):
        """lp: clips x V x T CTC log-probs."""
        n, k = lp.size(0), beam
        self.k, self.clips = k, torch.arange(n)  # clips: each live clip's position in the caller's batch
        self.lp, self.lengths, self.cache = lp, lengths.cpu(), decoder_cache
        self.row_clip = torch.arange(n, device=lp.device).repeat_interleave(k)
        self.tokens = torch.full((n * k, 1), sos, dtype=torch.long, device=lp.device)
        self.score = torch.full((n, k), -math.inf, device=lp.device)
        self.score[:, 0] = 0.0  # one hypothesis (sos) to start from
        # each row's forward variables, time-major: T x rows x (non-blank, blank ending); the empty prefix is
        # complete at t with the probability of t + 1 blanks
        r = lp.new_full((lp.size(2), n * k, 2), LOGZERO)
        r[..., 1] = lp[:, blank].cumsum(1).repeat_interleave(k, 0).t()
        self.set_forward(r)
        # each clip's CTC probabilities as ctc_prefix_scores multiplies them: clips x T x V, scaled per token
        self.peak = lp.double().max(2).values
        self.probs = (lp.double() - self.peak[..., None]).exp().transpose(1, 2).contiguous()
        self.psi = lp.new_zeros(n * k)  # the CTC prefix score of each row's prefix
        self.order = None  # the cache row each hypothesis continues (None: its own; continue_from)
        self.where = None  # each cache row's hypothesis (place)
        self.cached = None  # each hypothesis's row in the decoder cache (decoder_scores)
        self.lm_state = self.lm_next = None  # the language model's LSTM state after each row's prefix, and after
        # each row's prefix and its last token once scored (lm_scores)

    def set_forward(self, r: torch.Tensor) -> None:
        """r: the rows' forward variables; `complete`, T x rows: the probability that a row's prefix is complete
        at t, by either ending."""
        self.r, self.complete = r, torch.logaddexp(r[..., 0], r[..., 1])

    def keep(self, live: torch.Tensor) -> None:
        """Drop finished clips (live: bool per current clip), and the frames no live clip has."""
        live = live.to(self.lp.device)
        rows = live.repeat_interleave(self.k)
        T = int(self.lengths[live.cpu()].max())
        self.clips, self.lengths = self.clips[live.cpu()], self.lengths[live.cpu()]
        self.lp, self.score = self.lp[live, :, :T], self.score[live]
        self.probs, self.peak = self.probs[live, :T], self.peak[live]
        self.row_clip = torch.arange(len(self.clips), device=self.lp.device).repeat_interleave(self.k)
        self.tokens, self.psi = self.tokens[rows], self.psi[rows]
        self.set_forward(self.r[:T, rows])
        if self.lm_state is not None:
            self.lm_state = tuple(x[:, rows] for x in self.lm_state)
        if self.cache is not None:
            self.cache.keep_clips(live, T)
            self.continue_from(rows.nonzero().flatten())

    def continue_from(self, rows: torch.Tensor) -> None:
        """The hypotheses now go on from these rows of the previous layout."""
        self.order = rows if self.order is None else self.order[rows]

    def place(self, rows: torch.Tensor) -> torch.Tensor:
        """The hypotheses `rows` (their rows in the clips x beam layout) take rows of the decoder cache: the
        first to go on from a cached row takes that row where it fits, the others the rows left free, with a
        copy of their past. So only a few rows are copied (a quarter, in a trained base model's search), not
        all. -> each one's cache row."""
        order, n = self.order, len(rows)
        asked = torch.arange(n, device=rows.device)
        place = asked
        if self.cache.length:
            first = torch.full((self.cache.rows,), n, device=rows.device).scatter_reduce_(0, order, asked, "amin")
            stays = (order < n) & (first[order] == asked)
            taken = torch.zeros(n, dtype=torch.bool, device=rows.device).index_fill_(0, order[stays], True)
            moves = (~stays).nonzero().flatten()
            place = torch.where(stays, order, 0).index_copy_(0, moves, (~taken).nonzero().flatten())
            self.cache.copy_rows(place[moves], order[moves])
        self.where, self.order = torch.empty_like(rows).index_copy_(0, place, rows), None
        return place


def time_shifted(x: torch.Tensor, first: float) -> torch.Tensor:
    """T x R -> each frame's value at the frame before, `first` at frame 0."""
    return torch.cat([x.new_full((1, x.size(1)), first), x[:-1]])


def ctc_prefix_scores(beams: "Beams", step: int) -> torch.Tensor:
    """R x V CTC prefix scores of every row's prefix extended by each token: psi = log sum_t phi[t-1] p_t(token),
    phi the probability that the prefix is complete at t-1 (for a repeated token, only by its blank-ending
    paths: a repeat must pass through a blank). No recursion over time: the sum over t for all tokens of a clip's
    rows is one matrix product in probability space (float64, each row and token scaled by its largest value,
    so that only values some 700 nats below both peaks underflow, to LOGZERO)."""
    first = 0.0 if step == 0 else LOGZERO  # the empty prefix is complete before the first frame
    phi = time_shifted(beams.complete, first).double()
    scale = phi.max(0).values
    n, T, V = beams.probs.shape
    summed = torch.bmm((phi - scale).exp().t().reshape(n, beams.k, T), beams.probs).log_()
    psi = (summed + beams.peak[:, None]).view(-1, V).add_(scale[:, None]).clamp_(min=LOGZERO).float()
    last = beams.tokens[:, -1]
    rows = torch.arange(len(last), device=last.device)
    repeat = time_shifted(beams.r[..., 1], first) + beams.lp[beams.row_clip, last].t()
    psi[rows, last] = repeat.logsumexp(0)
    return psi


def ctc_extended(beams: "Beams", parent: torch.Tensor, token: torch.Tensor, step: int, blank: int) -> torch.Tensor:
    """T x R x 2 forward variables (non-blank, blank ending) of each parent's prefix extended by its token:
    ESPnet's recursion, run for the R chosen extensions alone rather than for every candidate, each frame's two
    ends written in place (a closed form by cumulative logsumexp, and stacking the ends, each took longer)."""
    phi = torch.where((token == beams.tokens[parent, -1])[None], beams.r[:, parent, 1], beams.complete[:, parent])
    clip = beams.row_clip[parent]
    x_token, x_blank = beams.lp[clip, token].t(), beams.lp[clip, blank].t()  # T x R each
    T, start = x_token.size(0), max(step, 1)  # a prefix of step + 1 units cannot end before frame `step`
    n, b = (x_token.new_full((T, len(token)), LOGZERO) for _ in range(2))  # frame-major: a frame's row is one block
    if step == 0:
        n[0] = x_token[0]
    for t in range(start, T):
        torch.logaddexp(n[t - 1], phi[t - 1], out=n[t]).add_(x_token[t])
        torch.logaddexp(n[t - 1], b[t - 1], out=b[t]).add_(x_blank[t])
    return torch.stack([n, b], -1)


# A language model's term (--lm) ------------------------------------------------------------------------------
# ESPnet's `lm` scorer beside `decoder` and `ctc`: each row's next-unit log-probs from a model of text alone,
# weighted by --lm-weight, summed in before the pre-beam picks the CTC's candidates.

LM_FILE = "lm.pt"


@dataclasses.dataclass
class LanguageModel:
    """A loaded --lm: the model (NgramLM or UnitLM), its weight in the search and the file it came from."""
    model: nn.Module
    weight: float
    path: Path


def read_lm(path: Path, vocab: Vocabulary) -> tuple[nn.Module, dict]:
    """The model in an lm.pt of --mode lm (an NgramLM or a UnitLM), and the file's other entries; refused
    unless its units are the vocabulary's, in the same order."""
    saved, _ = load_torch_file(path, "--lm", "Train one with --mode lm.", mmap=True)  # an n-gram's tables: as read
    kinds = {"ngram": {"order"}, "lstm": {"model", "dims"}}
    if not isinstance(saved, dict) or "vocab" not in saved or not kinds.get(saved.get("kind"), {None}) <= saved.keys() \
            or saved["kind"] == "ngram" and not {"tables", "sentences"} & saved.keys():
        raise UserError(f"--lm {path}: not a language model of --mode lm.")
    units = Vocabulary.from_json(saved["vocab"]).itos
    if units != vocab.itos:
        raise UserError(f"--lm {path} was trained over {len(units)} units, this model reads {vocab.size}"
                        + (" (the same number, other units or order)" if len(units) == vocab.size else "")
                        + ": train the language model with this run's vocabulary (--mode lm --work-dir RUN).")
    if saved["kind"] == "ngram":
        if "tables" not in saved:  # an lm.pt of a version before 2026-12-07 kept its sentences, to be counted anew
            print(f"--lm {path}: counting its sentences (written by an earlier version; --mode lm again saves the "
                  "counts, read at once)")
            saved["tables"] = ngram_tables(saved["sentences"], saved["order"], len(units), vocab.sos_eos)
        return NgramLM(saved["tables"], saved["order"], len(units), vocab.sos_eos, saved["discount"]), saved
    lm = UnitLM(len(units), **saved["dims"])
    lm.load_state_dict(saved["model"])
    return lm.eval(), saved


def load_lm(cfg: Config, vocab: Vocabulary, device) -> LanguageModel | None:
    """--lm, as given or found by name (on Kaggle under /kaggle/input), at --lm-weight."""
    if not cfg.lm:
        return None
    path = find_given(cfg.lm, "--lm", "Train one with --mode lm.", Path(cfg.work_dir), Path(cfg.work_dir) / "lm")
    lm, saved = read_lm(path, vocab)
    weight = cfg.lm_weight
    print(f"language model {path} (validation perplexity {saved.get('val_perplexity', float('nan')):.2f}) "
          f"at weight {weight:g} in the beam search")
    return LanguageModel(lm.to(device), weight, path)


def search_lm(cfg: Config, vocab: Vocabulary, device) -> LanguageModel | None:
    """--lm for the beam search; with a greedy --decoder it has nothing to score, which is said."""
    if cfg.lm and cfg.decoder != "beam":
        print(f"warning: --lm counts in the beam search only; --decoder {cfg.decoder} does without it.")
        return None
    return load_lm(cfg, vocab, device)


def search_ctc_weight(model: nn.Module, cfg: Config) -> float:
    return 1.0 if model.decoder is None else cfg.beam_ctc_weight  # a CTC-only model gets a CTC prefix search


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """One search's weights and pruning, as ESPnet chooses them."""
    ctc_weight: float  # 1: a CTC prefix search (a model without a decoder); 0: the decoder alone
    lm_weight: float
    pre_beam: int  # the CTC scores the best pre_beam tokens of each row by the other scores (0: every token)

    @property
    def use_decoder(self) -> bool:
        return self.ctc_weight < 1

    @property
    def use_ctc(self) -> bool:
        return self.ctc_weight > 0


def search_settings(model: nn.Module, cfg: Config, vocab_size: int, lm=None) -> SearchSettings:
    """ESPnet's choices: no pre-beam without a decoder (a language model does not bring one), or when the
    pre-beam would hold the whole vocabulary."""
    w = search_ctc_weight(model, cfg)
    pre_beam = int(1.5 * cfg.beam_size)
    return SearchSettings(w, lm.weight if lm else 0.0, pre_beam if w < 1 and pre_beam < vocab_size else 0)

def decoder_scores(model, beams: Beams, step: int) -> torch.Tensor:
    """The decoder's R x V log-probs of every row's next token, computed for the live rows alone (0 for the
    others): at the first step a clip's beam holds one hypothesis, and a slot freed by one that ended stays
    empty for a step. The cache keeps the computed rows only, each in the place it gave (`beams.cached`)."""
    rows = (beams.score.view(-1) > -math.inf).nonzero().flatten()
    beams.continue_from(rows)
    place = beams.place(rows)
    log_probs = model.decoder.step(beams.tokens[beams.where, -1], step, beams.cache, beams.where, len(beams.tokens))
    beams.cached = torch.zeros_like(beams.row_clip).index_copy_(0, rows, place)
    if len(rows) == len(beams.tokens) and torch.equal(beams.where, rows):
        return log_probs  # every row live and in its own place: nothing to scatter
    return log_probs.new_zeros(len(beams.tokens), log_probs.size(1)).index_copy_(0, beams.where, log_probs)


def lm_scores(lm: nn.Module, beams: Beams) -> torch.Tensor:
    """The language model's R x V log-probs of every row's next token: one step on each row's last token from
    the state after the rest of its prefix."""
    log_probs, beams.lm_next = lm(beams.tokens[:, -1:], beams.lm_state)
    return log_probs[:, 0]


def joint_scores(model, beams: Beams, search: SearchSettings, cfg: Config, vocab: Vocabulary, step: int, lm=None):
    """Every row's total score for each next token, summed in ESPnet's order (decoder, language model, length
    bonus, CTC, the row's own score), and the CTC prefix scores (R x V; None without CTC). The pre-beam, as
    ESPnet's, picks the CTC's candidates by the sum before CTC."""
    R, V, device = beams.tokens.size(0), vocab.size, beams.lp.device
    weighted = torch.zeros(R, V, device=device)
    if search.use_decoder:
        weighted += (1 - search.ctc_weight) * decoder_scores(model, beams, step).float()
    if lm is not None:
        weighted += search.lm_weight * lm_scores(lm, beams)
    if cfg.length_bonus:
        weighted += cfg.length_bonus
    psi = None
    if search.use_ctc:
        psi = ctc_prefix_scores(beams, step)
        if search.pre_beam:  # ESPnet scores the pre-beam's candidates only; the others are impossible to CTC
            ids = weighted.topk(search.pre_beam, -1, sorted=False).indices
            psi = torch.full_like(psi, LOGZERO).scatter_(1, ids, psi.gather(1, ids))
        ends = beams.lengths.to(device)[beams.row_clip] - 1  # eos: every path of the prefix, to the clip's end
        psi[:, vocab.sos_eos] = beams.complete[ends, torch.arange(R, device=device)]
        psi[:, vocab.blank] = LOGZERO
        weighted += search.ctc_weight * (psi - beams.psi[:, None])
    return weighted + beams.score.view(R, 1), psi


def record_ended(ended: list, best_at: list, rows: list[int], beams: Beams, parent, token, score, last_step,
                 eos: int) -> None:
    """Add the hypotheses of `rows` that have just finished to their clip's list, (score, length, tokens), and
    keep each clip's best by length (end_detected)."""
    tokens = torch.cat([beams.tokens[parent, 1:], token[:, None]], 1)[rows].tolist()
    for row, seq, value in zip(rows, tokens, score.view(-1)[rows].tolist()):
        clip = row // beams.k
        # at a clip's last step eos is appended to every hypothesis, even to one that has just chosen it
        length, c = len(seq) + 1 + bool(last_step[clip]), int(beams.clips[clip])
        ended[c].append((value, length, [t for t in seq if t != eos]))
        best_at[c][length] = max(value, best_at[c].get(length, -math.inf))


def advance(beams: Beams, parent, token, score, done_row, psi, step: int, blank: int) -> None:
    """Move the beams to the chosen extensions; finished ones free their slots."""
    if psi is not None:
        beams.set_forward(ctc_extended(beams, parent, token, step, blank))
        beams.psi = psi[parent, token]
    beams.tokens = torch.cat([beams.tokens[parent], token[:, None]], 1)
    beams.score = score.masked_fill(done_row.view(score.shape), -math.inf)
    if beams.lm_next is not None:
        beams.lm_state = tuple(x[:, parent] for x in beams.lm_next)
    if beams.cache is not None:
        beams.continue_from(beams.cached[parent])


@torch.no_grad()
def beam_search_batch(model, enc, mask, lengths, vocab: Vocabulary, cfg: Config,
                      lm: LanguageModel | None = None) -> list[list[tuple[list[int], float]]]:
    """The n-best (tokens, score) of each clip, best first, by Auto-AVSR's joint CTC/attention search (with a
    language model's term where one is given)."""
    search = search_settings(model, cfg, vocab.size, lm)
    K, V, eos = cfg.beam_size, vocab.size, vocab.sos_eos
    lengths = lengths.cpu()
    max_len = lengths if cfg.max_length_ratio == 0 else (lengths * cfg.max_length_ratio).long().clamp(min=1)
    min_len = (lengths * cfg.min_length_ratio).long()
    beams = Beams(ctc_log_probs(model, enc, lengths, vocab.blank).transpose(1, 2).contiguous(), lengths, K, eos, vocab.blank,
                  model.decoder.start(enc, mask, len(lengths) * K, int(max_len.max())) if search.use_decoder else None)
    ended: list[list[tuple[float, int, list[int]]]] = [[] for _ in lengths]  # (score, length, tokens) per clip
    best_at: list[dict[int, float]] = [{} for _ in lengths]  # per clip: length -> best ended score
    for step in range(int(max_len.max())):
        weighted, psi = joint_scores(model, beams, search, cfg, vocab, step, lm and lm.model)
        weighted[(step < min_len[beams.clips]).repeat_interleave(K).to(weighted.device), eos] = -math.inf
        score, flat = weighted.view(-1, K * V).topk(K, -1)
        parent = (flat // V + torch.arange(len(beams.clips), device=flat.device)[:, None] * K).view(-1)
        token = (flat % V).view(-1)
        last_step = step == max_len[beams.clips] - 1
        done_row = (token == eos) | last_step.repeat_interleave(K).to(token.device)
        finished = (done_row & (score.view(-1) > -math.inf)).nonzero().flatten().tolist()
        if finished:
            record_ended(ended, best_at, finished, beams, parent, token, score, last_step, eos)
        advance(beams, parent, token, score, done_row, psi, step, vocab.blank)
        emptied = (beams.score.max(1).values == -math.inf).cpu()  # one transfer a step, not one a clip
        live = torch.tensor([not (last_step[j] or emptied[j] or
                                  (cfg.max_length_ratio == 0 and end_detected(best_at[c], step)))
                             for j, c in enumerate(beams.clips.tolist())])
        if not live.any():
            break
        if not live.all():
            beams.keep(live)
    return [[(seq, score) for score, _, seq in sorted(e, key=lambda h: -h[0])[:cfg.nbest]] for e in ended]


BEAM_MEMORY = 2 ** 30  # bytes one beam search may hold in its largest tensors


def beam_chunk_clips(model: nn.Module, cfg: Config, vocab_size: int, frames: int,
                     lm: LanguageModel | None = None) -> int:
    """Clips searched at once: the CTC's scaled probabilities (float64, frames x vocabulary a clip), its scores
    and forward variables with their temporaries, the decoder's key and value buffers and the language model's
    states and scores stay within BEAM_MEMORY bytes."""
    positions = frames if cfg.max_length_ratio == 0 else math.ceil(frames * cfg.max_length_ratio)
    cached = 0 if model.decoder is None else model.decoder.cache_values()
    lm_values = 0 if lm is None else 2 * vocab_size + 4 * lm.model.state_size()  # scores; states, now and next
    ctc_bytes = 8 * (3 * vocab_size + 12 * frames)  # float64 scores and their temporaries; r, now and next
    per_row = ctc_bytes + 4 * (cached * positions + lm_values)
    return max(1, BEAM_MEMORY // (8 * frames * vocab_size + cfg.beam_size * per_row))


def decode(model: nn.Module, enc, mask, lengths, vocab: Vocabulary, cfg: Config,
           lm: LanguageModel | None = None, decoder: str = "") -> list[list[tuple[list[int], float]]]:
    """Test's and decode's one entry point: each clip's n-best (tokens, score), best first, by `decoder`
    (default --decoder; the language model counts in the beam search only)."""
    decoder = decoder or cfg.decoder
    if decoder == "attention" and model.decoder is not None:
        return [[h] for h in greedy_attention(model, enc, mask, lengths, vocab.sos_eos)]
    if decoder != "beam":
        return [[h] for h in greedy_ctc(model.ctc(enc), lengths, vocab.blank)]
    step = beam_chunk_clips(model, cfg, vocab.size, enc.size(1), lm)
    return [hyps for i in range(0, enc.size(0), step)
            for hyps in beam_search_batch(model, enc[i:i + step], mask[i:i + step], lengths[i:i + step], vocab, cfg,
                                          lm)]


def word_positions(ids: list[int], vocab: Vocabulary) -> list[list[int]]:
    """Where each word of `ids` lies: the positions of its units (words are split at spaces; none is empty)."""
    words, current = [], []
    for u, i in enumerate(ids + [vocab.space]):
        if i == vocab.space:
            if current:
                words.append(current)
            current = []
        else:
            current.append(u)
    return words


def words_of(ids: list[int], vocab: Vocabulary) -> list[tuple[int, ...]]:
    return [tuple(ids[u] for u in word) for word in word_positions(ids, vocab)]


def error_rates(refs: list[list[int]], hyps: list[list[int]], vocab: Vocabulary) -> dict:
    """CER over units without word boundaries (the team's count), WER over words, and the mean per-clip CER
    (the published 23.49% is one)."""
    import editdistance
    units = lambda ids: [i for i in ids if i != vocab.space]
    unit_errors = [editdistance.eval(units(r), units(h)) for r, h in zip(refs, hyps)]
    unit_counts = [max(len(units(r)), 1) for r in refs]
    word_errors = sum(editdistance.eval(words_of(r, vocab), words_of(h, vocab)) for r, h in zip(refs, hyps))
    word_counts = sum(len(words_of(r, vocab)) for r in refs)
    has_boundaries = any(vocab.space in r for r in refs)  # without them a clip is one "word": WER means nothing
    return {"cer": sum(unit_errors) / max(sum(unit_counts), 1),
            "wer": word_errors / max(word_counts, 1) if has_boundaries else None,
            "cer_mean_per_clip": float(np.mean([e / n for e, n in zip(unit_errors, unit_counts)])) if refs else 0.0,
            "n": len(refs)}


def clip_cer(ref: list[int], hyp: list[int], vocab: Vocabulary) -> float:
    """One clip's CER, as the reports show it."""
    return round(error_rates([ref], [hyp], vocab)["cer"], 4)


def eval_batches(ds: Dataset, index: list[int], cfg: Config) -> list[list[int]]:
    return ds.batches(index, cfg.max_frames)


@torch.no_grad()
def evaluate(model, ds: Dataset, index: list[int], vocab: Vocabulary, cfg: Config, device,
             decoders: tuple[str, ...] = ("ctc", "attention"), features=None, lm: LanguageModel | None = None) -> dict:
    """Loss, and error rates and n-best lists per decoder, on clips seen without augmentation (with `features`,
    a frozen frontend's FeatureBank: from its center-crop view). Every epoch asks for the two greedy decoders;
    test adds the one it reports (the beam search with `lm`'s term, where given)."""
    model.eval()
    augment = Augment(cfg, training=False)
    decoders = tuple(d for d in decoders if d != "attention" or model.decoder is not None)
    totals, seen, refs, order = Counter(), 0, [], []
    nbest: dict[str, list] = {d: [] for d in decoders}
    for batch in eval_batches(ds, index, cfg):
        chosen = [index[i] for i in batch]
        targets = [ds.samples[i].ids for i in chosen]
        with autocast(device, cfg):
            if features is None:
                x, lengths = batch_inputs(ds, chosen, augment, device)
                enc, mask = model.encode(x, lengths.to(device))
            else:
                x, lengths = features.batch(chosen, [0] * len(chosen))
                enc, mask = model.encode_features(x.to(device), lengths.to(device))
            parts = joint_loss(model, enc, mask, model.ctc(enc), lengths.to(device), targets, vocab, cfg)
            for d in decoders:
                nbest[d] += decode(model, enc, mask, lengths.to(device), vocab, cfg, lm, decoder=d)
        for k, v in parts.items():
            totals[k] += v.item() * len(chosen)
        seen += len(chosen)
        refs += targets
        order += chosen
    result = {("loss" if k == "loss" else f"loss_{k}"): v / max(seen, 1) for k, v in totals.items()}
    result.update({d: error_rates(refs, [hyps[0][0] for hyps in nbest[d]], vocab) for d in decoders})
    result["rows"] = {"order": order, "refs": refs, **nbest}
    return result


# Decoding files (--mode decode, --mode serve): clips without labels, read one by one, decoded in batches --------

def sound_to_decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What an audio model hears of one file, read whole: its sound as frames x 640, beside no picture."""
    wave = read_audio(path)
    frames = np.zeros((max(1, round(len(wave) / SAMPLES_PER_FRAME)), 0, 0), np.uint8)
    return frames, fit_to_frames(wave, len(frames))


def unlabelled_clips(clips: list[np.ndarray], waves: list, cfg: Config) -> Dataset:
    if cfg.modality == "video":
        return Dataset([], ClipBank(clips, torch.device("cpu")), {})
    noise = noise_track(cfg, [w.reshape(-1) for w in waves], torch.device("cpu")) if is_number_list(cfg.sound) else None
    return Dataset([], ClipBank(clips, torch.device("cpu")), {}, ClipBank(waves, torch.device("cpu")), noise)


@torch.no_grad()
def decode_clips(model: nn.Module, clips: Dataset, batch: list[int], vocab: Vocabulary, cfg: Config, device,
                 lm: LanguageModel | None = None) -> list[list[tuple[list[int], float]]]:
    """The n-best of the clips `batch` of an unlabelled Dataset, as --decoder (and --beam-size, --nbest) say."""
    x, lengths = batch_inputs(clips, batch, Augment(cfg, training=False), device)
    with autocast(device, cfg):
        enc, mask = model.encode(x, lengths.to(device))
        return decode(model, enc, mask, lengths.to(device), vocab, cfg, lm)


# ---------------------------------------------------------------------------------------------------------
# 8. Training: AdamW + WarmupCosine per optimizer step, mixed precision by GPU, checkpoints that resume
#    exactly, a time budget, and one log line, one metrics row and one redrawn plot per epoch.
# ---------------------------------------------------------------------------------------------------------


# seconds: after an epoch, curves.png and confusions.png are redrawn at most this often (and after the last),
# so that short epochs do not spend their time drawing (a heatmap of Arabic labels takes 0.6 s on a CPU)
REDRAW_CURVES, REDRAW_HEATMAP = 30.0, 300.0


def compile_model(model: nn.Module, device: torch.device) -> None:
    """torch.compile the encoding (frontend and encoder, where the time goes), where Triton can: not on GPUs
    before compute capability 7 (P100)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        print(f"--compile is skipped: torch.compile needs compute capability 7.0 or more, and "
              f"{torch.cuda.get_device_name(device)} has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}.")
        return
    model.encode = torch.compile(model.encode)  # a second graph once batch size or length varies, then no more


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Auto-AVSR's WarmupCosineScheduler factor for optimizer step `step` (counted from 1)."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))


def schedule_steps(cfg: Config, epoch_steps: int) -> tuple[int, int]:
    """(warmup steps, optimizer steps in all) of the WarmupCosine schedule."""
    return max(int(cfg.warmup_epochs * epoch_steps), 1), cfg.epochs * epoch_steps


def make_optimizer(model: nn.Module, cfg: Config, epoch_steps: int):
    """AdamW over the parts that train from the start, and (--unfreeze-at) a second group for the frozen parts,
    at --unfreeze-lr times the schedule from their epoch on, ramped up over a warmup so that the pretrained
    weights are not thrown about by the first steps. Parts frozen for good stay out."""
    groups, frozen = module_groups(model), part_names(cfg.freeze)
    trained = [p for g, params in groups.items() if g not in frozen for p in params]
    later = [p for g, params in groups.items() if g in frozen for p in params] if cfg.unfreeze_at else []
    optimizer = torch.optim.AdamW([{"params": trained}] + [{"params": later}] * bool(later), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    factors = schedule_factors(cfg, epoch_steps)[:len(optimizer.param_groups)]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def schedule_factors(cfg: Config, epoch_steps: int) -> list:
    """Each parameter group's share of --lr by optimizer step (from 0): WarmupCosine over cfg.epochs, and for the
    parts unfrozen at --unfreeze-at --unfreeze-lr times it, ramped up over a warmup from their epoch."""
    warmup, total = schedule_steps(cfg, epoch_steps)
    total = max(total, warmup + 1)
    unfrozen = (cfg.unfreeze_at - 1) * epoch_steps  # optimizer steps before the unfreezing
    ramp = lambda k: min(max(k - unfrozen + 1, 0) / warmup, 1)
    return [lambda k: warmup_cosine(k + 1, warmup, total),
            lambda k: cfg.unfreeze_lr * warmup_cosine(k + 1, warmup, total) * ramp(k)]


def rates_from_schedule(optimizer, scheduler) -> None:
    """Each group's learning rate as the schedule now stands, at the step it has reached: a schedule changed
    mid-run takes effect from the next step, not the next scheduler.step()."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def reschedule(optimizer, scheduler, cfg: Config, epoch_steps: int) -> None:
    """The schedule over cfg.epochs from the next step on, where a run's length changed (--fit-budget)."""
    scheduler.lr_lambdas = schedule_factors(cfg, epoch_steps)[:len(optimizer.param_groups)]
    rates_from_schedule(optimizer, scheduler)


# --fit-budget plans with epochs this much slower than the warmup's: on a shared machine they vary by about as much
FIT_MARGIN = 1.1


def fit_epoch(cfg: Config) -> int:
    """The epoch --fit-budget plans at the start of: the one the cosine starts in. The warmup's steps do not depend
    on the schedule's length, so a run cut to N epochs here is the run --epochs N makes (a warmup under one epoch
    aside)."""
    return max(math.floor(cfg.warmup_epochs), 1) + 1


def epoch_pace(history: list[dict]) -> float:
    """Seconds an epoch so far, on the mean."""
    return sum(r["epoch_s"] for r in history) / len(history)


def epochs_that_fit(history: list[dict], cfg: Config, elapsed: float) -> int:
    """The epochs done, and as many more as the budget's time left holds at their mean pace and FIT_MARGIN, less
    one: the room --time-budget's own stop keeps for a slow epoch. At least this epoch, at most --epochs."""
    more = int((cfg.time_budget * 60 - elapsed) // (FIT_MARGIN * epoch_pace(history))) - 1
    return max(len(history) + 1, min(cfg.epochs, len(history) + more))


def rng_state() -> dict:
    """Every generator's state as tensors and plain data (what a weights-only load reads back)."""
    name, keys, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": (name, keys.tolist(), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # keys: a list, or (checkpoints before 2026-12-07) an array
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What a checkpoint fixes, in one place: its model and the data it saw (the same clips, split and preprocessing)
# must match to resume and are taken from it to test; the training state its weights are in is taken with them
MODEL_SETTINGS = ("arch", "preset", "frontend", "encoder", "modality", "units", "word_boundary")
DATA_SETTINGS = ("split_seed", "val_fraction", "test_fraction", "split_lists", "frame_size", "crop_size",
                 "input_size", "mean", "std", "seed", "synthetic_clips", "synthetic_words", "synthetic_speakers")
MATCHED_SETTINGS = MODEL_SETTINGS + DATA_SETTINGS
CHECKPOINT_SETTINGS = MATCHED_SETTINGS + ("dropout", "freeze", "unfreeze_at")


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, epoch: int, history: list, cfg: Config,
                    vocab: Vocabulary) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
             "epoch": epoch, "history": history, "config": dataclasses.asdict(cfg), "vocab": vocab.to_json()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def saved_epoch(path: Path) -> int | None:
    """The epoch a checkpoint holds (its tensors left on disk), or None where there is none to read."""
    try:
        return load_torch_file(path, "", "", mmap=True)[0]["epoch"] if path.exists() else None
    except (UserError, TypeError, KeyError):
        return None


def load_checkpoint(path: Path, cfg: Config | None = None) -> dict:
    """A checkpoint of this tool; with `cfg` (to test, decode, serve, export), one of the team's models too."""
    if not Path(path).exists():
        raise UserError(f"No checkpoint at {path}: train first (--mode train), or name one with --checkpoint.")
    state, _ = load_torch_file(path, "The checkpoint", "If it was cut short, use the other checkpoint in its folder "
                               "(last.pt / best.pt); give only checkpoints this tool wrote.")
    if cfg is not None and isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()) \
            and team_encoder(state):
        return team_checkpoint(state, Path(path), cfg)
    if not isinstance(state, dict) or not {"model", "config", "vocab", "epoch"} <= state.keys():
        raise UserError(f"{path} is not a checkpoint of this tool (it holds {type(state).__name__ if not isinstance(state, dict) else 'weights alone, no settings or vocabulary'}). "
                        "To start training from its weights, pass it as --init-from; to test or decode, use a run's "
                        "checkpoints/best.pt (or averaged.pt, last.pt).")
    return state


def check_compatible(state: dict, cfg: Config, vocab: Vocabulary, path: Path) -> None:
    """Refuse a checkpoint whose vocabulary or architecture differs, saying which."""
    saved = {**dataclasses.asdict(Config()), **state["config"]}  # settings added since it was written: defaults
    diffs = [f"{k}: checkpoint {saved[k]!r}, now {getattr(cfg, k)!r}" for k in MATCHED_SETTINGS
             if saved[k] != getattr(cfg, k)]
    if diffs:
        raise UserError(f"The checkpoint {path} was trained with other settings ({'; '.join(diffs)}). "
                        "Use the same flags, or another --work-dir to start afresh.")
    if state["vocab"] != vocab.to_json():
        raise UserError(f"The checkpoint {path} was trained with another vocabulary ({len(state['vocab']['units'])} "
                        f"units, now {len(vocab.ids)}). Pass the --vocab it was trained with.")


def saved_config(state: dict) -> Config:
    """The settings a checkpoint was trained with (settings added since: their defaults)."""
    return Config(**{k: v for k, v in state["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})


def checkpoint_path(cfg: Config) -> Path:
    """--checkpoint, else averaged.pt where it is as new as last.pt (a run trained on since left it behind), else
    best.pt."""
    if cfg.checkpoint:
        return Path(cfg.checkpoint)
    folder = checkpoints_of(cfg.work_dir)
    averaged, last = folder / "averaged.pt", folder / "last.pt"
    if averaged.exists() and (not last.exists() or averaged.stat().st_mtime_ns >= last.stat().st_mtime_ns):
        return averaged
    return best_of_run(folder, cfg.decoder)


def best_of_run(folder: Path, decoder: str) -> Path:
    """best.pt; or last.pt where the run was stopped while copying its best epoch, the newest, to best.pt."""
    best, last = folder / "best.pt", folder / "last.pt"
    try:
        state = load_torch_file(last, "", "", mmap=True)[0]
        history, epoch = state["history"], state["epoch"]
    except (UserError, TypeError, KeyError):  # no run beside it: best.pt as it is
        return best
    best_epoch = best_row(history, decoder)["epoch"] if history else None
    if best_epoch != epoch or saved_epoch(best) == best_epoch:
        return best
    print(f"{best} does not hold the run's best epoch ({best_epoch}; the run was stopped while writing it): reading "
          "last.pt, which does (--resume restores best.pt).")
    return last


def model_from_checkpoint(path: Path, cfg: Config, device, state: dict | None = None
                          ) -> tuple[nn.Module, Vocabulary, Config]:
    """The model, vocabulary and settings a checkpoint was trained with; model and data settings come from the
    checkpoint (so the test split is the one it was trained beside), the rest (data folders, decoding) from now."""
    state = state or load_checkpoint(path, cfg)
    try:
        saved = saved_config(state)
        model_cfg = dataclasses.replace(cfg, **{k: getattr(saved, k) for k in CHECKPOINT_SETTINGS})
        vocab = Vocabulary.from_json(state["vocab"])
        model = build_model(model_cfg, vocab.size)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # a damaged or foreign file
        raise UserError(f"The checkpoint {path} does not hold a model this script can build ({type(e).__name__}: "
                        f"{str(e)[:200]}). It may be damaged; use the other checkpoint in that folder.") from e
    set_frozen(model, frozen_in(model_cfg, state["epoch"]))  # as in its last epoch (gradient flow reports it)
    return model.to(device).eval(), vocab, model_cfg


ENSEMBLE_INPUT = ("modality", "frame_size", "crop_size", "input_size", "mean", "std")  # what the models see alike
ENSEMBLE_SPLIT = ("split_seed", "val_fraction", "test_fraction", "split_lists")  # what holds the same clips out


def ensemble_member(name: str, cfg: Config) -> Path:
    """--ensemble's run folder (its checkpoint as --checkpoint's default picks it) or checkpoint file."""
    if Path(name).is_dir():
        return checkpoint_path(dataclasses.replace(cfg, work_dir=name, checkpoint=""))
    return Path(name)


def models_to_read(cfg: Config, device, held_out: bool = False, path: Path | None = None, state: dict | None = None
                   ) -> tuple[nn.Module, Vocabulary, Config]:
    """model_from_checkpoint's model, vocabulary and settings for --checkpoint (or the run's); with --ensemble, the
    models read as one, refused where their units or input differ (and, `held_out`, to test on a split: where
    they did not hold out the same clips)."""
    path = path or checkpoint_path(cfg)
    model, vocab, model_cfg = model_from_checkpoint(path, cfg, device, state)
    if not cfg.ensemble:
        return model, vocab, model_cfg
    models, alike = [model], ENSEMBLE_INPUT + ENSEMBLE_SPLIT * held_out
    for name in cfg.ensemble:
        other_path = ensemble_member(name, cfg)
        other, units, other_cfg = model_from_checkpoint(other_path, cfg, device)
        if units.itos != vocab.itos:
            raise UserError(f"--ensemble {other_path} reads {units.size} units, {path} reads {vocab.size}"
                            + (" (the same number, other units or order)" if units.size == vocab.size else "")
                            + ": an ensemble's models must share their vocabulary (train them on the same labels).")
        differ = [f"{k} {getattr(other_cfg, k)!r} against {getattr(model_cfg, k)!r}" for k in alike
                  if getattr(other_cfg, k) != getattr(model_cfg, k)]
        if differ:
            raise UserError(f"--ensemble {other_path} was trained otherwise than {path}: {'; '.join(differ)}. An "
                            "ensemble's models must see the same input" + (" and hold out the same clips" * held_out) + ".")
        models.append(other)
    print(f"ensemble: {path} with {', '.join(map(str, (ensemble_member(n, cfg) for n in cfg.ensemble)))}",
          file=sys.stderr)
    return Ensemble(models).to(device).eval(), vocab, model_cfg


# Several processes (torchrun, one per GPU) -------------------------------------------------------------------
# Every process holds the whole dataset and the whole model; rank 0 alone evaluates, draws, writes checkpoints
# and decides when to stop, and tells the others.

def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def join_process_group(device_name: str) -> None:
    """Join torchrun's process group (NCCL between GPUs, gloo between CPU processes). Only rank 0 prints."""
    cuda = device_name != "cpu" and torch.cuda.is_available()
    # rank 0 evaluates and draws while the others wait in their next gradient exchange: allow it time
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")


def unwrapped(objective: nn.Module) -> nn.Module:
    """The model inside an Objective, itself maybe inside DistributedDataParallel."""
    return getattr(objective, "module", objective).model


def all_ranks_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def rank0_number(x: float, device) -> float:
    """Rank 0's number, for every process."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.item()


def rank0_says(flag: bool, device) -> bool:
    """Rank 0's decision, for every process."""
    return bool(rank0_number(flag, device))


class AllRanksSum(torch.autograd.Function):
    """A sum over the processes that autograd sees through: every process's loss depends on the sum, so the
    gradient reaching each process's part is the sum of all their gradients."""

    @staticmethod
    def forward(ctx, t):
        return all_ranks_sum(t.clone())

    @staticmethod
    def backward(ctx, grad):
        return all_ranks_sum(grad.clone())


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """What torch's SyncBatchNorm (GPUs only) does, for CPU processes (gloo): sums and counts all-reduced with
    autograd, so every process normalises by the mean and variance of the global batch."""

    def _check_input_dim(self, x):  # any of BatchNorm1d/2d/3d's shapes
        pass

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        c, dims, shape = x.shape[1], [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xd = x.double()  # E[x^2] - E[x]^2 cancels badly in float32
        stats = AllRanksSum.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / c])]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean ** 2).to(x.dtype)
        mean = mean.to(x.dtype)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) \
            + self.bias.view(shape)


def with_synced_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` synchronised across processes; same parameters, buffers and state_dict keys."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            synced = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            synced.weight.requires_grad_(child.weight.requires_grad)
            synced.bias.requires_grad_(child.bias.requires_grad)
            setattr(model, name, synced.train(child.training))
        else:
            with_synced_batchnorm(child, device)
    return model


def training_batch(ds: Dataset, chosen: list[int], augment: Augment, device) -> tuple:
    """Inputs from memory, augmented on the device: (x, lengths, targets)."""
    targets = [ds.samples[i].ids for i in chosen]
    x, lengths = batch_inputs(ds, chosen, augment, device, torch.tensor([frames_needed(t) for t in targets]))
    return x, lengths.to(device), targets


# A frozen frontend, run once ---------------------------------------------------------------------------------
# While the frontend is frozen, its output for a given crop and flip of a clip never changes: it is computed once
# for a few views of every clip, and the epochs train the rest of the model from memory.

class FeatureBank:
    """A frozen frontend's per-frame features, clips concatenated over time as in ClipBank: view 0 is the center
    crop of every clip in a split (what evaluation sees), views 1..--feature-views random crops and flips of the
    training clips (drawn with their own seed, so a resumed run draws the same). Time masking and warping
    happen later, on the features of each batch."""

    def __init__(self, model: nn.Module, ds: Dataset, cfg: Config, device: torch.device):
        self.offsets, self.lengths = ds.bank.offsets, ds.bank.lengths
        dtype = amp_dtype(device, cfg) or torch.float32
        shape = (cfg.feature_views + 1, int(self.lengths.sum()), model.proj_encoder.in_features)
        self.device = device_with_room(math.prod(shape) * dtype.itemsize, device)
        self.views = torch.zeros(shape, dtype=dtype, device=self.device)
        spatial_only = dataclasses.replace(cfg, time_mask=False, time_warp=False)
        model.frontend.eval()
        t0, used = time.time(), sorted({i for index in ds.splits.values() for i in index})
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(cfg.seed)
            for view in range(shape[0]):
                index = used if view == 0 else ds.trained()
                augment = Augment(spatial_only, training=view > 0)
                for batch in eval_batches(ds, index, cfg):
                    chosen = [index[i] for i in batch]
                    frames, lengths = ds.bank.batch(chosen)
                    x, lengths = augment(frames.to(device), lengths)
                    with autocast(device, cfg):
                        features = model.frontend(x)  # Augment zeroes the padding, as encode does
                    for b, i in enumerate(chosen):
                        start = int(self.offsets[i])
                        self.views[view, start:start + int(lengths[b])] = features[b, :lengths[b]].to(self.device)
        print(f"frozen frontend: features of {len(used)} clips cached, center crop and {cfg.feature_views} "
              f"training views ({self.views.numel() * dtype.itemsize / 2 ** 20:.0f} MB on {self.device}, "
              f"{time.time() - t0:.0f} s); epochs train from them", flush=True)

    def batch(self, index: list[int], views: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B x Tmax x C features of clip index[b] in view views[b] (zero-padded) and the B lengths."""
        rows, padding, lengths = padded_rows(self.offsets, self.lengths, index)
        view = torch.as_tensor(views, dtype=torch.long)[:, None].expand_as(rows)
        out = self.views[view.to(self.device), rows.to(self.device)]
        return out.masked_fill_(padding.to(self.device)[..., None], 0), lengths


def caches_features(model: nn.Module, cfg: Config, frozen: list[str]) -> bool:
    """Only for video: sound is augmented before its frontend (noise, masking), so its features change."""
    return cfg.feature_views > 0 and "frontend" in frozen and hasattr(model, "encode_features") \
        and cfg.modality == "video"


def feature_batch(ds: Dataset, chosen: list[int], features: FeatureBank, augment: Augment, device) -> tuple:
    """A training batch from the cache, each clip in one of its views drawn at random: (x, lengths, targets)."""
    targets = [ds.samples[i].ids for i in chosen]
    views = [random.randrange(1, features.views.shape[0]) if augment.train else 0 for _ in chosen]
    x, lengths = features.batch(chosen, views)
    needed = torch.tensor([frames_needed(t) for t in targets])
    x, lengths = augment.features(x.to(device, non_blocking=True), lengths, needed)
    return x, lengths.to(device), targets


# A teacher's soft targets (--teacher) -------------------------------------------------------------------------
# A trained model (an audio-visual one, say, which hears what lips hide) reads every training clip once before
# the first epoch: its CTC posteriors per frame and its decoder's per label position (teacher forcing on the
# clip's label) become targets beside the label. Once per clip, not per view: the student's views of a clip
# (crop, flip, time mask) keep its frames' times, so the clean clip's posteriors fit each of them (time warp does
# not, and is refused). The teacher reads its own input (sound too) from the run's data folders.

class TeacherTargets:
    """Log-probs at the temperature, per training clip (by the student's index), clips concatenated as in
    ClipBank: CTC frames and decoder positions (the label's units, then the end)."""

    def __init__(self, per_clip: dict[int, tuple[torch.Tensor, torch.Tensor | None]], device):
        self.index = {i: k for k, i in enumerate(sorted(per_clip))}
        ctc, dec = zip(*(per_clip[i] for i in sorted(per_clip))) if per_clip else ((), ())
        self.ctc = ClipBank([c.numpy() for c in ctc], device) if ctc else None
        self.dec = ClipBank([d.numpy() for d in dec], device) if ctc and dec[0] is not None else None

    def batch(self, chosen: list[int], frames: int, positions: int, device) -> SoftTargets:
        """The targets of clips `chosen` padded to the batch's frames and label positions; a clip the teacher
        did not read is known nowhere."""
        at = torch.tensor([k for k, i in enumerate(chosen) if i in self.index], dtype=torch.long)
        rows = [self.index[chosen[k]] for k in at.tolist()]

        def padded(bank: ClipBank, length: int):
            out = torch.zeros(len(chosen), length, bank.frames.size(-1), device=device)
            known = torch.zeros(len(chosen), length, device=device)
            if rows:
                values, lengths = bank.batch(rows)
                n = min(length, values.size(1))
                out[at, :n] = values[:, :n].to(device, torch.float32)
                known[at, :n] = (torch.arange(n)[None] < lengths[:, None]).to(device, torch.float32)
            return out, known
        ctc, ctc_known = padded(self.ctc, frames) if self.ctc else (None, None)
        dec, dec_known = padded(self.dec, positions) if self.dec else (None, None)
        return SoftTargets(ctc, ctc_known, dec, dec_known)


def teacher_model(cfg: Config, vocab: Vocabulary, device) -> tuple[nn.Module, Config]:
    """--teacher's model and settings, refused where its units differ or where it held out other clips (it may
    then have trained on this run's validation or test clips)."""
    path = ensemble_member(cfg.teacher, cfg)
    model, units, teacher_cfg = model_from_checkpoint(path, cfg, device)
    if units.itos != vocab.itos:
        raise UserError(f"--teacher {path} reads {units.size} units, this run {vocab.size}"
                        + (" (the same number, other units or order)" if units.size == vocab.size else "")
                        + ": a teacher must share the vocabulary (train it on the same labels, with the same --units).")
    held = ENSEMBLE_SPLIT + (("seed", "synthetic_clips", "synthetic_words", "synthetic_speakers")
                             if data_kind(cfg) == "synthetic" else ())
    differ = [f"{k} {getattr(teacher_cfg, k)!r} against {getattr(cfg, k)!r}" for k in held
              if getattr(teacher_cfg, k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"--teacher {path} held out other clips than this run: {'; '.join(differ)}. It may have "
                        "trained on this run's validation or test clips: train the teacher with the same split.")
    return model, teacher_cfg


def teacher_targets(cfg: Config, ds: Dataset, vocab: Vocabulary, device) -> TeacherTargets:
    """--teacher's posteriors on every clip that trains here (its clean view, its own input), matched by name;
    never a validation or test clip's. The random streams are left as they were: a resumed run goes on as the
    whole run did."""
    before = rng_state()
    try:
        return read_by_teacher(cfg, ds, vocab, device)
    finally:
        set_rng_state(before)


@torch.no_grad()
def read_by_teacher(cfg: Config, ds: Dataset, vocab: Vocabulary, device) -> TeacherTargets:
    began = time.time()
    model, teacher_cfg = teacher_model(cfg, vocab, device)
    teacher_cfg = dataclasses.replace(teacher_cfg, work_dir=str(Path(cfg.work_dir) / "teacher"))
    heard = load_dataset(teacher_cfg, vocab, device)
    by_name = {s.stem: i for i, s in enumerate(heard.samples)}
    mine = {by_name[ds.samples[i].stem]: i for i in ds.trained()
            if ds.samples[i].stem in by_name and heard.samples[by_name[ds.samples[i].stem]].ids == ds.samples[i].ids}
    temperature, per_clip = cfg.teacher_temperature, {}
    order = sorted(mine)
    for batch in heard.batches(order, teacher_cfg.max_frames):
        chosen = [order[b] for b in batch]
        targets = [heard.samples[i].ids for i in chosen]
        x, lengths = batch_inputs(heard, chosen, Augment(teacher_cfg, training=False), device)
        with autocast(device, teacher_cfg):
            enc, mask = model.encode(x, lengths.to(device))
            ctc = (model.ctc(enc).float() / temperature).log_softmax(-1).cpu()
            dec = None
            if model.decoder is not None:
                ys_in, _ = decoder_io(targets, vocab.sos_eos, device)
                dec = (model.decoder(ys_in, enc, mask).float() / temperature).log_softmax(-1).cpu()
        for b, (i, n) in enumerate(zip(chosen, lengths.tolist())):
            per_clip[mine[i]] = (ctc[b, :n], None if dec is None else dec[b, :len(targets[b]) + 1])
    missing = len(ds.trained()) - len(per_clip)
    print(f"teacher {ensemble_member(cfg.teacher, cfg)} ({teacher_cfg.modality}): soft targets of {len(per_clip)} training "
          f"clips at temperature {temperature:g}, weight {cfg.teacher_weight:g}, in {time.time() - began:.0f} s"
          + (f"; {missing} clips it could not read (no sound, say) train on their labels alone" if missing else ""))
    return TeacherTargets(per_clip, device)


class Objective(nn.Module):
    """The model and its joint loss as one forward pass, the unit DistributedDataParallel synchronises; from
    frames, or from a frozen frontend's cached features."""

    def __init__(self, model: nn.Module, vocab: Vocabulary, cfg: Config):
        super().__init__()
        self.model, self.vocab, self.cfg = model, vocab, cfg

    def forward(self, x, lengths, targets, from_features: bool = False, soft: SoftTargets | None = None) -> dict:
        enc, mask = (self.model.encode_features if from_features else self.model.encode)(x, lengths)
        return joint_loss(self.model, enc, mask, self.model.ctc(enc), lengths, targets, self.vocab, self.cfg, soft)


def objective_for(model: nn.Module, vocab: Vocabulary, cfg: Config, device) -> nn.Module:
    """Under torchrun, wrapped anew whenever parts are frozen or unfrozen: DDP exchanges the gradients of the
    parameters that train when it is built."""
    objective = Objective(model, vocab, cfg)
    if rank_and_world()[1] > 1:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.index is not None
                                                        else None)
    return objective


def backward_pass(objective: nn.Module, x, lengths, targets, cfg: Config, device, scaler, weight: float = 1.0,
                  from_features: bool = False, soft: SoftTargets | None = None) -> dict:
    """Loss parts of the batch; its gradient, times `weight` (this process's share of a global batch), added."""
    with autocast(device, cfg):
        parts = objective(x, lengths, targets, from_features, soft)
    scaler.scale(parts["loss"] * (weight / cfg.accum_steps)).backward()
    return parts


def group_grad_norms(model: nn.Module) -> torch.Tensor:
    """The gradient norm of each module group (0 where no gradient reached it), on the model's device."""
    norms = []
    for params in module_groups(model).values():
        grads = [p.grad for p in params if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).float() if grads else params[0].new_zeros(()).float())
    return torch.stack(norms)


def optimizer_step(model, optimizer, scheduler, scaler, cfg: Config) -> torch.Tensor:
    """Clip, step, advance the schedule; -> each module group's gradient norm (unscaled, before clipping),
    which the clipping needs anyway: gradient flow is watched for free."""
    scaler.unscale_(optimizer)
    norms = group_grad_norms(model)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.grad_clip, torch.linalg.vector_norm(norms))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # fp16's GradScaler skips a step whose gradients overflowed, by design
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # (torch: "a mistake")
        scheduler.step()
    return norms


def rank_share(batch_size: int) -> tuple[list[int], float]:
    """The rows of a global batch this process trains on (every world_size-th), and the weight that makes the
    averaged gradients those of the whole batch. A batch smaller than the world gives a spare process one row
    at weight 0, so that every process still joins the gradient exchange."""
    rank, world = rank_and_world()
    rows = list(range(rank, batch_size, world))
    return (rows, len(rows) * world / batch_size) if rows else ([0], 0.0)


# Parameter updates (--log-param-updates, as the team's audio-visual trainer offers) -------------------------------------------------

def snapshot(groups: dict[str, list[nn.Parameter]]) -> dict[str, list[torch.Tensor]]:
    return {g: [p.detach().clone() for p in params] for g, params in groups.items()}


def param_update_rows(groups, before, grad_norms: torch.Tensor, epoch: int, step: int, lr: float) -> list[dict]:
    """Per module group: the gradient norm, the parameter norm after the step, and how far the step moved
    the parameters relative to their size (about 1e-3 is healthy; far below, that part hardly learns)."""
    rows = []
    for (g, params), grad in zip(groups.items(), grad_norms.tolist()):
        size = torch.nn.utils.get_total_norm([p.detach() for p in params]).item()
        moved = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(params, before[g])]).item()
        rows.append({"epoch": epoch, "step": step, "lr": lr, "group": g, "grad_norm": grad, "param_norm": size,
                     "update_norm": moved, "update_ratio": moved / max(size, 1e-12)})
    return rows


def append_rows(path: Path, rows: list[dict], epoch: int) -> None:
    """Add an epoch's rows to a per-epoch CSV; rows a killed run wrote for this epoch or later are dropped,
    so a resumed run's file reads as if it had never stopped."""
    kept = []
    if path.exists():
        with open(path, newline="", encoding=CSV_ENCODING) as f:
            kept = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
    write_csv(path, kept + rows)


def train_epoch(objective: nn.Module, ds: Dataset, cfg: Config, device, optimizer, scheduler, scaler, epoch: int,
                updates: list | None = None, features: FeatureBank | None = None,
                teacher: TeacherTargets | None = None) -> dict:
    """One pass over the training split -> mean losses, clips seen, and each module group's mean gradient norm
    (`grad_<group>`); with `updates` (--log-param-updates), a row per optimizer step and group is added to it.

    Under torchrun every process draws and augments the same global batches (same seeds) and trains on its
    own rows of each: the run follows a one-process run with the same --max-frames, the same padding and
    (with --sync-batchnorm) the same statistics."""
    model, world = unwrapped(objective), rank_and_world()[1]
    getattr(objective, "module", objective).cfg = cfg  # this epoch's loss weights
    train_mode(model)
    augment = Augment(cfg, training=epoch >= cfg.augment_from, drop=epoch >= drop_start(cfg))
    groups = module_groups(model)
    train_index = epoch_clips(ds, cfg, epoch)
    batches = ds.batches(train_index, cfg.max_frames, cfg.seed * 1000 + epoch)
    totals, seen = Counter(), 0
    grad_sums, grad_steps = torch.zeros(len(groups), device=device), torch.zeros(len(groups), device=device)
    optimizer.zero_grad(set_to_none=True)
    for n, batch in enumerate(progress(batches, f"epoch {epoch}"), 1):
        chosen = [train_index[i] for i in batch]
        x, lengths, targets = (training_batch(ds, chosen, augment, device) if features is None
                               else feature_batch(ds, chosen, features, augment, device))
        rows, weight = rank_share(len(chosen))
        x = tuple(t[rows] for t in x) if isinstance(x, tuple) else x[rows]
        lengths, targets = lengths[rows], [targets[i] for i in rows]
        soft = teacher and teacher.batch([chosen[i] for i in rows], int(lengths.max()),
                                         max(map(len, targets)) + 1, device)
        step = n % cfg.accum_steps == 0 or n == len(batches)
        with contextlib.nullcontext() if step or not hasattr(objective, "no_sync") else objective.no_sync():
            parts = backward_pass(objective, x, lengths, targets, cfg, device, scaler, weight, features is not None,
                                  soft)
        if step:
            before, lr = (snapshot(groups) if updates is not None else None), optimizer.param_groups[0]["lr"]
            norms = optimizer_step(model, optimizer, scheduler, scaler, cfg)
            finite = torch.isfinite(norms)  # an fp16 step the GradScaler skipped has inf gradients
            grad_sums += torch.where(finite, norms, 0.0)
            grad_steps += finite
            if updates is not None:
                updates += param_update_rows(groups, before, norms, epoch, scheduler.last_epoch, lr)
        for k, v in parts.items():  # summed on the device: one GPU sync per epoch, not per step
            totals[k] += v.detach() * (weight * len(chosen) / world)  # this process's part of the batch's sum
        seen += len(chosen)
    keys = sorted(totals)
    summed = all_ranks_sum(torch.stack([totals[k].float() for k in keys])).tolist()
    grads = {f"grad_{g}": s / max(c, 1) for g, s, c in zip(groups, grad_sums.tolist(), grad_steps.tolist())}
    return {k: v / max(seen, 1) for k, v in zip(keys, summed)} | {"clips": seen} | grads


def steps_per_epoch(ds: Dataset, cfg: Config) -> int:
    """Optimizer steps of an epoch (the first's, where extra clips make each epoch's draw a little different)."""
    n_batches = len(ds.batches(epoch_clips(ds, cfg, 1), cfg.max_frames))
    return math.ceil(n_batches / cfg.accum_steps)


def epoch_row(epoch, train_stats, val, probe, lr, seconds, cfg: Config) -> dict:
    """Everything metrics.csv keeps of an epoch; `probe` scores the fixed training clips (None without
    diagnostics)."""
    scores = lambda result, decoder: ((result or {}).get(decoder) or {})
    att, ctc = scores(val, "attention"), scores(val, "ctc")
    return {"epoch": epoch, "train_loss": train_stats["loss"], "train_ctc": train_stats["ctc"],
            "train_att": train_stats["att"], **({"train_kd": train_stats["kd"]} if "kd" in train_stats else {}),
            "ctc_weight": cfg.ctc_weight, "ctc_share": ctc_share(train_stats["ctc"], train_stats["att"], cfg),
            "train_eval_loss": (probe or {}).get("loss"), "train_cer_ctc": scores(probe, "ctc").get("cer"),
            "train_cer_att": scores(probe, "attention").get("cer"),
            "val_loss": (val or {}).get("loss"), "val_cer_ctc": ctc.get("cer"), "val_cer_att": att.get("cer"),
            "val_wer": (att or ctc).get("wer"), "val_cer_mean_per_clip": (att or ctc).get("cer_mean_per_clip"),
            **{k: v for k, v in train_stats.items() if k.startswith("grad_")},
            "lr": lr, "epoch_s": seconds, "clips_per_s": train_stats["clips"] / max(seconds, 1e-9)}


def shown(v, spec=".3f") -> str:
    """A figure for the console, or n/a."""
    return "n/a" if v is None else format(v, spec)


def time_left(history: list[dict], cfg: Config, began: float) -> float:
    """Seconds until the last epoch, from the last three epochs' times; within --time-budget where set."""
    recent = [r["epoch_s"] for r in history[-3:]]
    left = (cfg.epochs - history[-1]["epoch"]) * sum(recent) / len(recent)
    return min(left, cfg.time_budget * 60 - (time.time() - began)) if cfg.time_budget else left


def log_epoch(row: dict, cfg: Config, eta: float) -> None:
    probe = (f" | train CER ctc {shown(row['train_cer_ctc'])} att {shown(row['train_cer_att'])}"
             if row.get("train_cer_ctc") is not None else "")
    muted = (f" | muted ctc {shown(row['val_muted_cer_ctc'])} att {shown(row['val_muted_cer_att'])}"
             if "val_muted_cer_ctc" in row else "")
    kd = f", teacher {shown(row['train_kd'])}" if row.get("train_kd") is not None else ""
    print(f"epoch {row['epoch']:3d}/{cfg.epochs} | train loss {shown(row['train_loss'])} (ctc {shown(row['train_ctc'])}, "
          f"att {shown(row['train_att'])}{kd}){probe} | val loss {shown(row['val_loss'])} | val CER ctc "
          f"{shown(row['val_cer_ctc'])} att {shown(row['val_cer_att'])} WER {shown(row['val_wer'])}{muted} | lr {row['lr']:.2e} | "
          f"{row['epoch_s']:.0f}s {row['clips_per_s']:.1f} clips/s" + (f" | ETA {duration(eta)}" if eta > 0 else ""),
          flush=True)


def selection_cer(row: dict, decoder: str, split: str = "val") -> float:
    """best.pt is the epoch whose validation CER (greedy, for speed) is lowest for the decoder that will be used;
    under --drop-sound p, (1 - p) x that CER heard + p x muted (muted_validation)."""
    weight = row.get("muted_weight") if split == "val" else None
    if weight:
        return (1 - weight) * decoder_cer(row, decoder, "val") + weight * decoder_cer(row, decoder, "val_muted")
    return decoder_cer(row, decoder, split)


def best_row(history: list[dict], decoder: str) -> dict:
    """best.pt's epoch: the lowest selection_cer, the later of a tie (a new epoch that ties replaces best.pt)."""
    return min(reversed(history), key=lambda r: selection_cer(r, decoder))


def decoder_cer(row: dict, decoder: str, split: str) -> float:
    """An epoch's greedy CER on `split` for `decoder`; inf where it was not scored."""
    ctc, att = row.get(f"{split}_cer_ctc"), row.get(f"{split}_cer_att")
    if decoder == "beam" and att is not None and ctc is not None:  # the joint search tracks the better of its two scorers
        return min(ctc, att)
    value = att if decoder == "attention" and att is not None else ctc
    return math.inf if value is None else value


# Checkpoint averaging (--average-last, --mode average) -------------------------------------------------------
# Auto-AVSR averages its last 10 epochs before testing: with the cosine schedule falling to 0 they lie close
# together, and their mean is a smoother model than any one of them. (The N best by validation CER could lie
# epochs apart, where averaging weights is not sound, and would pick on the validation split once more.)

def epoch_weights_dir(cfg: Config) -> Path:
    return checkpoints_of(cfg.work_dir) / "epochs"


def kept_epochs(folder: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("epoch_")) for p in folder.glob("epoch_*.pt"))


def keep_epoch_weights(model: nn.Module, epoch: int, cfg: Config) -> None:
    """This epoch's weights (the model alone) kept for averaging; those older than the last --average-last go."""
    folder = epoch_weights_dir(cfg)
    atomic_write(folder / f"epoch_{epoch:04d}.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    for old in kept_epochs(folder):
        if old <= epoch - cfg.average_last:
            (folder / f"epoch_{old:04d}.pt").unlink(missing_ok=True)


def averaged_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The mean of the state dicts in `paths`, summed in float64 one file at a time; integer entries (BatchNorm's
    batch counts) from the last."""
    total, dtypes = {}, {}
    for path in paths:
        for k, v in load_torch_file(path, "The epoch's weights", "Delete it; averaging then takes the epochs "
                                    "kept beside it.")[0].items():
            dtypes[k] = v.dtype
            total[k] = total.get(k, 0) + v.double() if v.is_floating_point() else v
    return {k: (v / len(paths)).to(dtypes[k]) if dtypes[k].is_floating_point else v for k, v in total.items()}


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, ds: Dataset, cfg: Config, device) -> int:
    """BatchNorm statistics for averaged weights, measured anew over one pass of the training clips as training
    sees them (augmentation with a fixed seed): the mean of the epochs' running statistics belongs to none of
    their weights. The layers of frozen parts keep theirs. -> the number of layers measured."""
    trained = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight.requires_grad]
    momenta = [m.momentum for m in trained]
    model.eval()
    for layer in trained:
        layer.reset_running_stats()
        layer.momentum = None  # a plain mean over the batches
        layer.train()
    index, augment, outside = ds.subset("train"), Augment(cfg, training=True), rng_state()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # the time mask draws from Python's generator
    for batch in eval_batches(ds, index, cfg):
        x, lengths = batch_inputs(ds, [index[i] for i in batch], augment, device)
        with autocast(device, cfg):
            model.encode(x, lengths.to(device))
    set_rng_state(outside)
    for layer, momentum in zip(trained, momenta):
        layer.momentum = momentum
    model.eval()
    return len(trained)


def write_averaged(cfg: Config, ds: Dataset, device) -> Path:
    """checkpoints/averaged.pt: the last --average-last epochs' weights averaged, BatchNorm measured anew."""
    folder, ckpt_dir = epoch_weights_dir(cfg), checkpoints_of(cfg.work_dir)
    epochs = kept_epochs(folder)[-cfg.average_last:]
    if not epochs:
        raise UserError(f"No epoch weights in {folder} to average: train with --average-last N, which keeps the "
                        "last N epochs' weights there.")
    state = load_checkpoint(ckpt_dir / "last.pt")
    model, _, model_cfg = model_from_checkpoint(ckpt_dir / "last.pt", cfg, device, state)
    model.load_state_dict(averaged_weights([folder / f"epoch_{e:04d}.pt" for e in epochs]))
    measured = refresh_batchnorm(model, ds, model_cfg, device)
    averaged = {k: state[k] for k in ("epoch", "history", "config", "vocab")} | {
        "model": model.state_dict(), "averaged_epochs": epochs}
    atomic_write(ckpt_dir / "averaged.pt", lambda tmp: torch.save(averaged, tmp))
    short = f" (only {len(epochs)} kept, of --average-last {cfg.average_last})" if len(epochs) < cfg.average_last else ""
    print(f"{ckpt_dir / 'averaged.pt'}: the weights of epochs {epochs[0]}-{epochs[-1]} averaged{short}; BatchNorm "
          f"statistics of {measured} layers measured anew over {len(ds.subset('train'))} training clips", flush=True)
    return ckpt_dir / "averaged.pt"


def stalled_for(history: list[dict], cfg: Config) -> bool:
    """--stop-after: the last --stop-after epochs brought no validation CER better than the one before them."""
    n = cfg.stop_after
    if not n or len(history) <= n:
        return False
    cers = [selection_cer(r, cfg.decoder) for r in history]
    return min(cers[-n:]) >= min(cers[:-n])


def previous_run(cfg: Config, vocab: Vocabulary) -> dict | None:
    """The checkpoint to continue (checked before any data is read), or None for a fresh run."""
    ckpt_dir = checkpoints_of(cfg.work_dir)
    last = ckpt_dir / "last.pt"
    if not cfg.resume:
        kept = [p for p in (last, ckpt_dir / "best.pt", ckpt_dir / "averaged.pt") if p.exists()]
        if last.exists():
            raise UserError(f"{cfg.work_dir} already holds a run ({last}). Continue it with --resume, or start "
                            "afresh in another --work-dir.")
        if kept:
            raise UserError(f"{cfg.work_dir} holds the checkpoints of an earlier run ({', '.join(map(str, kept))}) "
                            "but no last.pt to continue from: start afresh in another --work-dir, or move them away.")
        return None
    state = load_checkpoint(last)
    check_compatible(state, cfg, vocab, last)
    if rank_and_world()[0] == 0:
        restore_best(state, cfg, ckpt_dir)
    return state


def restore_best(state: dict, cfg: Config, ckpt_dir: Path) -> None:
    """A run killed, or out of disk, while it copied its newest epoch to best.pt has that epoch's weights in last.pt
    alone: best.pt is missing, or still holds an earlier epoch."""
    best, history = ckpt_dir / "best.pt", state["history"]
    if not history:
        return
    best_epoch, held = best_row(history, cfg.decoder)["epoch"], saved_epoch(best)
    if held == best_epoch:
        return
    was = "was missing" if held is None else f"held epoch {held}"
    if best_epoch == state["epoch"]:
        atomic_write(best, lambda tmp: shutil.copyfile(ckpt_dir / "last.pt", tmp))
        print(f"{best} {was} (the run was stopped while writing it): restored from last.pt, epoch {best_epoch}.")
    else:
        print(f"warning: {best} {was}, and the best epoch ({best_epoch}) is not last.pt's ({state['epoch']}): it "
              "cannot be restored; a better epoch from now on makes a new one.")


def apply_new_rates(optimizer, scheduler, cfg: Config) -> None:
    """--lr and --weight-decay given anew with --resume take effect from the next step (the saved optimizer and
    schedule carry the old ones)."""
    old_lr, old_decay = scheduler.base_lrs[0], optimizer.param_groups[0]["weight_decay"]
    if (old_lr, old_decay) == (cfg.lr, cfg.weight_decay):
        return
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay)
    rates_from_schedule(optimizer, scheduler)
    print(f"Resumed with --lr {cfg.lr:g} (was {old_lr:g}) and --weight-decay {cfg.weight_decay:g} (was {old_decay:g}).")


def load_dataset_once(cfg: Config, vocab: Vocabulary, device) -> Dataset:
    """The dataset; under torchrun rank 0 reads it first (filling the clip cache), the others then from the cache."""
    rank, world = rank_and_world()
    if rank > 0:
        dist.barrier()
    ds = load_dataset(cfg, vocab, device)
    if rank == 0 and world > 1:
        dist.barrier()
    return ds


# Language model (--mode lm) ----------------------------------------------------------------------------------
# Lips leave letters that look alike (ب/م, ت/د/ن/ل); text settles them. The model learns the units of the
# training clips' labels and of any text given, and keeps the epoch that predicts the validation labels best.

LM_BATCH = 64  # sentences a step


def text_sentences(path: Path, vocab: Vocabulary) -> list[list[int]]:
    """--lm-text: one sentence a line (UTF-8 or UTF-16 with its BOM); a line with a unit the vocabulary lacks
    is skipped, counted and shown."""
    try:
        raw = path.read_bytes()
        lines = raw.decode(label_encoding(raw)).splitlines()
    except (OSError, ValueError) as e:
        raise UserError(f"--lm-text {path}: cannot read it ({e}).") from e
    kept, skipped = [], []
    for line in filter(str.strip, lines):
        ids, unknown = vocab.encode(line)
        if unknown:
            skipped.append((line.strip(), unknown))
        else:
            kept.append(ids)
    print(f"--lm-text {path}: {len(kept)} sentences used, {len(skipped)} skipped for units outside the vocabulary"
          + "".join(f"\n  e.g. {line[:60]!r}: {', '.join(sorted(set(u))[:5])}" for line, u in skipped[:3]))
    return kept


def lm_sentences(cfg: Config, vocab: Vocabulary) -> dict[str, list[list[int]]]:
    """The sentences the language model learns from (the labels of every clip that trains, then --lm-text)
    and those it is measured on (the validation labels), as ids."""
    ds = load_dataset(cfg, vocab, torch.device("cpu"))
    sentences = {"train": [ds.samples[i].ids for i in ds.trained()],
                 "val": [ds.samples[i].ids for i in ds.subset("val")]}
    for path in cfg.lm_text:
        sentences["train"] += text_sentences(Path(path), vocab)
    if not sentences["train"] or not sentences["val"]:
        raise UserError("--mode lm needs training and validation labels: check --data-dir and --val-fraction.")
    return sentences


def lm_batch(sentences: list[list[int]], sos_eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs sos + ids and targets ids + eos, right-padded (targets with -1, ignored)."""
    n = max(len(ids) for ids in sentences) + 1
    inputs = torch.full((len(sentences), n), sos_eos)
    targets = torch.full((len(sentences), n), -1)
    for b, ids in enumerate(sentences):
        inputs[b, 1:len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
        targets[b, :len(ids) + 1] = torch.tensor(ids + [sos_eos], dtype=torch.long)
    return inputs, targets


def lm_loss(lm: nn.Module, sentences: list[list[int]], sos_eos: int, device) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the sentences' units and eos, and how many there are."""
    inputs, targets = lm_batch(sentences, sos_eos)
    log_probs, _ = lm(inputs.to(device))
    targets = targets.to(device)
    return F.nll_loss(log_probs.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum"), \
        int((targets >= 0).sum())


@torch.no_grad()
def lm_perplexity(lm: nn.Module, sentences: list[list[int]], sos_eos: int, device) -> float:
    lm.eval()
    total, n = 0.0, 0
    for i in range(0, len(sentences), LM_BATCH):
        nll, count = lm_loss(lm, sentences[i:i + LM_BATCH], sos_eos, device)
        total, n = total + nll.item(), n + count
    return math.exp(total / n)


def lm_file(lm: nn.Module, cfg: Config, vocab: Vocabulary, epoch: int, val_perplexity: float) -> dict:
    if isinstance(lm, NgramLM):
        return {"kind": "ngram", "tables": lm.tables, "order": lm.order, "discount": lm.discount,
                "vocab": vocab.to_json(), "val_perplexity": val_perplexity}
    return {"kind": "lstm", "model": lm.state_dict(), "dims": lm_dims(cfg), "vocab": vocab.to_json(), "epoch": epoch,
            "val_perplexity": val_perplexity}


def lm_dims(cfg: Config) -> dict:
    return {"dim": cfg.lm_dim, "layers": cfg.lm_layers, "dropout": cfg.lm_dropout}


def resumable_lm(path: Path, cfg: Config, vocab: Vocabulary) -> dict:
    state, _ = load_torch_file(path, "The language model's checkpoint", "Delete it to start the language model "
                               "afresh.")
    if Vocabulary.from_json(state["vocab"]).itos != vocab.itos or state["dims"] != lm_dims(cfg):
        raise UserError(f"{path} was trained with {state['dims']} over {len(state['vocab']['units'])} units; "
                        f"these settings ask for {lm_dims(cfg)} over {vocab.size}: resume with its settings, or "
                        "give another --work-dir.")
    return state


def lm_run_settings(cfg: Config) -> tuple[Config, Vocabulary]:
    """The vocabulary and split of the model trained in --work-dir, where there is one (no label that model is
    validated or tested on then trains its language model); else --vocab and the split settings given."""
    last = checkpoints_of(cfg.work_dir) / "last.pt"
    if not last.exists():
        return cfg, load_vocabulary(cfg)
    state = load_checkpoint(last)
    saved = saved_config(state)
    print(f"language model: the vocabulary and split of the run in {cfg.work_dir}")
    return dataclasses.replace(cfg, **{k: getattr(saved, k) for k in DATA_SETTINGS}), Vocabulary.from_json(state["vocab"])


def count_ngrams(cfg: Config, vocab: Vocabulary, device) -> dict:
    """--mode lm --lm-kind ngram: the counts are the training; lm/lm.pt keeps them, to be read as they are."""
    sentences = lm_sentences(cfg, vocab)
    lm = NgramLM(ngram_tables(sentences["train"], cfg.lm_order, vocab.size, vocab.sos_eos), cfg.lm_order, vocab.size,
                 vocab.sos_eos)
    val = lm_perplexity(lm.to(device), sentences["val"], vocab.sos_eos, device)
    folder = Path(cfg.work_dir) / "lm"
    atomic_write(folder / LM_FILE, lambda tmp: torch.save(lm_file(lm, cfg, vocab, 0, val), tmp))
    report = {"kind": "ngram", "order": cfg.lm_order, "val_perplexity": val,
              "sentences": {k: len(v) for k, v in sentences.items()}, "lm_text": cfg.lm_text}
    write_json(folder / "perplexity.json", report)
    print(f"Wrote {folder / LM_FILE}: a {cfg.lm_order}-gram (Kneser-Ney) of {len(sentences['train'])} sentences, "
          f"validation perplexity {val:.2f}. Use it with --lm {folder / LM_FILE} in --mode test/decode/diagnose.")
    return report


def train_lm(cfg: Config) -> dict:
    """--mode lm: <work_dir>/lm/lm.pt (the epoch of lowest validation perplexity), lm/last.pt to resume from,
    and lm/perplexity.json."""
    device = pick_device(cfg.device)
    cfg, vocab = lm_run_settings(cfg)
    folder = Path(cfg.work_dir) / "lm"
    last_path = folder / "last.pt"
    for made in (last_path, folder / LM_FILE):
        if made.exists() and not cfg.resume:
            raise UserError(f"{made} exists: add --resume to continue it (an LSTM; an n-gram is counted anew), or "
                            "give another --work-dir.")
    if cfg.lm_kind == "ngram":
        return count_ngrams(cfg, vocab, device)
    sentences = lm_sentences(cfg, vocab)
    torch.manual_seed(cfg.seed)
    lm = UnitLM(vocab.size, cfg.lm_dim, cfg.lm_layers, cfg.lm_dropout).to(device)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    start, history = 1, []
    if cfg.resume and last_path.exists():
        state = resumable_lm(last_path, cfg, vocab)
        lm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, history = state["epoch"] + 1, state["history"]
    n_units = sum(len(ids) + 1 for ids in sentences["train"])
    print(f"language model: LSTM {cfg.lm_layers} x {cfg.lm_dim} over {vocab.size} units; "
          f"{len(sentences['train'])} sentences ({n_units} units and ends) to learn, {len(sentences['val'])} "
          f"validation labels to measure")
    for epoch in range(start, cfg.lm_epochs + 1):
        lm.train()
        order = sentences["train"][:]
        random.Random(cfg.seed * 100_003 + epoch).shuffle(order)
        total, n = 0.0, 0
        for i in range(0, len(order), LM_BATCH):
            nll, count = lm_loss(lm, order[i:i + LM_BATCH], vocab.sos_eos, device)
            optimizer.zero_grad(set_to_none=True)
            (nll / count).backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.grad_clip)
            optimizer.step()
            total, n = total + nll.item(), n + count
        val = lm_perplexity(lm, sentences["val"], vocab.sos_eos, device)
        history.append({"epoch": epoch, "train_perplexity": math.exp(total / n), "val_perplexity": val})
        best = min(r["val_perplexity"] for r in history)
        print(f"lm epoch {epoch}/{cfg.lm_epochs}: perplexity train {math.exp(total / n):.2f}, validation "
              f"{val:.2f}" + (" (best so far)" if val == best else ""), flush=True)
        if val == best:
            atomic_write(folder / LM_FILE, lambda tmp: torch.save(lm_file(lm, cfg, vocab, epoch, val), tmp))
        state = {"model": lm.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "epoch": epoch, "history": history, "vocab": vocab.to_json(), "dims": lm_dims(cfg)}
        atomic_write(last_path, lambda tmp: torch.save(state, tmp))
    best = min(history, key=lambda r: r["val_perplexity"])
    report = {"val_perplexity": best["val_perplexity"], "epoch": best["epoch"], "history": history,
              "sentences": {k: len(v) for k, v in sentences.items()}, "lm_text": cfg.lm_text}
    write_json(folder / "perplexity.json", report)
    print(f"Wrote {folder / LM_FILE}: validation perplexity {best['val_perplexity']:.2f} (epoch {best['epoch']}). "
          f"Use it with --lm {folder / LM_FILE} in --mode test/decode/diagnose.")
    return report


# ---------------------------------------------------------------------------------------------------------
# 9. Diagnostics: what the data looks like (the team's figures) and the debugging checklist for a stuck model,
#    run every epoch and by --mode diagnose / sanity: learning curves and a verdict in words, gradient flow,
#    the worst clips, unit confusions (by letter and by diacritic), the settings' sanity, parameter updates.
# ---------------------------------------------------------------------------------------------------------

OVERFIT_GAP = 0.15  # val CER this far above train CER: the model knows its training clips, not the task
HIGH_CER = 0.5  # train CER above this: the model does not even fit its training clips
COLLAPSED = 0.5  # this share of validation clips given one and the same hypothesis: the video is ignored
VANISHING = 1e-3  # a trainable part's rms gradient this far below the liveliest part's has vanished
DOMINANT = 0.9  # one loss making this share of the objective drowns the other's signal
SANITY_CER = 0.01  # "about 0" for --mode sanity


def training_probe(ds: Dataset, cfg: Config) -> list[int]:
    """The fixed training clips scored each epoch without augmentation: the train side of the curves."""
    clips = ds.subset("train")
    return sorted(random.Random(cfg.seed).sample(clips, min(cfg.train_eval_clips, len(clips))))


def augmentation_line(cfg: Config) -> str:
    kinds = [f"random {cfg.crop_size}-pixel crop" * cfg.random_crop, f"flip p {cfg.hflip_prob:g}" * (cfg.hflip_prob > 0),
             f"time mask (window {cfg.time_mask_window}, stride {cfg.time_mask_stride})" * cfg.time_mask,
             f"time warp up to {cfg.time_warp_max:g}" * cfg.time_warp]
    kinds = [k for k in kinds if k]
    start = f", from epoch {cfg.augment_from} (the center crop before)" if kinds and cfg.augment_from > 1 else ""
    senses = [f"sound p {cfg.drop_sound:g}" * (cfg.drop_sound > 0), f"video p {cfg.drop_video:g}" * (cfg.drop_video > 0)]
    dropped = " and ".join(k for k in senses if k)
    dropped = f"{'; ' if kinds else ''}{dropped} dropped from epoch {drop_start(cfg)}" if dropped else ""
    return "augmentation: " + (", ".join(kinds) + start + dropped if kinds or dropped else "none (the center crop)")


def report_setup(model: nn.Module, ds: Dataset, cfg: Config, path: Path) -> list[str]:
    """The debugging checklist's hyperparameter sanity check: what one step and one epoch are, in numbers, with warnings;
    printed and written to `path`."""
    training, extra = ds.subset("train"), ds.subset("extra")
    epoch = epoch_clips(ds, cfg, 1)
    batches = len(ds.batches(epoch, cfg.max_frames))
    clips_per_batch = len(epoch) / max(batches, 1)
    steps = steps_per_epoch(ds, cfg)
    warmup, total = schedule_steps(cfg, steps)
    counts = {g: sum(p.numel() for p in params) for g, params in module_groups(model).items()}
    frozen = frozen_parts(model)
    weights = [ctc_weight_at(cfg, e) for e in range(1, cfg.epochs + 1)]
    w = weights[0]
    schedule = (f" by epoch ({cfg.ctc_weight_schedule}: {weights[0]:g} in epoch 1 .. {weights[-1]:g} in epoch "
                f"{cfg.epochs}; else {cfg.ctc_weight:g})" if cfg.ctc_weight_schedule else "")
    lines = [
        f"an epoch: {len(training)} training clips"
        + (f" + {len(epoch) - len(training)} of {len(extra)} extra clips drawn afresh (--extra-weight "
           f"{cfg.extra_weight:g})" if extra else ""),
        f"batch: {clips_per_batch:.1f} clips on average (frame budget {cfg.max_frames}), x {cfg.accum_steps} "
        f"accumulated = effective batch {clips_per_batch * cfg.accum_steps:.1f} clips",
        f"steps: {steps} optimizer steps an epoch, {total} in {cfg.epochs} epochs; warmup {warmup} steps "
        f"({cfg.warmup_epochs:g} epochs), then cosine to 0"
        + (f" (--fit-budget: fewer epochs from epoch {fit_epoch(cfg)} on where --time-budget {cfg.time_budget:g} "
           "min holds fewer)" if cfg.fit_budget else ""),
        f"optimizer: AdamW, peak learning rate {cfg.lr:g}, betas {cfg.beta1}/{cfg.beta2}, eps {cfg.adam_eps:g}, "
        f"weight decay {cfg.weight_decay:g}, gradient clip {cfg.grad_clip:g}",
        f"loss: {w:g} x CTC + {1 - w:g} x attention{schedule} (label smoothing {cfg.label_smoothing:g})"
        if model.decoder is not None else "loss: CTC only (the model has no decoder)",
        *([f"teacher: {cfg.teacher}: the loss is {1 - cfg.teacher_weight:g} x the labels' + {cfg.teacher_weight:g} x "
           f"KL to its posteriors (CTC per frame and decoder per unit, weighted as above; temperature "
           f"{cfg.teacher_temperature:g}), computed once per training clip"] if cfg.teacher else []),
        augmentation_line(cfg),
        f"parameters: {sum(n for g, n in counts.items() if g not in frozen):,} trainable, "
        f"{sum(n for g, n in counts.items() if g in frozen):,} frozen ("
        + ", ".join(f"{g} {n:,}{' frozen' if g in frozen else ''}" for g, n in counts.items()) + ")",
    ]
    cautions = [
        (cfg.lr > 5e-3, f"a peak learning rate of {cfg.lr:g} is high for a Transformer under AdamW (Auto-AVSR: 1e-3)"),
        (cfg.lr < 1e-5, f"a peak learning rate of {cfg.lr:g} barely moves the weights"),
        (warmup >= total, "the warmup never ends: --warmup-epochs is not below --epochs"),
        (total < 100, f"only {total} optimizer steps in all: more epochs or a smaller --max-frames"),
        (clips_per_batch * cfg.accum_steps < 4, "an effective batch under 4 clips makes noisy steps: raise "
                                                "--max-frames or --accum-steps"),
        (model.decoder is not None and max(weights) == 0 and cfg.decoder != "attention",
         "--ctc-weight 0 leaves the CTC head untrained, yet greedy CTC and the beam search use it"),
        (model.decoder is not None and min(weights) == 1, "--ctc-weight 1 leaves the attention decoder untrained"),
    ]
    lines += [f"warning: {why}" for bad, why in cautions if bad]
    for line in lines:
        print(line)
    write_text(path, "\n".join(lines) + "\n")
    return lines


# Over/under-fitting verdict ----------------------------------------------------------------------------------

def best_hypotheses(result: dict, decoder: str) -> list[list[int]]:
    """Each clip's first hypothesis from an evaluation's n-best lists."""
    return [nbest[0][0] for nbest in result["rows"][decoder]]


def same_hypothesis_share(result: dict, decoder: str) -> float:
    """The share of clips given the most common hypothesis: near 1, the model answers without looking."""
    hyps = [tuple(h) for h in best_hypotheses(result, decoder)]
    return Counter(hyps).most_common(1)[0][1] / len(hyps) if hyps else 0.0


def augmentation_hint(cfg: Config) -> str:
    """Augmentation from the first epochs stalled LRC-AR's recipe at lr 2e-3 (MEASUREMENTS.md), where 15 epochs of
    the center crop first let it learn: worth saying to a run that is stuck."""
    augmenting = cfg.random_crop or cfg.hflip_prob > 0 or cfg.time_mask or cfg.time_warp
    if not augmenting or cfg.augment_from > cfg.warmup_epochs + 1:
        return ""
    return (f"; augmentation is on from epoch {cfg.augment_from}: let the model learn on the center crop first "
            "(--augment-from 16)")


def fit_verdict(history: list[dict], cfg: Config) -> str:
    """The debugging checklist's reading of the learning curves, in words, from the better greedy CER of each epoch."""
    row, k = history[-1], cfg.patience
    # heard on both sides, as the probe is (under --drop-sound best.pt also weighs muted validation)
    val, train_cer = decoder_cer(row, "beam", "val"), decoder_cer(row, "beam", "train")
    if math.isinf(val):
        return "no verdict: there are no validation clips"
    vals = [decoder_cer(r, "beam", "val") for r in history]
    best = min(reversed(range(len(vals))), key=lambda i: vals[i])  # the later of a tie: best.pt's (best_row)
    stalled = len(vals) > k and min(vals[-k:]) > min(vals[:-k]) - 0.005
    rising = next((n for n in range(len(vals) - 1) if vals[-1 - n] <= vals[-2 - n]), len(vals) - 1)
    change = f"{vals[-1] - vals[max(len(vals) - 1 - k, 0)]:+.3f} in the last {min(k, len(vals) - 1)} epochs"
    cers = f"train CER {train_cer:.3f}, val CER {val:.3f}"
    if math.isinf(train_cer):  # a run without the training probe (--no-diagnostics, or older): validation alone
        trend = f"not better in the last {k} epochs" if stalled else change
        return f"val CER {val:.3f}, {trend}; over- or underfitting needs the training probe (--diagnostics)"
    same = row.get("val_same_hyp", 0)
    if same >= COLLAPSED and val - train_cer < OVERFIT_GAP:  # far better on its training clips: it does look
        early = " (usual while the learning rate warms up)" if row["epoch"] <= cfg.warmup_epochs + 1 else ""
        return (f"collapsed{early}: {same:.0%} of validation clips get the same hypothesis; "
                f"{cers}. The model answers without looking: check --mode sanity, the learning rate and the labels"
                + augmentation_hint(cfg) * (not early))
    if val - train_cer >= OVERFIT_GAP and stalled:
        since = len(vals) - 1 - best
        trend = f"rising for {rising} epochs" if rising > 1 else f"not better for {since} epoch{'s' * (since != 1)}"
        recited = f"; {same:.0%} of validation clips get one and the same answer" if same >= COLLAPSED else ""
        return (f"overfitting: {cers} and {trend} (best {vals[best]:.3f} at epoch {history[best]['epoch']}){recited}. "
                "best.pt keeps the best epoch; more augmentation, dropout or data, or a smaller model")
    if val - train_cer >= OVERFIT_GAP:
        return f"overfitting begins: {cers} (val {change}); val still improves"
    if stalled and train_cer >= HIGH_CER:
        return (f"stuck, underfitting: {cers}, neither better in the last {k} epochs. The model does not fit even "
                "its training clips: check the gradient flow, the learning rate, and --mode sanity"
                + augmentation_hint(cfg))
    if stalled:
        return f"converged: {cers}, not better in the last {k} epochs"
    if train_cer >= HIGH_CER:
        return f"underfitting: {cers} (val {change}), both high and still falling: train longer or a larger model"
    return f"learning: {cers} (val {change})"


# Gradient flow and the two losses ----------------------------------------------------------------------------

def gradient_notes(row: dict, model: nn.Module) -> list[str]:
    """The epoch's gradient norm per module group, and a warning for a trainable group whose gradients vanish
    or a frozen group that gets any."""
    groups, frozen = module_groups(model), frozen_parts(model)
    norms = {g: row[f"grad_{g}"] for g in groups if f"grad_{g}" in row}
    rms = {g: n / math.sqrt(sum(p.numel() for p in groups[g])) for g, n in norms.items()}
    liveliest = max((v for g, v in rms.items() if g not in frozen), default=0.0)
    lines = ["gradient norm: " + ", ".join(f"{g} {n:.2e}{' (frozen)' if g in frozen else ''}"
                                           for g, n in norms.items())]
    for g, n in norms.items():
        if g in frozen and n > 0:
            lines.append(f"warning: {g} is frozen but its gradients are not zero (norm {n:.2e})")
        elif g not in frozen and (n == 0 or rms[g] < VANISHING * liveliest):
            lines.append(f"warning: {g}'s gradients vanish (rms {rms[g]:.1e} a weight, the liveliest part's "
                         f"{liveliest:.1e}): it hardly learns; check its learning rate, normalisation or freezing")
    return lines


def loss_note(row: dict, cfg: Config, model: nn.Module) -> list[str]:
    if model.decoder is None:
        return []
    share = row["ctc_share"]
    line = (f"losses: ctc {row['train_ctc']:.2f} x {cfg.ctc_weight:g} = {share:.0%} of the objective, "
            f"attention {row['train_att']:.2f} x {1 - cfg.ctc_weight:g} = {1 - share:.0%}")
    if 0 < cfg.ctc_weight < 1 and max(share, 1 - share) >= DOMINANT:
        loud = "CTC" if share > 0.5 else "attention"
        line += (f"\nwarning: the {loud} loss makes {max(share, 1 - share):.0%} of the objective and drowns the "
                 f"other; move --ctc-weight {'down' if loud == 'CTC' else 'up'}")
    return [line]


# Worst clips -------------------------------------------------------------------------------------------------

def scored_clips(result: dict, ds: Dataset, vocab: Vocabulary, decoder: str) -> list[dict]:
    """Every clip of an evaluation, side by side with its hypothesis, worst first."""
    rows = result["rows"]
    clips = []
    for i, ref, nbest in zip(rows["order"], rows["refs"], rows[decoder]):
        hyp, score = nbest[0]
        clips.append({"id": ds.samples[i].stem, "frames": ds.samples[i].frames, "decoder": decoder,
                      "cer": clip_cer(ref, hyp, vocab), "score": round(score, 3),
                      "reference": vocab.decode(ref), "hypothesis": vocab.decode(hyp)})
    return sorted(clips, key=lambda c: (-c["cer"], c["id"]))


def worst_lines(worst: list[dict]) -> list[str]:
    lines = [f"worst {len(worst)} clips ({worst[0]['decoder']} decoding):"] if worst else []
    for c in worst:
        lines.append(f"  {c['id']}  {c['frames']} frames  CER {c['cer']:.2f}  score {c['score']:.1f}\n"
                     f"    ref: {c['reference']}\n    hyp: {c['hypothesis']}")
    return lines


# Unit confusions ---------------------------------------------------------------------------------------------

def alignment(ref: list[str], hyp: list[str]) -> list[tuple]:
    """A minimal edit-distance alignment: (reference unit, hypothesis unit) pairs, None on the side without
    one (a deletion or an insertion). Among the minimal ones it pairs units that share their letter or their
    diacritic, so that a confusion is counted as the one it most likely was."""
    bonus = 1 / (2 * (len(ref) + len(hyp) + 1))  # all bonuses together stay below one edit
    cost = lambda r, h: 0.0 if r == h else 1 - bonus * ((base_letter(r) == base_letter(h))
                                                       + (diacritic_of(r) == diacritic_of(h))) / 2
    d = np.zeros((len(ref) + 1, len(hyp) + 1))
    d[:, 0], d[0, :] = np.arange(len(ref) + 1), np.arange(len(hyp) + 1)
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + cost(ref[i - 1], hyp[j - 1]))
    pairs, i, j = [], len(ref), len(hyp)
    while i or j:  # retrace the choices: each d[i, j] is exactly one of its three candidates
        if i and j and d[i, j] == d[i - 1, j - 1] + cost(ref[i - 1], hyp[j - 1]):
            pairs.append((ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i and d[i, j] == d[i - 1, j] + 1:
            pairs.append((ref[i - 1], None))
            i -= 1
        else:
            pairs.append((None, hyp[j - 1]))
            j -= 1
    return pairs[::-1]


def diacritic_of(unit: str) -> str:
    """A unit's marks by name ("shadda+fatha"), "none" for a bare letter."""
    return "+".join(unicodedata.name(m, f"U+{ord(m):04X}").removeprefix("ARABIC ").lower()
                    for m in unit[1:]) or "none"


def unit_pairs(refs: list[list[int]], hyps: list[list[int]], vocab: Vocabulary) -> Counter:
    """(reference unit, hypothesis unit) -> count over every clip's alignment; word boundaries left out,
    as the CER leaves them out."""
    text = lambda ids: [vocab.itos[i] for i in ids if i != vocab.space]
    pairs: Counter = Counter()
    for r, h in zip(refs, hyps):
        pairs.update(alignment(text(r), text(h)))
    return pairs


def reference_counts(pairs: Counter) -> Counter:
    """How often each reference unit (letter, diacritic) occurs in the aligned pairs."""
    counts: Counter = Counter()
    for (r, _), n in pairs.items():
        if r:
            counts[r] += n
    return counts


def pairs_by(pairs: Counter, part) -> Counter:
    """Unit pairs seen through `part` (base_letter or diacritic_of): letter or diacritic confusions."""
    out: Counter = Counter()
    for (r, h), n in pairs.items():
        out[(r and part(r), h and part(h))] += n
    return out


def confusion_summary(pairs: Counter) -> dict:
    """The edits, and whether the letters or the diacritics go wrong: on units aligned to a unit, how often
    the letter (the diacritic) is right, against always guessing the most common one."""
    aligned = Counter({(r, h): n for (r, h), n in pairs.items() if r and h})
    subs = Counter({(r, h): n for (r, h), n in aligned.items() if r != h})
    total = lambda counts, test=lambda r, h: True: sum(n for (r, h), n in counts.items() if test(r, h))
    same_letter = lambda r, h: base_letter(r) == base_letter(h)
    same_marks = lambda r, h: diacritic_of(r) == diacritic_of(h)
    n_aligned, n_subs = max(total(aligned), 1), max(total(subs), 1)
    summary = {"reference_units": total(pairs, lambda r, h: r is not None), "substitutions": total(subs),
               "deletions": total(pairs, lambda r, h: h is None), "insertions": total(pairs, lambda r, h: r is None),
               "letter_right": total(aligned, same_letter) / n_aligned,
               "diacritic_right": total(aligned, same_marks) / n_aligned,
               "substitutions_only_diacritic": total(subs, lambda r, h: same_letter(r, h) and not same_marks(r, h)) / n_subs,
               "substitutions_only_letter": total(subs, lambda r, h: same_marks(r, h) and not same_letter(r, h)) / n_subs}
    for name, part in (("letter", base_letter), ("diacritic", diacritic_of)):
        by_reference = reference_counts(pairs_by(aligned, part))
        top, n = by_reference.most_common(1)[0] if by_reference else ("", 0)
        summary[f"most_common_{name}"], summary[f"most_common_{name}_share"] = top, n / n_aligned
    return summary


def confusion_headline(s: dict) -> str:
    if not s["most_common_letter"]:
        return "confusions: no unit recognised yet"
    return (f"confusions: letter right on {s['letter_right']:.0%} of aligned units, diacritic on "
            f"{s['diacritic_right']:.0%} (always guessing {s['most_common_diacritic']}: "
            f"{s['most_common_diacritic_share']:.0%})")


def confusion_lines(pairs: Counter, top: int = 15) -> list[str]:
    """confusions.txt: the summary, the most confused pairs, and deletions and insertions per unit."""
    s, ref_counts = confusion_summary(pairs), reference_counts(pairs)
    lines = [f"{s['reference_units']} reference units: {s['substitutions']} substituted, {s['deletions']} deleted, "
             f"{s['insertions']} inserted"]
    if not s["most_common_letter"]:
        return lines + ["no reference unit was recognised as any unit: nothing to compare"]
    lines += [
             f"letter right on {s['letter_right']:.1%} of aligned units (always {s['most_common_letter']}: "
             f"{s['most_common_letter_share']:.1%})",
             f"diacritic right on {s['diacritic_right']:.1%} of aligned units (always {s['most_common_diacritic']}: "
             f"{s['most_common_diacritic_share']:.1%})",
             f"substitutions: {s['substitutions_only_diacritic']:.1%} only the diacritic wrong, "
             f"{s['substitutions_only_letter']:.1%} only the letter wrong, the rest both"]
    for title, part in (("units", str), ("letters", base_letter), ("diacritics", diacritic_of)):
        counts = pairs if part is str else pairs_by(pairs, part)
        swapped = [(n, r, h) for (r, h), n in counts.items() if r and h and r != h]
        lines.append(f"\nmost confused {title} (reference -> hypothesis: count)")
        lines += [f"  {r} -> {h}: {n}" for n, r, h in sorted(swapped, reverse=True)[:top]]
    for title, side in (("deleted", 0), ("inserted", 1)):
        counts = Counter()
        for pair, n in pairs.items():
            if pair[1 - side] is None:
                counts[pair[side]] += n
        lines.append(f"\nmost {title} units (count" + (", share of the unit's occurrences)" if side == 0 else ")"))
        lines += [f"  {u}: {n}" + (f" ({n / ref_counts[u]:.0%})" if side == 0 else "") for u, n in counts.most_common(top)]
    return lines


def confusion_rows(pairs: Counter) -> list[dict]:
    """confusions.csv: every pair at the three levels; an empty side is a deletion or an insertion."""
    rows = []
    for level, part in (("unit", str), ("letter", base_letter), ("diacritic", diacritic_of)):
        counts = pairs if part is str else pairs_by(pairs, part)
        rows += [{"level": level, "reference": r or "", "hypothesis": h or "", "count": n}
                 for (r, h), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return rows


def confusion_matrix(counts: Counter, labels: list[str]) -> np.ndarray:
    """Rows: reference labels; columns: the same labels, then "other" and "deleted"; each row sums to 1."""
    where = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels) + 2))
    for (r, h), n in counts.items():
        if r in where:
            matrix[where[r], len(labels) + 1 if h is None else where.get(h, len(labels))] += n
    return matrix / np.maximum(matrix.sum(1, keepdims=True), 1)


@functools.cache
def plot_font():
    from matplotlib import font_manager, ft2font
    return ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties()))


def drawable(label: str) -> str:
    """The label, or its characters' names where matplotlib's font lacks one (alef wasla, for one)."""
    if all(plot_font().get_char_index(ord(ch)) for ch in label):
        return label
    names = (unicodedata.name(ch, f"U+{ord(ch):04X}").removeprefix("ARABIC ").removeprefix("LETTER ") for ch in label)
    return "+".join(names).lower()


def plot_confusions(pairs: Counter, path: Path, units: int = 30) -> None:
    """Heatmaps of how each reference unit (the `units` most frequent), letter (as many) and diacritic was
    recognised: each row a reference, its shares over what was heard, one colour scale for all three."""
    from matplotlib.figure import Figure
    panels = []
    for title, part in (("units", str), ("letters", base_letter), ("diacritics", diacritic_of)):
        counts = pairs if part is str else pairs_by(pairs, part)
        panels.append((title, counts, [label for label, _ in reference_counts(counts).most_common(units)]))
    fig = Figure(figsize=(26, 10))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [len(labels) + 2 for _, _, labels in panels]})
    for ax, (title, counts, labels) in zip(axes, panels):
        names = [textwrap.shorten(drawable(label), 14, placeholder="~") for label in labels]
        image = ax.imshow(confusion_matrix(counts, labels), cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(labels)), names, fontsize=11)
        ax.set_xticks(range(len(labels) + 2), names + ["other", "deleted"], fontsize=11, rotation=90)
        ax.set_title(f"{title}: reference (rows) heard as (columns)", fontsize=13)
    fig.subplots_adjust(left=0.05, right=0.94, bottom=0.16, top=0.94, wspace=0.28)  # tight_layout costs 0.4 s
    fig.colorbar(image, cax=fig.add_axes((0.955, 0.25, 0.008, 0.6)), label="share of the reference's occurrences")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def write_confusions(pairs: Counter, folder: Path, heading: str) -> None:
    """confusions.txt and confusions.csv (the heatmap is drawn apart: it costs 0.6 s)."""
    lines = [heading] + confusion_lines(pairs)
    write_text(folder / "confusions.txt", "\n".join(lines) + "\n")
    write_csv(folder / "confusions.csv", confusion_rows(pairs))


# Every epoch -------------------------------------------------------------------------------------------------

def better_greedy_decoder(result: dict) -> str:
    return min((d for d in ("ctc", "attention") if d in result), key=lambda d: result[d]["cer"])


def diagnose_epoch(history: list[dict], val: dict | None, ds: Dataset, vocab: Vocabulary, model: nn.Module,
                   cfg: Config) -> tuple[list[str], Counter | None]:
    """The checklist on an epoch just finished: the verdict and same-answer share go into its metrics row,
    the worst clips and the confusions into <work-dir>/diagnostics; -> the lines for the console, and the
    validation's unit pairs for the heatmap (training redraws it at most every REDRAW_HEATMAP seconds)."""
    row, folder = history[-1], Path(cfg.work_dir) / "diagnostics"
    lines, pairs = [], None
    if val is not None:
        decoder = better_greedy_decoder(val)
        row["val_same_hyp"] = same_hypothesis_share(val, decoder)
        worst = scored_clips(val, ds, vocab, decoder)[:cfg.worst_k]
        append_rows(folder / "worst_samples.csv", [{"epoch": row["epoch"], **c} for c in worst], row["epoch"])
        pairs = unit_pairs(val["rows"]["refs"], best_hypotheses(val, decoder), vocab)
        summary = confusion_summary(pairs)
        write_confusions(pairs, folder, f"epoch {row['epoch']}, validation, {decoder} decoding")
        lines += worst_lines(worst)
        lines.append(confusion_headline(summary) + f"; {folder / 'confusions.txt'}")
    row["verdict"] = fit_verdict(history, cfg)
    return [f"verdict: {row['verdict']}"] + gradient_notes(row, model) + loss_note(row, cfg, model) + lines, pairs


def gradient_flow(model: nn.Module, ds: Dataset, index: list[int], vocab: Vocabulary, cfg: Config, device) -> dict:
    """--mode diagnose: each module group's mean gradient norm over the split's batches (no step is taken)."""
    train_mode(model)
    one_step, unscaled = dataclasses.replace(cfg, accum_steps=1), torch.amp.GradScaler(device.type, enabled=False)
    augment, norms = Augment(cfg, training=False), []
    for batch in eval_batches(ds, index, cfg):
        model.zero_grad(set_to_none=True)
        x, lengths, targets = training_batch(ds, [index[i] for i in batch], augment, device)
        backward_pass(Objective(model, vocab, cfg), x, lengths, targets, one_step, device, unscaled)
        norms.append(group_grad_norms(model))
    model.zero_grad(set_to_none=True)
    model.eval()
    return {f"grad_{g}": v for g, v in zip(module_groups(model), torch.stack(norms).mean(0).tolist())}


# Dataset statistics ------------------------------------------------------------------------------------------

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
    from matplotlib.figure import Figure  # not pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 2.5]})
    for ax, key, title in ((axes[0], "frames", "frames a clip"), (axes[1], "label_units", "units a label")):
        hist = stats[key]["histogram"]
        ax.bar(list(hist), list(hist.values()))
        ax.set_title(f"{title} (mean {stats[key]['mean']})")
        ax.set_ylabel("clips")
    top = list(stats["unit_frequency"].items())[:40]
    axes[2].bar(range(len(top)), [n for _, n in top])
    axes[2].set_xticks(range(len(top)), [drawable(unit) for unit, _ in top], fontsize=10)
    for tick in axes[2].get_xticklabels():  # a name in words (the font lacks the letter) stands upright
        tick.set_rotation(90 if len(tick.get_text()) > 2 else 0)
    axes[2].set_title(f"the {len(top)} most frequent of {stats['distinct_units']} units (all in stats.json)")
    axes[2].set_ylabel("occurrences")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_curves(history: list[dict], path: Path, decoder: str = "beam") -> None:
    """The learning curves side by side: loss and CER, training (the fixed probe, no augmentation) against
    validation, the best epoch (best.pt's, by `decoder`) marked; gradient norm per module group; learning rate.
    The title is the last epoch's verdict, whole."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(20, 5))
    axes = fig.subplots(1, 4)

    def line(ax, key, label=None, style="-"):
        values = [np.nan if r.get(key) in (None, "") else float(r[key]) for r in history]
        if not np.isnan(values).all():  # a series the run does not have (no probe, no decoder) stays out
            ax.plot(epochs, values, style, marker=".", label=label)

    for key, label, style in (("train_loss", "training batches", ":"), ("train_eval_loss", "train probe", "--"),
                              ("val_loss", "val", "-")):
        line(axes[0], key, label, style)
    for key, label, style in (("train_cer_ctc", "train probe, greedy CTC", "--"),
                              ("train_cer_att", "train probe, attention", "--"), ("val_cer_ctc", "val, greedy CTC", "-"),
                              ("val_cer_att", "val, attention", "-"), ("val_wer", "val WER", ":"),
                              ("val_muted_cer_ctc", "val muted, greedy CTC", "-."),
                              ("val_muted_cer_att", "val muted, attention", "-.")):
        line(axes[1], key, label, style)
    axes[1].set_ylim(bottom=0)
    for key in [k for k in history[-1] if k.startswith("grad_")]:
        line(axes[2], key, key.removeprefix("grad_"))
    axes[2].set_yscale("log")
    line(axes[3], "lr")
    scored = [r for r in history if selection_cer(r, decoder) < math.inf]
    if scored:
        best = best_row(scored, decoder)
        weighted = " (heard and muted, weighted)" if best.get("muted_weight") else ""
        for ax in axes[:2]:
            ax.axvline(best["epoch"], color="gray", linestyle="--", linewidth=1,
                       label=f"best: epoch {best['epoch']}, val CER {selection_cer(best, decoder):.3f}{weighted}")
    for ax, title in zip(axes, ("loss", "error rate", "gradient norm by part", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0] and ax is not axes[3]:
            ax.legend(fontsize=8)
    if history[-1].get("verdict"):
        fig.suptitle(textwrap.fill(f"epoch {epochs[-1]}: {history[-1]['verdict']}", 190), fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.11, top=0.82, wspace=0.22)  # tight_layout costs 0.4 s
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


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
# 10. The training run: setup (fresh, pretrained or resumed), a short loop over epochs, and the end of each
#     epoch on rank 0 (scores, the verdict, curves, checkpoints) that decides, for every process, when to stop.
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainingRun:
    """What a run carries from epoch to epoch: built by start_training, updated by each epoch's end."""
    cfg: Config
    device: torch.device
    rank: int
    world: int
    vocab: Vocabulary
    ds: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    history: list[dict]
    start: int  # the first epoch to train (after a resumed run's last)
    frozen: str  # what is frozen now (--freeze until --unfreeze-at)
    objective: nn.Module
    features: FeatureBank | None  # a frozen frontend's cached features
    teacher: TeacherTargets | None  # --teacher's soft targets
    probe: list[int]  # the training clips scored each epoch without augmentation
    began: float = dataclasses.field(default_factory=time.time)
    slowest: float = 0.0  # the longest epoch's seconds, for --time-budget
    curves_drawn: float = 0.0
    heatmap_drawn: float = 0.0

    @property
    def work(self) -> Path:
        return Path(self.cfg.work_dir)


def start_training(cfg: Config, ds: Dataset | None) -> TrainingRun:
    """The model, optimizer and schedule, fresh (pretrained parts loaded) or as the run in --work-dir left them
    (--resume), on the device; the setup printed and written to diagnostics/setup.txt."""
    device = pick_device(cfg.device)
    rank, world = rank_and_world()
    vocab = load_vocabulary(cfg)
    state = previous_run(cfg, vocab)
    ds = ds or load_dataset_once(cfg, vocab, device)
    if not ds.subset("train"):
        raise UserError("The training split is empty: add clips, or change --val-fraction / --test-fraction.")
    model = build_model(cfg, vocab.size)
    if (cfg.init_from or cfg.init_from_audio) and state is None:
        load_pretrained(model, cfg, vocab)
    model.to(device)
    if cfg.sync_batchnorm and world > 1:
        model = with_synced_batchnorm(model, device)
    cfg = with_planned_epochs(cfg, state)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch(ds, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg) == torch.float16)
    history, start = [], 1
    if state is not None:
        history, start = resume_from(state, model, optimizer, scheduler, scaler, cfg), state["epoch"] + 1
    frozen = frozen_in(cfg, start)
    set_frozen(model, frozen)
    if cfg.compile:
        compile_model(model, device)
    print(f"{cfg.arch}/{cfg.preset} ({cfg.modality}): {sum(p.numel() for p in model.parameters()):,} parameters "
          f"on {device}"
          f"{f' x {world} processes' if world > 1 else ''}; {len(ds.subset('train'))} train / "
          f"{len(ds.subset('val'))} val / {len(ds.subset('test'))} test clips"
          + (f" + {len(ds.subset('extra'))} extra training clips" if ds.subset("extra") else ""))
    if rank == 0:
        report_setup(model, ds, cfg, Path(cfg.work_dir) / "diagnostics" / "setup.txt")
    return TrainingRun(cfg, device, rank, world, vocab, ds, model, optimizer, scheduler, scaler, history, start,
                       frozen, objective_for(model, vocab, cfg, device),
                       FeatureBank(model, ds, cfg, device) if caches_features(model, cfg, frozen) else None,
                       teacher_targets(cfg, ds, vocab, device) if cfg.teacher else None,
                       training_probe(ds, cfg) if cfg.diagnostics and rank == 0 else [])


def resume_from(state: dict, model, optimizer, scheduler, scaler, cfg: Config) -> list[dict]:
    """Weights, optimizer, schedule, loss scale and random streams as last.pt saved them -> its history."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    apply_new_rates(optimizer, scheduler, cfg)
    if state["scaler"] and scaler.is_enabled():  # empty when saved on a CPU or a bf16 GPU
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    print(f"Resumed from {checkpoints_of(cfg.work_dir) / 'last.pt'} after epoch {state['epoch']}")
    return state["history"]


def with_planned_epochs(cfg: Config, state: dict | None) -> Config:
    """A resumed --fit-budget run keeps the epochs planned before it was stopped."""
    if state is None or not cfg.fit_budget or state["epoch"] < fit_epoch(cfg):
        return cfg
    planned = state["config"]["epochs"]
    if planned >= cfg.epochs:
        return cfg
    print(f"--fit-budget: the run keeps the {planned} epochs it planned (--no-fit-budget trains on to --epochs "
          f"{cfg.epochs})")
    return dataclasses.replace(cfg, epochs=planned)


def fit_to_budget(run: TrainingRun) -> None:
    """--fit-budget: rank 0's plan, for every process; a shorter run gets the schedule of its own length."""
    cfg, elapsed = run.cfg, time.time() - run.began
    planned = int(rank0_number(epochs_that_fit(run.history, cfg, elapsed) if run.rank == 0 else 0, run.device))
    if run.rank == 0:
        print(f"--fit-budget: epochs of {epoch_pace(run.history):.0f} s so far and "
              f"{cfg.time_budget - elapsed / 60:.1f} of --time-budget's {cfg.time_budget:g} minutes left: "
              + (f"{planned} epochs, not {cfg.epochs}; the schedule now ends with epoch {planned}"
                 if planned < cfg.epochs else f"all {cfg.epochs} epochs fit"), flush=True)
    if planned < cfg.epochs:
        run.cfg = dataclasses.replace(cfg, epochs=planned)
        reschedule(run.optimizer, run.scheduler, run.cfg, steps_per_epoch(run.ds, run.cfg))


def begin_epoch(run: TrainingRun, epoch: int) -> Config:
    """The run's length fitted to its budget, freezing that changes with this epoch, each GPU's own dropout masks
    -> the settings of this epoch."""
    if run.cfg.fit_budget and epoch == fit_epoch(run.cfg):
        fit_to_budget(run)
    cfg = run.cfg
    if frozen_in(cfg, epoch) != run.frozen:
        run.frozen, run.features = frozen_in(cfg, epoch), None
        set_frozen(run.model, run.frozen)
        run.objective = objective_for(run.model, run.vocab, cfg, run.device)
    if epoch == cfg.unfreeze_at:
        print(f"epoch {epoch}: {cfg.freeze} unfrozen, at {cfg.unfreeze_lr:g} x the learning rate", flush=True)
    if run.world > 1 and run.device.type == "cuda":  # own dropout masks per GPU; augmentation draws (CPU) stay shared
        torch.cuda.manual_seed((cfg.seed * 10_000 + epoch) * 64 + run.rank)
    return at_epoch(cfg, epoch)


def muted_validation(run: TrainingRun, ecfg: Config) -> dict:
    """Under --drop-sound, the validation clips scored again with their sound muted, and the share of muted
    clips in training that weighs them when best.pt is picked: the model is trained for both, so an epoch
    before the dropout started (best with clean sound, lost without it) would otherwise win."""
    if not (ecfg.drop_sound and run.ds.subset("val")):
        return {}
    muted = evaluate(run.model, run.ds, run.ds.subset("val"), run.vocab, dataclasses.replace(ecfg, sound="mute"),
                     run.device)
    return {"val_muted_cer_ctc": muted["ctc"]["cer"], "val_muted_cer_att": (muted.get("attention") or {}).get("cer"),
            "muted_weight": ecfg.drop_sound}


def end_epoch(run: TrainingRun, epoch: int, ecfg: Config, train_stats: dict, updates, t0: float, done) -> bool:
    """Rank 0's end of an epoch: validation and the training probe scored, the row logged and drawn, the
    checkpoints saved -> whether this was the last epoch (done, out of time, stalled or the final one)."""
    cfg, model, ds, history = run.cfg, run.model, run.ds, run.history
    val = evaluate(model, ds, ds.subset("val"), run.vocab, ecfg, run.device, features=run.features) if ds.subset("val") else None
    probe = evaluate(model, ds, run.probe, run.vocab, ecfg, run.device, features=run.features) if run.probe else None
    muted = muted_validation(run, ecfg)
    seconds = time.time() - t0
    run.slowest = max(run.slowest, seconds)
    row = epoch_row(epoch, train_stats, val, probe, run.optimizer.param_groups[0]["lr"], seconds, ecfg) | muted
    history.append(row)
    notes, pairs = diagnose_epoch(history, val, ds, run.vocab, model, ecfg) if cfg.diagnostics else ([], None)
    reached = done is not None and done(row)
    out_of_time = cfg.time_budget and (time.time() - run.began + 1.2 * run.slowest) / 60 > cfg.time_budget
    stalled = stalled_for(history, cfg)
    last = reached or out_of_time or epoch == cfg.epochs or stalled
    log_epoch(row, cfg, 0 if last else time_left(history, cfg, run.began))
    for line in notes if cfg.verbose else notes[:1]:  # the verdict; the rest is in diagnostics/ and metrics.csv
        print(line, flush=True)
    draw_epoch(run, pairs, last)
    save_epoch(run, epoch, updates)
    if stalled and epoch < cfg.epochs:
        best = best_row(history, cfg.decoder)["epoch"]
        print(f"Stopping after epoch {epoch}: no better validation CER for {cfg.stop_after} epochs "
              f"(--stop-after; the best was epoch {best}).")
    elif out_of_time and epoch < cfg.epochs:
        print(f"Stopping after epoch {epoch}: the next one would overrun --time-budget {cfg.time_budget} min. "
              f"Continue with --resume.")
    return bool(last)


def draw_epoch(run: TrainingRun, pairs, last: bool) -> None:
    """curves.png and the confusion heatmap, redrawn at most every few minutes (and after the last epoch)."""
    if last or time.time() - run.curves_drawn >= REDRAW_CURVES:
        run.curves_drawn = time.time()
        plot_curves(run.history, run.work / "curves.png", run.cfg.decoder)
    if pairs is not None and (last or time.time() - run.heatmap_drawn >= REDRAW_HEATMAP):
        run.heatmap_drawn = time.time()
        plot_confusions(pairs, run.work / "diagnostics" / "confusions.png")


def save_epoch(run: TrainingRun, epoch: int, updates) -> None:
    """metrics.csv, the parameter updates, the epoch's weights for averaging, last.pt and (when better) best.pt."""
    cfg, ckpt_dir = run.cfg, checkpoints_of(run.work)
    write_csv(run.work / "metrics.csv", run.history)
    if updates is not None:
        append_rows(run.work / "diagnostics" / "param_updates.csv", updates, epoch)
    if cfg.average_last:  # before last.pt: a run killed in between resumes with this epoch's weights redone
        keep_epoch_weights(run.model, epoch, cfg)
    save_checkpoint(ckpt_dir / "last.pt", run.model, run.optimizer, run.scheduler, run.scaler, epoch, run.history,
                    cfg, run.vocab)
    if best_row(run.history, cfg.decoder) is run.history[-1]:
        atomic_write(ckpt_dir / "best.pt", lambda tmp: shutil.copyfile(ckpt_dir / "last.pt", tmp))


def train(cfg: Config, ds: Dataset | None = None, done=None) -> dict:
    """Train on `ds` (default: the dataset cfg names); `done(row)`, when given, ends training after an epoch.
    Under torchrun, rank 0's result has the history; the other processes' is empty."""
    run = start_training(cfg, ds)
    for epoch in range(run.start, run.cfg.epochs + 1):
        t0 = time.time()
        ecfg = begin_epoch(run, epoch)
        updates = [] if cfg.log_param_updates and run.rank == 0 else None
        train_stats = train_epoch(run.objective, run.ds, ecfg, run.device, run.optimizer, run.scheduler, run.scaler,
                                  epoch, updates, run.features, run.teacher)
        last = run.rank == 0 and end_epoch(run, epoch, ecfg, train_stats, updates, t0, done)
        if rank0_says(last, run.device):  # every process stops where rank 0 does, once an epoch
            break
    return {"history": run.history, "model": run.model, "vocab": run.vocab, "dataset": run.ds}


# ---------------------------------------------------------------------------------------------------------
# 11. Preprocessing: raw face videos -> the 112 x 112 gray 25 fps mouth clips the model reads, cut the way the
#     LRC-AR's own crops were: dlib's 68 landmarks on every frame, the crop centred on the mouth (points 48-67),
#     sized and turned by the eyes.
# ---------------------------------------------------------------------------------------------------------

LANDMARK_FILE = "shape_predictor_68_face_landmarks.dat"
MOUTH = slice(48, 68)
OUTER_EYE_CORNERS = (36, 45)
RAW_VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v"}
SAME_FACE_OVERLAP = 0.3  # a detection overlapping the followed face this much (IoU) is the same face
SAME_LOOK = 0.5  # below this correlation with the previous frame's face, the followed face is lost
REPORT_EVERY = 20.0  # seconds: preprocess_report.csv is rewritten at most this often while workers run


def import_dlib():
    try:
        import dlib
    except ImportError as e:
        raise UserError("Preprocessing needs dlib: `pip install dlib-bin` (prebuilt wheels; `pip install dlib` "
                        "compiles for many minutes). Kaggle's image has it.") from e
    return dlib


def find_landmark_model(cfg: Config) -> Path:
    """--landmark-model, else the usual places (the face_recognition_models package among them, looked up on
    sys.path rather than imported: its import fails on recent setuptools); a clear error otherwise."""
    if cfg.landmark_model:
        if not Path(cfg.landmark_model).is_file():
            raise UserError(f"--landmark-model {cfg.landmark_model}: no such file.")
        return Path(cfg.landmark_model)
    package_folders = [Path(p) / "face_recognition_models" / "models" for p in sys.path if p]
    found, places = find_on_disk(LANDMARK_FILE, *package_folders)
    if found is None:
        looked = "\n  ".join(map(str, places))
        raise UserError(
            f"dlib's 68-point landmark model ({LANDMARK_FILE}) was not found. Looked in:\n  {looked}\n"
            f"Get it with `pip install face_recognition_models` (the package ships the file), or download "
            f"http://dlib.net/files/{LANDMARK_FILE}.bz2, unpack it (bunzip2) and pass --landmark-model PATH. "
            f"On Kaggle, attach a dataset that holds the file.")
    return found


def box_of(points: np.ndarray) -> np.ndarray:
    """left, top, right, bottom of a set of points."""
    return np.concatenate([points.min(0), points.max(0)])


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes."""
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
    return float(inter / union) if union > 0 else 0.0


def face_box(points: np.ndarray) -> np.ndarray:
    """The box dlib's detector would draw around a face, placed from its inner landmarks (brows, eyes, nose,
    mouth: 1.32 x their width, centred 0.04 of it below theirs, as measured on LRC-AR's full-size detections).
    The jaw line is left out: it follows the box it was fitted in, and a box drawn around it grows frame by frame."""
    inner = box_of(points[17:])
    width = inner[2] - inner[0]
    centre = (inner[:2] + inner[2:]) / 2 + np.array([0.01, 0.037]) * width
    return np.concatenate([centre - 0.66 * width, centre + 0.66 * width])


def face_look(gray: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The face inside box as a small standardised patch: what the next frame's face is compared with."""
    import cv2
    h, w = gray.shape
    l, t, r, b = np.round(box).astype(int)
    patch = gray[max(t, 0):min(b, h), max(l, 0):min(r, w)]
    if patch.size < 16:
        return np.zeros((24, 24), np.float32)
    patch = cv2.resize(patch, (24, 24), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (patch - patch.mean()) / (patch.std() + 1e-3)


@dataclass
class FaceTrack:
    points: np.ndarray  # T x 68 x 2 landmarks, NaN on frames without the face
    detections: int  # times the detector ran
    most_faces: int  # the most faces one detection saw


class FaceFollower:
    """dlib's 68 landmarks on every frame. The detector runs on a shrunk frame every `detect_every` frames (on
    the full frame when the shrunk one shows no face); in between, the face's box is carried over from the last
    landmarks, and when the face stops looking like itself (a cut, the face gone) the detector runs at once. Of
    several faces the largest is taken, and then the same one is followed."""

    def __init__(self, model_path: Path, cfg: Config):
        dlib = import_dlib()
        self.rectangle = dlib.rectangle
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model_path))
        self.every, self.scale = cfg.detect_every, cfg.detect_scale
        self.start()

    def faces(self, gray: np.ndarray) -> list[np.ndarray]:
        import cv2
        found, scale = [], 1.0
        if self.scale < 1:
            small = cv2.resize(gray, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_AREA)
            found, scale = self.detector(small, 0), self.scale
        if not found:
            found, scale = self.detector(gray, 0), 1.0
        return [np.array([f.left(), f.top(), f.right(), f.bottom()], float) / scale for f in found]

    def landmarks(self, gray: np.ndarray, box: np.ndarray) -> np.ndarray:
        shape = self.predictor(gray, self.rectangle(*(int(round(v)) for v in box)))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32)

    def start(self) -> None:
        """A new video: counts from zero, no face followed."""
        self.detections, self.most_faces, self.face, self.frame = 0, 0, 0, 0
        self.forget()

    def forget(self) -> None:
        """Forget the face followed (a cut to another shot): the next frame's largest face is a new one."""
        self.box = self.followed = self.look = None  # detector-style box to use now; the face's last box; its look

    def step(self, gray: np.ndarray, switch: bool = False) -> np.ndarray | None:
        """The followed face's landmarks on this frame, or None. With `switch`, a frame showing other faces but
        not the followed one (a cut to another shot) starts following the largest of them, and `self.face`
        counts the faces followed so far, a face that suddenly stops looking like itself (a cut) as a new one."""
        p, cut = None, False
        if self.box is not None and self.frame % self.every:
            p = self.landmarks(gray, self.box)
            if (face_look(gray, box_of(p)) * self.look).mean() < SAME_LOOK:
                p, cut = None, switch
        self.frame += 1
        if p is None:
            faces = self.faces(gray)
            self.detections, self.most_faces = self.detections + 1, max(self.most_faces, len(faces))
            if self.followed is not None:
                same = [f for f in faces if overlap(f, self.followed) > SAME_FACE_OVERLAP]
                faces = same if same or not switch else faces
                self.face += (cut or not same) and bool(faces)
            else:
                self.face += bool(faces)
            if not faces:
                self.box = None
                return None
            largest = max(faces, key=lambda f: (f[2:] - f[:2]).prod())
            # a box found on a shrunk frame is coarse: fit once, then again in the box that fit implies
            p = self.landmarks(gray, face_box(self.landmarks(gray, largest)))
        self.box = self.followed = face_box(p)
        self.look = face_look(gray, box_of(p))
        return p

    def track(self, frames: np.ndarray) -> FaceTrack:
        self.start()
        points = np.full((len(frames), 68, 2), np.nan, np.float32)
        for t, gray in enumerate(frames):
            p = self.step(gray)
            if p is not None:
                points[t] = p
        return FaceTrack(points, self.detections, self.most_faces)


def fill_gaps(points: np.ndarray) -> np.ndarray:
    """Frames without a face get landmarks interpolated from their neighbours (the nearest at either end)."""
    have = ~np.isnan(points[:, 0, 0])
    t = np.arange(len(points))
    flat = points.reshape(len(points), -1)
    filled = np.stack([np.interp(t, t[have], flat[have, k]) for k in range(flat.shape[1])], 1)
    return filled.reshape(points.shape).astype(np.float32)


def smooth_over_time(points: np.ndarray, frames: int) -> np.ndarray:
    """Each frame's landmarks averaged with up to frames // 2 neighbours either side (fewer near the ends, so
    the window stays centred)."""
    half = frames // 2
    sums = np.concatenate([np.zeros_like(points[:1]), np.cumsum(points, 0)])
    out = np.empty_like(points)
    for t in range(len(points)):
        k = min(half, t, len(points) - 1 - t)
        out[t] = (sums[t + k + 1] - sums[t - k]) / (2 * k + 1)
    return out


def mouth_crops(points: np.ndarray, scale: float) -> np.ndarray:
    """T x 4: crop centre x, y (mean of the mouth points), side (scale x the outer eye corners' distance) and
    angle in degrees (the eye line's tilt, turned level)."""
    centre = points[:, MOUTH].mean(1)
    eyes = points[:, OUTER_EYE_CORNERS[1]] - points[:, OUTER_EYE_CORNERS[0]]
    side = scale * np.linalg.norm(eyes, axis=1)
    angle = np.degrees(np.arctan2(eyes[:, 1], eyes[:, 0]))
    return np.column_stack([centre, side, angle]).astype(np.float32)


def cut_mouth(gray: np.ndarray, crop: np.ndarray, size: int) -> np.ndarray:
    import cv2
    cx, cy, side, angle = (float(v) for v in crop)
    if side > 2 * size:  # shrink first: warpAffine's bilinear sampling would alias
        f = 2 * size / side
        gray, cx, cy, side = cv2.resize(gray, None, fx=f, fy=f, interpolation=cv2.INTER_AREA), cx * f, cy * f, side * f
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
    m[:, 2] += (size / 2 - cx, size / 2 - cy)
    return cv2.warpAffine(gray, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def at_clip_rate(frames: np.ndarray, fps: float) -> np.ndarray:
    """The frames a 25 fps camera would have taken (nearest frame in time)."""
    if abs(fps - CLIP_FPS) < 0.01:
        return frames
    n = max(1, int(round(len(frames) * CLIP_FPS / fps)))
    return frames[np.minimum((np.arange(n) * fps / CLIP_FPS).round().astype(int), len(frames) - 1)]


def write_clip(path: Path, frames: np.ndarray) -> None:
    """An mp4 of gray frames stored as 3 channels, as LRC-AR's crops are; read back before it takes its name,
    since OpenCV's writer does not report a failed write (a full disk)."""
    import cv2

    def write(tmp):
        h, w = frames.shape[1:]
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (w, h), True)
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write mp4 files here ({tmp})")
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
        writer.release()
        try:
            got = len(read_frames(Path(tmp))[0])
        except ValueError:
            got = 0
        if got != len(frames):
            raise OSError(28, f"the clip reads back with {got} of its {len(frames)} frames: the disk may be full")
    atomic_write(path, write)


def frame_ranges(frames: np.ndarray) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    runs, start = [], None
    for i, f in enumerate(frames):
        if start is None:
            start = f
        if i + 1 == len(frames) or frames[i + 1] != f + 1:
            runs.append(f"{start}-{f}" if f > start else f"{f}")
            start = None
    return ", ".join(runs)


FOLLOWERS: dict = {}  # one FaceFollower per worker process, built on its first video


def follower_for(cfg: Config) -> FaceFollower:
    key = (cfg.landmark_model, cfg.detect_every, cfg.detect_scale)
    if key not in FOLLOWERS:
        FOLLOWERS[key] = FaceFollower(Path(cfg.landmark_model), cfg)
    return FOLLOWERS[key]


def report_row(path: Path, status: str = "failed", note: str = "", **counts) -> dict:
    return {"video": str(path), "status": status, "frames": "", "faces": "", "detections": "", "filled": "",
            "output": "", "note": note, **counts}


def preprocess_video(path: Path, out_dir: Path, cfg: Config) -> dict:
    """Cut one video's mouth clip; the report row says what happened, in words where something went wrong."""
    import cv2
    cv2.setNumThreads(1)  # the parallelism is one video per process
    try:
        frames, fps = read_frames(path)
    except ValueError as e:
        return report_row(path, note=f"{e}. Re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4) or remove it.")
    frames = at_clip_rate(frames, fps)
    track = follower_for(cfg).track(frames)
    missing = np.flatnonzero(np.isnan(track.points[:, 0, 0]))
    counts = dict(frames=len(frames), faces=track.most_faces, detections=track.detections, filled=len(missing))
    if len(missing) == len(frames):
        return report_row(path, note=f"no face found on any of its {len(frames)} frames: the detector needs a "
                                     f"frontal face about 40 pixels wide or more.", **counts)
    points = smooth_over_time(fill_gaps(track.points), cfg.smooth_frames)
    crops = mouth_crops(points, cfg.mouth_scale)
    mouths = np.stack([cut_mouth(f, c, cfg.frame_size) for f, c in zip(frames, crops)])
    out = out_dir / f"{path.stem}.mp4"
    write_clip(out, mouths)
    if cfg.save_landmarks:
        arrays = {"landmarks": points, "found": ~np.isnan(track.points[:, 0, 0]), "crops": crops}
        atomic_write(out.with_suffix(".npz"), lambda tmp: np.savez(tmp, **arrays))
    notes = [f"resampled from {fps:g} fps"] if abs(fps - CLIP_FPS) >= 0.01 else []
    if len(missing):
        notes.append(f"face lost on frame(s) {frame_ranges(missing)} of {len(frames)}: landmarks interpolated")
    if track.most_faces > 1:
        notes.append(f"{track.most_faces} faces seen: followed the largest")
    if len(frames) == 1:
        notes.append("a single frame: written, but too short to lip-read (training skips clips this short)")
    return report_row(path, "done", "; ".join(notes), output=str(out), **counts)


def end_with_parent() -> None:
    """A preprocessing worker leaves Ctrl-C to its parent (which stops the run in order) and ends when the parent
    does, even by SIGKILL (Linux; elsewhere only the first)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was gone before the call
        os._exit(1)


def preprocess_one(args) -> dict:
    path, out_dir, cfg = args
    try:
        return preprocess_video(path, out_dir, cfg)
    except Exception as e:  # one bad video must not end a run over thousands
        return report_row(path, note=f"{type(e).__name__}: {e}")


def raw_videos(source: Path) -> list[Path]:
    """--input's videos (one file, or a folder searched recursively); two of one name cannot share an output."""
    if source.is_file():
        return [source]
    found = files_by_stem(source, RAW_VIDEO_EXTS, set())
    refuse_ambiguous(found, "video", "--input")
    return [paths[0] for _, paths in sorted(found.items())]


def preprocess_videos(cfg: Config, out_dir: Path) -> list[dict]:
    """Every video of --input cut into out_dir, in parallel processes; videos already done are kept."""
    source = Path(cfg.input)
    if not cfg.input or not source.exists():
        raise UserError(f"--mode preprocess needs --input, a face video or a folder of them ({cfg.input!r} not found).")
    videos = raw_videos(source)
    if not videos:
        raise UserError(f"No videos ({', '.join(sorted(RAW_VIDEO_EXTS))}) under {source}.")
    cfg = dataclasses.replace(cfg, landmark_model=str(find_landmark_model(cfg)))
    import_dlib()
    done = [v for v in videos if (out_dir / f"{v.stem}.mp4").exists()
            and (not cfg.save_landmarks or (out_dir / f"{v.stem}.npz").exists())]
    todo = [v for v in videos if v not in done]
    kept = [report_row(v, "kept", "done by an earlier run", output=str(out_dir / f"{v.stem}.mp4")) for v in done]
    workers = min(cfg.workers or os.cpu_count() or 1, max(len(todo), 1))
    jobs = [(v, out_dir, cfg) for v in todo]
    report = lambda rows: write_csv(out_dir / "preprocess_report.csv", sorted(kept + rows, key=lambda r: r["video"]))
    if workers == 1:
        rows = [preprocess_one(job) for job in progress(jobs, "preprocess")]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        rows, written = [], time.time()
        with ProcessPoolExecutor(workers, mp_context=context, initializer=end_with_parent) as pool:
            try:
                for row in progress(pool.map(preprocess_one, jobs), "preprocess"):
                    rows.append(row)
                    if time.time() - written > REPORT_EVERY:  # a run killed midway still leaves its report so far
                        report(rows)
                        written = time.time()
            except KeyboardInterrupt:  # the videos under way are finished, the rest left for the next run
                pool.shutdown(wait=True, cancel_futures=True)
                reported = {r["video"] for r in rows}
                rows += [report_row(v, "done", "finished as the run was interrupted", output=str(out_dir / f"{v.stem}.mp4"))
                         for v in todo if str(v) not in reported and (out_dir / f"{v.stem}.mp4").exists()]
                report(rows)
                raise
    report(rows)
    rows = sorted(kept + rows, key=lambda r: r["video"])
    for r in rows:
        if r["status"] == "failed" or (r["status"] == "done" and r["note"]):
            print(f"{r['video']}: {r['status']}{': ' + r['note'] if r['note'] else ''}", file=sys.stderr)
    counts = Counter(r["status"] for r in rows)
    print(f"Preprocessed {counts['done']} video(s) into {out_dir} ({counts['kept']} kept from an earlier run, "
          f"{counts['failed']} failed); each one is listed in {out_dir / 'preprocess_report.csv'}")
    return rows


# Long videos (--mode decode, the page): any length, read as a stream and cut into pieces ---------------------
# The model knows 1.2-second clips, so a video of any length is read a frame at a time (upright, as its rotation
# tag says; at 25 fps), the followed face's mouth cut out as the frames pass (as preprocess_video cuts it), and
# the mouth track cut into pieces of about that length: where the face is gone longer than --bridge-seconds,
# where another face takes over (a cut), and within a long run at its quietest frame (least mouth motion)
# between --shortest-piece and --piece-seconds. An audio-visual model hears each piece's own stretch of the sound,
# streamed beside the frames. Pieces from all videos are read in batches as they fill --max-frames, and each word
# is placed in time by CTC's alignment of the hypothesis. Held at once: a gap's and a smoothing window's frames,
# one piece a video and its sound, one batch, whatever the length.

SHORTEST_READ = 5  # frames: a piece shorter than this (0.2 s) is not read
LARGEST_FRAME = 7680 * 4320  # pixels: a frame of a streamed video is read whole; beyond 8K it is refused


@dataclass
class Piece:
    video: int  # which video of the run
    start: int  # its first frame in the video (25 fps)
    mouths: np.ndarray  # T x S x S uint8
    face: int  # the face it shows (1, 2, ...: a new number at each cut to another face)
    sound: np.ndarray | None = None  # T x 640 float32: its frames' sound, for an audio-visual model


def stream_frames(path: Path, info: dict):
    """A video's gray frames one at a time, upright as its rotation tag says, at 25 fps (the frame nearest in
    time, by the frames' own times); `info` gets fps, rotation, the frames the header declares and `read` so far.
    Saved arrays (.npy, .npz: mouth clips) are read whole."""
    if path.suffix.lower() in (".npy", ".npz"):
        frames, _ = read_frames(path)
        info.update(fps=CLIP_FPS, rotation=0, declared=len(frames), read=len(frames))
        yield from frames
        return
    import cv2
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(unopened(path) + ": re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 1 <= fps <= 1000 else CLIP_FPS
    info.update(fps=fps, rotation=int(cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0),
                declared=max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))), read=0)
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if width * height > LARGEST_FRAME:
        cap.release()
        raise ValueError(f"too large: frames of {width} x {height}; up to 8K ({LARGEST_FRAME:,} pixels) are read: "
                         "scale it down first (ffmpeg -i IN -vf scale=-2:720 OUT.mp4)")
    given, first, before = 0, None, None  # 25 fps frames given; the first frame's time; the one before's
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            # by the frames' own times (a phone's or a browser's recording has no steady rate), else by the rate
            stamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
            first = stamp if first is None else first
            now = stamp - first if before is None or stamp - first > before else before + 1 / fps
            step = now - before if before is not None else 1 / fps
            gray = to_gray(frame)
            info["read"] += 1
            while given / CLIP_FPS < now + step / 2:  # the frames nearest in time to each 25 fps instant
                yield gray
                given += 1
            before = now
    finally:
        cap.release()


SHOT_CUT = 0.4  # mean change of the whole frame's standardised 32 x 32 look from the frame before: a cut to another shot
# (LRC-AR's face videos joined end to end: 0.72-1.05 at the joins, at most 0.15 elsewhere)
MOUTH_CUT = 0.6  # the same of a mouth crop: a jump to another mouth (LRC-AR's mouth clips joined: median 0.86 at
# the joins, 95% above 0.51; elsewhere median 0.11, 99.9% below 0.68)


def shot_look(gray: np.ndarray) -> np.ndarray:
    import cv2
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (small - small.mean()) / (small.std() + 1e-3)


def smoothed_crops(run: list, points: list, first: int, lo: int, hi: int, cfg: Config) -> list[np.ndarray]:
    """Mouth crops of run[lo:hi], each from its landmarks averaged with up to --smooth-frames // 2 neighbours
    either side within the face's run (fewer near the run's ends, as smooth_over_time); `first`: the run's
    frames already dropped before run[0]."""
    if lo >= hi:
        return []
    half, known = cfg.smooth_frames // 2, np.stack(points)
    out = []
    for i in range(lo, hi):
        k = min(half, i + first, len(points) - 1 - i)
        crop = mouth_crops(known[i - k:i + k + 1].mean(0, keepdims=True), cfg.mouth_scale)[0]
        out.append(cut_mouth(run[i], crop, cfg.frame_size))
    return out


def mouth_track(frames, follower: FaceFollower, cfg: Config, info: dict | None = None):
    """(mouth crop, face) for every frame of a face video, (None, 0) where no face is followed. Gaps of up to
    --bridge-seconds get landmarks interpolated across them; a longer gap or another face ends the face's run.
    `info` gets the most faces one frame showed."""
    half, bridge = cfg.smooth_frames // 2, round(cfg.bridge_seconds * CLIP_FPS)
    follower.start()
    run, points, first, done, gap, face = [], [], 0, 0, 0, 0

    def end_run():
        nonlocal run, points, first, done, gap
        known = len(run) - gap
        yield from ((c, face) for c in smoothed_crops(run[:known], points[:known], first, done, known, cfg))
        yield from [(None, 0)] * gap
        run, points, first, done, gap = [], [], 0, 0, 0

    before = None
    for gray in frames:
        before, now = shot_look(gray), before
        if now is not None and np.abs(before - now).mean() > SHOT_CUT:
            follower.forget()
        p = follower.step(gray, switch=True)
        if info is not None:
            info["most_faces"] = follower.most_faces
        if p is not None and run and follower.face != face:
            yield from end_run()
        if p is None:
            if not run:
                yield None, 0
                continue
            run.append(gray)
            points.append(None)
            gap += 1
            if gap > bridge:
                yield from end_run()
            continue
        if gap:  # the face is back: its landmarks across the gap drawn straight from before to after
            before = points[-gap - 1]
            for j in range(1, gap + 1):
                points[-gap - 1 + j] = before + (p - before) * j / (gap + 1)
            gap = 0
        face = follower.face
        run.append(gray)
        points.append(p)
        ready = len(run) - half
        if ready > done:
            yield from ((c, face) for c in smoothed_crops(run, points, first, done, ready, cfg))
            done = ready
        if done > half:  # what no later frame's window reaches
            drop = done - half
            run, points, first, done = run[drop:], points[drop:], first + drop, done - drop
    yield from end_run()


def quietest_cut(mouths: list[np.ndarray], shortest: int) -> int:
    """Where to end a piece that reached its longest: at the frame (from `shortest` on) where the mouth moves
    least, motion being the mean change of the crop's pixels from the frame before, over 3 frames."""
    motion = np.array([np.abs(b.astype(np.int16) - a).mean() for a, b in zip(mouths, mouths[1:])])
    motion = np.convolve(motion, np.ones(3) / 3, "same")
    return shortest + int(np.argmin(motion[shortest - 1:]))


def pieces_of(video: int, track, cfg: Config):
    """The mouth track cut into Pieces: at every frame without the face, at a change of face, and at the
    quietest frame of a run that reaches --piece-seconds (no earlier than --shortest-piece)."""
    longest = max(SHORTEST_READ, round(cfg.piece_seconds * CLIP_FPS))
    shortest = min(longest - 1, max(SHORTEST_READ, round(cfg.shortest_piece * CLIP_FPS)))
    held, start, face = [], 0, 0
    try:
        for t, (crop, f) in enumerate(track):
            if held and (crop is None or f != face):
                yield Piece(video, start, np.stack(held), face)
                held = []
            if crop is None:
                continue
            if not held:
                start, face = t, f
            held.append(crop)
            if len(held) == longest:
                cut = quietest_cut(held, shortest)
                yield Piece(video, start, np.stack(held[:cut]), face)
                held, start = held[cut:], start + cut
    except KeyboardInterrupt:  # Ctrl-C: the frames held are a piece too, then the run stops
        if held:
            yield Piece(video, start, np.stack(held), face)
        raise
    if held:
        yield Piece(video, start, np.stack(held), face)


class PieceSound:
    """A video's sound as its pieces need it, T x 640 samples from a frame on; the pieces come in time order, so
    what lies before the one asked for is let go. `end`: the samples the track held, once it has run out."""

    def __init__(self, path: Path):
        self.chunks = stream_sound(path)
        first = next(self.chunks, None)  # a file without sound says so now, not at its first piece
        self.held, self.first, self.end = [first] if first is not None else [], 0, None
        self.read = len(first) if first is not None else 0

    def of(self, start: int, frames: int) -> np.ndarray:
        lo, hi = start * SAMPLES_PER_FRAME, (start + frames) * SAMPLES_PER_FRAME
        while True:
            while self.held and self.first + len(self.held[0]) <= lo:  # wholly before this piece
                self.first += len(self.held.pop(0))
            if self.read >= hi or self.end is not None:
                break
            chunk = next(self.chunks, None)
            if chunk is None:
                self.end = self.read
                break
            self.held.append(chunk)
            self.read += len(chunk)
        wave = np.concatenate(self.held) if self.held else np.zeros(0, np.float32)
        return fit_to_frames(wave[max(0, lo - self.first):], frames)


def sound_of_video(candidates: list[Path]) -> PieceSound:
    """The first of `candidates` (the video itself, a file of its name) that has sound; ValueError if none."""
    tried = []
    for path in candidates:
        try:
            return PieceSound(path)
        except ValueError as e:
            tried.append(f"{path}: {e}")
    raise ValueError(no_sound(tried))


def ctc_spans(log_probs: torch.Tensor, ids: list[int], blank: int) -> list[tuple[int, int]] | None:
    """The frames [first, last + 1) each unit of `ids` takes in CTC's most likely alignment of them (Viterbi over
    blank-unit-blank states), or None where CTC cannot place them in these frames."""
    if not ids:
        return []
    T, S = len(log_probs), 2 * len(ids) + 1
    states = torch.full((S,), blank, dtype=torch.long)
    states[1::2] = torch.tensor(ids)
    lp = log_probs[:, states].double()
    skip = torch.zeros(S, dtype=torch.bool)
    skip[3::2] = states[3::2] != states[1:-2:2]  # a unit may follow the one before it without a blank between
    score = torch.full((S,), -math.inf, dtype=torch.double)
    score[:2] = lp[0, :2]
    back = torch.zeros(T, S, dtype=torch.long)
    none = torch.tensor([-math.inf], dtype=torch.double)
    for t in range(1, T):
        one = torch.cat([none, score[:-1]])
        two = torch.cat([none, none, score[:-2]]).masked_fill(~skip, -math.inf)
        best, step = torch.stack([score, one, two]).max(0)
        score, back[t] = best + lp[t], step
    end = S - 1 if score[S - 1] >= score[S - 2] else S - 2
    if score[end] == -math.inf:
        return None
    path = [end]
    for t in range(T - 1, 0, -1):
        path.append(path[-1] - int(back[t, path[-1]]))
    path.reverse()
    spans = [[T, 0] for _ in ids]
    for t, s in enumerate(path):
        if s % 2:
            span = spans[s // 2]
            span[0], span[1] = min(span[0], t), max(span[1], t + 1)
    return [tuple(s) for s in spans]


def timed_words(ids: list[int], spans, frames: int, start: int, vocab: Vocabulary) -> list[dict]:
    """The hypothesis' words with their start and end in seconds: from the CTC spans of their units, or, where
    CTC cannot place them, spread evenly over the piece."""
    words, out = word_positions(ids, vocab), []
    for k, units in enumerate(words):
        if spans is not None:
            first, last = spans[units[0]][0], spans[units[-1]][1]
        else:
            first, last = frames * k // len(words), frames * (k + 1) // len(words)
        out.append({"word": vocab.decode([ids[u] for u in units]), "start": round((start + first) / CLIP_FPS, 3),
                    "end": round((start + last) / CLIP_FPS, 3), "timed": "ctc" if spans is not None else "even"})
    return out


@torch.no_grad()
def read_pieces(model: nn.Module, pieces: list[Piece], vocab: Vocabulary, cfg: Config, device,
                lm: LanguageModel | None = None) -> list[dict]:
    """Each piece's best hypothesis, its score and its timed words, the pieces read as one batch."""
    clips = unlabelled_clips([p.mouths for p in pieces], [p.sound for p in pieces], cfg)
    x, lengths = batch_inputs(clips, list(range(len(pieces))), Augment(cfg, training=False), device)
    with autocast(device, cfg):
        enc, mask = model.encode(x, lengths.to(device))
        nbest = decode(model, enc, mask, lengths.to(device), vocab, cfg, lm)
        log_probs = ctc_log_probs(model, enc, lengths, vocab.blank).float().cpu()
    out = []
    for i, (piece, hyps) in enumerate(zip(pieces, nbest)):
        ids, score = hyps[0]
        n = len(piece.mouths)
        spans = ctc_spans(log_probs[i, :n], ids, vocab.blank)
        out.append({"start": round(piece.start / CLIP_FPS, 3), "end": round((piece.start + n) / CLIP_FPS, 3),
                    "face": piece.face, "text": vocab.decode(ids), "score": round(score, 4),
                    "words": timed_words(ids, spans, n, piece.start, vocab), "ids": ids,
                    "nbest": [(vocab.decode(h), round(sc, 4)) for h, sc in hyps]})
    return out


def plain_track(frames, cfg: Config):
    """(frame, shot) for every frame of a mouth clip (frames already cut to the mouth), a new shot where the crop
    jumps (MOUTH_CUT)."""
    shot, before = 1, None
    for frame in frames:
        if frame.shape != (cfg.frame_size, cfg.frame_size):
            raise ValueError(f"frames are {frame.shape[1]} x {frame.shape[0]}, the model wants {cfg.frame_size} x "
                             f"{cfg.frame_size} mouth crops (for face videos, add --preprocess)")
        before, now = shot_look(frame), before
        shot += bool(now is not None and np.abs(before - now).mean() > MOUTH_CUT)
        yield frame, shot


def counted(track, info: dict, on_frame=None):
    """The track, counting its frames, those without a face and the faces followed into `info`; on_frame()
    after each."""
    info.update(frames=0, no_face=0, faces=0)
    for crop, face in track:
        info["frames"] += 1
        info["no_face"] += crop is None
        info["faces"] = max(info["faces"], face)
        yield crop, face
        if on_frame:  # after its frame is taken: a stop here loses no frame counted
            on_frame()


def video_pieces(video: int, path: Path, cfg: Config, follower: FaceFollower | None, info: dict, on_frame=None):
    """The pieces of one file: its frames streamed, the mouth followed (a face video) or taken as it is."""
    frames = stream_frames(path, info)
    track = mouth_track(frames, follower, cfg, info) if follower else plain_track(frames, cfg)
    return pieces_of(video, counted(track, info, on_frame), cfg)


def video_notes(info: dict, faces: bool, pieces: int) -> list[str]:
    """What the reader should know of one video (`faces`: a face video, its mouth followed), in words."""
    notes, frames, no_face = [], info.get("frames", 0), info.get("no_face", 0)
    if info.get("rotation"):
        notes.append(f"turned upright by {info['rotation']} degrees, as its rotation tag says")
    if abs(info.get("fps", CLIP_FPS) - CLIP_FPS) >= 0.01:
        notes.append(f"resampled from {info['fps']:g} fps")
    if info.get("declared", 0) > info.get("read", 0) + max(1, info.get("declared", 0) // 20):
        notes.append(f"truncated: its header declares {info['declared']} frames, {info['read']} decode; transcribed "
                     f"up to {frames / CLIP_FPS:.1f} s")
    if faces and frames and no_face == frames:
        notes.append(f"no face found on any of its {frames} frames: the detector needs a frontal face about 40 "
                     "pixels wide or more")
    elif faces and no_face:
        notes.append(f"no face on {no_face} of {frames} frames ({no_face / CLIP_FPS:.1f} s): not read")
    if faces and info.get("faces", 0) > 1:
        notes.append(f"{info['faces']} faces followed one after another (a new one at each cut); of several at "
                     "once, the largest")
    elif faces and info.get("most_faces", 0) > 1:
        notes.append(f"{info['most_faces']} faces seen at once: followed the largest")
    if info.get("sound_ends") is not None and info["sound_ends"] < frames / CLIP_FPS - 0.5:
        notes.append(f"its sound ends at {info['sound_ends']:.1f} s, its picture at {frames / CLIP_FPS:.1f} s: the "
                     "pieces after it were heard as silence")
    if frames and not pieces and not (faces and no_face == frames):
        notes.append("nothing long enough to read")
    return notes


def transcribe(paths: list[Path], model: nn.Module, vocab: Vocabulary, cfg: Config, device,
               lm: LanguageModel | None = None, on_progress=None, pieces_for=None, sound_for=None) -> list[dict]:
    """Every video of `paths` (face videos with --preprocess, else mouth clips) read in pieces: per video its
    text, score, length, pieces (start, end, face, text, score, words), timed words and notes; one that cannot
    be read gets its reason as `error`. An audio-visual model hears each piece's sound from the first file of
    sound_for(path) that has any (default: the video itself). on_progress(stage, info, piece), when given, is called at each "frame",
    each "piece" found and before each batch is "read" ("last read" once the videos are all cut), `info` holding
    the video's frames so far, the frames its header declares, pieces found and read; it may raise to stop.
    pieces_for(video, path, info, on_frame), when given, replaces video_pieces (pieces cut before)."""
    if pieces_for is None:
        follower = follower_for(dataclasses.replace(cfg, landmark_model=str(find_landmark_model(cfg)))) if cfg.preprocess else None
        pieces_for = lambda v, path, info, on_frame: video_pieces(v, path, cfg, follower, info, on_frame)
    results = [{"name": p.stem, "video": str(p), "pieces": [], "notes": [], "error": "", "seconds_reading": 0.0}
               for p in paths]
    queue: list[Piece] = []
    info: dict = {}
    tell = on_progress or (lambda stage, info, piece: None)

    def read_queue(stage: str):
        tell(stage, info, None)
        began = time.perf_counter()
        read = read_pieces(model, queue, vocab, cfg, device, lm)
        share = (time.perf_counter() - began) / max(1, len(queue))
        for piece, r in zip(queue, read):
            results[piece.video]["pieces"].append(r)
            results[piece.video]["seconds_reading"] += share
        info["pieces_read"] = info.get("pieces_read", 0) + len(queue)
        queue.clear()

    stopped = False
    for v, path in enumerate(paths):
        info, result = {"pieces": 0, "pieces_read": 0}, results[v]
        if stopped:
            result.update(error="not read: the run was interrupted before it", frames=0, notes=[])
            continue
        try:
            sound = sound_of_video(sound_for(path) if sound_for else [path]) if cfg.modality == "av" else None
            for piece in pieces_for(v, path, info, lambda: tell("frame", info, None)):
                if len(piece.mouths) < SHORTEST_READ:
                    continue
                if sound:
                    piece.sound = sound.of(piece.start, len(piece.mouths))
                    info["sound_ends"] = sound.end and sound.end / SAMPLE_RATE
                queue.append(piece)
                info["pieces"] += 1
                tell("piece", info, piece)
                if sum(len(p.mouths) for p in queue) >= cfg.max_frames:
                    read_queue("read")
        except ValueError as e:
            result["error"] = str(e)
        except KeyboardInterrupt:  # Ctrl-C: what was cut so far is still read, and said to end there
            stopped = result["interrupted"] = True
        result.update(frames=info.get("frames", 0), duration=round(info.get("frames", 0) / CLIP_FPS, 3),
                      no_face=info.get("no_face", 0), fps=info.get("fps", CLIP_FPS), rotation=info.get("rotation", 0),
                      notes=video_notes(info, cfg.preprocess, info["pieces"]))
    if queue:
        read_queue("last read")
    for r in results:
        if r.get("interrupted"):
            r["notes"].append(f"interrupted (Ctrl-C) at {r['frames'] / CLIP_FPS:.1f} s: transcribed up to there")
        r["text"] = " ".join(p["text"] for p in r["pieces"] if p["text"])
        r["ids"] = []  # the units read, pieces a word boundary apart: what a CER is counted on
        for p in r["pieces"]:
            ids = p.pop("ids")
            r["ids"] += ([vocab.space] if r["ids"] and ids else []) + ids
        r["score"] = round(sum(p["score"] for p in r["pieces"]), 4)
        r["words"] = [w for p in r["pieces"] for w in p["words"]]
    return results


# Subtitles ---------------------------------------------------------------------------------------------------

CUE_WORDS, CUE_SECONDS, CUE_PAUSE = 7, 5.0, 1.0  # a subtitle holds at most this many words, seconds; a pause this long starts a new one


def subtitle_cues(words: list[dict]) -> list[tuple[float, float, str]]:
    """The timed words grouped into subtitles (start, end, text): a new one after a pause, or when one is full."""
    cues, current = [], []
    for w in words:
        if current and (len(current) == CUE_WORDS or w["start"] - current[-1]["end"] >= CUE_PAUSE
                        or w["end"] - current[0]["start"] > CUE_SECONDS):
            cues.append(current)
            current = []
        current.append(w)
    cues += [current] if current else []
    return [(c[0]["start"], c[-1]["end"], " ".join(w["word"] for w in c)) for c in cues]


def subtitle_time(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def subtitles(words: list[dict], kind: str) -> str:
    """SubRip (.srt) or WebVTT (.vtt) text of the timed words."""
    cues = subtitle_cues(words)
    if kind == ".srt":
        return "".join(f"{k}\n{subtitle_time(a, ',')} --> {subtitle_time(b, ',')}\n{text}\n\n"
                       for k, (a, b, text) in enumerate(cues, 1))
    return "WEBVTT\n\n" + "".join(f"{subtitle_time(a, '.')} --> {subtitle_time(b, '.')}\n{text}\n\n" for a, b, text in cues)


# ---------------------------------------------------------------------------------------------------------
# 12. Kaggle: what a Kaggle session changes. Attached datasets and earlier outputs are under /kaggle/input
#     (read-only), outputs go to /kaggle/working, a session ends after 12 h; so the defaults search the input
#     for clips and labels, write to the working folder, stop in time, continue the newest attached run, and a
#     kernel that sees several GPUs starts itself under torchrun.
# ---------------------------------------------------------------------------------------------------------

KAGGLE_WORKING = Path("/kaggle/working")  # kept as the session's output (20 GB)
KAGGLE_SCRATCH = Path("/tmp/master_all_avsr_cache")  # the clip cache: rebuilt in a minute, not worth output space
KAGGLE_BUDGET = 11 * 60.0  # minutes of training; the rest of the 12 h reads the data, tests and saves the output
SETTINGS_FILE = "master_all_avsr.json"  # a pushed kernel's --config, found in any attached dataset
DATA_MODES = ("train", "test", "diagnose", "sanity", "stats", "vocab", "average", "lm")
CHECKPOINT_MODES = ("test", "diagnose", "decode")


def on_kaggle() -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ  # set in every Kaggle session, interactive or batch


TESTED = {"torch": "2.13.0, and 2.10.0 as on Kaggle's image", "kornia": "0.9.0, and 0.8.3 as on Kaggle's image"}
OLDEST = {"torch": (2, 10), "kornia": (0, 8)}  # older ones are refused: nothing below them was tried
PACKAGES = {"kornia": "kornia", "editdistance": "editdistance", "cv2": "opencv-python-headless",
            "matplotlib": "matplotlib", "av": "av"}  # import name -> pip name


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:2])


def check_packages(cfg: Config) -> None:
    """Every package the run needs, at a version tested, before any work: on Kaggle, with the internet off, a
    missing one cannot be fetched later. On Kaggle the versions are stated."""
    import importlib.metadata
    import importlib.util
    needed = [n for n in PACKAGES if n != "av" or cfg.modality != "video"]
    missing = [PACKAGES[n] for n in needed if importlib.util.find_spec(n) is None]
    if missing:
        where = (" On Kaggle with the internet off: switch the internet on in the notebook's settings (or attach a "
                 "dataset holding their wheels and pip install --no-index --find-links /kaggle/input/<it>).")
        raise UserError(f"missing: {', '.join(missing)}: pip install {' '.join(missing)}." + where * on_kaggle())
    versions = {"torch": torch.__version__, "kornia": importlib.metadata.version("kornia")}
    for name, oldest in OLDEST.items():
        if version_tuple(versions[name]) < oldest:
            raise UserError(f"{name} {versions[name]} is older than any this script was tested with "
                            f"({TESTED[name]}): pip install -U {name}.")
    if on_kaggle():
        versions |= {n: getattr(importlib.import_module(n), "__version__", "?") for n in needed if n != "kornia"}
        print(f"Kaggle: Python {sys.version.split()[0]}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def kaggle_settings_file() -> str:
    found = kaggle_files(SETTINGS_FILE)
    if found:
        print(f"Kaggle: settings from {found[0]}")
    return str(found[0]) if found else ""


def earlier_runs() -> list[Path]:
    """Run folders (holding checkpoints/last.pt) in the earlier outputs attached to this session, newest first:
    by the epochs they trained, then by time."""
    runs = [last.parent.parent for last in kaggle_files("last.pt") if last.parent.name == "checkpoints"]

    def progress_of(run: Path):
        epoch = saved_epoch(checkpoints_of(run) / "last.pt")  # None, unreadable: tried last; resuming says why
        return -1 if epoch is None else epoch, (checkpoints_of(run) / "last.pt").stat().st_mtime
    return sorted(runs, key=progress_of, reverse=True)


def label_has_marks(path: Path) -> bool:
    try:
        return any(unicodedata.category(ch) == "Mn" for ch in read_label(path))
    except (ValueError, UnicodeDecodeError, csv.Error):
        return False


def clip_size_fits(path: Path, size: int) -> bool:
    try:
        return read_video(path).shape[1:] == (size, size)
    except ValueError:
        return False


def find_kaggle_data(cfg: Config) -> dict:
    """videos_dir and labels_dir under /kaggle/input: the folder of CSV labels and the folder of clips that
    share the most file stems, preferring labels with diacritics (for --units diacritized) and clips of
    --frame-size (mouth crops, not the raw face videos that ship beside them). Earlier outputs are skipped."""
    clips, labels = {}, {}
    for folder, subdirs, files in os.walk(KAGGLE_INPUT):
        if "checkpoints" in subdirs:  # an earlier output: its CSVs are reports, its .npy files a cache
            subdirs.clear()
            continue
        for name in files:
            stem, ext = os.path.splitext(name)
            kind = labels if ext.lower() in LABEL_EXTS else clips if ext.lower() in VIDEO_EXTS else None
            if kind is not None:
                kind.setdefault(Path(folder), {})[stem] = Path(folder) / name
    pairs = []
    for label_dir, label_files in labels.items():
        for clip_dir, clip_files in clips.items():
            shared = sorted(set(label_files) & set(clip_files))
            if shared:
                pairs.append((len(shared), label_dir, clip_dir, label_files[shared[0]], clip_files[shared[0]]))
    if not pairs:
        raise UserError(f"No clips with CSV labels of the same names were found under {KAGGLE_INPUT}. Attach your "
                        "dataset to the notebook (Add Input, or dataset_sources in kernel-metadata.json; README: "
                        "Kaggle), or pass --data-dir, or --data synthetic for the built-in clips.")
    marks = cfg.units == "diacritized"
    best = max(pairs, key=lambda p: (clip_size_fits(p[4], cfg.frame_size), label_has_marks(p[3]) == marks, p[0]))
    print(f"Kaggle: {best[0]} clips in {best[2]}, labels in {best[1]} (searched {KAGGLE_INPUT})")
    return {"videos_dir": str(best[2]), "labels_dir": str(best[1])}


def kaggle_defaults(given: dict) -> dict:
    """Settings a Kaggle session changes, for those not given by flags or --config."""
    cfg = Config(**given)
    out = {"work_dir": str(KAGGLE_WORKING / "run"), "cache_dir": str(KAGGLE_SCRATCH), "time_budget": KAGGLE_BUDGET}
    out = {k: v for k, v in out.items() if k not in given}
    work = Path(given.get("work_dir", out.get("work_dir")))
    if cfg.mode in DATA_MODES and not given.keys() & {"data", "data_dir", "videos_dir", "labels_dir"}:
        out |= find_kaggle_data(cfg)
    if cfg.mode == "train" and "resume" not in given:
        out["resume"] = (checkpoints_of(work) / "last.pt").exists() or bool(earlier_runs())
    if cfg.mode in CHECKPOINT_MODES and "checkpoint" not in given and not (checkpoints_of(work) / "best.pt").exists():
        runs = earlier_runs()
        if runs:
            out["checkpoint"] = str(checkpoints_of(runs[0]) / "best.pt")
    return out


def adopt_earlier_run(cfg: Config) -> None:
    """--resume on Kaggle with nothing in the work dir: copy the newest attached earlier run there (read-only
    input cannot be written to), file by file and atomically, last.pt last, so a cut copy is simply redone."""
    work = Path(cfg.work_dir)
    runs = earlier_runs()
    if (checkpoints_of(work) / "last.pt").exists() or not runs:
        return
    files = sorted((f for f in runs[0].rglob("*") if f.is_file() and "cache" not in f.relative_to(runs[0]).parts
                    and f.name != LOCK_FILE), key=lambda f: f.name == "last.pt")
    for f in files:
        atomic_write(work / f.relative_to(runs[0]), lambda tmp: shutil.copyfile(f, tmp))
    print(f"Kaggle: continuing the run in {runs[0]} (copied to {work})")


def processes_to_start(cfg: Config) -> int:
    """Processes --mode train starts under torchrun: --processes, or on Kaggle one per GPU; 1 runs in place."""
    if cfg.mode != "train" or "WORLD_SIZE" in os.environ:  # already one of torchrun's processes
        return 1
    wanted = cfg.processes or (torch.cuda.device_count() if on_kaggle() and cfg.device != "cpu"
                               and torch.cuda.is_available() else 1)
    if wanted > 1 and globals().get("__file__") is None:  # a notebook cell has no file torchrun could start
        print(f"{wanted} processes would train, but a notebook cell cannot start itself under torchrun: training "
              f"in this one. For all GPUs, save the script and run in a cell: !torchrun --nproc_per_node {wanted} "
              "master_all_avsr.py --mode train ...")
        return 1
    return wanted


def train_under_torchrun(cfg: Config, processes: int) -> dict:
    """Start `processes` copies of this script under torchrun with the settings resolved here; rank 0 trains,
    writes and tests as one process would."""
    settings = Path(cfg.work_dir) / "torchrun_config.json"
    write_json(settings, dataclasses.asdict(cfg) | {"processes": 0})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).resolve()), "--config", str(settings)]
    print(f"Starting {processes} training processes: {' '.join(command)}", flush=True)
    code = subprocess.run(command).returncode
    if code:
        raise UserError(f"The {processes} torchrun processes failed (exit code {code}; their messages are above). "
                        "To train in one process, pass --processes 1.")
    return {"processes": processes}


# ---------------------------------------------------------------------------------------------------------
# 13. Serving (--mode serve): a page and a JSON API that lip-read uploaded videos with a run's model. Each upload
#    is a job: stored under <work-dir>/serve, cut to its mouth when it is a face video, decoded, and followed live
#    through server-sent events. Built on FastAPI and uvicorn, optional packages (README).
# ---------------------------------------------------------------------------------------------------------

SERVE_STATES = ("queued", "reading", "preprocessing", "decoding", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVE_LOCK = "serve/.lock"  # one server a work dir: a second would remove the first's uploads as half-received
PREVIEW_FRAMES = 8  # mouth-crop frames side by side in a job's preview
RESULT_COLUMNS = ["job", "name", "rank", "text", "score", "frames", "seconds", "beam_size"]
PLAYABLE = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
            ".mkv": "video/x-matroska", ".ogv": "video/ogg", ".avi": "video/x-msvideo"}  # what the page's player is given


class JobCancelled(Exception):
    pass


@dataclass
class Job:
    """One upload and what became of it; the worker thread writes it, the page's event streams read it."""
    id: str
    name: str  # the file's name as uploaded (shown, never used as a path)
    folder: Path  # <work-dir>/serve/jobs/<id>: the upload, its preview and result.json
    beam_size: int
    nbest: int
    upload: Path | None = None
    state: str = "queued"
    detail: str = "waiting its turn"
    progress: float = 0.0  # 0..1 within the current state
    hypotheses: list = field(default_factory=list)  # [{"text", "score"}], best first
    frames: int = 0
    seconds: float = 0.0  # decoding time
    notes: str = ""  # what preprocessing noticed (face lost on some frames, resampled, ...)
    pieces: list = field(default_factory=list)  # a video's pieces: start, end, face, text, score, words
    words: list = field(default_factory=list)  # [{"word", "start", "end", "timed"}], seconds into the video
    created: float = field(default_factory=time.time)
    changed: float = field(default_factory=time.time)  # when it last moved on (the team app's last_update)
    cancel: threading.Event = field(default_factory=threading.Event)
    asked: dict = field(default_factory=dict)  # a team app's task: its model_name, diacritized, enhance, video_hash

    def set(self, state: str, detail: str, progress: float = 0.0) -> None:
        """The job's next state; once cancelled, any but cancelled or failed stops its work instead."""
        if self.cancel.is_set() and state not in ("cancelled", "failed"):
            raise JobCancelled
        self.state, self.detail, self.progress, self.changed = state, detail, progress, time.time()

    def result(self) -> dict:
        return {"id": self.id, "name": self.name, "state": self.state, "detail": self.detail,
                "progress": round(self.progress, 3), "beam_size": self.beam_size, "nbest": self.nbest,
                "frames": self.frames, "seconds": round(self.seconds, 3), "notes": self.notes,
                "hypotheses": self.hypotheses, "pieces": self.pieces, "words": self.words,
                "preview": f"/api/jobs/{self.id}/preview.png" if (self.folder / "preview.png").exists() else None}


def preview_strip(frames: np.ndarray) -> bytes:
    """PREVIEW_FRAMES evenly spaced frames of a mouth clip side by side, as PNG bytes."""
    import cv2
    chosen = frames[np.linspace(0, len(frames) - 1, min(PREVIEW_FRAMES, len(frames))).round().astype(int)]
    ok, png = cv2.imencode(".png", np.concatenate(list(chosen), axis=1))
    if not ok:
        raise OSError("OpenCV could not encode the preview")
    return png.tobytes()


def mouths_folder(work_dir: Path, frame_size: int) -> Path:
    """Where the mouth pieces cut from face videos are kept: serve/mouths, or serve/mouths-<size> for a model of
    another frame size than Config's (one served beside the run's with --serve-model), a cut being of one size."""
    return work_dir / "serve" / ("mouths" if frame_size == Config.frame_size else f"mouths-{frame_size}")


CACHED_FRAMES = 3000  # a face video's mouth pieces are kept for another reading (another model, say) up to 2 minutes


def save_pieces(path: Path, pieces: list[Piece], info: dict) -> None:
    """A face video's mouth pieces as one .npz, with what its notes are made from."""
    arrays = {"starts": np.array([p.start for p in pieces]), "faces": np.array([p.face for p in pieces]),
              "lengths": np.array([len(p.mouths) for p in pieces]), "mouths": np.concatenate([p.mouths for p in pieces]),
              "counts": np.array([info["frames"], info["no_face"], info.get("rotation", 0)]),
              "fps": np.array([info.get("fps", CLIP_FPS)])}
    atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))


def saved_pieces(path: Path, video: int, info: dict):
    """The pieces save_pieces kept, as video_pieces gives them."""
    with np.load(path) as saved:
        info.update(frames=int(saved["counts"][0]), no_face=int(saved["counts"][1]), rotation=int(saved["counts"][2]),
                    fps=float(saved["fps"][0]), faces=int(saved["faces"].max()))
        ends = np.cumsum(saved["lengths"])
        for start, face, end, length in zip(saved["starts"], saved["faces"], ends, saved["lengths"]):
            yield Piece(video, int(start), saved["mouths"][end - length:end], int(face))


def checkpoint_name(path: Path) -> str:
    """A checkpoint as a client is shown it: RUN/best.pt (its run's folder name) or the file's name, never where
    on the server's disk it lies."""
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


class LipReader:
    """The run's model, loaded once, and the way from an uploaded file to its n-best. Video of any length is read
    in pieces (section 11): a face video's mouth is found first (its pieces kept by the upload's hash, so the
    same video sent again is not cut again); a clip of the model's frame size is read as it is; an audio-visual
    model hears each piece's sound from the upload. Sound alone (an audio model) is read whole."""
    dlib_lock = threading.Lock()  # dlib's objects are not shared safely: one lock for every model served

    def __init__(self, cfg: Config):
        self.device = pick_device(cfg.device)
        self.checkpoint = checkpoint_path(cfg)
        self.model, self.vocab, self.cfg = models_to_read(cfg, self.device, path=self.checkpoint)
        self.lm = search_lm(self.cfg, self.vocab, self.device)
        self.mouths = mouths_folder(Path(cfg.work_dir), self.cfg.frame_size)
        self.model_lock = threading.Lock()

    def describe(self) -> dict:
        return {"checkpoint": checkpoint_name(self.checkpoint), "preset": self.cfg.preset, "modality": self.cfg.modality,
                "decoder": self.cfg.decoder, "beam_size": self.cfg.beam_size, "frame_size": self.cfg.frame_size,
                "device": str(self.device), "vocabulary": self.vocab.size}

    def first_frame(self, path: Path) -> np.ndarray:
        first = next(stream_frames(path, {}), None)
        if first is None:
            raise ValueError("unreadable video: no frame could be decoded")
        return first

    def read(self, job: Job) -> None:
        if self.cfg.modality != "audio":
            return self.read_video(job)
        frames, wave = sound_to_decode(job.upload)
        job.set("decoding", f"decoding {len(frames)} frames" + f", beam {job.beam_size}" * (self.cfg.decoder == "beam"))
        cfg = dataclasses.replace(self.cfg, beam_size=job.beam_size, nbest=job.nbest)
        t0 = time.perf_counter()
        with self.model_lock:
            [nbest] = decode_clips(self.model, unlabelled_clips([frames], [wave], cfg), [0], self.vocab, cfg,
                                   self.device, self.lm)
        job.frames, job.seconds = len(frames), time.perf_counter() - t0
        job.hypotheses = [{"text": self.vocab.decode(ids), "score": round(score, 4)} for ids, score in nbest]

    def read_video(self, job: Job) -> None:
        first = self.first_frame(job.upload)
        mouths = first.shape == (self.cfg.frame_size, self.cfg.frame_size)
        cfg = dataclasses.replace(self.cfg, beam_size=job.beam_size, nbest=job.nbest, preprocess=not mouths)
        cut = self.mouths / f"{job.upload.stem}.npz"
        reused = not mouths and cut.exists()
        if not mouths and not reused:
            job.set("preprocessing", f"a {first.shape[1]} x {first.shape[0]} face video: finding the mouth")
        found: list[Piece] = []
        beam = f", beam {job.beam_size}" * (self.cfg.decoder == "beam")

        def progress(stage: str, info: dict, piece: Piece | None):
            total = round(info.get("declared", 0) * CLIP_FPS / info.get("fps", CLIP_FPS))
            frames, pieces = info.get("frames", 0), info.get("pieces", 0)
            where = "finding the mouth: " * (not mouths) + f"frame {frames}" + f" of {total}" * bool(total)
            if stage == "frame" and not mouths and not reused:
                job.set("preprocessing", where, (frames - 1) / total if total else 0.0)
            elif stage == "piece" and sum(len(p.mouths) for p in found) < CACHED_FRAMES:
                found.append(piece)
            elif stage == "read":
                job.set(job.state, f"{where}; reading pieces {info['pieces_read'] + 1}-{pieces}", job.progress)
            elif stage == "last read":
                job.set("decoding", f"reading piece{'s' * (pieces != 1)} {info['pieces_read'] + 1}"
                        + f"-{pieces}" * (pieces > info["pieces_read"] + 1) + f" of {pieces} ({frames} frames{beam})",
                        info["pieces_read"] / max(1, pieces))

        pieces_for = (lambda v, path, info, on_frame: saved_pieces(cut, v, info)) if reused else None
        with self.dlib_lock, self.model_lock:
            [r] = transcribe([job.upload], self.model, self.vocab, cfg, self.device, self.lm, progress, pieces_for)
        if r["error"]:
            raise ValueError(r["error"])
        if found:
            atomic_write(job.folder / "preview.png", lambda tmp: Path(tmp).write_bytes(preview_strip(found[0].mouths)))
        if not mouths and not reused and found and len(found) == len(r["pieces"]):
            save_pieces(cut, found, {"frames": r["frames"], "no_face": r["no_face"], "fps": r["fps"],
                                     "rotation": r["rotation"]})
        notes = (["the same video was cut before: its mouth pieces are reused"] if reused else []) + r["notes"]
        job.frames, job.seconds, job.notes = r["frames"], r["seconds_reading"], "; ".join(notes)
        ranked = r["pieces"][0]["nbest"] if len(r["pieces"]) == 1 else [(r["text"], r["score"])]
        job.hypotheses = [{"text": text, "score": round(score, 4)} for text, score in ranked]
        job.pieces = [{k: v for k, v in p.items() if k != "nbest"} for p in r["pieces"]]
        job.words = r["words"]


# Several models at once: the team's app asks for one by model_name and diacritized (their backend's three
# encoders, each with and without diacritics). --serve-model names the checkpoints that answer; the page and /api
# read with the first.

TEAM_DEFAULT_MODEL = "conformer"  # the team app's default model_name: without --serve-model, the run's model
SERVE_MODEL = re.compile(r"([A-Za-z0-9._-]+)(:nodia|:dia)?=(.+)")


def served_model_entries(cfg: Config) -> list[tuple[str, bool, Path]]:
    """Each --serve-model NAME[:nodia]=PATH as (name, diacritized, path); a UserError for one that is not."""
    entries: list[tuple[str, bool, Path]] = []
    for given in cfg.serve_model:
        found = SERVE_MODEL.fullmatch(given.strip())
        if not found:
            raise UserError(f"--serve-model {given!r}: write NAME=PATH, or NAME:nodia=PATH for the model asked for "
                            "with diacritized=false (NAME of letters, digits, '.', '_', '-'), e.g. --serve-model "
                            "conformer=runs/a/checkpoints/best.pt")
        name, diacritized, path = found[1], found[2] != ":nodia", Path(found[3]).expanduser()
        if (name, diacritized) in [e[:2] for e in entries]:
            raise UserError(f"--serve-model: {name}{'' if diacritized else ':nodia'} is given twice; keep one.")
        if not path.is_file():
            raise UserError(f"--serve-model {given!r}: {path} is {'a folder' if path.is_dir() else 'not there'}; "
                            "name a checkpoint file: a run's checkpoints/best.pt (or averaged.pt, last.pt), or one "
                            "of the team's released models (conformer_model_dia.pth, ...).")
        entries.append((name, diacritized, path))
    return entries


def served_models(cfg: Config) -> dict[tuple[str, bool], LipReader]:
    """The models this server reads with, by the (model_name, diacritized) a team app's task asks for, the first
    the one the page and /api use: each --serve-model checkpoint loaded once (one named twice is one LipReader);
    without any, the run's own model, under the app's default name for both."""
    entries = served_model_entries(cfg)
    if not entries:
        reader = LipReader(cfg)
        return {(TEAM_DEFAULT_MODEL, True): reader, (TEAM_DEFAULT_MODEL, False): reader}
    readers: dict[Path, LipReader] = {}
    for _, _, path in entries:
        if path.resolve() not in readers:
            readers[path.resolve()] = LipReader(dataclasses.replace(cfg, checkpoint=str(path)))
    models = {(name, diacritized): readers[path.resolve()] for name, diacritized, path in entries}
    for (name, diacritized), served in models.items():
        if (served.cfg.units == "diacritized") != diacritized:  # allowed (it is what there is), but said
            print(f"note: --serve-model {name}{'' if diacritized else ':nodia'} answers diacritized="
                  f"{str(diacritized).lower()} with a model of --units {served.cfg.units} ({served.checkpoint})")
    return models


def model_names(models: dict[tuple[str, bool], LipReader]) -> list[str]:
    return list(dict.fromkeys(name for name, _ in models))


def model_choices(models: dict[tuple[str, bool], LipReader]) -> str:
    """The served models as a request names them: conformer, conformer:nodia, ..."""
    return ", ".join(f"{name}{'' if diacritized else ':nodia'}" for name, diacritized in models)


class JobBoard:
    """Every job of this server: uploads wait in a queue of at most --serve-queue, --serve-jobs are read at once,
    and each job's result.json stays in its folder (a restarted server lists them again). A team app's task is
    read by the model it asked for, any other job by `reader`."""

    def __init__(self, reader: LipReader, cfg: Config, models: dict[tuple[str, bool], LipReader] | None = None):
        import concurrent.futures
        self.reader, self.cfg, self.lock = reader, cfg, threading.Lock()
        self.models = models or {(TEAM_DEFAULT_MODEL, True): reader, (TEAM_DEFAULT_MODEL, False): reader}
        self.root = Path(cfg.work_dir) / "serve" / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.arriving = 0  # uploads whose body is still coming, each holding a place in the queue
        self.earlier_results()
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.serve_jobs, thread_name_prefix="lipread")

    def earlier_results(self) -> None:
        """The jobs of the server's earlier runs: finished ones as they ended, one it stopped in the middle of as
        failed (its upload kept); an upload it was still receiving is removed."""
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            (folder / ".upload.part").unlink(missing_ok=True)
            path = folder / "result.json"
            if not path.exists():
                if not any(folder.iterdir()):
                    folder.rmdir()
                continue
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                job = Job(saved["id"], saved["name"], folder, saved["beam_size"], saved["nbest"])
                for key in ("state", "detail", "progress", "hypotheses", "frames", "seconds", "notes"):
                    setattr(job, key, saved[key])
                job.pieces, job.words = saved.get("pieces") or [], saved.get("words") or []  # (earlier versions')
                job.asked = dict(saved.get("asked") or {})  # a team app's task (absent from other jobs)
            except (OSError, ValueError, KeyError, TypeError):
                print(f"warning: {path} is not a job's result (left as it is)", file=sys.stderr)
                continue
            job.created = job.changed = path.stat().st_mtime
            if job.state not in FINISHED:
                job.set("failed", f"{job.name}: the server stopped before this job finished; send it again")
                self.save(job)
            self.jobs[job.id] = job

    def save(self, job: Job) -> None:
        saved = job.result() | ({"asked": job.asked} if job.asked else {})
        write_text(job.folder / "result.json", json.dumps(saved, ensure_ascii=False, indent=1))

    def new_job(self, name: str, beam_size: int, nbest: int) -> Job:
        job_id = secrets.token_hex(8)
        folder = self.root / job_id
        folder.mkdir()
        return Job(job_id, name[:200], folder, beam_size, nbest)

    def waiting(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.created)

    def hold_place(self) -> bool:
        """A place in the queue for an upload about to arrive, taken before its body is read, so that uploads
        waiting and uploads arriving together stay within --serve-queue; False when none is free."""
        with self.lock:
            if len(self.waiting()) + self.arriving >= self.cfg.serve_queue:
                return False
            self.arriving += 1
            return True

    def free_place(self) -> None:
        with self.lock:
            self.arriving -= 1

    def submit(self, job: Job) -> None:
        """Queue the job, in the place its upload held."""
        with self.lock:
            self.jobs[job.id] = job
        self.save(job)
        self.pool.submit(self.work_on, job)

    def view(self, job: Job) -> dict:
        out = job.result()
        if job.state == "queued":
            ahead = next((n for n, j in enumerate(self.waiting()) if j is job), 0)
            out["detail"] = f"waiting its turn: {ahead} ahead" if ahead else "next in line"
        return out

    def start(self, job: Job) -> bool:
        """The job leaves the queue (False: it was cancelled there). One step under the board's lock, as a cancel
        is, so that a cancel at the same moment finds it either still waiting or started, never a mixture."""
        with self.lock:
            if job.cancel.is_set():
                return False
            job.set("reading", "reading the upload")
            return True

    def reader_of(self, job: Job) -> LipReader:
        """The model the job is read with: the one a team app's task asked for, else the board's own."""
        return self.models[job.asked["model_name"], job.asked["diacritized"]] if job.asked else self.reader

    def work_on(self, job: Job) -> None:
        try:
            if not self.start(job):
                raise JobCancelled
            self.reader_of(job).read(job)
            job.set("done", "done", 1.0)
        except JobCancelled:
            job.hypotheses = []
            job.set("cancelled", job.detail if job.state == "cancelled" else f"cancelled while {job.state}")
        except (ValueError, OSError, UserError) as e:  # the upload's fault, or a missing model file: said on its page
            job.set("failed", f"{job.name}: {e}")
        except Exception as e:  # a bug: the job says so and the server goes on with the next
            import traceback
            traceback.print_exc()
            job.set("failed", f"{job.name}: internal error {type(e).__name__}: {e} (the server's console has more)")
        self.save(job)

    def cancel(self, job: Job) -> None:
        with self.lock:
            job.cancel.set()
            if job.state == "queued":
                job.set("cancelled", "cancelled before it started")

    def results_rows(self) -> list[dict]:
        return [dict(zip(RESULT_COLUMNS, (j.id, j.name, rank, h["text"], h["score"], j.frames, round(j.seconds, 3),
                                          j.beam_size)))
                for j in sorted(self.jobs.values(), key=lambda j: j.created) if j.state == "done"
                for rank, h in enumerate(j.hypotheses, 1)]

    def stop(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def accepted_types(cfg: Config) -> list[str]:
    kinds = SOUND_EXTS | SOUND_IN_VIDEO_EXTS if cfg.modality == "audio" else VIDEO_EXTS | RAW_VIDEO_EXTS
    return sorted(kinds)


class UploadRefused(Exception):
    """Why an upload is not kept, and the HTTP status that says so (None: its client went away)."""

    def __init__(self, status: int | None, why: str):
        super().__init__(why)
        self.status = status


async def guarded_body(request, name: str, limit: int, timeout: float):
    """The request's body, chunk by chunk. Refused past `limit` bytes; when it pauses `timeout` seconds, or comes
    slower than a MB per `timeout` seconds (a client holding a place in the queue with a trickle); when its client
    goes away (UploadRefused each time)."""
    import asyncio

    from starlette.requests import ClientDisconnect

    size, chunks, start = 0, request.stream(), time.monotonic()
    while True:
        left = start + timeout * (1 + size / 2 ** 20) - time.monotonic()
        try:
            chunk = await asyncio.wait_for(anext(chunks, None), max(0.0, min(timeout, left)))
        except asyncio.TimeoutError:
            raise UploadRefused(408, f"{name}: the upload stopped for {timeout:g} s, or came slower than "
                                     f"1 MB per {timeout:g} s (--serve-timeout), so it was dropped: send it "
                                     "again, over a faster connection or as a shorter clip") from None
        except ClientDisconnect:
            raise UploadRefused(None, "its client went away before the upload ended; nothing was kept") from None
        if chunk is None:
            return
        size += len(chunk)
        if size > limit:
            raise UploadRefused(413, f"{name}: the upload is too large (over {limit / 2 ** 20:g} MB)")
        yield chunk


def upload_named_by_hash(job: Job, part: Path, digest, ext: str) -> None:
    """The received file `part` becomes the job's upload, named by its content's hash (never by the client's)."""
    job.upload = job.folder / f"{digest.hexdigest()[:32]}{ext}"
    os.replace(part, job.upload)


async def receive_upload(request, job: Job, ext: str, limit: int, timeout: float) -> None:
    """The request's body into the job's folder, the file named by its hash (guarded_body's refusals)."""
    digest, size, part = hashlib.sha256(), 0, job.folder / ".upload.part"
    with open(part, "wb") as f:
        async for chunk in guarded_body(request, job.name, limit, timeout):
            size += len(chunk)
            digest.update(chunk)
            f.write(chunk)
    if size == 0:
        raise UploadRefused(400, f"{job.name}: the upload is empty")
    upload_named_by_hash(job, part, digest, ext)


SERVE_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lip reading</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 14px 24px; }
  header h1 { font-size: 20px; margin: 0; }
  header .model { font-size: 13px; opacity: 0.8; margin-top: 4px; }
  main { max-width: 980px; margin: 0 auto; padding: 20px; }
  .panel { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12); padding: 16px 20px;
    margin-bottom: 16px; }
  #drop { border: 2px dashed #9aa3b5; border-radius: 8px; padding: 22px; text-align: center; cursor: pointer; }
  #drop.over { background: #e8eefc; border-color: #3d6be0; }
  .settings { display: flex; gap: 18px; align-items: center; margin-top: 12px; flex-wrap: wrap; }
  .settings input[type=number] { width: 64px; }
  button { background: #3d6be0; color: #fff; border: 0; border-radius: 6px; padding: 7px 14px; cursor: pointer;
    font-size: 14px; }
  button.secondary { background: #e4e7ee; color: #1d2330; }
  button:disabled { opacity: .5; cursor: default; }
  .hint { color: #5b6477; font-size: 13px; }
  .job { border-top: 1px solid #e4e7ee; padding: 12px 0; }
  .job:first-child { border-top: 0; }
  .job .head { display: flex; justify-content: space-between; align-items: center; gap: 10px; }
  .job .name { font-weight: 600; word-break: break-all; }
  .badge { font-size: 12px; border-radius: 10px; padding: 2px 9px; background: #e4e7ee; }
  .badge.done { background: #d5f1dd; color: #17602f; }
  .badge.failed { background: #fbdada; color: #8a1c1c; }
  .badge.cancelled { background: #eee; color: #666; }
  .badge.reading, .badge.preprocessing, .badge.decoding { background: #dfe7fb; color: #23459c; }
  .bar { height: 6px; background: #e4e7ee; border-radius: 3px; margin: 8px 0 4px; overflow: hidden; }
  .bar div { height: 100%; background: #3d6be0; width: 0; transition: width .2s; }
  .detail { font-size: 13px; color: #5b6477; }
  .error { color: #8a1c1c; font-size: 14px; margin-top: 6px; }
  .transcript { font-size: 26px; direction: rtl; text-align: right; margin: 10px 0 4px; overflow-wrap: anywhere;
    font-family: "Noto Naskh Arabic", "Amiri", "Segoe UI", Tahoma, Arial, serif; }
  table.nbest th { font-weight: normal; color: #5b6477; font-size: 12px; text-align: left; padding: 0 8px; }
  table.nbest { border-collapse: collapse; width: 100%; font-size: 15px; margin-top: 6px; }
  table.nbest td { padding: 3px 8px; border-bottom: 1px solid #f0f1f4; }
  table.nbest td.text { direction: rtl; text-align: right; font-size: 18px; overflow-wrap: anywhere; }
  table.nbest td.num { color: #5b6477; width: 70px; font-variant-numeric: tabular-nums; }
  img.preview { max-width: 100%; image-rendering: pixelated; border-radius: 4px; margin-top: 8px; }
  #camera { width: 320px; max-width: 100%; border-radius: 6px; margin-top: 8px; transform: scaleX(-1); }
  .downloads a { margin-right: 14px; }
  video.player { width: 100%; max-height: 360px; background: #000; border-radius: 6px; margin-top: 8px; }
  .words { direction: rtl; text-align: right; font-size: 22px; line-height: 1.9; margin-top: 6px;
    font-family: "Noto Naskh Arabic", "Amiri", "Segoe UI", Tahoma, Arial, serif; }
  .words span { cursor: pointer; border-radius: 4px; padding: 0 3px; }
  .words span:hover { background: #e8eefc; }
  .words span.now { background: #3d6be0; color: #fff; }
  .words span small { font-size: 11px; color: #8a93a6; margin-right: 3px; font-family: system-ui, sans-serif; }
</style>
</head>
<body>
<header>
  <h1>Lip reading</h1>
  <div class="model" id="model">loading the model's description...</div>
</header>
<main>
  <div class="panel">
    <div id="drop">Drop face videos or mouth clips here, or <u>choose files</u>
      <div class="hint" id="limits"></div></div>
    <input type="file" id="files" multiple hidden>
    <div class="settings">
      <label>Beam size <input type="number" id="beam" min="1" max="50"></label>
      <label>Hypotheses shown <input type="number" id="nbest" min="1" max="50" value="3"></label>
      <span class="hint">a larger beam is slower and usually a little better</span>
    </div>
    <div class="settings">
      <button class="secondary" id="record">Record from the camera</button>
      <span class="hint" id="recording">face the camera and speak; stop to transcribe</span>
    </div>
    <video id="camera" muted playsinline hidden></video>
    <div class="error" id="upload-error"></div>
  </div>
  <div class="panel">
    <div class="head" style="display:flex;justify-content:space-between;align-items:center">
      <strong>Videos</strong>
      <span class="downloads"><a href="/api/results.csv" download>results as CSV</a>
        <a href="/api/results.json" download="lipreading.json">as JSON</a></span>
    </div>
    <div id="jobs"><p class="hint" id="empty">No video yet.</p></div>
  </div>
</main>
<script>
const $ = (id) => document.getElementById(id);
const cards = {};

async function loadStatus() {
  const s = await (await fetch("/api/status")).json();
  const m = s.model;
  $("model").textContent = `${m.checkpoint} · ${m.preset} ${m.modality} model · ${m.decoder} search on ${m.device}`;
  $("limits").textContent = `up to ${s.max_upload_mb} MB each: ${s.accepted.join(" ")}`;
  $("files").accept = s.accepted.join(",");
  $("beam").value = m.beam_size;
}

function card(id, name) {
  $("empty")?.remove();
  const div = document.createElement("div");
  div.className = "job";
  div.innerHTML = `<div class="head"><span class="name"></span><span><span class="badge"></span>
    <button class="secondary cancel">Cancel</button></span></div>
    <div class="bar"><div></div></div><div class="detail"></div><div class="error"></div>
    <div class="transcript"></div><table class="nbest"></table>`;
  div.querySelector(".name").textContent = name;
  $("jobs").prepend(div);
  cards[id] = div;
  return div;
}

function show(div, job) {
  div.dataset.state = job.state;
  const badge = div.querySelector(".badge");
  badge.textContent = job.state;
  badge.className = "badge " + job.state;
  const finished = ["done", "failed", "cancelled"].includes(job.state);
  div.querySelector(".bar").style.display = finished ? "none" : "";
  div.querySelector(".bar div").style.width = `${Math.round(100 * job.progress)}%`;
  div.querySelector(".detail").textContent = job.state === "done"
    ? `${job.frames} frames, decoded in ${job.seconds.toFixed(2)} s (beam ${job.beam_size})`
      + (job.notes ? `; ${job.notes}` : "")
    : (job.state === "failed" ? "" : job.detail);
  div.querySelector(".error").textContent = job.state === "failed" ? job.detail : "";
  const cancel = div.querySelector(".cancel");
  cancel.style.display = finished ? "none" : "";
  cancel.onclick = () => {
    cancel.disabled = true;
    cancel.textContent = "Cancelling...";
    fetch(`/api/jobs/${job.id}/cancel`, {method: "POST"});
  };
  if (job.preview && !div.querySelector("img")) {
    const img = document.createElement("img");
    img.className = "preview";
    img.alt = "the mouth crop the model read";
    img.src = job.preview;
    div.querySelector(".bar").before(img);
  }
  if (job.state === "done" && job.words && job.words.length && !div.querySelector("video")) {
    player(div, job);
  }
  if (job.state === "done") {
    const best = job.hypotheses[0];
    div.querySelector(".transcript").textContent = best ? (best.text || "(nothing read)") : "";
    const table = div.querySelector(".nbest");
    table.innerHTML = job.hypotheses.length > 1 ? "<tr><th>rank</th><th>score</th><th></th></tr>" : "";
    if (job.hypotheses.length > 1) job.hypotheses.forEach((h, i) => {
      const row = table.insertRow();
      row.insertCell().textContent = `${i + 1}`;
      row.cells[0].className = "num";
      row.insertCell().textContent = h.score.toFixed(2);
      row.cells[1].className = "num";
      row.insertCell().textContent = h.text;
      row.cells[2].className = "text";
    });
  }
}

function player(div, job) {
  // the upload with its subtitles as a track, and the words in time: a word seeks the video
  const video = document.createElement("video");
  video.className = "player";
  video.controls = true;
  video.preload = "metadata";
  video.src = `/api/jobs/${job.id}/video`;
  const track = document.createElement("track");
  Object.assign(track, {kind: "subtitles", srclang: "ar", label: "lip reading", default: true,
                        src: `/api/jobs/${job.id}/subtitles.vtt`});
  video.append(track);
  const words = document.createElement("div");
  words.className = "words";
  const spans = job.words.map((w) => {
    const span = document.createElement("span");
    span.textContent = w.word;
    const at = document.createElement("small");
    at.textContent = w.start.toFixed(1);
    span.append(at);
    span.dataset.start = w.start;
    span.dataset.end = w.end;
    span.title = `${w.start.toFixed(2)}-${w.end.toFixed(2)} s`;
    span.onclick = () => { video.currentTime = w.start; video.play().catch(() => {}); };
    words.append(span, " ");
    return span;
  });
  video.ontimeupdate = () => spans.forEach((s) => s.classList.toggle("now",
    video.currentTime >= +s.dataset.start && video.currentTime < +s.dataset.end));
  const links = document.createElement("div");
  links.className = "downloads hint";
  ["srt", "vtt"].forEach((kind) => {
    const a = document.createElement("a");
    Object.assign(a, {href: `/api/jobs/${job.id}/subtitles.${kind}`, download: "", textContent: `subtitles (.${kind})`});
    links.append(a);
  });
  div.querySelector(".nbest").after(video, words, links);
}

function follow(job) {
  const div = cards[job.id] || card(job.id, job.name);
  show(div, job);
  if (["done", "failed", "cancelled"].includes(job.state)) return;
  const events = new EventSource(`/api/jobs/${job.id}/events`);
  events.onmessage = (e) => {
    const now = JSON.parse(e.data);
    show(div, now);
    if (["done", "failed", "cancelled"].includes(now.state)) events.close();
  };
}

async function send(file) {
  const beam = $("beam").value, nbest = $("nbest").value;
  const url = `/api/jobs?name=${encodeURIComponent(file.name)}&beam_size=${beam}&nbest=${nbest}`;
  let reply;
  try {
    reply = await fetch(url, {method: "POST", body: file, headers: {"Content-Type": "application/octet-stream"}});
  } catch (e) {
    $("upload-error").textContent = `${file.name}: the upload did not reach the server (${e})`;
    return;
  }
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    const why = Array.isArray(body.detail)  // FastAPI's own word on a bad setting (a beam size of 0, say)
      ? body.detail.map((d) => `${d.loc.at(-1)}: ${d.msg}`).join("; ") : body.detail;
    $("upload-error").textContent = why || `${file.name}: refused (HTTP ${reply.status})`;
    return;
  }
  follow(body);
}

function sendAll(files) {
  $("upload-error").textContent = "";
  [...files].forEach(send);
}

let recorder = null;

async function camera() {
  // the camera's picture (with its sound where there is a microphone), recorded in the browser as WebM
  try {
    return await navigator.mediaDevices.getUserMedia({video: true, audio: true});
  } catch (e) {
    return navigator.mediaDevices.getUserMedia({video: true});
  }
}

$("record").onclick = async () => {
  if (recorder) return recorder.stop();
  $("upload-error").textContent = "";
  let stream;
  try {
    stream = await camera();
  } catch (e) {
    $("upload-error").textContent = `the camera could not be opened (${e.name}): allow it for this page, or upload a video`;
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream, MediaRecorder.isTypeSupported("video/webm") ? {mimeType: "video/webm"} : {});
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    Object.assign($("camera"), {hidden: true, srcObject: null});
    $("record").textContent = "Record from the camera";
    recorder = null;
    const stamp = new Date().toISOString().slice(0, 19).replace(/[-:T]/g, "");
    send(new File(chunks, `camera-${stamp}.webm`, {type: "video/webm"}));
  };
  Object.assign($("camera"), {hidden: false, srcObject: stream});
  $("camera").play();
  recorder.start(500);
  $("record").textContent = "Stop and transcribe";
};

$("drop").onclick = () => $("files").click();
$("files").onchange = () => { sendAll($("files").files); $("files").value = ""; };
$("drop").ondragover = (e) => { e.preventDefault(); $("drop").classList.add("over"); };
$("drop").ondragleave = () => $("drop").classList.remove("over");
$("drop").ondrop = (e) => { e.preventDefault(); $("drop").classList.remove("over"); sendAll(e.dataTransfer.files); };

loadStatus();
fetch("/api/jobs").then((r) => r.json()).then((jobs) => {
  jobs.forEach(follow);
  document.body.dataset.ready = "yes";  // earlier jobs listed: new ones go on top
});
</script>
</body>
</html>
"""


# Requests from elsewhere ------------------------------------------------------------------------------------
# A server on 127.0.0.1 is still reached by the pages its user visits. DNS rebinding: a page of the attacker's
# site, its name made to resolve to 127.0.0.1, is the same origin as this server to the browser and may read it;
# its requests still carry the attacker's name in Host, so only this server's own names are answered. A page of
# another site may also send requests without reading them (a form, fetch in no-cors mode): the browser names
# where they come from (Origin, Sec-Fetch-Site), and those that would change something are refused.

HOST_HEADER = re.compile(r"([a-z0-9._-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?", re.IGNORECASE)


def allowed_hosts(cfg: Config) -> list[str]:
    return [name.strip().lower() for name in cfg.serve_allowed_hosts.split(",") if name.strip()]


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Whether a Host header names this server: an IP address, localhost, or a name --serve-allowed-hosts
    allows (.example.com: it and its subdomains; *: any)."""
    import ipaddress
    match = HOST_HEADER.fullmatch(host)
    if not match:
        return False
    name = match[1].strip("[]").lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or any(a == "*" or name == a.lstrip(".") or (a.startswith(".") and name.endswith(a))
                                      for a in allowed)


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin names the server as the Host header does: the same name and port. Not the same
    scheme: a tunnel or proxy that adds HTTPS (localtunnel's) brings https origins to this plain http server."""
    import urllib.parse
    try:
        theirs, here = urllib.parse.urlsplit(origin), urllib.parse.urlsplit("//" + host)
        default = {"http": 80, "https": 443}[theirs.scheme]
        return theirs.hostname is not None and (theirs.hostname, theirs.port or default) == (here.hostname,
                                                                                            here.port or default)
    except (KeyError, ValueError):
        return False


def foreign_request(method: str, headers: dict[str, str], allowed: list[str]) -> tuple[int, str] | None:
    """The status and message refusing a request from elsewhere, or None. A request without Origin (curl, a
    script) is no page's, and passes."""
    host = headers.get("host", "")
    if not host_allowed(host, allowed):
        return 400, (f"this server does not answer to the name {host!r} (a guard against DNS rebinding), only to "
                     "IP addresses, localhost and the names in --serve-allowed-hosts: open it by its address "
                     "(http://127.0.0.1:PORT/), or add the name to --serve-allowed-hosts if it is this server's")
    if method in ("GET", "HEAD"):
        return None
    origin = headers.get("origin")
    if headers.get("sec-fetch-site") == "cross-site" or (origin is not None and not same_origin(origin, host)):
        return 403, (f"a page of another site ({origin or 'cross-site'}) may not change anything on this server: "
                     "use the server's own page, or its API from a program")
    return None


class RefuseForeignRequests:
    """The app's first step (an ASGI middleware): requests foreign_request refuses get their answer here, before
    their body is read."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = foreign_request(scope["method"], headers, self.allowed)
            if refusal:
                from fastapi.responses import JSONResponse
                return await JSONResponse({"detail": refusal[1]}, refusal[0])(scope, receive, send)
        await self.app(scope, receive, send)


def serving_app(reader: LipReader, board: JobBoard, cfg: Config):
    """The FastAPI app: the page at /, the JSON API under /api (its own documentation at /docs)."""
    import asyncio

    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

    app = FastAPI(title="master_all_avsr: lip reading", description="Upload a face video or a mouth clip; follow "
                  "it; read its n-best.")
    app.add_middleware(RefuseForeignRequests, allowed=allowed_hosts(cfg))
    limit, types = int(cfg.max_upload_mb * 2 ** 20), accepted_types(reader.cfg)

    def job_of(job_id: str) -> Job:
        if job_id not in board.jobs:
            raise HTTPException(404, f"no job {job_id!r} on this server")
        return board.jobs[job_id]

    @app.get("/", response_class=HTMLResponse)
    def page():
        return SERVE_PAGE

    @app.get("/api/health")
    def health():
        return {"ok": True}

    @app.get("/api/status")
    def status():
        states = Counter(j.state for j in board.jobs.values())
        return {"model": reader.describe(), "max_upload_mb": cfg.max_upload_mb, "accepted": types,
                "beam_sizes": [1, 50], "jobs_at_once": cfg.serve_jobs, "queue_limit": cfg.serve_queue,
                "jobs": {s: states[s] for s in SERVE_STATES}}

    async def upload(request: Request, name: str = Query(..., description="the file's name, with its extension"),
                     beam_size: int = Query(reader.cfg.beam_size, ge=1, le=50),
                     nbest: int = Query(1, ge=1, le=50)):
        ext = Path(name).suffix.lower()
        if ext not in types:
            raise HTTPException(415, f"{name}: {ext or 'no extension'} is not a kind this server reads; send one "
                                     f"of {', '.join(types)}")
        if int(request.headers.get("content-length") or 0) > limit:
            raise HTTPException(413, f"{name} is over the upload limit of {cfg.max_upload_mb:g} MB (--max-upload-mb): "
                                     "send a shorter clip, or cut its mouth first (--mode preprocess)")
        if not board.hold_place():  # before the body is read: a crowd of uploads is refused, not received
            raise HTTPException(429, f"{cfg.serve_queue} uploads are already waiting or arriving (--serve-queue): "
                                     "try again when some are done")
        try:
            job = board.new_job(name, beam_size, min(nbest, beam_size))
            try:
                await receive_upload(request, job, ext, limit, cfg.serve_timeout)
                whole = reader.cfg.modality == "av" or (reader.cfg.modality == "video" and ext in (".npy", ".npz"))
                if whole and (bomb := await asyncio.to_thread(declared_size_problem, job.upload)):  # video streams
                    raise UploadRefused(413, f"{job.name}: {bomb}")
            except UploadRefused as e:
                shutil.rmtree(job.folder, ignore_errors=True)
                if e.status is None:
                    print(f"{name!r}: {e}", file=sys.stderr)  # one line; the client will not read an answer
                stalled = {"Connection": "close"} if e.status == 408 else None  # its client sends nothing more
                raise HTTPException(e.status or 400, str(e), headers=stalled) from None
            board.submit(job)
        finally:
            board.free_place()
        return board.view(job)
    upload.__annotations__["request"] = Request  # this file's annotations are strings, looked up in its globals
    app.post("/api/jobs", status_code=202)(upload)


    @app.get("/api/jobs")
    def jobs():
        return [board.view(j) for j in sorted(board.jobs.values(), key=lambda j: j.created)]

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        return board.view(job_of(job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        job = job_of(job_id)
        if job.state in FINISHED:
            return JSONResponse(board.view(job), status_code=409)
        board.cancel(job)
        return board.view(job)

    @app.get("/api/jobs/{job_id}/preview.png")
    def preview(job_id: str):
        path = job_of(job_id).folder / "preview.png"
        if not path.exists():
            raise HTTPException(404, "no preview yet (it comes with the mouth clip)")
        return FileResponse(path, media_type="image/png")

    def upload_of(job_id: str) -> Path:
        job = job_of(job_id)
        found = job.upload or next((p for p in job.folder.iterdir() if p.suffix.lower() in types), None)
        if found is None or not found.exists():
            raise HTTPException(404, "this job's upload is not kept")
        return found

    @app.get("/api/jobs/{job_id}/video")
    def video(job_id: str):
        """The upload as it was sent, for the page's player."""
        path = upload_of(job_id)
        return FileResponse(path, media_type=PLAYABLE.get(path.suffix.lower(), "application/octet-stream"))

    @app.get("/api/jobs/{job_id}/subtitles.{kind}")
    def subtitles_of(job_id: str, kind: str):
        """The transcript's timed words as WebVTT (the player's track) or SubRip."""
        if kind not in ("vtt", "srt"):
            raise HTTPException(404, "subtitles come as .vtt or .srt")
        job = job_of(job_id)
        return Response(subtitles(job.words, f".{kind}"), media_type="text/vtt" if kind == "vtt" else "text/plain",
                        headers={"Content-Disposition": f'inline; filename="{Path(job.name).stem or job.id}.{kind}"'})

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str):
        """Server-sent events: the job's state each time it changes, until it is finished (or the page leaves:
        Starlette then ends the stream)."""
        job = job_of(job_id)

        async def stream():
            last, quiet = None, 0.0
            while True:
                now = board.view(job)
                if now != last:
                    yield f"data: {json.dumps(now, ensure_ascii=False)}\n\n"
                    last, quiet = now, 0.0
                    if now["state"] in FINISHED:  # the state sent, not job.state: that may have moved on since
                        return
                elif quiet > 15:  # a comment line keeps tunnels and proxies from closing a quiet stream
                    yield ": still there\n\n"
                    quiet = 0.0
                await asyncio.sleep(0.1)
                quiet += 0.1
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/results.json")
    def results_json():
        return board.results_rows()

    @app.get("/api/results.csv")
    def results_csv():
        return Response("\ufeff" + csv_text(board.results_rows(), RESULT_COLUMNS),  # the BOM: for Excel
                        media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="lipreading.csv"'})

    team_routes(app, reader, board, cfg, types)
    return app


# The team's app ------------------------------------------------------------------------------------------------
# The team's Flutter app talks to their FastAPI backend (Essa-Ramzy/Arabic-Lip-Reading, backend/main.py): it asks
# GET /config for the models, posts a video (or the video_hash of one sent before) as a form to /transcribe/,
# follows GET /progress/{task_id} (lines "data: {json}") and reads the transcript from the last one's result. The
# same routes, fields and status codes here let the app work unchanged against this server. A task is a job: the
# same upload limits, queue, timeouts and checks of where requests come from, read by the model its model_name
# and diacritized ask for. Gemini's enhancement, which this server lacks, is answered as their backend answers
# without a Gemini key (the raw transcript as the enhanced one), but /health says healthy: nothing is missing.

TEAM_API_VERSION = "1.0.0"  # the version of their API these routes follow
TEAM_MAX_BEAM = 50
TEAM_LANDMARKS = ["dlib"]  # their landmark_model_name picks a RetinaFace; here dlib finds the face, whatever it says
TEAM_FORM_ROOM = 2 ** 20  # what a form may carry besides its file (its other fields, the parts' headers)
TEAM_STATUS = {"queued": "processing", "reading": "processing", "preprocessing": "processing",
               "decoding": "processing", "done": "completed", "failed": "failed", "cancelled": "cancelled"}
TEAM_FINISHED = ("completed", "failed", "cancelled")  # theirs never ends a stream on cancelled: this one does
NO_GEMINI = "Gemini service not available"  # their words where enhance is asked without Gemini; the app keys on none


def form_parsing_missing() -> bool:
    """Whether python-multipart is missing: Starlette reads forms with it, and the team app sends forms."""
    import importlib.util
    return not any(importlib.util.find_spec(name) for name in ("python_multipart", "multipart"))


def team_status(job: Job) -> str:
    """processing, completed, failed or cancelled: a task cancelled is so at once (the worker stops at its next
    step; a decoding under way ends first), as in their backend."""
    return "cancelled" if job.cancel.is_set() and job.state not in FINISHED else TEAM_STATUS[job.state]


def team_step(board: JobBoard, job: Job) -> tuple[int, str]:
    """The task's progress (0..100) and current_step. The app shows a stage it infers from the step's words, the
    first it finds in the order failed/error, initializing/starting, upload, preprocess, analyzing/frames,
    landmark/detecting, mouth/extracting, inference/lip reading, enhancement/ai, completed/success: each step
    here has the words of its own stage and none of one before. A finished task's bar is full, whatever its end."""
    status = team_status(job)
    if status != "processing":
        return 100, {"completed": "Completed", "failed": "Failed", "cancelled": "Cancelled by user"}[status]
    if job.state == "queued":
        return 0, f"Starting... ({board.view(job)['detail']})"
    if job.state == "preprocessing":
        return 30 + round(35 * job.progress), f"Extracting mouth regions ({round(100 * job.progress)}%)..."
    return {"reading": (20, "Analyzing video frames..."), "decoding": (70, "Running lip reading inference...")
            }[job.state]


def video_hash(job: Job) -> str | None:
    """What the app sends back as file_hash to read the same video with another model: the start of the upload's
    name, its content's hash."""
    return job.asked.get("video_hash") or (job.upload.stem[:16] if job.upload else None)


def team_result(job: Job) -> dict:
    """A completed task's result, as their backend gives it (its metadata has these five keys, no more)."""
    text = job.hypotheses[0]["text"] if job.hypotheses else ""
    return {"raw_transcript": text, "enhanced_transcript": text, "video_hash": video_hash(job),
            "metadata": {"model_name": job.asked.get("model_name"), "diacritized": job.asked.get("diacritized"),
                         "beam_size": job.beam_size, "success": True, "error": None},
            "enhancements": {"error": NO_GEMINI} if job.asked.get("enhance") else {}}


def team_progress(board: JobBoard, job: Job) -> dict:
    """A task's progress object, their field names and values."""
    progress, step = team_step(board, job)
    status = team_status(job)
    return {"progress": progress, "total_steps": 100, "current_step": step, "status": status,
            "start_time": job.created, "last_update": job.changed,
            "error": job.detail if status == "failed" else None,
            "result": team_result(job) if status == "completed" else None, "cancelled": status == "cancelled",
            "elapsed_time": (job.changed if status in TEAM_FINISHED else time.time()) - job.created,
            "percentage": float(progress)}


def team_event(data: dict) -> str:
    # ASCII only (json's \u escapes), as theirs: the app decodes each chunk it receives on its own, and a chunk
    # ending inside a character's UTF-8 bytes would not decode
    return f"data: {json.dumps(data)}\n\n"


def team_defaults(reader, board: JobBoard) -> dict:
    """What each field of a /transcribe/ form is when absent or empty: their route's defaults, the model the first
    served, the beam size the run's (--beam-size)."""
    name = next(iter(board.models))[0]
    return {"file_hash": None, "model_name": name, "landmark_model_name": TEAM_LANDMARKS[0],
            "diacritized": (name, True) in board.models, "enhance": False,
            "beam_size": reader.cfg.beam_size, "include_summary": False, "include_translation": False,
            "target_language": "English"}


def team_form_values(form, defaults: dict) -> dict:
    """The form's fields typed as their route declares them (pydantic's way, as FastAPI's), absent or empty ones
    their defaults; a value that is not of its type gets FastAPI's own 422 with the list of what is wrong."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import TypeAdapter, ValidationError
    values, errors = {}, []
    for name, default in defaults.items():
        given = form.get(name)
        if given is None or given == "":
            values[name] = default
        elif not isinstance(given, str):
            errors.append({"type": "string_type", "loc": ("body", name), "input": None,
                           "msg": f"{name} is a text field: send it as text, not as a file"})
        else:
            try:
                values[name] = TypeAdapter(type(default) if default is not None else str).validate_python(given)
            except ValidationError as e:
                errors += [{**error, "loc": ("body", name)} for error in e.errors(include_url=False)]
    if errors:
        raise RequestValidationError(errors)
    return values


async def read_team_form(request, limit: int, timeout: float):
    """The request's form, multipart or urlencoded (their route reads both; anything else is an empty form), its
    body received as an upload's is (guarded_body's limits and UploadRefused). A file is spooled by the parser:
    in memory, past 1 MB in a nameless temporary file."""
    from starlette.datastructures import FormData
    from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

    kind = request.headers.get("content-type", "")
    body = guarded_body(request, "the form", limit, timeout)
    try:
        if kind.startswith("multipart/form-data"):
            return await MultiPartParser(request.headers, body, max_files=1, max_fields=50).parse()
        if kind.startswith("application/x-www-form-urlencoded"):
            return await FormParser(request.headers, body).parse()
    except MultiPartException as e:
        raise UploadRefused(400, f"the form could not be read ({e}): send multipart/form-data, the video as its "
                                 "one file, named file") from None
    return FormData()


def upload_by_hash(board: JobBoard, wanted: str) -> Path | None:
    """The upload an earlier job kept whose content's hash starts with `wanted` (a task's video_hash), if any."""
    return next(iter(sorted(board.root.glob(f"*/{wanted.lower()}{'[0-9a-f]' * 16}.*"))), None)


def reuse_upload(job: Job, earlier: Path) -> None:
    """An upload kept by an earlier job, the job's own too: linked where the file system allows, else copied. Its
    mouth clip, kept by the same hash, is not cut again."""
    job.upload = job.folder / earlier.name
    try:
        os.link(earlier, job.upload)
    except OSError:
        shutil.copyfile(earlier, job.upload)


def keep_form_file(job: Job, spooled, ext: str) -> None:
    """The form's file, as the parser spooled it, into the job's folder, named by its hash."""
    digest, part = hashlib.sha256(), job.folder / ".upload.part"
    spooled.seek(0)
    with open(part, "wb") as f:
        for chunk in iter(lambda: spooled.read(2 ** 20), b""):
            digest.update(chunk)
            f.write(chunk)
    upload_named_by_hash(job, part, digest, ext)


def team_request_problem(values: dict, file, board: JobBoard) -> tuple[int, str] | None:
    """Why a /transcribe/ form cannot start a task, as their route says it (its status codes, in its order; a
    model not loaded here is refused at once, with the names that are, where theirs fails the task later), or
    None."""
    choices = f"{model_choices(board.models)} (GET /config lists them)"
    checks = [(file is None and values["file_hash"] is None,
               "Either 'file' or 'file_hash' must be provided: the video as a file field named file, or the "
               "video_hash of a result"),
              (file is not None and values["file_hash"] is not None,
               "Cannot provide both 'file' and 'file_hash'. Choose one."),
              (values["file_hash"] is not None and not re.fullmatch(r"[0-9a-fA-F]{16}", values["file_hash"]),
               "Invalid file hash format. Hash must be a 16-character hexadecimal string: a result's video_hash"),
              (not 1 <= values["beam_size"] <= TEAM_MAX_BEAM, f"Beam size must be between 1 and {TEAM_MAX_BEAM}"),
              ((values["model_name"], values["diacritized"]) not in board.models,
               f"Model {values['model_name']}{'' if values['diacritized'] else ':nodia'} (diacritized="
               f"{str(values['diacritized']).lower()}) is not loaded on this server: ask for one of {choices}, "
               "or start the server with --serve-model for it")]
    return next(((400, why) for failed, why in checks if failed), None)


def file_problem(file, limit: int, types: list[str]) -> tuple[int, str] | None:
    """Why an uploaded file is refused, their status codes in their order, or None."""
    from starlette.datastructures import UploadFile
    if not isinstance(file, UploadFile) or not file.filename:
        return 400, "No filename provided: send the video as a file (with its file name), in the field named file"
    ext = Path(file.filename).suffix.lower()
    if ext not in types:
        return 400, (f"Unsupported file format ({ext or 'no extension'}): send one of {', '.join(types)}")
    if file.size > limit:
        return 413, (f"File too large. Size: {file.size / 2 ** 20:.1f}MB, Max allowed: {limit / 2 ** 20:.1f}MB "
                     "(--max-upload-mb): send a shorter clip")
    if file.size == 0:
        return 400, f"{file.filename}: the upload is empty"
    return None


async def start_team_task(board: JobBoard, form, defaults: dict, limit: int, types: list[str]) -> Job:
    """The task a /transcribe/ form asks for, queued (HTTPException for a form that cannot be one)."""
    import asyncio

    from fastapi import HTTPException

    values = team_form_values(form, defaults)
    file = form.get("file") or None  # an empty field is an absent one, as in FastAPI's forms
    problem = team_request_problem(values, file, board)
    earlier = upload_by_hash(board, values["file_hash"]) if values["file_hash"] and not problem else None
    if values["file_hash"] and not problem and earlier is None:
        problem = 404, (f"No processed file found for hash: {values['file_hash']} (this server keeps no video by "
                        "that hash): send the video itself, as the field file")
    problem = problem or (file_problem(file, limit, types) if file is not None else None)
    if problem:
        raise HTTPException(*problem)
    name = file.filename if file is not None else getattr(board.jobs.get(earlier.parent.name), "name", earlier.name)
    job = board.new_job(name, values["beam_size"], 1)
    job.asked = {key: values[key] for key in ("model_name", "diacritized", "enhance")}
    try:
        if file is not None:
            await asyncio.to_thread(keep_form_file, job, file.file, Path(file.filename).suffix.lower())
        else:
            reuse_upload(job, earlier)
        if board.reader_of(job).cfg.modality != "audio" and (bomb := await asyncio.to_thread(
                declared_size_problem, job.upload)):
            raise HTTPException(413, f"{job.name}: {bomb}")
    except BaseException:
        shutil.rmtree(job.folder, ignore_errors=True)
        raise
    job.asked["video_hash"] = job.upload.stem[:16]
    board.submit(job)
    return job


def team_routes(app, reader, board: JobBoard, cfg: Config, types: list[str]) -> None:
    """The team's routes on the app: POST /transcribe/, GET /progress/{task_id} (events), GET
    /progress/{task_id}/status, DELETE /progress/{task_id}/cancel, GET /config, GET /health, POST /enhance-text/."""
    import asyncio

    from fastapi import HTTPException, Request
    from fastapi.responses import StreamingResponse

    limit = int(cfg.max_upload_mb * 2 ** 20)
    not_found = lambda task_id: (f"Task not found: no task {task_id!r} on this server; use the task_id that POST "
                                 "/transcribe/ answered, or send the video again")

    async def transcribe(request: Request):
        if form_parsing_missing():
            raise HTTPException(501, "this server cannot read forms: the Python package python-multipart is "
                                     "missing; whoever runs it: pip install python-multipart, then restart it")
        if int(request.headers.get("content-length") or 0) > limit + TEAM_FORM_ROOM:
            raise HTTPException(413, f"File too large: the request is over the upload limit of "
                                     f"{cfg.max_upload_mb:g} MB (--max-upload-mb): send a shorter clip")
        if not board.hold_place():  # before the body is read: a crowd of uploads is refused, not received
            raise HTTPException(429, f"{cfg.serve_queue} uploads are already waiting or arriving (--serve-queue): "
                                     "try again when some are done")
        try:
            try:
                form = await read_team_form(request, limit + TEAM_FORM_ROOM, cfg.serve_timeout)
            except UploadRefused as e:
                if e.status is None:
                    print(f"/transcribe/: {e}", file=sys.stderr)  # one line; the client will not read an answer
                why = str(e) if e.status != 413 else (f"File too large: over the upload limit of "
                                                      f"{cfg.max_upload_mb:g} MB (--max-upload-mb): send a "
                                                      "shorter clip")
                raise HTTPException(e.status or 400, why,
                                    headers={"Connection": "close"} if e.status == 408 else None) from None
            try:
                job = await start_team_task(board, form, team_defaults(reader, board), limit, types)
            finally:
                await form.close()
        finally:
            board.free_place()
        return {"task_id": job.id, "message": "Transcription started. Use the task_id to track progress.",
                "progress_stream_url": f"/progress/{job.id}", "progress_status_url": f"/progress/{job.id}/status"}
    transcribe.__annotations__["request"] = Request  # this file's annotations are strings, looked up in its globals
    app.post("/transcribe/")(transcribe)

    @app.get("/progress/{task_id}")
    async def progress_events(task_id: str):
        """Server-sent events: the task's progress object when it changes and each second (its elapsed_time),
        until it is completed, failed or cancelled; for a task not here, one event with its error."""
        job = board.jobs.get(task_id)

        async def stream():
            if job is None:
                yield team_event({"error": not_found(task_id), "task_id": task_id})
                return
            last, quiet = None, 0.0
            while True:
                now = team_progress(board, job)
                moved = {k: v for k, v in now.items() if k != "elapsed_time"}
                if moved != last or quiet >= 1.0:
                    yield team_event(now)
                    last, quiet = moved, 0.0
                    if now["status"] in TEAM_FINISHED:
                        return
                await asyncio.sleep(0.1)
                quiet += 0.1
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/progress/{task_id}/status")
    def progress_status(task_id: str):
        if task_id not in board.jobs:
            raise HTTPException(404, not_found(task_id))
        return team_progress(board, board.jobs[task_id])

    @app.delete("/progress/{task_id}/cancel")
    def cancel_task(task_id: str):
        """Their answer, 200 whether or not it cancelled (success says); was_running: whether it had started."""
        if task_id not in board.jobs:
            raise HTTPException(404, not_found(task_id))
        job = board.jobs[task_id]
        status, was_running = team_status(job), job.state != "queued"
        if status == "processing":
            board.cancel(job)
        message = "Task cancelled successfully" if status == "processing" else f"Task already {status}"
        return {"task_id": task_id, "message": message, "was_running": status == "processing" and was_running,
                "success": status == "processing"}

    @app.get("/config")
    def team_config():
        defaults = team_defaults(reader, board)
        return {"upload": {"max_size_mb": round(limit / 2 ** 20, 1), "max_size_bytes": limit,
                           "allowed_extensions": types},
                "processing": {"default_beam_size": defaults["beam_size"], "max_beam_size": TEAM_MAX_BEAM},
                "model": {"default_model": defaults["model_name"], "default_landmark_model": TEAM_LANDMARKS[0],
                          "default_diacritized": defaults["diacritized"], "available_models": model_names(board.models),
                          "available_landmark_models": TEAM_LANDMARKS,
                          "loaded": [{"model_name": name, "diacritized": diacritized,
                                      "checkpoint": checkpoint_name(getattr(served, "checkpoint", Path()))}
                                     for (name, diacritized), served in board.models.items()]},
                "ai": {"gemini_available": False}}

    @app.get("/health")
    def team_health():
        return {"status": "healthy",
                "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "version": TEAM_API_VERSION,
                "services": {"api": "healthy", "gemini_ai": "unavailable", "file_upload": "healthy",
                             "logging": "healthy"},
                "configuration": {"max_upload_size_mb": round(limit / 2 ** 20, 1),
                                  "default_model": team_defaults(reader, board)["model_name"],
                                  "ai_enhancement_available": False}}

    @app.post("/enhance-text/")
    def enhance_text():
        raise HTTPException(503, f"{NO_GEMINI}: this server enhances no text (it has no Gemini); the transcript "
                                 "is the model's own")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def protocol_with_deadlines(timeout: float):
    """uvicorn's HTTP/1.1 protocol (h11's) with a deadline for each request's headers: they must have come
    `timeout` seconds after the connection opened or the answer before went out, else the connection is closed
    (with a 408 when part of a request came). uvicorn 0.55 times only a connection left idle after an answer
    (timeout_keep_alive), so a client sending nothing, or its headers a byte at a time, held one for ever. A
    request's body has its own time: receive_upload's."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ProtocolWithDeadlines(H11Protocol):
        deadline, heard = None, False

        def connection_made(self, transport):
            super().connection_made(transport)
            self.start_deadline()

        def data_received(self, data: bytes) -> None:
            self.heard = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.start_deadline()

        def connection_lost(self, exc):
            self.deadline.cancel()
            super().connection_lost(exc)

        def start_deadline(self) -> None:
            if self.deadline:
                self.deadline.cancel()
            self.heard = False
            self.deadline = self.loop.call_later(timeout, self.too_slow)

        def too_slow(self) -> None:
            if self.transport.is_closing() or (self.cycle and not self.cycle.response_complete):
                return  # a request is being answered
            if self.heard:
                why = json.dumps({"detail": f"the request's headers did not all come within {timeout:g} s "
                                            "(--serve-timeout)"}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(why), why))
            self.transport.close()

    return ProtocolWithDeadlines


def serve(cfg: Config):
    """--mode serve: the page and the API on --host:--port until Ctrl-C; in a notebook, in the background of its
    kernel (the uvicorn Server returned; `.should_exit = True` stops it)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError("--mode serve needs FastAPI and uvicorn: `pip install fastapi uvicorn python-multipart` "
                        f"(Kaggle's image has the first two; the third reads the team app's forms). ({e})") from e
    if not port_is_free(cfg.host, cfg.port):
        raise UserError(f"{cfg.host}:{cfg.port} is taken (another server?): choose another with --port.")
    with contextlib.ExitStack() as lock:  # a training run may hold the work dir's own lock: serving writes in serve/
        lock.enter_context(held_lock(Path(cfg.work_dir) / SERVE_LOCK, cfg.work_dir, "server", "Stop it first "
                                     "(Ctrl-C where it runs), or serve from another --work-dir (--checkpoint "
                                     "names the model)."))
        return serve_holding_the_lock(cfg, lock)


def serve_holding_the_lock(cfg: Config, lock: contextlib.ExitStack):
    import uvicorn
    scratch = Path(cfg.work_dir) / "serve" / "tmp"  # libraries' own temporary files (onnxruntime's, say) go here too
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    models = served_models(cfg)
    reader = next(iter(models.values()))  # the page's and /api's
    board = JobBoard(reader, cfg, models)
    if cfg.host not in LOOPBACK:
        print(f"warning: serving on {cfg.host}: anyone who can reach this machine can upload videos and use the "
              "model. --host 127.0.0.1 keeps it to this machine.")
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}/"
    print(f"serving {reader.checkpoint} ({reader.cfg.preset}, {reader.cfg.modality}, {reader.cfg.decoder}) at {url} "
          f"(the API: {url}docs); uploads up to {cfg.max_upload_mb:g} MB; jobs under {board.root}. "
          + ("It runs while this kernel does." if in_notebook() else "Ctrl-C stops."), flush=True)
    print("the team's app (POST /transcribe/, GET /config) may ask for "
          + ", ".join(f"{name}{'' if diacritized else ':nodia'} ({served.checkpoint})"
                      for (name, diacritized), served in models.items())
          + ("" if cfg.serve_model else " (--serve-model adds others)"), flush=True)
    if form_parsing_missing():
        print("warning: python-multipart is missing, so the team app's POST /transcribe/ is refused (HTTP 501): "
              "pip install python-multipart, then restart the server", flush=True)
    app = serving_app(reader, board, cfg)
    settings = dict(host=cfg.host, port=cfg.port, log_level="warning", http=protocol_with_deadlines(cfg.serve_timeout))
    if in_notebook():  # the kernel's event loop owns this thread: the server gets a thread and a loop of its own
        server = uvicorn.Server(uvicorn.Config(app, **settings))
        held = lock.pop_all()  # the lock goes with the server's thread, released when it ends

        def run_holding_the_lock():
            with held:
                server.run()
        threading.Thread(target=run_holding_the_lock, name="serve", daemon=True).start()
        return server
    try:
        uvicorn.run(app, **settings)
    finally:
        board.stop()


# ---------------------------------------------------------------------------------------------------------
# 14. CLI: flags from the Config fields, one function per mode, and the entry point.
# ---------------------------------------------------------------------------------------------------------


EXAMPLES = """examples:
  python master_all_avsr.py --config configs/cpu_demo.json                      # built-in clips, 9 minutes on a CPU
  python master_all_avsr.py --config configs/lrc_cpu_hour.json --data-dir DATA   # your clips, an hour on 2 CPU cores
  python master_all_avsr.py --mode test --work-dir RUN --data-dir DATA          # score a run on its test split
  python master_all_avsr.py --mode decode --work-dir RUN --input CLIPS          # clips (or --preprocess faces) to text
  python master_all_avsr.py --mode serve --work-dir RUN                         # a page at http://127.0.0.1:8000
  python master_all_avsr.py --mode diagnose --work-dir RUN --data-dir DATA      # why a model is stuck
"""


def settings_help() -> tuple[dict[str, str], dict[str, str]]:
    """Each setting's help and group, read where they are written once: the comment beside a field of Config and
    the comment line above its block. (Without this file's source, as in a pasted notebook cell: none.)"""
    try:
        lines = inspect.getsource(Config).splitlines()
    except (OSError, TypeError):
        return {}, {}
    helps, groups, group = {}, {}, "settings"
    for line in map(str.strip, lines):
        if line.startswith("# "):
            group = line[2:]
        elif (found := re.match(r"(\w+): [^=]+=.*?(?:  # (.*))?$", line)):
            helps[found[1]], groups[found[1]] = found[2] or "", group
    return helps, groups


CHOICES = {"device": ("auto", "cpu", "cuda"), "frontend": ("cnn", "noise", "linear"), "encoder": ("conformer", "mstcn", "dctcn"),
           "data": ("auto", "files", "synthetic"), "units": ("diacritized", "letters"), "unknown_units": ("skip", "map"), "arch": ("conformer", "baseline"),
           "preset": tuple(PRESETS), "amp": ("auto", "bf16", "fp16", "off"), "split": ("train", "val", "test", "all"),
           "decoder": ("beam", "attention", "ctc"), "modality": ("video", "audio", "av"), "lm_kind": ("ngram", "lstm")}


def setting_choices() -> dict[str, tuple[str, ...]]:
    """Every setting with a fixed set of values, and the values: the one list argparse, validate and --help read
    (the modes are MODES's)."""
    return CHOICES | {"mode": tuple(MODES)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Arabic lip reading: data, training, decoding and diagnostics in one file.", epilog=EXAMPLES,
        usage="%(prog)s [--mode MODE] [--config FILE] [--SETTING VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="JSON file of settings; flags given here win over it")
    helps, groups = settings_help()
    choices = setting_choices()
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        group = groups.get(f.name, "settings")
        where = sections.setdefault(group, parser.add_argument_group(group))
        default = "" if f.type == "list[str]" or f.default == "" else f" (default: {f.default}"
        default += "".join(f"; {d[f.name]} under --modality {m}" for m, d in MODALITY_DEFAULTS.items() if f.name in d)
        default += ")" * bool(default)
        text = (helps.get(f.name) or "").replace("%", "%%") + default
        if f.type in ("bool", bool):
            where.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.type == "list[str]":
            where.add_argument(flag, action="append", default=None, help=text + " (repeatable)")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            where.add_argument(flag, type=kind, default=None, choices=choices.get(f.name), help=text,
                               metavar=None if f.name in choices else f.name.upper())
    return parser


def read_config_file(path: str) -> dict:
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--config {path}: cannot read it as JSON ({e}).") from e
    if not isinstance(settings, dict):
        raise UserError(f"--config {path}: holds a JSON {type(settings).__name__}; it needs an object of settings, "
                        'e.g. {"preset": "mini", "epochs": 50}.')
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see --help for the names.")
    return settings


def schedule_problem(cfg: Config) -> str:
    try:
        ctc_weight_ranges(cfg.ctc_weight_schedule, cfg.epochs)
    except ValueError as e:
        return str(e)
    return ""


def validate(cfg: Config) -> Config:
    """Refuse settings that would only fail later, deep in a run."""
    problems = [f"--{k.replace('_', '-')} {getattr(cfg, k)!r}: choose one of {', '.join(v)}"
                for k, v in setting_choices().items() if getattr(cfg, k) not in v]
    for f in dataclasses.fields(Config):
        if not isinstance(getattr(cfg, f.name), {"bool": bool, "int": int, "float": (int, float), "str": str,
                                                 "list[str]": list}[f.type]):
            problems.append(f"{f.name} = {getattr(cfg, f.name)!r} should be a {f.type}")
    if not problems:  # the ranges can only be compared once the types are right
        parts = parts_of(cfg)
        checks = [(cfg.accum_steps >= 1 and cfg.processes >= 0, "--accum-steps must be 1 or more, --processes 0 or more"),
                  (set(part_names(cfg.freeze) + part_names(cfg.init_parts) * bool(cfg.init_from)) <= set(parts),
                   f"--freeze and --init-parts name parts of --arch {cfg.arch}: {', '.join(parts)}"),
                  (not cfg.unfreeze_at or cfg.freeze, "--unfreeze-at needs --freeze: the parts to unfreeze"),
                  (min(cfg.unfreeze_at, cfg.unfreeze_lr, cfg.feature_views) >= 0,
                   "--unfreeze-at, --unfreeze-lr and --feature-views must be 0 or more"),
                  (not cfg.init_from or cfg.frontend == "cnn" or "frontend" not in part_names(cfg.init_parts),
                   f"--init-from loads a CNN frontend, not --frontend {cfg.frontend}: leave it out of --init-parts"),
                  (cfg.modality == "video" or cfg.arch == "conformer",
                   "--arch baseline reads video only; sound needs --arch conformer"),
                  (min(cfg.lm_dim, cfg.lm_layers, cfg.lm_epochs) >= 1 and cfg.lm_order >= 2 and 0 <= cfg.lm_dropout < 1
                   and cfg.lm_weight >= 0, "--lm-dim, --lm-layers and --lm-epochs must be 1 or more, --lm-order 2 "
                                           "or more, --lm-dropout in [0, 1), --lm-weight 0 or more"),
                  (0 <= cfg.drop_sound and 0 <= cfg.drop_video and cfg.drop_sound + cfg.drop_video <= 1,
                   "--drop-sound and --drop-video are probabilities that add up to at most 1"),
                  (not (cfg.drop_sound or cfg.drop_video) or cfg.modality == "av",
                   "--drop-sound and --drop-video take one sense from an audio-visual model: they need --modality av"),
                  (not cfg.init_from_audio or cfg.modality == "av",
                   "--init-from-audio fills an audio-visual model's sound side: it needs --modality av"),
                  (cfg.modality == "video" or not cfg.time_warp,
                   "--time-warp changes a clip's frame count, which its sound cannot follow: video only"),
                  (cfg.modality != "audio" or cfg.frontend == "cnn",
                   f"--frontend {cfg.frontend} replaces the video frontend; --modality audio has none"),
                  (is_number_list(cfg.noise_snrs) and (cfg.sound in ("clean", "mute") or is_number_list(cfg.sound) and "," not in cfg.sound),
                   "--noise-snrs takes SNRs in dB separated by commas (inf: clean); --sound clean, mute or one SNR"),
                  (0 <= cfg.ctc_weight <= 1, "--ctc-weight must lie in [0, 1]"),
                  (cfg.lr > 0 and cfg.grad_clip > 0 and cfg.adam_eps > 0,
                   "--lr, --grad-clip and --adam-eps must be above 0 (a negative clip trains backwards)"),
                  (min(cfg.weight_decay, cfg.warmup_epochs, cfg.time_budget) >= 0,
                   "--weight-decay, --warmup-epochs and --time-budget must be 0 or more"),
                  (cfg.time_budget or not cfg.fit_budget, "--fit-budget fits the epochs to --time-budget: give that too"),
                  (0 <= cfg.dropout < 1 and 0 <= cfg.label_smoothing < 1 and 0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1,
                   "--dropout, --label-smoothing, --beta1 and --beta2 must lie in [0, 1)"),
                  (0 <= cfg.hflip_prob <= 1 and 0 <= cfg.time_warp_max < 1, "--hflip-prob must lie in [0, 1] and "
                                                                            "--time-warp-max in [0, 1)"),
                  (cfg.drop_from >= 0, "--drop-from is an epoch (0: after a third of --epochs)"),
                  (min(cfg.epochs, cfg.max_frames, cfg.augment_from, cfg.time_mask_window, cfg.time_mask_stride, cfg.synthetic_clips,
                       cfg.synthetic_words, cfg.synthetic_speakers) >= 1,
                   "--epochs, --max-frames, --augment-from, --time-mask-window, --time-mask-stride and the --synthetic-* counts must "
                   "be 1 or more"),
                  (min(cfg.val_fraction, cfg.test_fraction) >= 0 and cfg.val_fraction + cfg.test_fraction < 1,
                   "--val-fraction and --test-fraction must be 0 or more and leave clips to train on (sum below 1)"),
                  (not schedule_problem(cfg), f"--ctc-weight-schedule: {schedule_problem(cfg)}"),
                  (min(cfg.stop_after, cfg.average_last) >= 0 and cfg.extra_weight >= 0,
                   "--stop-after, --average-last and --extra-weight must be 0 or more"),
                  (all(len(x) in (0, len(cfg.extra_data_dir)) for x in (cfg.extra_videos_dir, cfg.extra_labels_dir)),
                   "--extra-videos-dir and --extra-labels-dir go with --extra-data-dir: one each, in the same order"),
                  (0 <= cfg.beam_ctc_weight <= 1, "--beam-ctc-weight must lie in [0, 1]"),
                  (cfg.beam_size >= 1 and cfg.nbest >= 1, "--beam-size and --nbest must be 1 or more"),
                  (cfg.nbest <= cfg.beam_size, "--nbest cannot exceed --beam-size"),
                  (0 <= cfg.min_length_ratio <= 1 and 0 <= cfg.max_length_ratio <= 1,
                   "--min-length-ratio and --max-length-ratio must lie in [0, 1] (CTC emits at most a unit a frame)"),
                  (1 <= cfg.input_size <= cfg.crop_size <= cfg.frame_size, "sizes must satisfy 1 <= input <= crop <= frame size"),
                  (cfg.std > 0, "--std must be above 0 (the pixels are divided by it)"),
                  (cfg.detect_every >= 1 and cfg.smooth_frames >= 1 and cfg.workers >= 0,
                   "--detect-every and --smooth-frames must be 1 or more, --workers 0 or more"),
                  (min(cfg.train_eval_clips, cfg.worst_k) >= 0 and min(cfg.patience, cfg.sanity_clips,
                                                                         cfg.sanity_epochs) >= 1,
                   "--train-eval-clips and --worst-k must be 0 or more; --patience, --sanity-clips and "
                   "--sanity-epochs 1 or more"),
                  (0 < cfg.detect_scale <= 1 and cfg.mouth_scale > 0,
                   "--detect-scale must lie in (0, 1] and --mouth-scale be above 0"),
                  (cfg.serve_timeout > 0, "--serve-timeout must be above 0 (seconds a client may take)"),
                  (0 <= cfg.teacher_weight <= 1 and cfg.teacher_temperature > 0,
                   "--teacher-weight must lie in [0, 1] and --teacher-temperature be above 0"),
                  (not (cfg.teacher and cfg.time_warp), "--time-warp moves a clip's frames in time, where the "
                                                        "teacher's per-frame targets cannot follow: one or the other"),
                  (not (cfg.ensemble and cfg.serve_model), "--ensemble joins others to the run's model; --serve-model "
                                                           "serves models one by one: give one or the other")]
        problems = [why for ok, why in checks if not ok]
    if problems:
        raise UserError("Settings that cannot work:\n  " + "\n  ".join(problems))
    return cfg


def parse_config(argv: list[str]) -> Config:
    """Flags over --config over the modality's measured defaults and (on Kaggle) the session's over Config's."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config") or (kaggle_settings_file() if on_kaggle() else "")
    settings = read_config_file(config_file) if config_file else {}
    settings.update({k: v for k, v in args.items() if v is not None})
    settings = MODALITY_DEFAULTS.get(settings.get("modality", Config.modality), {}) | settings
    if on_kaggle():
        validate(Config(**settings))  # a wrong setting is named before the input is searched
        settings = kaggle_defaults(settings) | settings
    return validate(Config(**settings))


def run_stats(cfg: Config) -> dict:
    vocab = load_vocabulary(cfg)
    full_frames = dataclasses.replace(cfg, input_size=cfg.crop_size)  # pixel figures of the clips as they are
    stats = dataset_stats(load_dataset(full_frames, vocab, torch.device("cpu")), vocab)
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
    labels = files_by_stem(root, LABEL_EXTS, own_outputs(cfg))
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


def run_train(cfg: Config) -> dict:
    """Train, then score the best checkpoint on the test split (under torchrun: rank 0, once the others are done)."""
    if on_kaggle() and cfg.resume:
        adopt_earlier_run(cfg)
    processes = processes_to_start(cfg)
    if processes > 1:
        return train_under_torchrun(cfg, processes)
    result = train(cfg)
    rank, world = rank_and_world()
    if world > 1:
        dist.destroy_process_group()
    if rank > 0:
        return result
    ds, best = result["dataset"], checkpoints_of(cfg.work_dir) / "best.pt"
    averaged = write_averaged(cfg, ds, pick_device(cfg.device)) if cfg.average_last else None
    if ds.subset("test") and not best.exists():
        print(f"No {best} to test (see the warning above); test the run's last.pt with --mode test --checkpoint "
              f"{best.with_name('last.pt')}.")
    if ds.subset("test") and best.exists():
        if averaged:
            result["test_best"] = run_test(dataclasses.replace(cfg, checkpoint=str(best), split="test"), ds, "best")
        result["test"] = run_test(dataclasses.replace(cfg, checkpoint=str(averaged or best), split="test"), ds)
    if result["history"]:
        print_closing(cfg, result)
    return result


def print_closing(cfg: Config, result: dict) -> None:
    """What the run reached, where its files are, and what to run next; the test's line last, as test ends."""
    history, work = result["history"], Path(cfg.work_dir)
    best = best_row(history, cfg.decoder)
    kept = ", ".join(p.name for p in sorted(checkpoints_of(work).glob("*.pt")))
    lines = ["", f"Finished after epoch {history[-1]['epoch']}: the best was epoch {best['epoch']}, validation CER "
                 f"{selection_cer(best, cfg.decoder):.3f} (greedy, as it picks best.pt"
                 f"{'; heard and muted, weighted by --drop-sound' if best.get('muted_weight') else ''}).",
             f"Files in {work}: checkpoints/ ({kept}), metrics.csv, curves.png, predictions.csv, diagnostics/.",
             f"Next: python {Path(sys.argv[0]).name} --mode decode --work-dir {work} --input YOUR_CLIPS "
             f"(or --mode diagnose, or --resume --epochs {history[-1]['epoch'] + 20}"
             f"{' --no-fit-budget' if cfg.fit_budget else ''} to train on)"]
    test = result.get("test")
    if test:
        lines.append(f"CER={test['cer']:.4f} WER={shown(test['wer'], '.4f')} n={test['n']} ({test['split']} split, "
                     f"{Path(test['checkpoint']).name}, {test['decoding']['decoder']})")
    print("\n".join(lines))


def decoding_settings(model: nn.Module, cfg: Config, lm: LanguageModel | None = None) -> dict:
    if cfg.decoder != "beam":
        return {"decoder": cfg.decoder if model.decoder is not None else "ctc", "search": "greedy"}
    return {"decoder": "beam", "beam_size": cfg.beam_size, "ctc_weight": search_ctc_weight(model, cfg),
            "max_length_ratio": cfg.max_length_ratio, "min_length_ratio": cfg.min_length_ratio,
            "length_bonus": cfg.length_bonus, "nbest": cfg.nbest,
            **({"lm": str(lm.path), "lm_weight": lm.weight} if lm else {})}


def split_index(ds: Dataset, split: str) -> list[int]:
    index = list(range(len(ds.samples))) if split == "all" else ds.subset(split)
    if not index:
        raise UserError(f"The {split} split has no clips; choose another with --split (train, val, test, all).")
    return index


def run_test(cfg: Config, ds: Dataset | None = None, name: str = "") -> dict:
    """Score a checkpoint on a split: predictions.csv (and nbest.csv), test_metrics.json (each `_<name>` when
    named: a second checkpoint of the run), and `CER=... WER=... n=...` as the last line."""
    device = pick_device(cfg.device)
    model, vocab, model_cfg = models_to_read(cfg, device, held_out=True)
    ds = ds or load_dataset(model_cfg, vocab, device)
    index = split_index(ds, cfg.split)
    lm = search_lm(model_cfg, vocab, device)
    decoding = decoding_settings(model, model_cfg, lm)
    t0 = time.perf_counter()
    result = evaluate(model, ds, index, vocab, model_cfg, device, tuple(dict.fromkeys(("ctc", decoding["decoder"]))),
                      lm=lm)
    seconds = time.perf_counter() - t0
    order, refs, nbest = result["rows"]["order"], result["rows"]["refs"], result["rows"][decoding["decoder"]]
    work = Path(cfg.work_dir)

    def write_predictions(tmp):
        with open(tmp, "w", newline="", encoding=CSV_ENCODING) as f:
            writer = csv.writer(f)
            writer.writerow(["id", "reference", "hypothesis", "cer", "score"])
            for i, ref, hyps in zip(order, refs, nbest):
                writer.writerow([ds.samples[i].stem, vocab.decode(ref), vocab.decode(hyps[0][0]),
                                 clip_cer(ref, hyps[0][0], vocab), round(hyps[0][1], 4)])

    def write_nbest(tmp):
        with open(tmp, "w", newline="", encoding=CSV_ENCODING) as f:
            writer = csv.writer(f)
            writer.writerow(["id", "rank", "hypothesis", "cer", "score"])
            for i, ref, hyps in zip(order, refs, nbest):
                writer.writerows([ds.samples[i].stem, rank, vocab.decode(hyp),
                                  clip_cer(ref, hyp, vocab), round(score, 4)]
                                 for rank, (hyp, score) in enumerate(hyps, 1))
    tag = f"_{name}" if name else ""
    atomic_write(work / f"predictions{tag}.csv", write_predictions)
    if model_cfg.nbest > 1 and decoding["decoder"] == "beam":
        atomic_write(work / f"nbest{tag}.csv", write_nbest)
    scores = result[decoding["decoder"]]
    metrics = {**{k: scores[k] for k in ("cer", "wer", "cer_mean_per_clip", "n")}, "split": cfg.split,
               "modality": model_cfg.modality, **({"sound": cfg.sound} if model_cfg.modality != "video" else {}),
               "checkpoint": str(checkpoint_path(cfg)), "decoding": decoding,
               "cer_greedy_ctc": result["ctc"]["cer"], "seconds": round(seconds, 2)}
    write_json(work / f"test_metrics{tag}.json", metrics)
    print(f"CER={metrics['cer']:.4f} WER={shown(metrics['wer'], '.4f')} n={metrics['n']} "
          f"({cfg.split} split, {checkpoint_path(cfg).name}, {decoding['decoder']})")
    return metrics


def run_diagnose(cfg: Config) -> dict:
    """The debugging checklist on a trained checkpoint over --split: its settings, losses, CER by greedy CTC,
    greedy attention and the --decoder search, the worst clips, unit confusions, gradient flow, and its run's
    learning curves with their verdict. Everything goes to <work-dir>/diagnose_<split>/."""
    device = pick_device(cfg.device)
    path = checkpoint_path(cfg)
    state = load_checkpoint(path, cfg)
    model, vocab, model_cfg = models_to_read(cfg, device, held_out=True, path=path, state=state)
    trained = at_epoch(dataclasses.replace(saved_config(state), **{k: getattr(model_cfg, k) for k in ("device", "split")}),
                       state["epoch"])
    ds = load_dataset(model_cfg, vocab, device)
    index, folder = split_index(ds, cfg.split), Path(cfg.work_dir) / f"diagnose_{cfg.split}"
    print(f"Diagnosing {path} (epoch {state['epoch']}) on {len(index)} {cfg.split} clips; the settings it was "
          "trained with:")
    report_setup(model, ds, trained, folder / "setup.txt")
    lm = search_lm(model_cfg, vocab, device)
    decoding = decoding_settings(model, model_cfg, lm)["decoder"]
    result = evaluate(model, ds, index, vocab, model_cfg, device, tuple(dict.fromkeys(("ctc", "attention", decoding))),
                      lm=lm)
    cers = {d: result[d]["cer"] for d in ("ctc", "attention", "beam") if d in result}
    lines = ["CER " + ", ".join(f"{d} {v:.3f}" for d, v in cers.items()) + f" (WER {shown(result[decoding]['wer'])}, "
             f"mean per clip {result[decoding]['cer_mean_per_clip']:.3f})"]
    if cers["ctc"] >= HIGH_CER and min(cers.values()) >= HIGH_CER:
        lines.append("greedy CTC is as poor as the decoder: the problem lies upstream of the decoder, in the "
                     "frontend's features or the encoder (the debugging checklist, check 4)")
    losses = {"train_ctc": result["loss_ctc"], "train_att": result["loss_att"]}
    losses["ctc_share"] = ctc_share(losses["train_ctc"], losses["train_att"], trained)
    lines += loss_note(losses, trained, model)
    clips = scored_clips(result, ds, vocab, decoding)
    write_csv(folder / "clips_by_cer.csv", clips)
    lines += worst_lines(clips[:cfg.worst_k])
    pairs = unit_pairs(result["rows"]["refs"], best_hypotheses(result, decoding), vocab)
    write_confusions(pairs, folder, f"{path}, {cfg.split} split, {decoding} decoding")
    plot_confusions(pairs, folder / "confusions.png")
    lines.append(confusion_headline(confusion_summary(pairs)) + f"; {folder / 'confusions.txt'}")
    grads = gradient_flow(model, ds, index, vocab, trained, device)
    lines += gradient_notes(grads, model)
    history = state["history"]
    if history:
        history[-1].setdefault("verdict", fit_verdict(history, trained))
        lines.append(f"verdict of its last epoch ({history[-1]['epoch']}): {history[-1]['verdict']}")
        plot_curves(history, folder / "curves.png", trained.decoder)
    for line in lines:
        print(line)
    report = {"checkpoint": str(path), "epoch": state["epoch"], "split": cfg.split, "clips": len(index),
              "cer": cers, "loss": result["loss"], **losses, **grads, **confusion_summary(pairs),
              "verdict": history[-1]["verdict"] if history else None}
    write_json(folder / "report.json", report)
    print(f"Wrote {folder}: report.json, setup.txt, clips_by_cer.csv, confusions.txt/.csv/.png, curves.png")
    return report


def run_sanity(cfg: Config) -> dict:
    """The debugging checklist's quick sanity model: train on --sanity-clips training clips, without augmentation, until every
    decoder recognises them (CER about 0) or --sanity-epochs pass. A model that cannot memorise 10 clips has a
    bug or a setting that stops learning. With --frontend noise it shows what the rest learns without sight."""
    device = pick_device(cfg.device)
    vocab = load_vocabulary(cfg)
    work = Path(cfg.work_dir) / "sanity"
    shutil.rmtree(checkpoints_of(work), ignore_errors=True)  # a sanity run is a scratch run: always afresh
    ds = load_dataset(cfg, vocab, device)
    train_index = ds.subset("train")
    if not train_index:
        raise UserError("The training split is empty: --mode sanity needs training clips.")
    clips = sorted(random.Random(cfg.seed).sample(train_index, min(cfg.sanity_clips, len(train_index))))
    few = Dataset(ds.samples, ds.bank, {"train": clips, "val": clips})
    plain = dataclasses.replace(cfg, work_dir=str(work), epochs=cfg.sanity_epochs, random_crop=False, hflip_prob=0.0,
                                time_mask=False, time_warp=False, diagnostics=False, resume=False)
    decoders = lambda row: {d: row[f"val_cer_{k}"] for d, k in (("greedy CTC", "ctc"), ("attention", "att"))
                            if row[f"val_cer_{k}"] is not None}
    began = time.time()
    history = train(plain, few, lambda row: max(decoders(row).values()) <= SANITY_CER)["history"]
    seconds, steps_each = time.time() - began, steps_per_epoch(few, plain)
    learnt = {d: next((r["epoch"] for r in history if decoders(r)[d] <= SANITY_CER), None) for d in decoders(history[-1])}
    best = {d: min(decoders(r)[d] for r in history) for d in learnt}
    what = f"the {len(clips)} clips" + (f" (--frontend {cfg.frontend})" if cfg.frontend != "cnn" else "")
    lines = [f"  {d}: " + (f"CER about 0 after {e} epochs ({e * steps_each} optimizer steps)" if e else
                           f"best CER {best[d]:.3f}, never about 0") for d, e in learnt.items()]
    passed = all(learnt.values())
    if passed:
        verdict = f"sanity passed in {seconds:.0f} s: {what} were learnt; the model, the loss and the optimizer work."
    elif any(learnt.values()):
        yes, no = ([d for d, e in learnt.items() if bool(e) == knew] for knew in (True, False))
        verdict = (f"sanity partly passed: {what} were learnt by {', '.join(yes)}, not by {', '.join(no)} within "
                   f"{history[-1]['epoch']} epochs: that part learns slowly or not at all; give it more "
                   "--sanity-epochs, or look at its loss weight (--ctc-weight) and the learning rate.")
    else:
        verdict = (f"sanity FAILED: {what} were not learnt in {history[-1]['epoch']} epochs ({seconds:.0f} s). Something "
                   f"stops learning: check --lr ({cfg.lr:g}), --ctc-weight, --freeze, these clips' labels, and whether "
                   "--frontend noise learns them (then the frontend is at fault).")
    print(verdict + "\n" + "\n".join(lines))
    result = {"passed": passed, "clips": [ds.samples[i].stem for i in clips], "epochs_to_learn": learnt,
              "best_cer": best, "epochs": history[-1]["epoch"], "optimizer_steps_per_epoch": steps_each,
              "seconds": round(seconds, 1), "frontend": cfg.frontend, "verdict": verdict}
    write_json(work / "sanity.json", result)
    return result


def run_preprocess(cfg: Config) -> list[dict]:
    return preprocess_videos(cfg, Path(cfg.output) if cfg.output else Path(cfg.work_dir) / "mouths")


def sounds_to_decode(cfg: Config) -> list[Path]:
    """--input's sound for an audio model: one file, or per name in a folder its sound file, else its video."""
    source = Path(cfg.input)
    if not cfg.input or not source.exists():
        raise UserError(f"--mode decode needs --input, a sound file or video, or a folder of them ({cfg.input!r} not found).")
    if source.is_file():
        return [source]
    by_stem = files_by_stem(source, SOUND_EXTS | SOUND_IN_VIDEO_EXTS, set())  # a clip's wav, else its video
    return sorted(min(paths, key=lambda p: (p.suffix.lower() not in SOUND_EXTS, str(p))) for paths in by_stem.values())


def read_sounds_to_decode(paths: list[Path], cfg: Config) -> tuple[list[str], Dataset]:
    """Every readable file of `paths` as an audio model hears it, as an unlabelled Dataset; the others are named
    and skipped."""
    names, clips, waves = [], [], []
    for path in paths:
        try:
            frames, wave = sound_to_decode(path)
        except ValueError as e:
            print(f"Skipped {path}: {e}", file=sys.stderr)
            continue
        names.append(path.stem)
        clips.append(frames)
        waves.append(wave)
    if not names:
        raise UserError(f"--input {cfg.input}: no sound to decode ({'every file was skipped, above' if paths else 'none found'}"
                        f"; sound is {', '.join(sorted(SOUND_EXTS | SOUND_IN_VIDEO_EXTS))}).")
    return names, unlabelled_clips(clips, waves, cfg)


def labels_beside(cfg: Config, vocab: Vocabulary) -> dict[str, list[int]]:
    """Labels by clip name for decode's CER: under --labels-dir, else --data-dir, else --input's folder."""
    folder = cfg.labels_dir or cfg.data_dir or (cfg.input if Path(cfg.input).is_dir() else str(Path(cfg.input).parent))
    labels = {}
    for stem, paths in files_by_stem(Path(folder), LABEL_EXTS, set()).items():
        try:
            labels[stem] = vocab.encode(read_label(min(paths)))[0]
        except (OSError, ValueError):  # a CSV that is no label (a report, say) just gets no CER
            continue
    return labels


def shown_name(name: str) -> str:
    """A file's name for a line of output: a tab, a line break or another unprintable character written as its
    escape (\\n), so each clip keeps its one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name)


def write_decoded(path: Path, rows: list[dict]) -> None:
    if path.suffix.lower() == ".jsonl":
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        write_csv(path, rows)


def run_decode(cfg: Config) -> list[tuple[str, list[tuple[str, float]]]]:
    """The hypotheses of every clip or video of --input (a file or a folder), printed `name<TAB>text`, or with
    --nbest N, N lines `name<TAB>rank<TAB>score<TAB>text` a clip; and written to --output (default
    <work-dir>/decode.csv) by its suffix: .csv or .jsonl (a row a clip: its text, frames, seconds, and reference
    and CER where a label of its name is found), .json (pieces, timed words, notes), .srt or .vtt (subtitles).
    Video of any length is read in pieces (section 11), an audio-visual model's with their sound; sound alone, a
    file at a time."""
    device = pick_device(cfg.device)
    model, vocab, model_cfg = models_to_read(cfg, device)
    lm = search_lm(model_cfg, vocab, device)
    path = Path(cfg.output) if cfg.output else Path(cfg.work_dir) / "decode.csv"
    if path.suffix.lower() not in DECODE_OUTPUTS:
        raise UserError(f"--output {path}: decode writes {', '.join(DECODE_OUTPUTS)}; name the file with one of them.")
    if model_cfg.modality == "audio":
        return decode_sound_files(model, vocab, model_cfg, device, lm, path)
    paths = videos_to_transcribe(model_cfg)
    results = transcribe(paths, model, vocab, model_cfg, device, lm, decode_progress(len(paths), 10.0),
                         sound_for=sound_sources(model_cfg, paths) if model_cfg.modality == "av" else None)
    for r in results:
        if r["error"]:
            print(f"Skipped {r['video']}: {r['error']}", file=sys.stderr)
        for note in r["notes"]:
            print(f"{r['video']}: {note}", file=sys.stderr)
    read = [r for r in results if not r["error"]]
    if not read:
        raise UserError(f"--input {cfg.input}: no clip to decode ({'every one was skipped, above' if paths else 'none found'}"
                        f"; clips are {', '.join(sorted(VIDEO_EXTS))}, or raw face videos with --preprocess).")
    labels, rows, refs, best, out = labels_beside(model_cfg, vocab), [], [], [], []
    for r in sorted(read, key=lambda r: r["name"]):
        ranked = r["pieces"][0]["nbest"] if len(r["pieces"]) == 1 else [(r["text"], r["score"])]
        out.append((r["name"], ranked))
        ref, ids = labels.get(r["name"]), r["ids"]
        if ref is not None:
            refs.append(ref)
            best.append(ids)
        for rank, (text, score) in enumerate(ranked, 1):
            rows.append({"name": r["name"], "rank": rank, "text": text, "score": round(score, 4),
                         "frames": r["frames"], "seconds": round(r["seconds_reading"], 4), "pieces": len(r["pieces"]),
                         "reference": vocab.decode(ref) if ref is not None else "",
                         "cer": clip_cer(ref, ids, vocab) if ref is not None else ""})
            shown = shown_name(r["name"])
            print(f"{shown}\t{text}" if model_cfg.nbest == 1 else f"{shown}\t{rank}\t{score:.4f}\t{text}")
    written = write_transcripts(path, rows, read)
    print(f"Wrote {', '.join(map(str, written))}: {len(out)} clips" + (
        f"; {len(refs)} with a label of their name, CER {error_rates(refs, best, vocab)['cer']:.4f}" if refs else ""),
          file=sys.stderr)
    if any(r.get("interrupted") for r in results):
        raise KeyboardInterrupt  # what was read is written; the run still ends as interrupted
    return out


DECODE_OUTPUTS = (".csv", ".jsonl", ".json", ".srt", ".vtt")


def videos_to_transcribe(cfg: Config) -> list[Path]:
    """--input's face videos (with --preprocess) or mouth clips: one file, or a folder searched recursively."""
    source = Path(cfg.input)
    if not cfg.input or not source.exists():
        raise UserError(f"--mode decode needs --input, a clip or a folder of clips ({cfg.input!r} not found).")
    if source.is_file():
        return [source]
    if cfg.preprocess:
        return raw_videos(source)
    return sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXTS)


def decode_progress(videos: int, every: float):
    """transcribe's on_progress for a terminal: where reading stands, a line now and then."""
    last, video = [time.time()], [0]

    def show(stage: str, info: dict, piece):
        if piece is not None:
            video[0] = piece.video
        if time.time() - last[0] >= every:
            last[0] = time.time()
            total = info.get("declared", 0) / info.get("fps", CLIP_FPS)
            print(f"decode: video {video[0] + 1} of {videos}, {info.get('frames', 0) / CLIP_FPS:.0f} s"
                  + (f" of {total:.0f} s" if total else "") + f" read, {info.get('pieces', 0)} pieces", file=sys.stderr)
    return show


def write_transcripts(path: Path, rows: list[dict], results: list[dict]) -> list[Path]:
    """decode's output by --output's suffix; subtitles a file a video (NAME_VIDEO.srt where there are several)."""
    kind = path.suffix.lower()
    if kind in (".csv", ".jsonl"):
        write_decoded(path, rows)
        return [path]
    if kind == ".json":
        keep = ("name", "video", "text", "score", "frames", "duration", "notes", "pieces", "words")
        write_json(path, {"videos": [{k: r[k] for k in keep} for r in results]})
        return [path]
    paths = [path if len(results) == 1 else path.with_name(f"{path.stem}_{r['name']}{path.suffix}") for r in results]
    for p, r in zip(paths, results):
        write_text(p, subtitles(r["words"], kind))
    return paths


def sound_sources(cfg: Config, paths: list[Path]):
    """Where an audio-visual model hears each video of `paths`: the video itself, a sound file or video of its
    name under --input or --audio-dir (a mouth clip's raw face video)."""
    source = Path(cfg.input) if Path(cfg.input).is_dir() else Path(cfg.input).parent
    found = sound_candidates(dataclasses.replace(cfg, data_dir=str(source), videos_dir=""), {p.stem: p for p in paths})
    return lambda path: found[path.stem]


def decode_sound_files(model, vocab: Vocabulary, model_cfg: Config, device, lm, path: Path):
    """--modality audio: each file's sound read whole."""
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--output {path}: with --modality audio, decode writes .csv or .jsonl.")
    names, clips = read_sounds_to_decode(sounds_to_decode(model_cfg), model_cfg)
    out = []
    labels, rows, refs, best = labels_beside(model_cfg, vocab), [], [], []
    for batch in frame_budget_batches(clips.bank.lengths.tolist(), model_cfg.max_frames, random.Random(0)):
        t0 = time.perf_counter()
        nbest = decode_clips(model, clips, batch, vocab, model_cfg, device, lm)
        seconds = (time.perf_counter() - t0) / len(batch)
        for i, hyps in zip(batch, nbest):
            out.append((names[i], [(vocab.decode(ids), score) for ids, score in hyps]))
            ref = labels.get(names[i])
            if ref is not None:
                refs.append(ref)
                best.append(hyps[0][0])
            for rank, (ids, score) in enumerate(hyps, 1):
                rows.append({"name": names[i], "rank": rank, "text": vocab.decode(ids), "score": round(score, 4),
                             "frames": int(clips.bank.lengths[i]), "seconds": round(seconds, 4),
                             "reference": vocab.decode(ref) if ref is not None else "",
                             "cer": clip_cer(ref, ids, vocab) if ref is not None else ""})
    out.sort()
    for name, hyps in out:
        for rank, (text, score) in enumerate(hyps, 1):
            shown = shown_name(name)
            print(f"{shown}\t{text}" if model_cfg.nbest == 1 else f"{shown}\t{rank}\t{score:.4f}\t{text}")
    write_decoded(path, sorted(rows, key=lambda r: (r["name"], r["rank"])))
    print(f"Wrote {path}: {len(out)} clips" + (f"; {len(refs)} with a label of their name, CER "
                                               f"{error_rates(refs, best, vocab)['cer']:.4f}" if refs else ""),
          file=sys.stderr)
    return out


def run_average(cfg: Config) -> Path:
    """--mode average: checkpoints/averaged.pt of a trained run, from the epoch weights it kept."""
    if cfg.average_last < 1:
        raise UserError("--mode average needs --average-last N: how many of the last epochs to average.")
    device = pick_device(cfg.device)
    last = checkpoints_of(cfg.work_dir) / "last.pt"
    _, vocab, model_cfg = model_from_checkpoint(last, cfg, device)
    return write_averaged(cfg, load_dataset(model_cfg, vocab, device), device)


def run_export(cfg: Config) -> dict:
    """A checkpoint's weights for other tools: a plain state dict under Auto-AVSR's names (what --init-from and
    Auto-AVSR's own model load), the vocabulary that gives its rows meaning, and the encoder as ONNX."""
    path = checkpoint_path(cfg)
    model, vocab, model_cfg = model_from_checkpoint(path, cfg, torch.device("cpu"))
    folder = Path(cfg.output) if cfg.output else Path(cfg.work_dir) / "export"
    if folder.is_dir():
        remove_temporaries(folder)  # of an export killed mid-write
    files = {"state_dict": folder / "model_state_dict.pth", "vocab": folder / "vocab.json",
             "onnx": folder / "encoder.onnx"}
    atomic_write(files["state_dict"], lambda tmp: torch.save(model.state_dict(), tmp))
    vocab.save(files["vocab"])
    conformer = model_cfg.arch == "conformer"
    print(f"Wrote {files['state_dict']} ({model_cfg.arch}, {vocab.size} output units: blank {vocab.blank}, sos/eos "
          f"{vocab.sos_eos}, the units of {files['vocab']})" + ("; --init-from takes it" if conformer else "")
          + (f", and so does Auto-AVSR's E2E model built with odim = {vocab.size}" if conformer
             and model_cfg.preset == "base" else ""))
    if conformer:
        export_onnx(model, model_cfg, files["onnx"])
        described = {"video": f"video (B x T x {model_cfg.input_size} x {model_cfg.input_size}, normalised with mean "
                              f"{model_cfg.mean:.4f} and std {model_cfg.std:.4f})",
                     "audio": f"audio (B x T*{SAMPLES_PER_FRAME} samples at 16 kHz, each clip normalised)",
                     "lengths": "lengths (B, in frames)"}
        print(f"Wrote {files['onnx']}: {', '.join(described[k] for k in export_inputs(model_cfg))} -> encoder_out, "
              "ctc_log_probs")
    else:
        del files["onnx"]
        print("The baseline's LSTM is not exported to ONNX; its state dict is.")
    lm = Path(cfg.lm) if cfg.lm else Path(cfg.work_dir) / "lm" / LM_FILE
    if lm.is_file():  # the search's language model travels with the model it was checked against
        read_lm(lm, vocab)
        files["lm"] = folder / LM_FILE
        atomic_write(files["lm"], lambda tmp: shutil.copyfile(lm, tmp))
        print(f"Wrote {files['lm']}, the language model of {lm} (--lm in the beam search)")
    return {k: str(v) for k, v in files.items()}


WRITING_MODES = ("train", "test", "diagnose", "sanity", "stats", "vocab", "average", "export", "lm")  # lock the work dir
MODES = {"train": run_train, "test": run_test, "decode": run_decode, "serve": serve, "diagnose": run_diagnose, "sanity": run_sanity,
         "stats": run_stats, "vocab": run_vocab, "synth": run_synth, "preprocess": run_preprocess, "export": run_export,
         "average": run_average, "lm": train_lm}


def interrupted(argv: list[str]) -> str:
    """What Ctrl-C leaves: files are written whole or not at all, so a run's last.pt holds its last whole epoch."""
    command = " ".join(shlex.quote(a) for a in [sys.executable, Path(__file__).name, *argv] if a != "--resume")
    return ("Interrupted. Every file written so far is whole; a training run's checkpoints/last.pt holds its last "
            f"finished epoch (the one under way is lost). To continue training: {command} --resume")


def main(argv: list[str] | None = None):
    """Run one mode with the flags in $AVSR_ARGS, then the command line's; a notebook cell's own arguments (the
    kernel's) are ignored, so in a notebook $AVSR_ARGS (`%env AVSR_ARGS=--preset tiny`) carries the flags."""
    if argv is None:
        argv = shlex.split(os.environ.get("AVSR_ARGS", "")) + ([] if in_notebook() else sys.argv[1:])
    try:
        cfg = parse_config(argv)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
            if cfg.mode != "train":
                raise UserError(f"torchrun starts several processes for --mode train only; run --mode {cfg.mode} "
                                "with plain python.")
            join_process_group(cfg.device)
        check_packages(cfg)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        writes = cfg.mode in WRITING_MODES or cfg.mode == "decode" and cfg.preprocess
        with work_dir_lock(cfg) if writes and rank_and_world()[0] == 0 else contextlib.nullcontext():
            return MODES[cfg.mode](cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if in_notebook():
            raise
        sys.exit(2)
    except KeyboardInterrupt:
        if in_notebook():
            raise
        print(interrupted(argv), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
