"""Nearest-code search of the VQGAN quantizer: one matmul (`clipgen.quantizer.nearest_codes`,
what the tokenizer uses) vs. `torch.cdist(...).argmin` (what the CLIP-GEN reference code does),
at the COCO tokenizer's sizes, same inputs, same run.

    python bench/bench_vq.py [--codes 16384 --dim 256 --tokens 16 --batch 8 --threads 2]

Prints milliseconds per search, the ratio, and whether both chose the same codes (for plain
codes and for the l2-normalised codes of VQGAN.L2_NORM).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from clipgen.quantizer import nearest_codes


def ms_per_call(fn: Callable[[], torch.Tensor], reps: int) -> float:
    """Median milliseconds of `fn()` over `reps` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per image side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch * args.tokens ** 2, args.dim, generator=g)
    codes = torch.randn(args.codes, args.dim, generator=g)
    print(f"{len(z)} vectors ({args.batch} images x {args.tokens}x{args.tokens} tokens) against "
          f"{args.codes} codes of {args.dim}, {args.threads} thread(s)")
    for name, zz, cc, normalized in (("plain codes", z, codes, False),
                                     ("l2-normalised", F.normalize(z, dim=1),
                                      F.normalize(codes, dim=1), True)):
        ours = nearest_codes(zz, cc, normalized)
        theirs = torch.cdist(zz, cc).argmin(1)
        t_ours = ms_per_call(lambda zz=zz, cc=cc, n=normalized: nearest_codes(zz, cc, n),
                             args.reps)
        t_cdist = ms_per_call(lambda zz=zz, cc=cc: torch.cdist(zz, cc).argmin(1), args.reps)
        same = float((ours == theirs).float().mean())
        print(f"{name}: cdist+argmin {t_cdist:.1f} ms, one matmul {t_ours:.1f} ms: "
              f"{t_cdist / t_ours:.1f}x faster; same code for {same:.2%} of the vectors")


if __name__ == "__main__":
    main()
