"""The frozen stage-1 encoder as stage 2 and evaluation use it: loading it from TRAIN.NET_E, and
the cache of every caption's word/sentence features (computed once, memory-mapped, keyed by a
hash of the encoder weights and the tokens), so no step re-runs the frozen text tower."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets import cache_root
from miscc.config import ConfigError
from miscc.training import inference_precision, resolve_checkpoint
from miscc.utils import (
    atomic_write_bytes,
    barrier,
    is_local_main_process,
    streamed_arrays,
)
from model import ClipEncoder


# ------------------------------------------------------------------------------- encoder
def load_frozen_encoder(cfg, device: torch.device) -> ClipEncoder:
    """The stage-1 encoder of TRAIN.NET_E (file or Model/ directory), frozen, in eval mode."""
    if cfg.TRAIN.NET_E:
        path = resolve_checkpoint(cfg.TRAIN.NET_E, "clip*.pth", "stage-1 encoder", "TRAIN.NET_E")
        encoder = ClipEncoder.from_checkpoint(path)
    else:
        warnings.warn("TRAIN.NET_E is empty: using the CLIP weights of the CLIP section without "
                      "stage-1 DAMSM fine-tuning", stacklevel=2)
        encoder = ClipEncoder.from_config(cfg)
    if encoder.embed_dim != int(cfg.TEXT.EMBEDDING_DIM):
        raise ConfigError(f"TEXT.EMBEDDING_DIM is {cfg.TEXT.EMBEDDING_DIM} but the encoder "
                          f"gives {encoder.embed_dim}-d features; set TEXT.EMBEDDING_DIM: "
                          f"{encoder.embed_dim}")
    encoder.requires_grad_(False)
    return encoder.eval().to(device)


# --------------------------------------------------------------------------- text features
class TextFeatures:
    """Word [N, C, L, D] (fp16, memory-mapped), sentence [N, C, D] and mask [N, C, L] features
    of every caption of a split, indexed by (image index, caption index)."""

    def __init__(self, words: np.ndarray, sent: np.ndarray, mask: np.ndarray) -> None:
        self.words, self.sent, self.mask = words, torch.from_numpy(sent), torch.from_numpy(mask)

    def lookup(self, index: torch.Tensor, cap: torch.Tensor) -> tuple:
        """(words [B, L, D] float32, sent [B, D], mask [B, L] bool) for the given captions."""
        i, k = index.cpu().numpy(), cap.cpu().numpy()
        words = torch.from_numpy(np.ascontiguousarray(self.words[i, k])).float()
        return words, self.sent[index, cap].float(), self.mask[index, cap]


def encoder_digest(encoder: nn.Module) -> str:
    """A hash of every encoder weight: the cache key part that names the encoder."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_cache_root(cfg) -> Path:
    """CACHE_DIR (default <DATA_DIR>/cache) when writable, else <OUTPUT_DIR>/cache."""
    root = cache_root(cfg)
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    return Path(cfg.OUTPUT_DIR) / "cache"


@torch.no_grad()
def encode_all_captions(encoder: ClipEncoder, tokens: torch.Tensor, device: torch.device,
                        folder: Path, batch: int = 256, progress: bool = True) -> dict:
    """Run the text tower over tokens [N, C, L] batch by batch, straight into `folder`:
    words.npy (fp16, N·C rows of [L', D]), sent.npy (float32 [N·C, D]), mask.npy (bool
    [N·C, L']), L' = the longest caption (+SOT/EOT) in the split. Each array is streamed
    (`NpyWriter`) to a temp path of this process and renamed when complete: peak memory is
    one batch, whatever N. Returns the [N, C, ...] shapes the reader gives them."""
    n, c, _ = tokens.shape
    flat = tokens.reshape(n * c, -1)
    length = int(flat.argmax(dim=1).max()) + 1
    d = encoder.embed_dim
    shapes = {"words": (n, c, length, d), "sent": (n, c, d), "mask": (n, c, length)}
    dtypes = {"words": np.float16, "sent": np.float32, "mask": np.bool_}
    # stored flat ([N·C, ...]); the reader reshapes views
    specs = {k: ((n * c, *shapes[k][2:]), dtypes[k]) for k in shapes}
    with streamed_arrays(folder, specs) as out:
        for start in tqdm(range(0, n * c, batch), desc="text features", disable=not progress,
                          leave=False):
            w, s, m = encoder.encode_text(flat[start: start + batch, :length].to(device))
            out["words"].write(w.float().cpu().numpy())  # bf16 under autocast
            out["sent"].write(s.float().cpu().numpy())
            out["mask"].write(m.cpu().numpy())
    return shapes


