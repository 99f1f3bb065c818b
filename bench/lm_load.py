"""What loading a large n-gram --lm costs: counted once by --mode lm and saved as its lookup tables (read
memory-mapped), against counting its sentences at every load (what lm.pt files before 2026-12-07 needed). The
sentences are random words of the vocabulary's units, Zipf-distributed, as much as --megabytes of UTF-8 text
would hold (a unit is about 4 bytes). The load is timed in a process of its own, so its peak memory is its own.

    python bench/lm_load.py [--megabytes 100] [--order 7]
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from timing import m

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--megabytes", type=float, default=100)
parser.add_argument("--order", type=int, default=7)
parser.add_argument("--load", default="", help="(the child process) load this lm.pt and time it")
args = parser.parse_args()


def peak_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent's)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2 ** 20


vocab = m.Vocabulary.seed()
rng = np.random.default_rng(0)
if args.load:
    t0 = time.perf_counter()
    loaded, _ = m.read_lm(Path(args.load), vocab)
    for _ in range(2000):
        loaded.log_probs(tuple(rng.integers(1, 220, args.order - 1).tolist()))
    print(f"a new process: loading lm.pt and 2,000 contexts' distributions took {time.perf_counter() - t0:.2f} s, "
          f"peak memory {peak_gb():.2f} GB")
    sys.exit()
units = int(args.megabytes * 2 ** 20 / 4)
words = [rng.zipf(1.3, rng.integers(2, 7)) % 220 + 1 for _ in range(5000)]  # a lexicon of 5,000 words
sentences, made = [], 0
while made < units:
    picked = rng.zipf(1.2, rng.integers(3, 12)) % len(words)
    ids = [int(u) for w in picked for u in (*words[w], m.SPECIALS["<space>"])][:-1]
    sentences.append(ids)
    made += len(ids)
print(f"{len(sentences):,} sentences, {made:,} units (about {args.megabytes:g} MB of text); peak {peak_gb():.2f} GB")

t0 = time.perf_counter()
tables = m.ngram_tables(sentences, args.order, vocab.size, vocab.sos_eos)
counting = time.perf_counter() - t0
lm = m.NgramLM(tables, args.order, vocab.size, vocab.sos_eos)
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "lm.pt"
    torch.save(m.lm_file(lm, m.Config(lm_order=args.order), vocab, 0, 0.0), path)
    print(f"counting (--mode lm, once): {counting:.1f} s; lm.pt {path.stat().st_size / 2 ** 20:.0f} MB; "
          f"peak {peak_gb():.2f} GB")
    del tables, lm, sentences
    subprocess.run([sys.executable, __file__, "--load", str(path), "--order", str(args.order)], check=True)
    print(f"(counted at each load instead, as earlier versions did, in Python dicts: {counting:.1f} s or more)")
