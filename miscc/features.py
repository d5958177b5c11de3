"""Image inputs and the one Inception pass: every image goes through the network once.

Images are fed as uint8 [3, H, W] tensors; the extractor resizes them to 299 px itself with its
TF1-compatible bilinear interpolation, exactly as `torch_fidelity.calculate_metrics` does. One
pass yields all requested layers (pool features and logits); unreadable images are skipped and
counted.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from miscc.inception import LOGITS_LAYER, Inception, Log, MetricsError, log_stderr

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def find_images(folder: str | Path) -> list[str]:
    """All png/jpg/jpeg files under `folder`, recursively, sorted by real path (torch-fidelity's
    order, which matters for the IS splits)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricsError(f"{folder}: no such directory")
    files = []
    for root, _dirs, names in os.walk(folder):
        files += [os.path.realpath(os.path.join(root, n)) for n in names
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    files.sort()
    if not files:
        raise MetricsError(f"{folder}: no images found (searched recursively for "
                           f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    return files


class ImageFiles(Dataset):
    """Image files as uint8 [3, H, W] RGB tensors (the input torch-fidelity's extractor takes)."""

    def __init__(self, files: Sequence[str], label: str = "images") -> None:
        self.files = list(files)
        self.label = label

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as img:
            rgb = img.convert("RGB")
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)

    def name(self, index: int) -> str:
        return self.files[index]


class _Guarded(Dataset):
    """Wraps a dataset so an unreadable item becomes a counted skip instead of a crash."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        keys = getattr(self.inner, "keys", None)
        if hasattr(self.inner, "name"):
            name = self.inner.name(index)
        elif isinstance(keys, Sequence):
            name = str(keys[index])
        else:
            name = f"item {index}"
        try:
            img = self.inner[index]
        except Exception as err:  # any decode failure: skip and count, reported by path
            return index, None, f"{name}: {type(err).__name__}: {err}"
        if not (torch.is_tensor(img) and img.dtype == torch.uint8 and img.dim() == 3
                and img.shape[0] == 3):
            got = (f"{img.dtype} {tuple(img.shape)}" if torch.is_tensor(img)
                   else type(img).__name__)
            return index, None, f"{name}: expected a uint8 [3, H, W] tensor, got {got}"
        return index, img, None


def _collate_list(items: list) -> list:
    return items


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Run CUDA convolutions/matmuls in full fp32, like the reference Inception: PyTorch's TF32
    default for convolutions moved IS by ~0.3-0.5% and FID by ~0.03% from the CPU values in a
    check on an H100 (random-weight network); with TF32 off they agreed to ~1e-6."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:  # older PyTorch
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


@dataclass
class FeatureSet:
    """Per-image outputs of one pass: pool features [N, dims] and (optionally) logits [N, 1008]."""

    pool: torch.Tensor
    logits: torch.Tensor | None
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return int(self.pool.shape[0])


def as_dataset(source: str | Path | Dataset) -> tuple[Dataset, str]:
    """A folder (recursive) or a Dataset of uint8 tensors, plus a name for messages."""
    if isinstance(source, Dataset):
        return source, str(getattr(source, "label", type(source).__name__))
    return ImageFiles(find_images(source), label=str(source)), str(source)


def extract(source: str | Path | Dataset, inception: Inception, batch_size: int = 50,
            workers: int = 0, progress: bool = True, desc: str = "images",
            log: Log = log_stderr) -> FeatureSet:
    """One pass over `source`: every image goes through the network once, yielding all layers.

    Unreadable images are skipped, counted and named (the first few); images of different
    sizes are batched by size (the network resizes each to 299 px itself). On CUDA, TF32 is
    off during the pass (see `full_fp32`).
    """
    dataset, name = as_dataset(source)
    n_total = len(dataset)  # type: ignore[arg-type]
    if n_total == 0:
        raise MetricsError(f"{name}: no images")
    if batch_size < 1:
        raise MetricsError(f"--batch_size must be positive, got {batch_size}")
    if batch_size > n_total:
        log(f"note: --batch_size {batch_size} is larger than {name} ({n_total} images); "
            f"using {n_total}")
        batch_size = n_total
    cuda = inception.device.type == "cuda"
    workers = min(workers, -(-n_total // batch_size))  # no idle processes on a small set
    loader = DataLoader(_Guarded(dataset), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate_list, pin_memory=cuda)
    from tqdm import tqdm

    layers = inception.layers
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    order: list[int] = []
    skipped: list[str] = []
    start = time.perf_counter()
    with torch.inference_mode(), full_fp32():
        for items in tqdm(loader, desc=desc, unit="batch", disable=not progress,
                          file=sys.stderr, leave=False):
            skipped += [err for _i, img, err in items if img is None]
            groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
            for i, img, _err in items:
                if img is not None:
                    groups.setdefault(tuple(img.shape), []).append((i, img))
            for members in groups.values():
                batch = torch.stack([img for _i, img in members])
                batch = batch.to(inception.device, non_blocking=cuda)
                feats = inception.net(batch)
                for key, value in zip(layers, feats, strict=True):
                    outs[key].append(value.detach().float().cpu())
                order += [i for i, _img in members]
    seconds = time.perf_counter() - start
    if skipped:
        shown = "\n  ".join(skipped[:5])
        more = f"\n  ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log(f"warning: skipped {len(skipped)} of {n_total} unreadable images in {name}:\n"
            f"  {shown}{more}")
    if not order:
        raise MetricsError(f"{name}: none of the {n_total} images could be read "
                           f"(first error: {skipped[0]})")
    perm = torch.as_tensor(np.argsort(np.asarray(order), kind="stable"))
    result = {k: torch.cat(v)[perm] for k, v in outs.items()}
    pool = result[str(inception.dims)]
    if not torch.isfinite(pool).all():
        raise MetricsError(f"{name}: the Inception features are not finite (bad weights?)")
    return FeatureSet(pool=pool, logits=result.get(LOGITS_LAYER), skipped=skipped,
                      seconds=seconds)

