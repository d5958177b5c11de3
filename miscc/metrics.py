"""FID, IS and KID on torch-fidelity's TF-faithful Inception-v3: one pass, cached statistics.

One forward pass per image yields both the pool features at `dims` (FID, KID) and the unbiased
logits (IS): the extractor is `torch_fidelity.FeatureExtractorInceptionV3` asked for both feature
layers at once, and the metric math is torch-fidelity's own (`fid_features_to_statistics`,
`fid_statistics_to_metric`, `isc_features_to_metric`, `kid_features_to_metric`), so the numbers
equal `torch_fidelity.calculate_metrics` on the same inputs and weights.

Images are fed as uint8 [3, H, W] tensors; the extractor resizes them to 299 px itself with its
TF1-compatible bilinear interpolation, exactly as `calculate_metrics` does. Statistics are saved
as `.npz` (`mu`, `sigma` like pytorch-fid, plus metadata) and the real set's statistics of a
dataset are cached by dataset, split, image size and dims (rebuilt when the image list or the
Inception weights change).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from miscc.utils import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    run_command,
    select_device,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DIMS_CHOICES = (64, 192, 768, 2048)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name for this extractor
LOGITS_LAYER = "logits_unbiased"  # the layer torch-fidelity's IS uses
DOWNLOAD_TIMEOUT_S = 30.0  # a blocked network fails after this instead of hanging
STATS_FORMAT = 1
DATA_CHOICES = ("bird", "birds", "coco", "shapes")
Log = Callable[[str], None]


class MetricsError(RuntimeError):
    """A user-fixable problem (bad input, missing weights, mismatched statistics)."""


class WeightsUnavailableError(MetricsError):
    """The Inception weights are neither given nor downloadable."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ weights
