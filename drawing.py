"""Draw typed captions with a trained generator, DM-GAN or CLIP-GEN, found from its run folder
or checkpoint (docs/DESIGN.md §15). `draw` is the seam `generate.py` (and any other front end)
calls: captions in, uint8 pixels out, the same pixels for the same seed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datasets import CaptionTokenizer
from miscc.config import load_config
from miscc.pictures import save_caption_grid, save_png_file, to_uint8
from miscc.utils import CheckpointError, latest_checkpoint, load_checkpoint

DMGAN, CLIPGEN = "DM-GAN", "CLIP-GEN"
# checkpoint file names each trainer writes into <OUTPUT_DIR>/Model (newest epoch first)
PATTERNS = {DMGAN: "netG_epoch_*.pth", CLIPGEN: "gpt_epoch_*.pth"}
NAME_PREFIX = {"netG_": DMGAN, "gpt_": CLIPGEN}
FORMAT_PREFIX = {"dmgan-generator/": DMGAN, "clipgen-gpt/": CLIPGEN}
OTHER_RUNS = {"clip*.pth": "a stage-1 encoder run (pretrain_DAMSM.py)",
              "vqgan*.pth": "a CLIP-GEN tokenizer run (train_vqgan.py)"}


class RunError(CheckpointError):
    """A path that is not a generator run, or a run missing its checkpoint or config."""


@dataclass
class Run:
    """A trained generator on disk: its kind, checkpoint, run folder and merged config."""

    kind: str
    checkpoint: Path
    folder: Path
    cfg: dict = field(repr=False)


def _kind_of_file(path: Path) -> str:
    """DM-GAN or CLIP-GEN for a checkpoint file: by the trainers' file names, else by the
    `format` the file records."""
    for prefix, kind in NAME_PREFIX.items():
        if path.name.startswith(prefix):
            return kind
    fmt = load_checkpoint(path, "generator checkpoint").get("format", "")
    for prefix, kind in FORMAT_PREFIX.items():
        if isinstance(fmt, str) and fmt.startswith(prefix):
            return kind
    raise RunError(f"{path} is neither a DM-GAN generator (netG_epoch_<N>.pth of main.py) nor "
                   f"a CLIP-GEN transformer (gpt_epoch_<N>.pth of train_clipgen.py)")


def _checkpoint_in(folder: Path) -> tuple[str, Path]:
    """(kind, newest generator checkpoint) of a run folder or its Model/ folder."""
    model = folder / "Model" if (folder / "Model").is_dir() else folder
    found = {kind: latest_checkpoint(model, pattern) for kind, pattern in PATTERNS.items()}
    found = {kind: files[0] for kind, files in found.items() if files}
    if len(found) == 1:
        return next(iter(found.items()))
    if found:
        raise RunError(f"{model} holds both DM-GAN and CLIP-GEN checkpoints; name the file "
                       f"to draw with, e.g. {found[CLIPGEN]}")
    for pattern, what in OTHER_RUNS.items():
        if any(model.glob(pattern)):
            raise RunError(f"{folder} is {what}, not a generator: give the folder main.py or "
                           "train_clipgen.py wrote (OUTPUT_DIR)")
    raise RunError(f"no generator checkpoint in {model}: expected Model/netG_epoch_<N>.pth "
                   "(main.py) or Model/gpt_epoch_<N>.pth (train_clipgen.py); has the run "
                   "finished its first snapshot?")


def find_run(path: str | Path, overrides: Sequence[str] = ()) -> Run:
    """The generator at `path` (a run folder, its Model/ folder, or a checkpoint file) with the
    config the run saved (`<run>/config.yml`), `overrides` (KEY=VALUE) applied."""
    p = Path(path)
    if p.is_file():
        kind, checkpoint = _kind_of_file(p), p
        folder = p.parent.parent if p.parent.name == "Model" else p.parent
    elif p.is_dir():
        folder = p.parent if p.name == "Model" else p
        kind, checkpoint = _checkpoint_in(folder)
    else:
        raise RunError(f"{p} does not exist: give a run folder (e.g. output/shapes_DMGAN or "
                       "output/shapes_CLIPGEN) or a generator checkpoint file")
    config = folder / "config.yml"
    if not config.is_file():
        raise RunError(f"{folder} has no config.yml (written by the trainer beside Model/): "
                       f"without it the encoder and sizes of {checkpoint.name} are unknown")
    key = "TRAIN.NET_G" if kind == DMGAN else "CLIPGEN.NET"
    cfg = load_config(config, [*overrides, f"{key}={checkpoint}"], quiet=True)
    return Run(kind, checkpoint, folder, cfg)


class Drawer:
    """A generator loaded once, drawing any captions: `drawer(captions, n, seed)`."""

    def __init__(self, run: Run, device: torch.device) -> None:
        self.run, self.device = run, torch.device(device)
        cfg = run.cfg
        self.tokenizer = CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))
        if run.kind == DMGAN:
            from sampling import generator_for_eval
            from text_features import load_frozen_encoder

            self.encoder = load_frozen_encoder(cfg, self.device)
            self.netG = generator_for_eval(cfg, self.encoder, self.device)
        else:
            from clipgen.generate import load_models

            self.gpt, self.vq, self.encoder, _ = load_models(cfg, self.device)

    @torch.no_grad()
    def images(self, captions: Sequence[str], n: int = 1, seed: int | None = None
               ) -> torch.Tensor:
        """[len(captions), n, 3, H, W] in [-1, 1]. Image j of every caption is draw j of
        `seed` (default: the run's SEED), so a caption's pictures do not depend on the
        others and the same seed gives the same pixels."""
        if not captions:
            raise ValueError("no captions to draw")
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        cfg = self.run.cfg
        cfg.SEED = int(cfg.SEED if seed is None else seed)
        before = self.tokenizer.truncated
        tokens = self.tokenizer(list(captions))
        if self.tokenizer.truncated > before:
            warnings.warn(f"{self.tokenizer.truncated - before} caption(s) cut to "
                          f"TEXT.WORDS_NUM={cfg.TEXT.WORDS_NUM} word tokens", stacklevel=2)
        per_batch = max(1, int(cfg.TRAIN.BATCH_SIZE) // n)
        out = []
        for part in torch.arange(len(captions)).split(per_batch):
            words, sent, mask = self.encoder.encode_text(tokens[part].to(self.device))
            words, sent = (t.float().repeat_interleave(n, 0) for t in (words, sent))
            mask = mask.repeat_interleave(n, 0)
            draw = torch.arange(n).repeat(len(part))  # draw j of each caption
            out.append(self._draw(words, sent, mask, draw).float().cpu())
        images = torch.cat(out)
        return images.view(len(captions), n, *images.shape[1:])

    def _draw(self, words: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor,
              draw: torch.Tensor) -> torch.Tensor:
        if self.run.kind == DMGAN:
            from sampling import seeded_noise

            # draw j's noise comes from (SEED, j) alone, as custom-caption line j's does
            noise = [seeded_noise(self.run.cfg, 1, self.netG.arch, offset=j)
                     for j in range(int(draw.max()) + 1)]
            z, eps = (torch.cat([pair[k] for pair in noise])[draw].to(self.device)
                      for k in (0, 1))
            return self.netG(z, sent, words, mask, eps)[0][-1]
        from clipgen.models import draw_images

        return draw_images(self.run.cfg, self.gpt, self.vq, sent, draw.to(self.device),
                           self.encoder)

    def __call__(self, captions: Sequence[str], n: int = 1, seed: int | None = None
                 ) -> np.ndarray:
        """uint8 [len(captions), n, H, W, 3]."""
        images = self.images(captions, n, seed)
        return to_uint8(images.flatten(0, 1)).reshape(*images.shape[:2], *images.shape[3:],
                                                      3)


def load(run: str | Path, device: str | torch.device = "cpu") -> Drawer:
    """The generator at `run` (folder or checkpoint), loaded on `device`, ready to draw."""
    return Drawer(find_run(run), torch.device(device))


def draw(run: str | Path | Drawer, captions: Sequence[str], n: int = 1,
         seed: int | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 images [len(captions), n, H, W, 3] of each caption, drawn by the generator at
    `run` (a run folder, a checkpoint, or a loaded `Drawer`, which keeps the models between
    calls); image j of a caption is draw j of `seed` (default: the run's SEED)."""
    drawer = run if isinstance(run, Drawer) else load(run, device)
    return drawer(captions, n, seed)


def slug(caption: str, limit: int = 40) -> str:
    """A file-name-safe short form of a caption."""
    return re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")[:limit].rstrip("-") or "caption"


def write_drawings(images: np.ndarray, captions: Sequence[str], out: str | Path
                   ) -> tuple[list[Path], Path]:
    """Each image as `<out>/<i>_<slug>_<j>.png` and one grid `<out>/grid.png` (a row per
    caption, the caption under each image); returns (image files, grid file)."""
    out = Path(out)
    files = [save_png_file(images[i, j], out / f"{i:03d}_{slug(c)}_{j}.png")
             for i, c in enumerate(captions) for j in range(images.shape[1])]
    n = images.shape[1]
    flat = torch.from_numpy(images.reshape(-1, *images.shape[2:])).permute(0, 3, 1, 2)
    labels = [c for c in captions for _ in range(n)]
    columns = n if n > 1 else min(4, len(captions))
    grid = save_caption_grid(flat.float() / 127.5 - 1.0, labels, out / "grid.png", columns)
    return files, grid
