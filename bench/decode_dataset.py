"""Decode a whole dataset with the beam search, as `--mode test --split all` does: seconds, clips/s and peak
memory. Untrained weights by default (the worst case: hypotheses run to one unit a frame), or --checkpoint.
Usage: python bench/decode_dataset.py --data-dir ROOT [--videos-dir DIR] [--preset small] [--beam 10]"""
import argparse
import time
from pathlib import Path

import torch

from timing import m, peak_memory_mb, sync

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--data-dir", required=True)
parser.add_argument("--videos-dir", default="")
parser.add_argument("--cache-dir", default="")
parser.add_argument("--preset", default="small")
parser.add_argument("--beam", type=int, default=10)
parser.add_argument("--ctc-weight", type=float, default=0.3)
parser.add_argument("--checkpoint", default="")
parser.add_argument("--device", default="auto")
args = parser.parse_args()

device = m.pick_device(args.device)
cfg = m.Config(data_dir=args.data_dir, videos_dir=args.videos_dir, cache_dir=args.cache_dir, preset=args.preset,
               beam_size=args.beam, beam_ctc_weight=args.ctc_weight, decoder="beam", work_dir="runs/bench_decode")
if args.checkpoint:
    model, vocab, cfg = m.model_from_checkpoint(Path(args.checkpoint), cfg, device)
else:
    vocab = m.load_vocabulary(cfg)
    torch.manual_seed(0)
    model = m.build_model(cfg, vocab.size).to(device).eval()
ds = m.load_dataset(cfg, vocab, device)
index = list(range(len(ds.samples)))
sync(device)
t0 = time.perf_counter()
result = m.evaluate(model, ds, index, vocab, cfg, device, ("beam",))
sync(device)
seconds = time.perf_counter() - t0
print(f"{len(index)} clips, preset {args.preset}, beam {args.beam}, CTC weight {args.ctc_weight} on {device} "
      f"({torch.get_num_threads()} threads): {seconds:.0f} s, {len(index) / seconds:.1f} clips/s, "
      f"CER {result['beam']['cer']:.3f}, peak memory {peak_memory_mb(device):.0f} MB")
