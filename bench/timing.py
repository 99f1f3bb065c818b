"""Shared by the benchmarks: time the parts of real training steps on the current device."""
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import master_all_avsr as m  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """fn's result and the seconds it took (the device's queue drained before and after)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def quick_fit(model, cfg: m.Config, vocab: m.Vocabulary, x, lengths, targets, steps: int, device) -> None:
    """A few training steps on a few clips: weights whose searches end early, as a trained model's do."""
    optimizer, scheduler = m.make_optimizer(model, cfg, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=m.amp_dtype(device, cfg) == torch.float16)
    model.train()
    for _ in range(steps):
        m.backward_pass(m.Objective(model, vocab, cfg), x, lengths, targets, cfg, device, scaler)
        m.optimizer_step(model, optimizer, scheduler, scaler, cfg)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process, data included


def time_training_steps(cfg: m.Config, ds: m.Dataset, vocab: m.Vocabulary, device: torch.device,
                        steps: int = 8, warmup: int = 2) -> dict:
    """Seconds spent getting batches ready (memory gather + augmentation) and computing, over `steps` steps."""
    model = m.build_model(cfg, vocab.size).to(device)
    if cfg.compile:
        m.compile_model(model, device)
    optimizer, scheduler = m.make_optimizer(model, cfg, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=m.amp_dtype(device, cfg) == torch.float16)
    augment = m.Augment(cfg, training=True)
    train = ds.subset("train")
    batches = ds.batches(train, cfg.max_frames)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_s = compute_s = 0.0
    clips = 0
    model.train()
    for i, batch in enumerate((batches * (1 + (warmup + steps) // len(batches)))[: warmup + steps]):
        chosen = [train[j] for j in batch]
        sync(device)
        t0 = time.perf_counter()
        x, lengths, targets = m.training_batch(ds, chosen, augment, device)
        sync(device)
        t1 = time.perf_counter()
        m.backward_pass(m.Objective(model, vocab, cfg), x, lengths, targets, cfg, device, scaler)
        m.optimizer_step(model, optimizer, scheduler, scaler, cfg)
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s, compute_s, clips = data_s + t1 - t0, compute_s + t2 - t1, clips + len(chosen)
    return {"clips_per_s": clips / (data_s + compute_s), "data_share": data_s / (data_s + compute_s),
            "step_s": (data_s + compute_s) / steps, "data_ms": 1000 * data_s / steps,
            "peak_mb": peak_memory_mb(device), "batch": clips / steps}
