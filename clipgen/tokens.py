"""CLIP-GEN's token cache (docs/DESIGN.md §13): the VQGAN tokens and the CLIP image embedding of
several augmented views of every training image, computed once with the frozen tokenizer and
encoder, so that training the transformer (with the reconstruction term off) reads no pixels.

Files (`<CACHE_DIR>/tokens_<key>/`): tokens.npy [V·N, t·t] (int16, or int32 past 32,767 codes),
emb.npy [V·N, E] float32, row v·N + i = view v of image i; meta.json last. The key hashes both
models' weights, the image list, the number of views, how they are drawn (size, crop, flip)
and the seed. View v of image i is the crop `SeededItems` draws for (epoch v, index i): the
same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipgen.data import TokenizerImages
from clipgen.vqgan import VQModel
from datasets import keys_digest
from miscc.training import SeededItems
from miscc.utils import atomic_write_bytes, barrier, is_local_main_process, streamed_arrays
from model import ClipEncoder
from text_features import encoder_digest


@dataclass
class TokenCache:
    """Memory-mapped tokens [V·N, T] and embeddings [V·N, E] of a token cache."""

    tokens: np.ndarray
    emb: np.ndarray
    views: int

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T] long, embeddings [B, E] float32) of cache rows `index`."""
        i = index.cpu().numpy()
        return (torch.from_numpy(self.tokens[i].astype(np.int64)),
                torch.from_numpy(np.array(self.emb[i], dtype=np.float32)))


def view_recipe(data: TokenizerImages) -> str:
    """How `data` draws a training view (size, the random crop's load size, flips): a cache
    built with other views must not be reused when TRAIN.RANDOM_CROP or TRAIN.FLIP change."""
    return f"crop {data.crop} of {data.load_size}, flip {data.flip}"


def cache_key(vq: VQModel, encoder: ClipEncoder, keys: list[str], views: int, recipe: str,
              seed: int) -> str:
    """The cache folder's key: both models' weights, the images, views, their recipe, seed."""
    text = "|".join([encoder_digest(vq), encoder_digest(encoder), keys_digest(keys),
                     str(views), recipe, str(seed)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def write_token_cache(data: TokenizerImages, vq: VQModel, encoder: ClipEncoder,
                      device: torch.device, folder: Path, views: int, seed: int,
                      batch: int = 64, workers: int = 0, progress: bool = True) -> dict:
    """Encode `views` seeded views of every image of `data` (a training split) into `folder`,
    streamed batch by batch to per-process temp files and renamed; returns the meta data."""
    vq, encoder = vq.eval(), encoder.eval()
    n, side = len(data), vq.arch.tokens_side
    dtype = np.int16 if vq.arch.n_embed <= np.iinfo(np.int16).max else np.int32
    specs = {"tokens": ((views * n, side * side), dtype),
             "emb": ((views * n, encoder.embed_dim), np.float32)}
    items = [(v, i) for v in range(views) for i in range(n)]  # row order: view-major
    loader = DataLoader(SeededItems(data, seed), batch_size=batch, sampler=items,
                        num_workers=workers)
    with streamed_arrays(folder, specs) as out:
        for item in tqdm(loader, desc="token cache", disable=not progress, leave=False):
            x = item["image"].to(device)
            out["tokens"].write(vq.encode(x).flatten(1).cpu().numpy())
            out["emb"].write(encoder.encode_image(x)[1].float().cpu().numpy())
    return {"views": views, "images": n, "tokens": side * side, "n_embed": vq.arch.n_embed,
            "embed_dim": encoder.embed_dim, "seed": seed, "skipped": data.skipped}


def token_cache(root: Path, data: TokenizerImages, vq: VQModel, encoder: ClipEncoder,
                device: torch.device, views: int, seed: int, batch: int = 64,
                workers: int = 0, progress: bool = True) -> TokenCache:
    """Open the token cache under `root` for these models and images, building it first (the
    first process of each node builds; the others wait) when it does not exist yet."""
    key = cache_key(vq, encoder, data.keys, views, view_recipe(data), seed)
    folder = root / f"tokens_{key}"
    meta = folder / "meta.json"
    if is_local_main_process() and not meta.is_file():
        info = write_token_cache(data, vq, encoder, device, folder, views, seed, batch,
                                 workers, progress)
        atomic_write_bytes(meta, json.dumps(info).encode())
    barrier()
    return TokenCache(np.load(folder / "tokens.npy", mmap_mode="r"),
                      np.load(folder / "emb.npy", mmap_mode="r"), views)
