"""GPU throughput of the birds configuration: stage-2 training steps of the 3-branch 256 px
DM-GAN (cfg/clip_bird_DMGAN.yml) with a CLIP ViT-B/32-sized encoder (random weights, so no
download), with and without TRAIN.AMP / TRAIN.CHANNELS_LAST.

    python bench/bench_gpu.py [--gpu 0] [--steps 200] [--batch 10]

Prints images/s (real images per second, each with two captions) and peak GPU memory per
setting, relative to the fp32 contiguous baseline measured in the same run. The data are a
small synthetic shapes set in the CUB layout at 304 px; steps run on prefetched batches.
On a machine without CUDA, `--gpu -1 --steps 2 --batch 2` checks that the script runs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from datasets import make_shapes_dataset
from miscc.config import load_config
from miscc.utils import atomic_torch_save
from model import ClipEncoder, resolve_clip_name
from trainer import GANTrainer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (("fp32, contiguous", False, False), ("AMP", True, False),
            ("channels_last", False, True), ("AMP + channels_last", True, True))


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


def run(cfg, device: torch.device, steps: int) -> tuple[float, float]:
    """(images/s, peak memory GiB) over `steps` training steps after two warm-up steps."""
    release(device)
    trainer = GANTrainer(cfg, device, fresh=True, progress=False)
    trainer.sampler.set_epoch(0)
    batches = [b for _, b in zip(range(4), trainer.loader, strict=False)]
    for b in batches[:2]:
        trainer.train_step(b)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return steps * trainer.batch / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0, help="-1: CPU (a smoke run)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="per process (birds: 10)")
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
            rows.append((name, *run(cfg, device, args.steps)))
    base = rows[0][1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"stage 2, birds config (3 branches to 256 px, GF 64, DF 32), ViT-B/32-sized "
          f"encoder, batch {args.batch}, {args.steps} steps on {where}")
    print("| setting | images/s | vs fp32 | peak memory GiB |")
    print("| --- | --- | --- | --- |")
    for name, speed, peak in rows:
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {peak:.2f} |")


if __name__ == "__main__":
    main()
