"""Training speed per preset (and temporal encoder) on this device: clips/s, peak memory, and the share of each
step spent getting data ready. Usage: python bench/train_speed.py [--presets tiny,small,base]
[--encoders conformer,mstcn,dctcn] [--input-size 88] [--amp auto|bf16|fp16|off] [--compile] (compiling takes
the warm-up steps: give it --warmup 4 or more)"""
import argparse

import torch

from timing import m, time_training_steps

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--presets", default="tiny,small,base")
parser.add_argument("--arch", default="conformer")
parser.add_argument("--encoders", default="conformer")
parser.add_argument("--input-size", type=int, default=88)
parser.add_argument("--max-frames", type=int, default=1200)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--amp", default="auto", choices=m.CHOICES["amp"])
parser.add_argument("--compile", action="store_true")
parser.add_argument("--device", default="auto")
args = parser.parse_args()

device = m.pick_device(args.device)
vocab = m.Vocabulary.seed()
print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'})"
      f", input {args.input_size} x {args.input_size}, frame budget {args.max_frames}, amp {args.amp}"
      f"{', compiled' if args.compile else ''}")
print(f"{'preset':8} {'encoder':10} {'params':>12} {'batch':>6} {'step s':>8} {'clips/s':>8} {'data %':>7} "
      f"{'peak MB':>9}")
for preset in args.presets.split(","):
    for encoder in args.encoders.split(","):
        cfg = m.Config(preset=preset, arch=args.arch, encoder=encoder, input_size=args.input_size,
                       max_frames=args.max_frames, synthetic_clips=300, work_dir="runs/bench", amp=args.amp,
                       compile=args.compile)
        ds = m.load_dataset(cfg, vocab, device)
        r = time_training_steps(cfg, ds, vocab, device, steps=args.steps, warmup=args.warmup)
        params = sum(p.numel() for p in m.build_model(cfg, vocab.size).parameters())
        print(f"{preset:8} {encoder:10} {params:12,} {r['batch']:6.0f} {r['step_s']:8.2f} {r['clips_per_s']:8.1f} "
              f"{100 * r['data_share']:6.1f}% {r['peak_mb']:9.0f}", flush=True)
