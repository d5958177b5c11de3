"""CLIP-GEN transformer step: what the embedding-reconstruction term costs, same model and
batch, same run (CE only vs. CE + RECON_WEIGHT · reconstruction through the VQGAN decoder and
the CLIP image tower).

    python bench/bench_clipgen_step.py [--threads 1] [--steps 10]

Shapes demo sizes, with random-weight models built by the same code (tiny VQGAN at 32 px →
8x8 tokens of 256 codes, the tiny CLIP ResNet of cfg/clip/tiny_rn.json, GPT 4 x 128, batch
32). Prints seconds per step (forward, backward, AdamW) of each and the ratio as `N.Nx`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from clipgen.gpt import CondGPT
from clipgen.models import gpt_arch
from clipgen.trainer import recon_loss
from clipgen.vqgan import VQModel
from miscc.config import load_config
from model import ClipEncoder, resolve_clip_name

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(gpt: CondGPT, opt: torch.optim.Optimizer, tokens: torch.Tensor,
                 emb: torch.Tensor, recon, steps: int) -> float:
    """Mean seconds of `steps` optimisation steps (after one warm-up step)."""
    def step() -> None:
        logits = gpt(tokens, emb)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        if recon is not None:
            loss = loss + 0.2 * recon(logits, emb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "cfg" / "VQGAN" / "shapes.yml", quiet=True)
    vq = VQModel.from_config(cfg).eval().requires_grad_(False)
    encoder = ClipEncoder(resolve_clip_name("tiny_rn", ""), adapter=False).eval()
    encoder.requires_grad_(False)
    gen_cfg = load_config(ROOT / "cfg" / "clipgen_shapes.yml", quiet=True)
    gpt = CondGPT(gpt_arch(gen_cfg, vq, encoder))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4, betas=(0.9, 0.95))
    batch = int(gen_cfg.TRAIN.BATCH_SIZE)
    tokens = torch.randint(0, vq.arch.n_embed, (batch, gpt.arch.tokens))
    emb = torch.randn(batch, encoder.embed_dim)
    ce = step_seconds(gpt, opt, tokens, emb, None, args.steps)
    both = step_seconds(gpt, opt, tokens, emb,
                        lambda logits, e: recon_loss(logits, vq, encoder, e), args.steps)
    print(f"shapes transformer step, batch {batch}, {args.threads} thread(s): CE only "
          f"{ce:.3f} s, CE + reconstruction {both:.3f} s: {both / ce:.1f}x")


if __name__ == "__main__":
    main()