def inception_url() -> str:
    """The URL torch-fidelity downloads its Inception-v3 weights from."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_filename() -> str:
    """The weights file name torch-fidelity expects (and caches under torch hub)."""
    return os.path.basename(inception_url())


def hub_weights_path() -> Path:
    """Where torch hub keeps the downloaded weights (`$TORCH_HOME/hub/checkpoints/<file>`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_filename()


def missing_weights_message(reason: str) -> str:
    """The one message shown when the weights cannot be obtained."""
    return (
        f"cannot get the Inception-v3 weights '{inception_filename()}' ({reason}).\n"
        f"  Download {inception_url()}\n"
        f"  on a machine with internet access, then pass it with --weights PATH "
        f"(or copy it to {hub_weights_path()})."
    )


def file_sha256(path: str | Path) -> str:
    """Short SHA-256 of a file: identifies the weights that produced cached statistics."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def _check_state_dict_file(path: Path) -> None:
    """Fail clearly on a missing file or one that holds more than tensors.

    Read with `miscc.utils.load_checkpoint` (`weights_only=True`) before torch-fidelity, which
    loads the file with `weights_only=False`, ever unpickles it.
    """
    if not path.is_file():
        raise MetricsError(f"--weights {path}: no such file.\n" + missing_weights_message(
            "the given file does not exist"))
    try:
        state = load_checkpoint(path, "Inception weights")
    except CheckpointError as err:
        raise MetricsError(f"{err}; expected a PyTorch state dict of tensors readable with "
                           f"torch.load(weights_only=True)") from err
    if not all(torch.is_tensor(v) for v in state.values()):
        raise MetricsError(f"--weights {path}: expected a state dict of tensors "
                           f"(the file '{inception_filename()}')")


@dataclass
class Inception:
    """torch-fidelity's Inception-v3 extractor set up for one pass: pool features (+ logits)."""

    net: torch.nn.Module
    dims: int
    logits: bool
    device: torch.device
    weights_id: str

    @property
    def layers(self) -> list[str]:
        return list(self.net.features_list)


def load_inception(dims: int = 2048, logits: bool = True, weights: str | Path | None = None,
                   device: torch.device | str = "cpu") -> Inception:
    """Build torch-fidelity's FeatureExtractorInceptionV3 for `dims` pool features and logits.

    `weights` is a local weights file (offline use); without it torch-fidelity's own file is
    used from the torch hub cache or downloaded, failing fast with a clear message when the
    network is unavailable.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if dims not in DIMS_CHOICES:
        raise MetricsError(f"--dims must be one of {DIMS_CHOICES}, got {dims}")
    layers = [str(dims)] + ([LOGITS_LAYER] if logits else [])
    from_hub = weights is None and hub_weights_path().is_file()
    if from_hub:
        weights = hub_weights_path()
    if weights is not None:
        path = Path(weights)
        try:
            _check_state_dict_file(path)
        except MetricsError as err:
            if from_hub:  # e.g. a download cut short earlier
                raise MetricsError(f"the cached weights {path} are unreadable; delete the file "
                                   f"and run again, or pass --weights PATH\n{err}") from err
            raise
        try:
            net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, layers,
                                              feature_extractor_weights_path=str(path))
        except RuntimeError as err:  # strict load_state_dict: missing/unexpected keys listed
            raise MetricsError(f"--weights {path} does not fit torch-fidelity's Inception-v3 "
                               f"(expected '{inception_filename()}'):\n{err}") from err
        weights_id = file_sha256(path)
    else:
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        chatter = io.StringIO()  # torch hub's "Downloading: ..." line and progress bar
        try:
            with contextlib.redirect_stderr(chatter):
                net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, layers)
        except (OSError, ValueError, RuntimeError) as err:  # URLError, timeouts, bad file
            # the one message (what to download, how to pass it) replaces torch hub's output
            raise WeightsUnavailableError(missing_weights_message(
                f"download failed: {err}")) from err
        finally:
            socket.setdefaulttimeout(old_timeout)
        _stderr(f"downloaded {inception_filename()} to {hub_weights_path()}")
        weights_id = file_sha256(hub_weights_path()) if hub_weights_path().is_file() else "hub"
    device = torch.device(device)
    net = net.to(device).eval()
    return Inception(net=net, dims=dims, logits=logits, device=device, weights_id=weights_id)


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Save torch-fidelity's Inception-v3 with random weights, for offline tests/benchmarks only.

    Built through torch-fidelity's own class with its weight loading switched off. Convolutions
    get He-normal weights (the default init shrinks activations to ~0 over 90 layers); the
    classifier is made orthogonal to the mean feature and scaled so logits spread by ~3, so
    features and IS are non-degenerate. Numbers from it are not comparable to published ones.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    g = torch.Generator().manual_seed(seed)
    with (mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
          mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                            lambda *a, **k: None)):
        net = fe.FeatureExtractorInceptionV3(EXTRACTOR_NAME, ["2048"])
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.normal_(0, (2.0 / mod.weight[0].numel()) ** 0.5, generator=g)
        probe = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
        feats = net(probe)[0]
        mean_dir = feats.mean(0) / feats.mean(0).norm()
        w = torch.randn(1008, 2048, generator=g)
        w -= (w @ mean_dir)[:, None] * mean_dir[None, :]
        net.fc.weight.copy_(w * 3.0 / ((feats - feats.mean(0)) @ w.T).std())
        net.fc.bias.normal_(0, 1, generator=g)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# ------------------------------------------------------------------------------- inputs
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
            log: Log = _stderr) -> FeatureSet:
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


# ---------------------------------------------------------------------------- statistics
@dataclass
class Stats:
    """Gaussian statistics of pool features (+ the features themselves when KID needs them)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.mu.shape[0])


