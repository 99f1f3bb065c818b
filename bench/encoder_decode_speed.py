"""Decoding speed per temporal encoder: each encoder at one preset fitted for --fit-steps steps to 8 built-in clips
(weights whose searches end, as a trained model's do), then 64 clips read in frame-budget batches by greedy CTC
and by the beam search (beam 20, CTC weight 0.3): clips/s of each, the encoder's share of the beam's time.
Usage: python bench/encoder_decode_speed.py [--preset mini] [--encoders conformer,mstcn,dctcn] [--input-size 44]"""
import argparse
import random

import torch

from timing import m, quick_fit, timed

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--preset", default="mini")
parser.add_argument("--encoders", default="conformer,mstcn,dctcn")
parser.add_argument("--input-size", type=int, default=44)
parser.add_argument("--clips", type=int, default=64)
parser.add_argument("--fit-steps", type=int, default=40)
parser.add_argument("--device", default="auto")
args = parser.parse_args()

device = m.pick_device(args.device)
vocab = m.Vocabulary.seed()
print(f"device {device} ({torch.get_num_threads()} CPU threads), preset {args.preset}, input {args.input_size}, "
      f"{args.clips} clips")
print(f"{'encoder':10} {'params':>12} {'encode clips/s':>15} {'greedy CTC clips/s':>19} {'beam 20 clips/s':>16}")
for encoder in args.encoders.split(","):
    torch.manual_seed(0)
    cfg = m.Config(preset=args.preset, encoder=encoder, input_size=args.input_size, max_frames=1000,
                   synthetic_clips=args.clips, work_dir="runs/bench", beam_size=20, beam_ctc_weight=0.3)
    ds = m.load_dataset(cfg, vocab, device)
    model = m.build_model(cfg, vocab.size).to(device)
    fit = list(range(8))
    x, lengths = m.batch_inputs(ds, fit, m.Augment(cfg, training=False), device)
    quick_fit(model, cfg, vocab, x, lengths.to(device), [ds.samples[i].ids for i in fit], args.fit_steps, device)
    model.eval()
    batches = m.frame_budget_batches(ds.bank.lengths.tolist()[:args.clips], cfg.max_frames, random.Random(0))
    seconds = {}
    for decoder in ("encode", "ctc", "beam"):
        total = 0.0
        for batch in batches:
            x, lengths = m.batch_inputs(ds, batch, m.Augment(cfg, training=False), device)
            with torch.no_grad():
                if decoder == "encode":
                    _, s = timed(lambda: model.encode(x, lengths.to(device)), device)
                else:
                    _, s = timed(lambda: m.decode(model, *model.encode(x, lengths.to(device)), lengths.to(device),
                                                  vocab, cfg, decoder=decoder), device)
            total += s
        seconds[decoder] = total
    params = sum(p.numel() for p in model.parameters())
    rate = {k: args.clips / v for k, v in seconds.items()}
    print(f"{encoder:10} {params:12,} {rate['encode']:15.1f} {rate['ctc']:19.1f} {rate['beam']:16.1f}", flush=True)
