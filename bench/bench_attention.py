"""How sharp is the DAMSM word attention with dot-product vs cosine word-region similarity?

    python bench/bench_attention.py [--encoder output/shapes_DAMSM/Model] [--data data/shapes]
                                    [--random ViT-B/32] [--images 64]

For each encoder, the test pictures and their first captions go through the towers; the
attention of every real word over the image's regions (DAMSM's alpha, docs/DESIGN.md §6) is
summarised by its mean largest weight and its mean entropy as a fraction of the uniform
distribution's (1.0 = uniform, the context vector is then the mean of all regions). The
encoders: the trained stage-1 checkpoint (when it exists) and a randomly initialised CLIP of
the size stage 2 uses on birds/COCO (ViT-B/32: 49 regions at 224 px).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from easydict import EasyDict
from PIL import Image

from datasets import CaptionTokenizer, read_split
from miscc.losses import SIMILARITIES, words_loss
from miscc.training import resolve_checkpoint
from model import ClipEncoder, resolve_clip_name

GAMMAS = (4.0, 5.0, 10.0)


def test_pictures(data: Path, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` test pictures in [-1, 1] at `size` px, with their first captions."""
    cfg = EasyDict(DATA_DIR=str(data), DATASET_NAME="shapes", TEXT=EasyDict(CAPTIONS_PER_IMAGE=1))
    info = read_split(cfg, "test")
    images = []
    for path in info.image_paths[:count]:
        with Image.open(path) as img:
            pixels = np.array(img.convert("RGB").resize((size, size), Image.BICUBIC))
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(images), [c[0] for c in info.captions[:count]]


@torch.no_grad()
def sharpness(encoder: ClipEncoder, images: torch.Tensor, captions: list[str]) -> dict:
    """Mean max weight and entropy / log(R) of each real word's attention, per similarity."""
    tokens = CaptionTokenizer(20)(captions)
    words, _, mask = encoder.encode_text(tokens)
    regions, _ = encoder.encode_image(images)
    r = regions.shape[1]
    out = {"regions": r, "uniform max": 1 / r}
    for similarity in SIMILARITIES:
        _, _, attn = words_loss(words, mask, regions, None, *GAMMAS, similarity=similarity)
        a = attn[mask]                                                  # [words, R]
        entropy = -(a * a.clamp_min(1e-12).log()).sum(-1) / math.log(r)
        out[similarity] = (float(a.max(-1).values.mean()), float(entropy.mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="output/shapes_DAMSM/Model",
                        help="stage-1 checkpoint or its Model/ folder (skipped when absent)")
    parser.add_argument("--data", default="data/shapes", help="the shapes set")
    parser.add_argument("--random", default="ViT-B/32",
                        help="random-init CLIP to measure too ('' = none)")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoders: list[tuple[str, ClipEncoder]] = []
    if Path(args.encoder).exists():
        path = resolve_checkpoint(args.encoder, "clip*.pth", "stage-1 encoder", "--encoder")
        encoders.append((f"stage-1 {path}", ClipEncoder.from_checkpoint(path).eval()))
    else:
        print(f"{args.encoder} not found: run pretrain_DAMSM.py first to measure it")
    if args.random:
        random_clip = ClipEncoder(resolve_clip_name(args.random, ""), adapter=True,
                                  load_weights=False).eval()
        encoders.append((f"random {args.random}", random_clip))
    print("| encoder | regions | similarity | mean max weight (uniform) | entropy / uniform |")
    print("| --- | --- | --- | --- | --- |")
    for name, encoder in encoders:
        images, captions = test_pictures(Path(args.data), args.images, encoder.image_size)
        result = sharpness(encoder, images, captions)
        for similarity in SIMILARITIES:
            top, ent = result[similarity]
            print(f"| {name} | {result['regions']} | {similarity} | {top:.3f} "
                  f"({result['uniform max']:.3f}) | {ent:.3f} |")


if __name__ == "__main__":
    main()