def statistics(features: torch.Tensor | np.ndarray, keep_features: bool = False,
               meta: dict[str, str] | None = None) -> Stats:
    """Mean and covariance of [N, D] features with torch-fidelity's own function."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    feats = torch.as_tensor(features)
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise MetricsError(f"statistics need at least 2 feature vectors, got shape "
                           f"{tuple(feats.shape)}")
    stat = fid_features_to_statistics(feats.cpu())
    return Stats(mu=stat["mu"], sigma=stat["sigma"], n=int(feats.shape[0]),
                 features=feats.cpu().numpy() if keep_features else None,
                 meta=dict(meta or {}))


def frechet_distance(a: Stats, b: Stats) -> float:
    """FID between two Gaussians with torch-fidelity's formula (eigenvalues of Σ1·Σ2).

    Statistics from another tool (e.g. pytorch-fid's float64 `mu`) are promoted to a common
    dtype first; torch-fidelity's own statistics pass through unchanged.
    """
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise MetricsError(f"cannot compare {a.dims}-d statistics with {b.dims}-d statistics; "
                           "both sides must use the same --dims")
    sa, sb = {"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}
    if a.mu.dtype != b.mu.dtype or a.sigma.dtype != b.sigma.dtype:
        sa = {k: v.astype(np.float64) for k, v in sa.items()}
        sb = {k: v.astype(np.float64) for k, v in sb.items()}
    return float(fid_statistics_to_metric(sa, sb, verbose=False)["frechet_inception_distance"])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over `splits` (torch-fidelity's shuffle with seed 2020, float64)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    n = int(logits.shape[0])
    if splits < 1:
        raise MetricsError(f"--splits must be positive, got {splits}")
    if n < splits:
        raise MetricsError(f"IS with --splits {splits} needs at least {splits} images, got {n}")
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


def kernel_inception_distance(f1: torch.Tensor | np.ndarray, f2: torch.Tensor | np.ndarray,
                              subsets: int = 100, subset_size: int = 1000,
                              log: Log = _stderr) -> tuple[float, float, int]:
    """KID mean and std (torch-fidelity's polynomial-kernel unbiased MMD over random subsets).

    The subset size is lowered to the smaller set's size when needed (noted); returns it too.
    """
    from torch_fidelity.metric_kid import kid_features_to_metric

    t1, t2 = torch.as_tensor(f1).float(), torch.as_tensor(f2).float()
    if t1.shape[1] != t2.shape[1]:
        raise MetricsError(f"KID: {t1.shape[1]}-d features vs {t2.shape[1]}-d features")
    n = min(len(t1), len(t2))
    if n < 2:
        raise MetricsError(f"KID needs at least 2 images on each side, got {len(t1)} and "
                           f"{len(t2)}")
    if subset_size > n:
        log(f"note: KID subset size lowered from {subset_size} to {n} (the smaller set)")
        subset_size = n
    out = kid_features_to_metric(t1, t2, kid_subsets=subsets, kid_subset_size=subset_size,
                                 verbose=False, rng_seed=2020)
    return (out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"],
            subset_size)


def check_enough_for_dims(n: int, dims: int, name: str, allow_few: bool) -> None:
    """FID's covariance at `dims` has full rank only with more than `dims` images."""
    if n < 2:
        raise MetricsError(f"{name}: FID needs at least 2 images, got {n}")
    if n <= dims and not allow_few:
        smaller = [str(d) for d in DIMS_CHOICES if d < n]
        fixes = ["more images"] + ([f"a smaller --dims ({', '.join(smaller)})"] if smaller else [])
        raise MetricsError(
            f"{name}: {n} images are too few for FID at --dims {dims} (the covariance needs "
            f"at least {dims + 1} images to have full rank). Use {' or '.join(fixes)}, or "
            f"--allow-few-images to compute it anyway.")


# ------------------------------------------------------------------------------- .npz I/O
def save_stats(path: str | Path, stats: Stats) -> Path:
    """Write statistics atomically (`miscc.utils.atomic_write_bytes`: temp file, fsync, rename).

    Keys: `mu`, `sigma` (as pytorch-fid), `n`, `dims`, `format`, `meta_<name>` strings and,
    when kept, `features` (needed for KID against this set).
    """
    path = Path(path)
    arrays: dict[str, Any] = {"mu": stats.mu, "sigma": stats.sigma, "n": np.int64(stats.n),
                              "dims": np.int64(stats.dims), "format": np.int64(STATS_FORMAT)}
    if stats.features is not None:
        arrays["features"] = stats.features
    for key, value in stats.meta.items():
        arrays[f"meta_{key}"] = np.str_(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_stats(path: str | Path, dims: int | None = None) -> Stats:
    """Read a statistics `.npz` (ours or pytorch-fid's `mu`/`sigma`), checking it against `dims`."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: no such statistics file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise MetricsError(f"{path}: not a statistics file (needs arrays 'mu' and "
                                   f"'sigma'; found {sorted(data.files)})")
            mu, sigma = data["mu"], data["sigma"]
            features = data.get("features")
            n = int(data["n"]) if "n" in data else -1
            meta = {k[5:]: str(data[k]) for k in data.files if k.startswith("meta_")}
    except MetricsError:
        raise
    except Exception as err:
        raise MetricsError(f"{path}: unreadable statistics file ({err})") from err
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise MetricsError(f"{path}: malformed statistics (mu {mu.shape}, sigma {sigma.shape})")
    if dims is not None and d != dims:
        raise MetricsError(f"{path} holds {d}-d statistics but --dims {dims} was requested; "
                           f"use --dims {d} or recompute the statistics with --dims {dims}")
    if features is not None and (features.ndim != 2 or features.shape[1] != d):
        raise MetricsError(f"{path}: features {features.shape} do not match {d}-d statistics")
    return Stats(mu=mu, sigma=sigma, n=n, features=features, meta=meta)


def is_stats_file(path: str | Path) -> bool:
    return str(path).lower().endswith(".npz")


# ----------------------------------------------------------------------- real-stats cache
def stats_cache_path(data_dir: str | Path, dataset_name: str, split: str, size: int,
                     dims: int) -> Path:
    """`<DATA_DIR>/cache/fid_stats_<DATASET_NAME>_<split>_<size>px_<dims>.npz`."""
    return Path(data_dir) / "cache" / f"fid_stats_{dataset_name}_{split}_{size}px_{dims}.npz"


def cached_real_stats(dataset: Dataset, cache_path: str | Path, inception: Inception,
                      need_features: bool = False, batch_size: int = 50, workers: int = 0,
                      progress: bool = True, log: Log = _stderr) -> tuple[Stats, bool]:
    """Statistics of a dataset with `.keys`, computed once and reused from `cache_path`.

    The cache is rebuilt when the key list, the weights or the dims changed, or when KID needs
    per-image features the cache lacks. Returns (stats, came_from_cache).
    """
    from datasets import keys_digest  # the image cache's digest of a split's key list

    cache_path = Path(cache_path)
    digest = keys_digest([str(k) for k in dataset.keys])  # type: ignore[attr-defined]
    reason = "no cache yet"
    if cache_path.is_file():
        try:
            cached = load_stats(cache_path, inception.dims)
        except MetricsError as err:
            reason = f"unreadable cache: {err}"
        else:
            if cached.meta.get("keys_digest") != digest:
                reason = "the image list changed"
            elif cached.meta.get("weights") != inception.weights_id:
                reason = "other Inception weights"
            elif need_features and cached.features is None:
                reason = "KID needs the per-image features"
            else:
                log(f"using cached real statistics {cache_path} ({cached.n} images)")
                return cached, True
    log(f"computing real statistics ({reason}) -> {cache_path}")
    feats = extract(dataset, inception, batch_size=batch_size, workers=workers,
                    progress=progress, desc="real", log=log)
    meta = {"keys_digest": digest, "weights": inception.weights_id,
            "skipped": str(len(feats.skipped)), "source": str(cache_path.stem)}
    stats = statistics(feats.pool, keep_features=need_features, meta=meta)
    save_stats(cache_path, stats)
    return stats, False


# ------------------------------------------------------------------------ --data targets
@dataclass
class DataTarget:
    """What `--data NAME` / `--cfg FILE` resolves to."""

    gen_dir: Path
    real: Dataset
    cache_path: Path
    size: int
    dataset_name: str


def data_config_path(name: str) -> Path:
    """`cfg/eval_clip_<name>.yml` for --data bird|coco|shapes ('birds' is accepted too)."""
    short = {"birds": "bird"}.get(name, name)
    if short not in ("bird", "coco", "shapes"):
        raise MetricsError(f"--data must be one of bird, coco, shapes; got {name!r}")
    return REPO_ROOT / "cfg" / f"eval_clip_{short}.yml"


def resolve_generated_dir(cfg: Any, cfg_file: str | None = None) -> Path:
    """`<OUTPUT_DIR>/valid/single`, where main.py's evaluation mode writes the test images."""
    gen_dir = Path(cfg.OUTPUT_DIR) / "valid" / "single"
    if not gen_dir.is_dir():
        how = f"python main.py --cfg {cfg_file}" if cfg_file else "main.py with the eval config"
        raise MetricsError(f"generated images not found: {gen_dir}\n  generate the test set "
                           f"first ({how}), or give the folder with --path")
    return gen_dir


def resolve_data(cfg: Any, dims: int, split: str = "test",
                 cfg_file: str | None = None) -> DataTarget:
    """Generated = `<OUTPUT_DIR>/valid/single`; real = the test split, cropped and resized to the
    largest GAN size S like the training data; cache under `<DATA_DIR>/cache/`."""
    size = int(cfg.TREE.BASE_SIZE) * 2 ** (int(cfg.TREE.BRANCH_NUM) - 1)
    gen_dir = resolve_generated_dir(cfg, cfg_file)
    try:
        from datasets import SplitImages

        real = SplitImages(cfg, split=split, size=size)
        real.label = f"{cfg.DATASET_NAME} {split} split ({cfg.DATA_DIR})"
    except ImportError as err:
        raise MetricsError(f"cannot load the real images: {err}") from err
    except (OSError, ValueError, RuntimeError) as err:  # datasets.DataError is a RuntimeError
        raise MetricsError(f"cannot load the real {split} images: {err}") from err
    cache = stats_cache_path(cfg.DATA_DIR, str(cfg.DATASET_NAME), split, size, dims)
    return DataTarget(gen_dir=gen_dir, real=real, cache_path=cache, size=size,
                      dataset_name=str(cfg.DATASET_NAME))


# ----------------------------------------------------------------------------- pipelines
def _real_side(real: Dataset | Stats, inception: Inception, *, need_features: bool,
               cache_path: Path | None, batch_size: int, workers: int, progress: bool,
               log: Log) -> tuple[Stats, dict[str, Any]]:
    """Statistics of the reference side from a .npz, a cached dataset or a fresh pass."""
    info: dict[str, Any] = {}
    if isinstance(real, Stats):
        stats = real
        if stats.meta.get("weights") not in (None, inception.weights_id):
            log(f"warning: the real statistics were computed with other Inception weights "
                f"({stats.meta['weights']} vs {inception.weights_id})")
    elif cache_path is not None and isinstance(real, Dataset) and hasattr(real, "keys"):
        stats, hit = cached_real_stats(real, cache_path, inception, need_features,
                                       batch_size, workers, progress, log)
        info.update(real_stats_cache=str(cache_path), real_stats_cached=hit)
        info["skipped_real"] = int(stats.meta.get("skipped", 0))
    else:
        feats = extract(real, inception, batch_size, workers, progress, desc="real", log=log)
        stats = statistics(feats.pool, keep_features=need_features,
                           meta={"weights": inception.weights_id})
        stats.meta["skipped"] = str(len(feats.skipped))
        info.update(skipped_real=len(feats.skipped), real_inception_seconds=feats.seconds)
    return stats, info


def compute_fid(gen: str | Path | Dataset, real: str | Path | Dataset | Stats, *,
                dims: int = 2048, kid: bool = False, isc: bool = False, splits: int = 10,
                batch_size: int = 50, device: torch.device | str = "cpu",
                weights: str | Path | None = None, workers: int = 0, progress: bool = True,
                kid_subsets: int = 100, kid_subset_size: int = 1000, allow_few: bool = False,
                cache_path: str | Path | None = None, save_real_stats: str | Path | None = None,
                inception: Inception | None = None, log: Log = _stderr) -> dict[str, Any]:
    """FID (+ KID, + IS of `gen`) with one Inception pass per image.

    `gen`/`real`: an image folder (recursive), a Dataset of uint8 tensors, or a `.npz` of
    statistics; `cache_path` caches a Dataset-with-keys real side (see `cached_real_stats`).
    """
    start = time.perf_counter()
    gen_is_stats = not isinstance(gen, Dataset) and is_stats_file(gen)
    if gen_is_stats and (isc or kid):
        raise MetricsError(f"{gen} is a statistics file: IS and KID need the generated images")
    # check both inputs before the (long) first pass
    gen_src: Any = gen if gen_is_stats else as_dataset(gen)[0]
    if isinstance(real, Stats | Dataset):
        real_src: Any = real
    elif is_stats_file(real):
        real_src = load_stats(real, dims)
        if kid and real_src.features is None:
            raise MetricsError(f"{real} holds only mean/covariance; KID needs per-image "
                               "features: rebuild it with --save-stats ... --kid, or pass the "
                               "image folder")
    else:
        real_src = as_dataset(real)[0]
    for side, src in (("generated", gen_src), ("real", real_src)):
        if isinstance(src, Dataset):  # early check; repeated after unreadable images are skipped
            check_enough_for_dims(len(src), dims, f"{side} set {as_dataset(src)[1]}", allow_few)
    if inception is None:
        inception = load_inception(dims, logits=isc, weights=weights, device=device)
    elif inception.dims != dims or (isc and not inception.logits):
        raise MetricsError("the given Inception does not provide the requested layers")
    out: dict[str, Any] = {"dims": dims, "gen": str(gen), "real": str(real)}
    if gen_is_stats:
        gen_stats = load_stats(gen, dims)
        out.update(n_gen=gen_stats.n, skipped_gen=0)
        gen_feats = None
    else:
        gen_feats = extract(gen_src, inception, batch_size, workers, progress,
                            desc="generated", log=log)
        check_enough_for_dims(gen_feats.n, dims, f"generated set {gen}", allow_few)
        gen_stats = statistics(gen_feats.pool)
        out.update(n_gen=gen_feats.n, skipped_gen=len(gen_feats.skipped),
                   inception_seconds=gen_feats.seconds)
    real_stats, info = _real_side(real_src, inception, need_features=kid,
                                  cache_path=Path(cache_path) if cache_path else None,
                                  batch_size=batch_size, workers=workers, progress=progress,
                                  log=log)
    out.update(info)
    out["n_real"] = real_stats.n
    if real_stats.n >= 0:
        check_enough_for_dims(real_stats.n, dims, f"real set {real}", allow_few)
    if save_real_stats is not None:
        save_stats(save_real_stats, real_stats)
        out["saved_stats"] = str(save_real_stats)
        log(f"saved real statistics ({real_stats.n} images, {dims}-d) to {save_real_stats}")
    out["fid"] = frechet_distance(gen_stats, real_stats)
    if kid:
        assert gen_feats is not None and real_stats.features is not None
        mean, std, size = kernel_inception_distance(gen_feats.pool, real_stats.features,
                                                    kid_subsets, kid_subset_size, log)
        out.update(kid_mean=mean, kid_std=std, kid_subset_size=size, kid_subsets=kid_subsets)
    if isc:
        assert gen_feats is not None and gen_feats.logits is not None
        out["is_mean"], out["is_std"] = inception_score(gen_feats.logits, splits)
        out["splits"] = splits
    out["weights"] = inception.weights_id
    out["seconds"] = time.perf_counter() - start
    return out


def compute_stats_file(source: str | Path | Dataset, out_path: str | Path, *, dims: int = 2048,
                       keep_features: bool = False, batch_size: int = 50,
                       device: torch.device | str = "cpu", weights: str | Path | None = None,
                       workers: int = 0, progress: bool = True, allow_few: bool = False,
                       log: Log = _stderr) -> dict[str, Any]:
    """Compute one image set's statistics and save them as `.npz` (e.g. the real set, once)."""
    dataset, name = as_dataset(source)
    check_enough_for_dims(len(dataset), dims, name, allow_few)
    inception = load_inception(dims, logits=False, weights=weights, device=device)
    feats = extract(dataset, inception, batch_size, workers, progress, desc="images", log=log)
    check_enough_for_dims(feats.n, dims, str(source), allow_few)
    stats = statistics(feats.pool, keep_features=keep_features,
                       meta={"weights": inception.weights_id, "skipped": str(len(feats.skipped)),
                             "source": str(source)})
    save_stats(out_path, stats)
    log(f"saved statistics of {feats.n} images ({dims}-d) to {out_path}")
    return {"saved_stats": str(out_path), "n": feats.n, "dims": dims,
            "skipped": len(feats.skipped), "weights": inception.weights_id}


def compute_is(source: str | Path | Dataset, *, splits: int = 10, batch_size: int = 50,
               device: torch.device | str = "cpu", weights: str | Path | None = None,
               workers: int = 0, progress: bool = True, inception: Inception | None = None,
               log: Log = _stderr) -> dict[str, Any]:
    """Inception Score (mean ± std over `splits`) of an image folder or dataset."""
    if not isinstance(source, Dataset) and is_stats_file(source):
        raise MetricsError(f"{source}: IS needs images, not a statistics file")
    start = time.perf_counter()
    dataset, name = as_dataset(source)
    if len(dataset) < splits:
        raise MetricsError(f"{name}: IS with --splits {splits} needs at least {splits} images, "
                           f"got {len(dataset)}")
    if inception is None:
        # the smallest pool layer keeps the request minimal; the logits need the full network
        inception = load_inception(64, logits=True, weights=weights, device=device)
    feats = extract(dataset, inception, batch_size, workers, progress, desc="images", log=log)
    assert feats.logits is not None
    mean, std = inception_score(feats.logits, splits)
    return {"is_mean": mean, "is_std": std, "splits": splits, "n": feats.n,
            "skipped": len(feats.skipped), "path": str(source), "weights": inception.weights_id,
            "seconds": time.perf_counter() - start}


def human_lines(result: dict[str, Any]) -> list[str]:
    """`FID: 12.345` / `KID: 0.0123 ± 0.0010` / `IS: 4.56 ± 0.12` lines for a result dict."""
    lines = []
    if "fid" in result:
        lines.append(f"FID: {result['fid']:.3f}")
    if "kid_mean" in result:
        lines.append(f"KID: {result['kid_mean']:.4f} ± {result['kid_std']:.4f}")
    if "is_mean" in result:
        lines.append(f"IS: {result['is_mean']:.2f} ± {result['is_std']:.2f}")
    return lines


# ------------------------------------------------------------------ command-line helpers
def add_common_args(parser: Any) -> None:
    """Options shared by fid_score.py and inception_score.py."""
    parser.add_argument("--data", choices=DATA_CHOICES, default=None,
                        help="resolve the standard generated/real sets from "
                             "cfg/eval_clip_<data>.yml (or --cfg FILE)")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=50,
                        help="images per Inception forward pass (default 50)")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help=f"local Inception weights ({inception_filename()}) for offline use")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="data-loading worker processes (default min(4, CPUs) = "
                             f"{default_workers()}; 0 = in process)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of text lines")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def default_workers() -> int:
    """min(4, the CPUs this process may use): more only makes DataLoader warn."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def device_from_arg(gpu: int | None, cfg: Any = None) -> torch.device:
    """--gpu N / -1 via `miscc.utils.select_device`; unset: the config's GPU_ID when a config
    is in use, else the first GPU if any, else the CPU."""
    if gpu is None and cfg is not None:
        gpu = int(cfg.GPU_ID)
    if gpu is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return select_device(gpu)


def load_data_config(args: Any) -> Any:
    """The merged eval config for --data/--cfg (strict, via `miscc.config`)."""
    from miscc.config import config_from_args

    if args.data and not args.cfg_file:
        path = data_config_path(args.data)
        if not path.is_file():
            raise MetricsError(f"--data {args.data}: config {path} not found; "
                               "name an eval config with --cfg FILE")
        args.cfg_file = str(path)
    return config_from_args(args)


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print the result: one JSON object, or the human lines."""
    import json

    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        for line in human_lines(result):
            print(line)
    sys.stdout.flush()


def run_cli(fn: Callable[[], int]) -> int:
    """Run a command-line body; a MetricsError becomes one 'error:' message and exit code 2."""
    return run_command(fn, (MetricsError,))
