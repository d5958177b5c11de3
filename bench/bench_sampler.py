"""CLIP-GEN sampling: the key/value cache (`clipgen.gpt.sample_tokens`) vs. re-running the whole
prefix for every token (what the reference sampler does), same model, same draws, same run.

    python bench/bench_sampler.py [--threads 2]

Two settings, each at the batch it is sampled at: the shapes demo's grid (64 tokens, 256
codes, GPT 4 x 128) at batch 256, what `make demo-clipgen` draws at once (32 captions x 8
candidates); COCO's grid (256 tokens, 16384 codes) with a smaller model than the paper's
(6 x 256) so that it runs on a CPU, at batch 32 (one caption's candidates: the reference demo
draws 64). Prints seconds per batch, the ratio as `N.Nx`, and whether both drew identical
tokens. About 4 minutes on 2 cores, nearly all of it the full recompute.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clipgen.gpt import CondGPT, GPTArch, sample_tokens

SETTINGS = {
    "shapes (8x8 tokens, 256 codes, 4 x 128)": (GPTArch(256, 64, 64, 4, 128, 4), 256),
    "COCO grid (16x16 tokens, 16384 codes, 6 x 256)": (GPTArch(16384, 256, 512, 6, 256, 8), 32),
}


def timed_sample(model: CondGPT, cond: torch.Tensor, ids: torch.Tensor,
                 use_cache: bool) -> tuple[float, torch.Tensor]:
    """(seconds, tokens) of one sampling pass with top-k 100, top-p 0.95."""
    start = time.perf_counter()
    out = sample_tokens(model, cond, ids, seed=0, top_k=100, top_p=0.95, use_cache=use_cache)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, (arch, batch) in SETTINGS.items():
        torch.manual_seed(0)
        model = CondGPT(arch).eval()
        cond, ids = torch.randn(batch, arch.cond_dim), torch.arange(batch)
        timed_sample(model, cond[:2], ids[:2], True)  # warm-up
        cached, a = timed_sample(model, cond, ids, True)
        full, b = timed_sample(model, cond, ids, False)
        print(f"{name}, batch {batch}: full recompute {full:.2f} s, KV cache {cached:.2f} s: "
              f"{full / cached:.1f}x; identical tokens: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
