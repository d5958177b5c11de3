"""Statistics of Inception features and the metric math: FID, IS, KID, `.npz` I/O, cache.

The math is torch-fidelity's own (`fid_features_to_statistics`, `fid_statistics_to_metric`,
`isc_features_to_metric`, `kid_features_to_metric`), so the numbers equal
`torch_fidelity.calculate_metrics` on the same inputs and weights. Statistics are saved as
`.npz` (`mu`, `sigma` like pytorch-fid, plus metadata), and the real set's statistics of a
dataset are cached by dataset, split, image size and dims (rebuilt when the image list or the
Inception weights change).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from miscc.features import extract
from miscc.inception import DIMS_CHOICES, Inception, Log, MetricsError, log_stderr
from miscc.utils import DiskError, atomic_write_bytes

STATS_FORMAT = 1


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
                              log: Log = log_stderr) -> tuple[float, float, int]:
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
def stats_cache_path(cache_dir: str | Path, dataset_name: str, split: str, size: int,
                     dims: int) -> Path:
    """`<cache_dir>/fid_stats_<DATASET_NAME>_<split>_<size>px_<dims>.npz` (cache_dir: the
    config's CACHE_DIR, by default `<DATA_DIR>/cache`)."""
    return Path(cache_dir) / f"fid_stats_{dataset_name}_{split}_{size}px_{dims}.npz"


def cached_real_stats(dataset: Dataset, cache_path: str | Path, inception: Inception,
                      need_features: bool = False, batch_size: int = 50, workers: int = 0,
                      progress: bool = True, log: Log = log_stderr) -> tuple[Stats, bool]:
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
    try:
        save_stats(cache_path, stats)
    except DiskError as err:  # a read-only DATA_DIR or a full disk: the numbers still stand
        log(f"note: the real statistics are not cached ({err}); set CACHE_DIR to a writable "
            "folder to keep them")
    return stats, False
