"""Draw typed captions with a trained generator, DM-GAN or CLIP-GEN, found from its run folder
or checkpoint (docs/DESIGN.md §15). `draw` is the seam `generate.py` (and any other front end)
calls: captions in, uint8 pixels out, the same pixels for the same seed.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
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
                   "(main.py), Model/gpt_epoch_<N>.pth (train_clipgen.py) or an export "
                   "(export.json, export.py); has the run finished its first snapshot?")


def find_run(path: str | Path, overrides: Sequence[str] = ()) -> Run:
    """The generator at `path` (a run folder, its Model/ folder, a checkpoint file, an export
    folder of `export.py` or the Hub id `owner/name` of one) with the config the run saved
    (`<run>/config.yml`), `overrides` (KEY=VALUE) applied."""
    from miscc.export import HUB_ID, hub_folder, is_export, open_export

    p = Path(path)
    if not p.exists() and HUB_ID.fullmatch(str(path)):
        p = hub_folder(str(path))
    if is_export(p):
        exported = open_export(p)
        cfg = exported.cfg
        if overrides:
            from miscc.config import apply_overrides

            apply_overrides(cfg, overrides)
        return Run(exported.kind, exported.files["generator"], exported.folder, cfg)
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

    def _tokens(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids [len(captions), L], warning once about captions cut to WORDS_NUM."""
        before = self.tokenizer.truncated
        tokens = self.tokenizer(list(captions))
        if self.tokenizer.truncated > before:
            warnings.warn(f"{self.tokenizer.truncated - before} caption(s) cut to "
                          f"TEXT.WORDS_NUM={self.run.cfg.TEXT.WORDS_NUM} word tokens",
                          stacklevel=3)
        return tokens

    @torch.no_grad()
    def draw_pairs(self, tokens: torch.Tensor, caption: torch.Tensor, draw: torch.Tensor,
                   seed: int | None = None) -> torch.Tensor:
        """Images [P, 3, H, W] in [-1, 1] of the pairs (caption[p], draw[p]): draw j of the
        caption with token ids tokens[caption[p]]. Draw j depends on (seed, j) alone (default
        seed: the run's SEED), so a pair gets the same pixels in whatever batch it is drawn."""
        cfg = self.run.cfg
        cfg.SEED = int(cfg.SEED if seed is None else seed)
        unique, inverse = torch.unique(caption, return_inverse=True)
        words, sent, mask = self.encoder.encode_text(tokens[unique].to(self.device))
        words, sent, mask = words.float()[inverse], sent.float()[inverse], mask[inverse]
        return self._draw(words, sent, mask, draw).float().cpu()

    def images(self, captions: Sequence[str], n: int = 1, seed: int | None = None
               ) -> torch.Tensor:
        """[len(captions), n, 3, H, W] in [-1, 1]. Image j of every caption is draw j of
        `seed` (default: the run's SEED), so a caption's pictures do not depend on the
        others and the same seed gives the same pixels."""
        if not captions:
            raise ValueError("no captions to draw")
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        tokens = self._tokens(captions)
        pairs = torch.cartesian_prod(torch.arange(len(captions)), torch.arange(n))
        per_batch = max(1, int(self.run.cfg.TRAIN.BATCH_SIZE))
        images = torch.cat([self.draw_pairs(tokens, part[:, 0], part[:, 1], seed)
                            for part in pairs.split(per_batch)])
        return images.view(len(captions), n, *images.shape[1:])

    def stream(self, captions: Sequence[str], n: int, seed: int | None = None,
               batch: int = 64, skip: Callable[[int, int], bool] | None = None
               ) -> Iterator[tuple[int, int, np.ndarray | None]]:
        """Every pair (caption i, draw j), caption by caption: (i, j, uint8 [H, W, 3]) drawn in
        batches of `batch` pairs, or (i, j, None) for the pairs `skip(i, j)` says are done
        already. Only one batch is held at a time, so memory does not grow with n."""
        if not captions:
            raise ValueError("no captions to draw")
        tokens = self._tokens(captions)
        todo: list[tuple[int, int]] = []

        def flush():
            part = torch.tensor(todo)
            pixels = to_uint8(self.draw_pairs(tokens, part[:, 0], part[:, 1], seed))
            done = [(i, j, pic) for (i, j), pic in zip(todo, pixels, strict=True)]
            todo.clear()
            return done

        for i in range(len(captions)):
            for j in range(n):
                if skip is not None and skip(i, j):
                    yield i, j, None
                    continue
                todo.append((i, j))
                if len(todo) == batch:
                    yield from flush()
        if todo:
            yield from flush()

    def _draw(self, words: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor,
              draw: torch.Tensor) -> torch.Tensor:
        if self.run.kind == DMGAN:
            from sampling import seeded_noise

            # draw j's noise comes from (SEED, j) alone, as custom-caption line j's does
            unique, inverse = torch.unique(draw, return_inverse=True)
            noise = [seeded_noise(self.run.cfg, 1, self.netG.arch, offset=int(j))
                     for j in unique]
            z, eps = (torch.cat([pair[k] for pair in noise])[inverse].to(self.device)
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


GRID_LIMIT = 48  # images the grid of `write_stream` shows (the first ones, caption by caption)
GRID_CELL = 128  # their side in the grid (caption_grid's cell)


def drawing_path(out: Path, i: int, caption: str, j: int) -> Path:
    """Where `write_stream` puts draw j of caption i."""
    return out / f"{i:03d}_{slug(caption)}_{j}.png"


def write_stream(drawer: Drawer, captions: Sequence[str], n: int, out: str | Path,
                 seed: int | None = None, batch: int = 64, progress: bool = True
                 ) -> tuple[int, int, Path]:
    """Draw every caption n times into `<out>/<i>_<slug>_<j>.png`, batch by batch, each PNG
    written as soon as it is drawn; images already on disk are skipped (a re-run after an
    interruption draws only the rest, the same pixels as one run would have). Then `grid.png`
    of the first GRID_LIMIT images with their captions. Returns (written, skipped, grid)."""
    from PIL import Image
    from tqdm import tqdm

    out = Path(out)
    shown: list[tuple[np.ndarray, str]] = []
    written = skipped = 0
    pairs = drawer.stream(captions, n, seed, batch,
                          skip=lambda i, j: drawing_path(out, i, captions[i], j).is_file())
    for i, j, pixels in tqdm(pairs, total=len(captions) * n, desc="drawing", unit="image",
                             disable=not progress):
        path = drawing_path(out, i, captions[i], j)
        if pixels is None:
            skipped += 1
        else:
            save_png_file(pixels, path, atomic=True)
            written += 1
        if len(shown) < GRID_LIMIT:
            with Image.open(path) if pixels is None else contextlib.nullcontext() as img:
                picture = img.convert("RGB") if pixels is None else Image.fromarray(pixels)
            if max(picture.size) > GRID_CELL:  # as caption_grid scales it, kept small
                picture = picture.resize((GRID_CELL, GRID_CELL), Image.NEAREST)
            shown.append((np.asarray(picture), captions[i]))
    flat = torch.from_numpy(np.stack([p for p, _ in shown])).permute(0, 3, 1, 2)
    columns = min(n, 8) if n > 1 else min(4, len(shown))
    grid = save_caption_grid(flat.float() / 127.5 - 1.0, [c for _, c in shown],
                             out / "grid.png", columns, GRID_CELL)
    return written, skipped, grid
