"""GPU throughput: stage-2 training steps of the birds configuration (the 3-branch 256 px
DM-GAN of cfg/clip_bird_DMGAN.yml with a CLIP ViT-B/32-sized encoder, random weights, so no
download) with and without TRAIN.AMP / TRAIN.CHANNELS_LAST; and CLIP-GEN sampling at the COCO
grid (GPT-2 medium, 24 x 1024, 16x16 tokens of 16384 codes) in fp32 and bf16; and the COCO
VQGAN tokenizer's training step (256 px, ch 128, 16384 codes, PatchGAN on; LPIPS off, its VGG
weights are a download) under AMP, contiguous vs channels-last.

    python bench/bench_gpu.py [--gpu 0] [--steps 200] [--batch 10] [--sampler-batch 32]

Prints images/s (real images per second, each with two captions) and peak GPU memory per
setting, relative to the fp32 contiguous baseline measured in the same run, then the
sampler's tokens/s against fp32. The data are a small synthetic shapes set in the CUB layout
at 304 px; steps run on prefetched batches. On a machine without CUDA,
`--gpu -1 --steps 1 --batch 2 --sampler-batch 0 --vq-batch 1` checks that the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clipgen.gpt import CondGPT, GPTArch, sample_tokens
from clipgen.vq_trainer import VQGANTrainer
from datasets import make_shapes_dataset
from miscc.config import load_config
from miscc.utils import atomic_torch_save
from model import ClipEncoder, resolve_clip_name
from trainer import GANTrainer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (("fp32, contiguous", False, False), ("AMP", True, False),
            ("channels_last", False, True), ("AMP + channels_last", True, True))
COCO_GRID = GPTArch(vocab=16384, tokens=256, cond_dim=512, n_layer=24, n_embd=1024, n_head=16)


def select_device(gpu: int) -> torch.device:
    """`--gpu`: the CPU (-1) or that CUDA device, made current (allocations, streams and
    cuDNN handles of code that names no index go there too)."""
    if gpu < 0:
        return torch.device("cpu")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def release(device: torch.device) -> None:
    """Free what an earlier setting left (its trainer may sit in reference cycles) and
    restart the peak-memory count, so that each setting's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def profile_steps(trainer, batches: list, steps: int, device: torch.device) -> None:
    """torch.profiler over `steps` training steps: the busiest operators by GPU and by CPU
    time, and how much of the wall time the GPU spent in kernels (low: launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    table = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in table) / 1e6
    launches = sum(e.count for e in table if e.key == "cudaLaunchKernel")
    print(f"\nprofile of {steps} steps: {wall:.2f} s wall, GPU kernels {kernels:.2f} s "
          f"({kernels / wall:.0%} busy), {launches} kernel launches")
    for key in ("self_device_time_total", "self_cpu_time_total"):
        print(table.table(sort_by=key, row_limit=12, max_name_column_width=48))


def run(cfg, device: torch.device, steps: int, kind=None,
        profile: int = 0) -> tuple[float, float]:
    """(images/s, peak memory GiB) over `steps` training steps after two warm-up steps; then
    `profile` steps under torch.profiler when asked."""
    release(device)
    trainer = (kind or GANTrainer)(cfg, device, fresh=True, progress=False)
    trainer.sampler.set_epoch(0)
    batches = [b for _, b in zip(range(4), trainer.loader, strict=False)]
    for b in batches[:2]:
        trainer.train_step(b)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    if profile:
        profile_steps(trainer, batches, profile, device)
    return steps * trainer.batch / seconds, peak


def sampler_speed(device: torch.device, batch: int) -> list[tuple[str, float, float]]:
    """(setting, tokens/s, peak GiB) of `sample_tokens` at the COCO grid: fp32 weights and
    KV cache; bf16 autocast (fp32 weights and cache); the model (so its KV cache) in bf16,
    under autocast (the conditioning input is normalised in fp32)."""
    rows = []
    for name, dtype, amp in (("fp32", torch.float32, False), ("bf16 autocast", torch.float32, True),
                             ("bf16 weights + KV cache", torch.bfloat16, True)):
        release(device)
        torch.manual_seed(0)
        model = CondGPT(COCO_GRID).eval().to(device=device, dtype=dtype)
        cond = torch.randn(batch, COCO_GRID.cond_dim, device=device, dtype=dtype)
        ids = torch.arange(batch, device=device)
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if amp
               else contextlib.nullcontext())
        with torch.no_grad(), ctx:
            sample_tokens(model, cond[:2], ids[:2], seed=0, top_k=500, top_p=0.95)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            sample_tokens(model, cond, ids, seed=0, top_k=500, top_p=0.95)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                else float("nan"))
        rows.append((name, batch * COCO_GRID.tokens / seconds, peak))
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="-1: CPU (a smoke run)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="per process (birds: 10)")
    parser.add_argument("--sampler-batch", type=int, default=32,
                        help="CLIP-GEN images sampled at once (0: skip the sampler)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many DM-GAN steps of the last setting")
    parser.add_argument("--vq-batch", type=int, default=12,
                        help="VQGAN tokenizer batch (COCO: 12; 0: skip the tokenizer)")
    args = parser.parse_args()
    device = select_device(args.gpu)
    with tempfile.TemporaryDirectory() as tmp:
        data, enc = Path(tmp) / "data", Path(tmp) / "clip.pth"
        make_shapes_dataset(data, n_train=max(4 * args.batch, 8), n_test=4, size=304)
        torch.manual_seed(0)
        atomic_torch_save(ClipEncoder(resolve_clip_name("ViT-B/32", ""), adapter=True,
                                      load_weights=False).checkpoint_state(), enc)
        rows = []
        for name, amp, channels_last in SETTINGS:
            if device.type == "cpu" and (amp or channels_last):
                continue  # CUDA-only switches
            cfg = load_config(ROOT / "cfg" / "clip_bird_DMGAN.yml", [
                f"DATA_DIR={data}", f"OUTPUT_DIR={Path(tmp) / 'run'}", f"TRAIN.NET_E={enc}",
                f"GPU_ID={args.gpu}", "WORKERS=0", f"TRAIN.BATCH_SIZE={args.batch}",
                f"TRAIN.AMP={amp}", f"TRAIN.CHANNELS_LAST={channels_last}"], quiet=True)
            last = name == SETTINGS[-1][0] or device.type == "cpu"
            rows.append((name, *run(cfg, device, args.steps, profile=args.profile * last)))
    base = rows[0][1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"stage 2, birds config (3 branches to 256 px, GF 64, DF 32), ViT-B/32-sized "
          f"encoder, batch {args.batch}, {args.steps} steps on {where}")
    print("| setting | images/s | vs fp32 | peak memory GiB |")
    print("| --- | --- | --- | --- |")
    for name, speed, peak in rows:
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {peak:.2f} |")
    if args.vq_batch > 0:
        vq_rows = []
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            make_shapes_dataset(data, n_train=max(4 * args.vq_batch, 8), n_test=4, size=256)
            for name, channels_last in (("AMP, contiguous", False), ("AMP + channels_last", True)):
                cfg = load_config(ROOT / "cfg" / "VQGAN" / "coco.yml", [
                    f"DATA_DIR={data}", f"OUTPUT_DIR={Path(tmp) / 'run'}", "DATASET_NAME=shapes",
                    f"GPU_ID={args.gpu}", "WORKERS=0", f"TRAIN.BATCH_SIZE={args.vq_batch}",
                    "TRAIN.AMP=True", f"TRAIN.CHANNELS_LAST={channels_last}",
                    "VQGAN.PERCEPTUAL_WEIGHT=0.0", "VQGAN.DISC_START=0", "VQGAN.VAL_IMAGES=4"],
                    quiet=True)
                vq_rows.append((name, *run(cfg, device, args.steps, VQGANTrainer)))
        print(f"\nVQGAN tokenizer, COCO config (256 px, ch 128, 16384 codes, PatchGAN on), "
              f"batch {args.vq_batch}, {args.steps} steps on {where}")
        print("| setting | images/s | vs contiguous | peak memory GiB |")
        print("| --- | --- | --- | --- |")
        for name, speed, peak in vq_rows:
            print(f"| {name} | {speed:.1f} | {speed / vq_rows[0][1]:.2f}x | {peak:.2f} |")
    if args.sampler_batch > 0:
        rows = sampler_speed(device, args.sampler_batch)
        print(f"\nCLIP-GEN sampler, COCO grid (GPT-2 medium, 256 tokens, 16384 codes, top-k 500, "
              f"top-p 0.95), batch {args.sampler_batch} on {where}")
        print("| setting | tokens/s | vs fp32 | peak memory GiB |")
        print("| --- | --- | --- | --- |")
        for name, speed, peak in rows:
            print(f"| {name} | {speed:.0f} | {speed / rows[0][1]:.2f}x | {peak:.2f} |")


if __name__ == "__main__":
    main()
