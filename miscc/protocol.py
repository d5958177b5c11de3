"""The evaluation protocol both generators and `r_precision.py` share (docs/DESIGN.md §9):
which test (image, caption) pairs are drawn and scored. Pure tensor code, so the scorers and
the samplers import it without importing each other.
"""

from __future__ import annotations

import warnings

import torch


def caption_items(num_captions: torch.Tensor) -> torch.Tensor:
    """[M, 2] (image index, caption index) for every caption of a split, in order."""
    index = torch.arange(len(num_captions)).repeat_interleave(num_captions)
    starts = torch.cumsum(num_captions, 0) - num_captions
    return torch.stack([index, torch.arange(len(index)) - starts[index]], dim=1)


def eval_items(cfg, num_captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The (image, caption) pairs the evaluation generates ([M, 2]), their positions among all
    the split's pairs (which pick their noise), and the protocol for metrics.json.

    EVAL.NUM_IMAGES 0 (or at least the number of test captions): every caption, one image
    each. Else that many distinct pairs, drawn uniformly with a generator seeded by SEED, the
    30,000-image protocol of the AttnGAN/DM-GAN papers for COCO; the draw depends on nothing
    else (not on batch size or process count)."""
    every = caption_items(num_captions)
    want, seed = int(cfg.EVAL.NUM_IMAGES), int(cfg.SEED)
    if 0 < want < len(every):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        pick = torch.randperm(len(every), generator=g)[:want].sort().values
        rule = f"{want} distinct (image, caption) pairs drawn uniformly (seed {seed})"
    else:
        if want > len(every):
            warnings.warn(f"EVAL.NUM_IMAGES={want} is more than the {len(every)} test captions: "
                          "generating one image per caption", stacklevel=2)
        pick = torch.arange(len(every))
        rule = "one image per test caption"
    protocol = {"rule": rule, "images": len(pick), "test_captions": len(every), "seed": seed,
                "num_images_key": want}
    return every[pick], pick, protocol
