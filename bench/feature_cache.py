"""A frozen frontend's feature cache (--feature-views): the time of a training epoch and of a validation pass
with it and without it, on this device. Usage:
    python bench/feature_cache.py [--presets tiny,small,base] [--input-size 88] [--clips 160]
    python bench/feature_cache.py --data-dir LRC-AR/Dataset --videos-dir LRC-AR/Dataset/Preprocessed_Video"""
import argparse
import time

import torch

from timing import m, sync

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--presets", default="tiny,small")
parser.add_argument("--input-size", type=int, default=88)
parser.add_argument("--clips", type=int, default=160, help="training clips an epoch (validation: an eighth)")
parser.add_argument("--views", type=int, default=4)
parser.add_argument("--max-frames", type=int, default=1200)
parser.add_argument("--epochs", type=int, default=2, help="epochs timed each way; the fastest counts")
parser.add_argument("--data-dir", default="")
parser.add_argument("--videos-dir", default="")
parser.add_argument("--device", default="auto")
args = parser.parse_args()

device = m.pick_device(args.device)
data = dict(data_dir=args.data_dir, videos_dir=args.videos_dir, cache_dir="runs/lrc_cache") if args.data_dir else {}
base_cfg = m.Config(input_size=args.input_size, max_frames=args.max_frames, freeze="frontend", feature_views=args.views,
                    synthetic_clips=args.clips * 5 // 4 + 8, work_dir="runs/bench_feature_cache", **data)
vocab = m.load_vocabulary(base_cfg)
ds = m.load_dataset(base_cfg, vocab, device)
ds = m.Dataset(ds.samples, ds.bank, {"train": ds.subset("train")[:args.clips], "val": ds.subset("val")[:args.clips // 8]})
print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
      f"{'LRC-AR' if args.data_dir else 'built-in'} clips: {len(ds.subset('train'))} train, {len(ds.subset('val'))} val; "
      f"input {args.input_size}, frame budget {args.max_frames}, frozen frontend, {args.views} views")
print(f"{'preset':7} {'epoch direct s':>15} {'epoch cached s':>15} {'x':>6} {'val direct s':>13} {'val cached s':>13} "
      f"{'cache build s':>14} {'cache MB':>9}")


def timed(run) -> float:
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - t0


for preset in args.presets.split(","):
    cfg = m.dataclasses.replace(base_cfg, preset=preset)
    torch.manual_seed(0)
    model = m.build_model(cfg, vocab.size).to(device)
    m.set_frozen(model, ["frontend"])
    optimizer, scheduler = m.make_optimizer(model, cfg, m.steps_per_epoch(ds, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=m.amp_dtype(device, cfg) == torch.float16)
    objective = m.Objective(model, vocab, cfg)
    epoch = lambda features: m.train_epoch(objective, ds, cfg, device, optimizer, scheduler, scaler, 1,
                                           features=features)
    validate = lambda features: m.evaluate(model, ds, ds.subset("val"), vocab, cfg, device, ("ctc",), features)
    direct = min(timed(lambda: epoch(None)) for _ in range(args.epochs))
    val_direct = min(timed(lambda: validate(None)) for _ in range(args.epochs))
    bank = []
    build = timed(lambda: bank.append(m.FeatureBank(model, ds, cfg, device)))
    cached = min(timed(lambda: epoch(bank[0])) for _ in range(args.epochs))
    val_cached = min(timed(lambda: validate(bank[0])) for _ in range(args.epochs))
    size = bank[0].views.numel() * bank[0].views.element_size() / 2 ** 20
    print(f"{preset:7} {direct:15.1f} {cached:15.1f} {direct / cached:6.1f} {val_direct:13.2f} {val_cached:13.2f} "
          f"{build:14.1f} {size:9.0f}", flush=True)
