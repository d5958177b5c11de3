"""AdamW step time over a CLIP encoder's parameters: torch's per-tensor (foreach) update vs. the
fused kernel the trainers use (`miscc.training.fused_options`), same parameters, same run.

    python bench/bench_optimizer.py [--model tiny_rn] [--steps 30 --threads 1]

Stage 1 updates every CLIP parameter each step, including the 49408-row token-embedding table,
so the optimizer is a visible share of a small model's step. `--model ViT-B-32` times the real
model's size (random weights, no download).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from miscc.training import fused_options
from model import ClipEncoder, resolve_clip_name


def ms_per_step(params: list[torch.nn.Parameter], steps: int, **options: bool) -> float:
    """Mean milliseconds of one AdamW step (after 3 warm-up steps) with fixed gradients."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **options)
    for _ in range(3):
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_rn", help="a cfg/clip JSON name or open_clip name")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = ClipEncoder(resolve_clip_name(args.model, ""), adapter=True, load_weights=False)
    params = [p for p in encoder.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    count = sum(p.numel() for p in params)
    plain = ms_per_step(params, args.steps)
    fused = ms_per_step(params, args.steps, **fused_options(torch.device("cpu")))
    print(f"{args.model}: {len(params)} tensors, {count / 1e6:.2f} M parameters, "
          f"{args.threads} thread(s)")
    print(f"AdamW foreach {plain:.2f} ms/step, fused {fused:.2f} ms/step: "
          f"fused is {plain / fused:.1f}x faster")


if __name__ == "__main__":
    main()
