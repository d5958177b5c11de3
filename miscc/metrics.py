"""FID, IS and KID of image sets: one Inception pass per image, cached real statistics.

The entry points of the metric command lines (`fid_score.py`, `inception_score.py`):
`compute_fid` (FID, + KID, + IS of the generated set), `compute_is`, `compute_stats_file`.
One forward pass per image yields both the pool features at `dims` (FID, KID) and the unbiased
logits (IS): the extractor is torch-fidelity's `FeatureExtractorInceptionV3` asked for both
layers at once (`miscc.inception`, `miscc.features`), and the metric math is torch-fidelity's
own (`miscc.statistics`), so the numbers equal `torch_fidelity.calculate_metrics` on the same
inputs and weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from miscc.features import as_dataset, extract
from miscc.inception import Inception, Log, MetricsError, load_inception, log_stderr
from miscc.statistics import (
    Stats,
    cached_real_stats,
    check_enough_for_dims,
    frechet_distance,
    inception_score,
    is_stats_file,
    kernel_inception_distance,
    load_stats,
    save_stats,
    statistics,
)


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
                inception: Inception | None = None, log: Log = log_stderr) -> dict[str, Any]:
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
                       log: Log = log_stderr) -> dict[str, Any]:
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
               log: Log = log_stderr) -> dict[str, Any]:
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

