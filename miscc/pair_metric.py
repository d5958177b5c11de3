"""Minimal-pair accuracy (docs/DESIGN.md §14): per word category, how often a scorer ranks an
image's true caption above every one-edit variant of it in that category, with chance beside it.

    pairs = build_pair_set(captions, lists)                 # once: the queries and their variants
    result = score_pair_set(codes, pairs, encode_text)     # per evaluation
    result = minimal_pair_accuracy(codes, captions, lists, encode_text)   # both at once

`codes` [M, D] are image codes (real test pictures, or generated images through any encoder),
`captions` a list per image of its captions (a generated image: [[its caption]]), and
`encode_text(list of str) -> [n, D]` the scorer's text side; scores are cosines.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from miscc.minimal_pairs import WordLists, category_variants


@dataclass
class PairSet:
    """Queries of the metric: query q asks image `owner[q]` to pick texts[q][0] (its caption)
    over texts[q][1:] (one-edit variants in `category[q]`)."""

    owner: list[int] = field(default_factory=list)
    category: list[str] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)
    categories: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.owner)


def build_pair_set(captions: list[list[str]], lists: WordLists, max_variants: int = 0,
                   max_images: int = 0, seed: int = 0) -> PairSet:
    """One query per (image, category the image's captions name): the first caption naming the
    category, scanning image i's captions from i mod n (so every template is used), against
    its variants in that category (at most `max_variants`, a seeded sample; 0 = all).
    `max_images` > 0 keeps the first images only."""
    pairs = PairSet(categories=tuple(lists.categories))
    images = captions[:max_images] if max_images > 0 else captions
    for i, caps in enumerate(images):
        if not caps:
            continue
        order = [caps[(i + j) % len(caps)] for j in range(len(caps))]
        named = [set(lists.named(c)) for c in order]
        for category in lists.categories:
            caption = next((c for c, n in zip(order, named, strict=True) if category in n),
                           None)
            if caption is None:
                continue
            variants = category_variants(caption, lists, category)
            if max_variants > 0 and len(variants) > max_variants:
                variants = random.Random(f"{seed}/{i}/{category}").sample(variants,
                                                                          max_variants)
            if variants:
                pairs.owner.append(i)
                pairs.category.append(category)
                pairs.texts.append([caption, *variants])
    return pairs


@torch.no_grad()
def score_pair_set(codes: torch.Tensor, pairs: PairSet,
                   encode_text: Callable[[list[str]], torch.Tensor],
                   batch: int = 1024) -> dict[str, dict[str, float]]:
    """{category: {"accuracy", "chance", "count"}} and "mean" (over the categories with
    queries): a query is a hit when its true caption's cosine with the image code is strictly
    above every variant's (a tie is a miss); chance = mean of 1 / (1 + variants)."""
    if not len(pairs):
        return {}
    flat = [t for texts in pairs.texts for t in texts]
    sizes = torch.tensor([len(t) for t in pairs.texts], dtype=torch.long)
    text = torch.cat([encode_text(flat[s: s + batch]).float()
                      for s in range(0, len(flat), batch)])
    text = F.normalize(text, dim=-1)
    image = F.normalize(codes.float(), dim=-1).to(text.device)
    owner = torch.tensor(pairs.owner, dtype=torch.long, device=text.device)
    query = torch.repeat_interleave(torch.arange(len(pairs)), sizes).to(text.device)
    cos = (text * image[owner[query]]).sum(-1)
    starts = torch.cumsum(sizes, 0) - sizes
    out: dict[str, dict[str, float]] = {}
    hits = []
    for q in range(len(pairs)):
        s, n = int(starts[q]), int(sizes[q])
        hits.append(bool((cos[s] > cos[s + 1: s + n]).all()))
    for category in pairs.categories:
        rows = [q for q in range(len(pairs)) if pairs.category[q] == category]
        if rows:
            out[category] = {"accuracy": sum(hits[q] for q in rows) / len(rows),
                             "chance": sum(1 / int(sizes[q]) for q in rows) / len(rows),
                             "count": len(rows)}
    if out:
        out["mean"] = {k: sum(v[k] for v in out.values()) / len(out)
                       for k in ("accuracy", "chance")} | {"count": len(pairs)}
    return out


def minimal_pair_accuracy(codes: torch.Tensor, captions: list[list[str]], lists: WordLists,
                          encode_text: Callable[[list[str]], torch.Tensor],
                          max_variants: int = 0, seed: int = 0) -> dict[str, dict[str, float]]:
    """`build_pair_set` + `score_pair_set` for image codes [M, D] and their captions."""
    return score_pair_set(codes, build_pair_set(captions, lists, max_variants, seed=seed),
                          encode_text)


def format_pair_accuracy(result: dict[str, dict[str, float]]) -> str:
    """One line: 'colour 95.0 % (chance 16.7), ...' in category order, then the mean."""
    return ", ".join(f"{k} {100 * v['accuracy']:.1f} % (chance {100 * v['chance']:.1f})"
                     for k, v in result.items())


def generated_pair_accuracy(codes: torch.Tensor, captions: list[str], lists: WordLists,
                            encode_text: Callable[[list[str]], torch.Tensor],
                            max_images: int = 0, max_variants: int = 0,
                            seed: int = 0) -> dict[str, dict[str, float]]:
    """Minimal-pair accuracy of generated images: image m [codes row m] against its own
    caption `captions[m]` and that caption's one-edit variants. `max_images` > 0 asks that many
    images, evenly spread over the list (so every test image and template is represented)."""
    m = len(captions)
    if max_images > 0 and m > max_images:
        keep = torch.linspace(0, m - 1, max_images).round().long().unique()
    else:
        keep = torch.arange(m)
    return minimal_pair_accuracy(codes[keep], [[captions[int(i)]] for i in keep], lists,
                                 encode_text, max_variants, seed)


def text_scorer(encoder, tokenizer, device: torch.device) -> Callable[[list[str]], torch.Tensor]:
    """`encode_text` for the metric from a ClipEncoder and the caption tokenizer: sentence
    codes [n, D] (float32) of a list of captions."""

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        return encoder.encode_text(tokenizer(texts).to(device))[1].float()

    return encode
