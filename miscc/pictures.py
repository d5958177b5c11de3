"""PNG pictures a person looks at: image grids with captions and word-attention maps."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from miscc.utils import atomic_write_bytes, disk_writes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _save_png(img: Image.Image, path: str | Path) -> Path:
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def save_png_file(pixels: np.ndarray, path: str | Path, atomic: bool = False) -> Path:
    """One uint8 [H, W, 3] image as a PNG of an image tree (a write that fails for space or
    permission removes its partial file, raises DiskError). Not atomic by default (trees hold
    thousands); `atomic` writes a temporary name and renames it, so a file that exists is
    whole (for a re-run that skips the files already there)."""
    path = Path(path)
    target = path.with_name(f".{path.name}.tmp") if atomic else path
    with disk_writes(path, pixels.nbytes, cleanup=[target]):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(target, format="PNG")
        if atomic:
            target.replace(path)
    return path


def caption_grid(images: torch.Tensor, captions: list[str], columns: int = 4,
                 cell: int = 128) -> Image.Image:
    """Images (in [-1, 1]) laid out in a grid, each with its caption wrapped underneath."""
    font = ImageFont.load_default()
    pixels = to_uint8(images)
    chars = max(12, cell // 6)
    wrapped = [textwrap.wrap(c, chars)[:4] for c in captions]
    text_h = 12 * max((len(w) for w in wrapped), default=1) + 4
    rows = (len(pixels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, lines) in enumerate(zip(pixels, wrapped, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + 12 * k), line, fill="black", font=font)
    return sheet


def save_caption_grid(images: torch.Tensor, captions: list[str], path: str | Path,
                      columns: int = 4, cell: int = 128) -> Path:
    """Write `caption_grid` as a PNG (atomically)."""
    return _save_png(caption_grid(images, captions, columns, cell), path)


def attention_picture(image: torch.Tensor, words: list[str], attn: torch.Tensor,
                      cell: int = 128) -> Image.Image:
    """One image and, per word, its attention over the region grid drawn over the image.

    image [3, H, W] in [-1, 1]; attn [T, R] (R a square number of regions), T >= len(words).
    """
    font = ImageFont.load_default()
    side = round(attn.shape[-1] ** 0.5)
    base = Image.fromarray(to_uint8(image[None])[0]).resize((cell, cell), Image.BICUBIC)
    base_arr = np.asarray(base, dtype=np.float32)
    panels = [("(image)", base)]
    maps = attn[: len(words)].detach().float().cpu().reshape(-1, 1, side, side)
    maps = F.interpolate(maps, size=(cell, cell), mode="bilinear", align_corners=False)[:, 0]
    for word, amap in zip(words, maps, strict=True):
        amap = (amap - amap.min()) / (amap.max() - amap.min() + 1e-8)
        heat = np.stack([amap.numpy() * 255, amap.numpy() * 64, 255 - amap.numpy() * 255], -1)
        mixed = (0.45 * base_arr + 0.55 * heat).clip(0, 255).astype(np.uint8)
        panels.append((word, Image.fromarray(mixed)))
    columns = min(len(panels), 8)
    rows = (len(panels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, panel) in enumerate(panels):
        x, y = (i % columns) * cell, (i // columns) * (cell + 14)
        draw.text((x + 2, y + 1), title[:20], fill="black", font=font)
        sheet.paste(panel, (x, y + 14))
    return sheet


def save_attention_maps(images: torch.Tensor, words: list[list[str]], attn: torch.Tensor,
                        path: str | Path, limit: int = 4) -> Path:
    """Stack `attention_picture` of the first `limit` items into one PNG."""
    pictures = [attention_picture(images[i], words[i], attn[i])
                for i in range(min(limit, len(words)))]
    width = max(p.width for p in pictures)
    sheet = Image.new("RGB", (width, sum(p.height for p in pictures)), "white")
    y = 0
    for picture in pictures:
        sheet.paste(picture, (0, y))
        y += picture.height
    return _save_png(sheet, path)


def rows_picture(rows: list[torch.Tensor], cell: int = 64) -> Image.Image:
    """Batches of equal size (each [B, 3, H, W] in [-1, 1]) as the rows of one picture, every
    image resized (nearest) to `cell` pixels: e.g. inputs above their reconstructions."""
    cols = len(rows[0])
    sheet = Image.new("RGB", (cols * cell, len(rows) * cell), "white")
    for r, batch in enumerate(rows):
        for c, img in enumerate(to_uint8(batch)):
            sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST),
                        (c * cell, r * cell))
    return sheet


def save_rows(rows: list[torch.Tensor], path: str | Path, cell: int = 64) -> Path:
    """Write `rows_picture` as a PNG (atomically)."""
    return _save_png(rows_picture(rows, cell), path)
