"""Batched beam search vs one clip at a time, on the same model and clips: clips/s, their ratio, and whether
the answers agree. Per preset (small, base), weights (untrained; "trained": fitted to the clips for a few
steps, or --checkpoint), and beam (10, 40), over 64 clips of 29-38 frames.

The one-clip side is the plain reference of Auto-AVSR's search in tests/beam_reference.py, run on
--reference-clips clips picked evenly over the lengths (its cost grows with the square of a clip's length, so
the first few clips would not stand for the batch), its rate extrapolated; and, as a second yardstick, the
batched code fed those clips one at a time. On a GPU the reference runs its model there and its CTC recursion
(thousands of tiny operations) on the CPU, where such work is faster. Auto-AVSR's own (ESPnet) search on 2 CPU
cores: 8.8 s a clip at beam 10 and 19.8 s at beam 40 (base-sized, untrained; ../shared/reference/auto_avsr_notes.md).
Usage: python bench/decode_speed.py [--presets small,base] [--beams 10,40] [--clips 64] [--device auto]"""
import argparse
import sys
from pathlib import Path

import torch

from timing import m, peak_memory_mb, quick_fit, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from beam_reference import beam_search_one_clip  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--presets", default="small,base")
parser.add_argument("--weights", default="untrained,trained")
parser.add_argument("--beams", default="10,40")
parser.add_argument("--ctc-weight", type=float, default=0.1)
parser.add_argument("--clips", type=int, default=64)
parser.add_argument("--reference-clips", type=int, default=4)
parser.add_argument("--fit-steps", type=int, default=30, help="steps that make the 'trained' weights")
parser.add_argument("--checkpoint", default="", help="trained weights to use instead of a quick fit")
parser.add_argument("--input-size", type=int, default=88)
parser.add_argument("--device", default="auto")
parser.add_argument("--amp", default="auto", choices=m.CHOICES["amp"], help="on a GPU; off: fp32 (same answers)")
args = parser.parse_args()

device = m.pick_device(args.device)
vocab = m.Vocabulary.seed()
print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'})"
      f", {args.clips} clips, input {args.input_size}, CTC weight {args.ctc_weight}"
      f"{f', amp {args.amp}' if device.type == 'cuda' else ''}")


def clips_and_model(preset: str, weights: str):
    cfg = m.Config(preset=preset, input_size=args.input_size, synthetic_clips=args.clips, lr=3e-3, warmup_epochs=0,
                   work_dir="runs/bench_decode", amp=args.amp)
    if weights == "trained" and args.checkpoint:
        model, _, cfg = m.model_from_checkpoint(Path(args.checkpoint), cfg, device)
    ds = m.load_dataset(cfg, vocab, device)
    index = list(range(min(args.clips, len(ds.samples))))
    x, lengths, targets = m.training_batch(ds, index, m.Augment(cfg, training=False), device)
    if not (weights == "trained" and args.checkpoint):
        torch.manual_seed(0)
        model = m.build_model(cfg, vocab.size).to(device)
        if weights == "trained":
            quick_fit(model, cfg, vocab, x[:4], lengths[:4], targets[:4], args.fit_steps, device)
    return model.eval(), x, lengths, cfg




print(f"{'preset':6} {'weights':9} {'beam':>4} {'batched':>9} {'one-by-one':>10} {'reference':>9} "
      f"{'x ref':>7} {'x 1-by-1':>8} {'same':>6} {'peak MB':>8}   (clips/s)")
for preset in args.presets.split(","):
    for weights in args.weights.split(","):
        model, x, lengths, cfg = clips_and_model(preset, weights)
        with torch.no_grad(), m.autocast(device, cfg):
            enc, mask = model.encode(x, lengths.to(device))
            alone = [model.encode(x[b:b + 1, :n], lengths[b:b + 1].to(device))[0]
                     for b, n in enumerate(lengths.tolist())]
        by_length = sorted(range(len(alone)), key=lambda b: (lengths[b].item(), b))
        n_ref = min(args.reference_clips, len(alone))
        sample = [by_length[round((i + 0.5) * len(alone) / n_ref - 0.5)] for i in range(n_ref)]
        for beam in map(int, args.beams.split(",")):
            run = m.dataclasses.replace(cfg, beam_size=beam, beam_ctc_weight=args.ctc_weight)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad(), m.autocast(device, cfg):
                m.decode(model, enc[:2], mask[:2], lengths[:2].to(device), vocab, run)  # first-use costs out of the timing
                batched, t_batch = timed(lambda: m.decode(model, enc, mask, lengths.to(device), vocab, run), device)
                _, t_single = timed(lambda: [m.decode(model, alone[b], torch.ones(alone[b].shape[:2], dtype=torch.bool,
                                                                                   device=device),
                                                      lengths[b:b + 1].to(device), vocab, run)
                                             for b in sample], device)
                ref, t_ref = timed(lambda: [beam_search_one_clip(model, e.float(), beam, args.ctc_weight, vocab.sos_eos,
                                                                 vocab.blank) for e in map(alone.__getitem__, sample)], device)
            same = sum(batched[b][0][0] == [t for t in r[0]["yseq"][1:] if t != vocab.sos_eos]
                       and abs(batched[b][0][1] - r[0]["score"]) < 1e-3 for b, r in zip(sample, ref))
            rate, rate_single, rate_ref = len(alone) / t_batch, n_ref / t_single, n_ref / t_ref
            print(f"{preset:6} {weights:9} {beam:4d} {rate:9.1f} {rate_single:10.2f} {rate_ref:9.2f} "
                  f"{rate / rate_ref:7.1f} {rate / rate_single:8.1f} {same:>3}/{n_ref:<2} {peak_memory_mb(device):8.0f}",
                  flush=True)
