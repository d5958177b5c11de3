"""Both generators on one typed caption, for app.py's page (docs/DESIGN.md §16): each side's
images (drawn through `drawing.draw`), their CLIP scores, DM-GAN's stage-1 word-attention map,
example captions from the test split, and plain messages for a missing run or a long caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from drawing import DMGAN, Drawer, draw, find_run
from miscc.training import USER_ERRORS
from r_precision import clip_score

EXAMPLES = 6  # example captions offered, spread over the test split


@dataclass
class Answer:
    """One generator's answer to a caption: uint8 images [n, H, W, 3] and their CLIP scores
    per scorer (fine-tuned, independent), or a message saying why there are none."""

    kind: str
    images: np.ndarray | None = None
    scores: dict[str, list[float]] = field(default_factory=dict)
    attention: Image.Image | None = None
    message: str = ""


class Side:
    """One generator of the page, loaded once; `error` says why it is missing when it is."""

    def __init__(self, kind: str, path: str | Path, device: torch.device) -> None:
        from r_precision import load_independent_encoder

        self.kind, self.path, self.device = kind, str(path), device
        self.drawer: Drawer | None = None
        self.independent = None
        self.error = ""
        try:
            run = find_run(path)
            if run.kind != kind:
                raise ValueError(f"{path} is a {run.kind} run, not a {kind} run")
            self.drawer = Drawer(run, device)
            loaded = load_independent_encoder(run.cfg, device)
            if loaded is not None:
                self.independent = loaded
        except (*USER_ERRORS, ValueError) as err:
            self.error = f"{kind} run not loaded: {err}"

    @property
    def words_num(self) -> int:
        return int(self.drawer.run.cfg.TEXT.WORDS_NUM) if self.drawer else 0

    def refusal(self, caption: str) -> str:
        """Why `caption` cannot be drawn by this side ('' when it can)."""
        if self.drawer is None:
            return self.error
        if not caption.strip():
            return "Type a caption first."
        length = self.drawer.tokenizer.length(caption)
        if length > self.words_num:
            return (f"The caption has {length} word tokens; this {self.kind} run reads at most "
                    f"{self.words_num} (TEXT.WORDS_NUM in {self.drawer.run.folder}/config.yml). "
                    "Shorten it.")
        return ""

    @torch.no_grad()
    def answer(self, caption: str, n: int, seed: int) -> Answer:
        """Draw `caption` n times from `seed` (the pixels `drawing.draw` and generate.py give)
        and score each image; a refusal is an Answer with only a message."""
        refused = self.refusal(caption)
        if refused:
            return Answer(self.kind, message=refused)
        assert self.drawer is not None
        images = draw(self.drawer, [caption.strip()], n=int(n), seed=int(seed))[0]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        tokens = self.drawer.tokenizer([caption.strip()]).to(self.device)
        scorers = [("fine-tuned", self.drawer.encoder)]
        if self.independent is not None:
            scorers.append((f"independent {self.independent[1]['encoder']}",
                            self.independent[0]))
        scores = {name: image_scores(encoder, x.to(self.device), tokens)
                  for name, encoder in scorers}
        attention = (attention_map(self.drawer, x[0], tokens)
                     if self.drawer.run.kind == DMGAN else None)
        return Answer(self.kind, images, scores, attention)


def image_scores(encoder, images: torch.Tensor, tokens: torch.Tensor) -> list[float]:
    """CLIP score (100·max(cos, 0), as evaluation reports it) of each image [-1, 1] against the
    one caption `tokens` [1, L]."""
    sent = encoder.encode_text(tokens)[1].float()
    codes = encoder.encode_image(images)[1].float()
    return [clip_score(code[None], sent) for code in codes]


def attention_map(drawer: Drawer, image: torch.Tensor, tokens: torch.Tensor) -> Image.Image:
    """The stage-1 encoder's word-to-region attention of the caption over one image [3, H, W],
    computed as stage-1 validation pictures it (DAMSM word attention, TRAIN.SMOOTH settings)."""
    from miscc.losses import words_loss
    from miscc.pictures import attention_picture

    sm, encoder = drawer.run.cfg.TRAIN.SMOOTH, drawer.encoder
    regions, _ = encoder.encode_image(image[None].to(drawer.device))
    words, _, mask = encoder.encode_text(tokens)
    attn = words_loss(words.float(), mask, regions.float(), None, sm.GAMMA1, sm.GAMMA2,
                      sm.GAMMA3, attngan_score=sm.ATTNGAN_SCORE, similarity=sm.SIMILARITY)[2]
    # attention rows follow token positions: row 0 is the start token
    return attention_picture(image, drawer.tokenizer.decode(tokens[0].cpu()), attn[0, 1:])


def example_captions(sides: Sequence[Side], limit: int = EXAMPLES) -> list[str]:
    """A few captions of the test split (the first loaded run's data), spread over it; none
    when the data folder is not there."""
    from datasets import read_split

    for side in sides:
        if side.drawer is None:
            continue
        try:
            captions = read_split(side.drawer.run.cfg, "test").captions
        except USER_ERRORS:
            continue
        step = max(1, len(captions) // limit)
        return [caps[0] for caps in captions[::step][:limit]]
    return []


def score_line(answer: Answer) -> str:
    """The scores under a generator's images, as one Markdown line."""
    if answer.message:
        return f"**{answer.message}**"
    parts = [f"CLIP score ({name}): " + ", ".join(f"{s:.1f}" for s in values)
             + (f" (mean {np.mean(values):.1f})" if len(values) > 1 else "")
             for name, values in answer.scores.items()]
    return "  \n".join(parts)