def text_feature_cache(cfg, split: str, tokens: torch.Tensor, encoder: ClipEncoder,
                       device: torch.device, progress: bool = True) -> TextFeatures:
    """Open (or build once per node) the feature cache of a split's captions.

    Key: hash of the encoder weights + the token ids (so WORDS_NUM, captions and image list are
    covered). The first process of each node builds it (`is_local_main_process`: nodes with
    their own copy of the data each get one; on a shared disk both write the same bytes
    through their own temp files), streaming to disk (`encode_all_captions`); meta.json is
    written last, so an interrupted build is simply rebuilt.
    """
    key = hashlib.sha256((encoder_digest(encoder) + split).encode()
                         + tokens.numpy().tobytes()).hexdigest()[:16]
    folder = feature_cache_root(cfg) / f"text_{split}_{key}"
    meta = folder / "meta.json"
    if is_local_main_process() and not meta.is_file():
        with inference_precision(cfg, device):
            shapes = encode_all_captions(encoder, tokens, device, folder, progress=progress)
        atomic_write_bytes(meta, json.dumps({"split": split, "shape": list(shapes["words"]),
                                             "words_num": int(cfg.TEXT.WORDS_NUM)}).encode())
    barrier()
    n, c = tokens.shape[:2]
    words, sent, mask = (np.load(folder / f"{k}.npy", mmap_mode="r")
                         for k in ("words", "sent", "mask"))
    # [N·C, L, D] as streamed (a cache of an earlier version holds [N, C, L, D]: both read)
    return TextFeatures(words.reshape(n, c, *words.shape[-2:]),
                        np.array(sent).reshape(n, c, -1), np.array(mask).reshape(n, c, -1))


# ------------------------------------------------------------------- one-edit caption features
class EditFeatures:
    """Sentence features [N, C, K, D] and mask [N, C, K] (True = a real edit) of K one-edit
    variants of every caption of a split (docs/DESIGN.md §14), indexed like `TextFeatures`."""

    def __init__(self, sent: np.ndarray, mask: np.ndarray) -> None:
        self.sent, self.mask = torch.from_numpy(sent), torch.from_numpy(mask)

    def lookup(self, index: torch.Tensor, cap: torch.Tensor) -> tuple:
        """(sent [B, K, D] float32, mask [B, K] bool) of the given captions' edits."""
        return self.sent[index, cap].float(), self.mask[index, cap]


def edit_feature_cache(cfg, split: str, captions: list[list[str]], tokenizer, lists, k: int,
                       encoder: ClipEncoder, device: torch.device, seed: int | None = None,
                       progress: bool = True) -> EditFeatures:
    """Open (or build once per node) the frozen text tower's sentence features of K one-edit
    variants (`negatives_with_mask`, seed = SEED) of every caption of a split.

    Caption c of image n is edited with seed + n·C + c; a caption with fewer than K edits is
    padded with itself (mask False). Key: encoder weights + split + the captions + the word
    lists + K + seed, so a changed list or seed builds a new cache."""
    from miscc.minimal_pairs import negatives_with_mask

    seed = int(cfg.SEED) if seed is None else int(seed)
    per_image = int(cfg.TEXT.CAPTIONS_PER_IMAGE)
    n = len(captions)
    flat = [caps[c] if c < len(caps) else "" for caps in captions for c in range(per_image)]
    payload = json.dumps({"split": split, "captions": flat, "k": int(k), "seed": seed,
                          "lists": [lists.categories, lists.swap, lists.flip_pairs],
                          "words_num": int(cfg.TEXT.WORDS_NUM)}, default=str).encode()
    key = hashlib.sha256(encoder_digest(encoder).encode() + payload).hexdigest()[:16]
    folder = feature_cache_root(cfg) / f"edits_{split}_{key}"
    meta = folder / "meta.json"
    if is_local_main_process() and not meta.is_file():
        rows, mask = negatives_with_mask(flat, lists, int(k), seed)
        texts = [t for row in rows for t in row]
        d = encoder.embed_dim
        specs = {"sent": ((len(texts), d), np.float32), "mask": (tuple(mask.shape), np.bool_)}
        with streamed_arrays(folder, specs) as out, inference_precision(cfg, device), \
                torch.no_grad():
            out["mask"].write(mask.numpy())
            for start in tqdm(range(0, len(texts), 256), desc="edited caption features",
                              disable=not progress, leave=False):
                tokens = tokenizer(texts[start: start + 256]).to(device)
                out["sent"].write(encoder.encode_text(tokens)[1].float().cpu().numpy())
        atomic_write_bytes(meta, json.dumps({"split": split, "shape": [n, per_image, int(k)],
                                             "seed": seed}).encode())
    barrier()
    sent = np.array(np.load(folder / "sent.npy")).reshape(n, per_image, int(k), -1)
    mask = np.load(folder / "mask.npy").reshape(n, per_image, int(k))
    return EditFeatures(sent, mask)
