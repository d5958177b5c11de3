"""Benchmark: FID + IS + KID in one Inception pass vs. one pass per metric, on the same images.

    python bench/bench_metrics.py [--n 40] [--size 64] [--dims 2048] [--gpu -1] [--weights PATH]
                                  [--threads N]

One pass (miscc.metrics.compute_fid with kid+isc): every generated image goes through the
network once for pool features + logits, every real image once for pool features. Baselines:
  separate passes      the same extractor, one pass per metric (IS: gen; FID: gen+real;
                       KID: gen+real), i.e. what three independent scripts do;
  calculate_metrics x3 torch_fidelity.calculate_metrics called once per metric (cache off).
Without --weights it uses torch-fidelity's weights from the torch hub cache when present and
otherwise a random-weight Inception (offline; the speed is the same, the values meaningless).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miscc.features import extract  # noqa: E402
from miscc.inception import (  # noqa: E402
    DIMS_CHOICES,
    hub_weights_path,
    load_inception,
    save_random_inception,
)
from miscc.metrics import compute_fid  # noqa: E402
from miscc.metrics_cli import device_from_arg  # noqa: E402
from miscc.statistics import (  # noqa: E402
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    statistics,
)


def write_images(folder: Path, n: int, size: int, bright: bool, seed: int) -> Path:
    """n blob images (bright-on-dark or dark-on-bright) as PNG files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = np.full((size, size, 3), 20.0 if bright else 200.0, np.float32)
        for _ in range(3):
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(size / 10, size / 3.5)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(
                *(100, 255) if bright else (0, 120), 3)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40, help="images per set (default 40)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    parser.add_argument("--dims", type=int, choices=DIMS_CHOICES, default=2048)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--gpu", type=int, default=-1, help="-1 = CPU (default)")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--workers", type=int, default=0,
                        help="loader processes for ours; >0 lets torch-fidelity use its own "
                             "min(4, 2*cpus) (default 0 = in process for both)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op CPU threads (default: torch's choice); 1 avoids "
                             "OpenMP spin-waits on a small CPU shared with other jobs")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_from_arg(args.gpu)
    n, bs, dims = args.n, args.batch_size, args.dims
    with tempfile.TemporaryDirectory() as tmp:
        gen = write_images(Path(tmp) / "gen", n, args.size, True, 0)
        real = write_images(Path(tmp) / "real", n, args.size, False, 1)
        weights = args.weights
        label = "given weights"
        if weights is None and hub_weights_path().is_file():
            weights, label = str(hub_weights_path()), "torch-fidelity weights"
        elif weights is None:
            weights, label = str(save_random_inception(Path(tmp) / "w.pth")), "random weights"
        quiet = {"progress": False, "log": lambda msg: None, "workers": args.workers}
        kid_size = min(n, 1000)
        print(f"device {device}, {n} generated + {n} real images of {args.size}px, dims {dims}, "
              f"batch {bs}, workers {args.workers}, {label}, "
              f"torch threads {torch.get_num_threads()}")

        # one pass, all metrics (Inception built once, outside the timing, as for the baseline)
        full = load_inception(dims, logits=True, weights=weights, device=device)
        extract(gen, full, bs, **quiet)  # warm-up (allocator, kernels, page cache)
        ours, t_one = timed(lambda: compute_fid(
            gen, real, dims=dims, kid=True, isc=True, batch_size=bs, inception=full,
            kid_subset_size=kid_size, allow_few=True, **quiet))

        # separate passes with the same extractor: IS (gen), FID (gen, real), KID (gen, real)
        pool = load_inception(dims, logits=False, weights=weights, device=device)

        def separate() -> dict:
            g0 = extract(gen, full, bs, **quiet)
            is_mean, _ = inception_score(g0.logits, 10)
            g1, r1 = extract(gen, pool, bs, **quiet), extract(real, pool, bs, **quiet)
            fid = frechet_distance(statistics(g1.pool), statistics(r1.pool))
            g2, r2 = extract(gen, pool, bs, **quiet), extract(real, pool, bs, **quiet)
            kid = kernel_inception_distance(g2.pool, r2.pool, 100, kid_size, lambda m: None)
            passes = sum(f.seconds for f in (g0, g1, r1, g2, r2))
            return {"fid": fid, "is_mean": is_mean, "kid_mean": kid[0], "passes_s": passes}

        sep, t_sep = timed(separate)

        # torch_fidelity.calculate_metrics, one call per metric
        import torch_fidelity

        common = {"feature_extractor_weights_path": weights, "cuda": device.type == "cuda",
                  "batch_size": bs, "cache": False, "verbose": False,
                  "save_cpu_ram": args.workers == 0,
                  "feature_layer_fid": str(dims), "feature_layer_kid": str(dims)}

        def fidelity() -> dict:
            out = torch_fidelity.calculate_metrics(input1=str(gen), isc=True, **common)
            out |= torch_fidelity.calculate_metrics(input1=str(gen), input2=str(real), fid=True,
                                                    **common)
            out |= torch_fidelity.calculate_metrics(input1=str(gen), input2=str(real), kid=True,
                                                    kid_subset_size=kid_size, **common)
            return out

        tf, t_tf = timed(fidelity)

    images = 2 * n
    ours_passes = ours["inception_seconds"] + ours["real_inception_seconds"]
    print(f"{'method':<34}{'passes':>7}{'total s':>9}{'in passes s':>13}{'images/s':>10}"
          f"{'ratio':>8}")
    for name, passes, secs, in_passes in (
            ("one pass (FID+IS+KID)", 2, t_one, f"{ours_passes:.2f}"),
            ("separate passes, same extractor", 5, t_sep, f"{sep['passes_s']:.2f}"),
            ("calculate_metrics x3", 5, t_tf, "-")):
        print(f"{name:<34}{passes:>7}{secs:>9.2f}{in_passes:>13}{images / secs:>10.1f}"
              f"{secs / t_one:>7.2f}x")
    print("ratio = total seconds / one-pass total seconds (higher: the one pass is that much "
          "faster); images/s counts the 2n distinct images; 'in passes' = Inception passes "
          "incl. decoding, the rest is the metric math (FID's 2048x2048 eigenvalues, KID)")
    print(f"one pass:          FID {ours['fid']:.6g}  IS {ours['is_mean']:.6g}  "
          f"KID {ours['kid_mean']:.6g}")
    print(f"separate passes:   FID {sep['fid']:.6g}  IS {sep['is_mean']:.6g}  "
          f"KID {sep['kid_mean']:.6g}")
    print(f"calculate_metrics: FID {tf['frechet_inception_distance']:.6g}  "
          f"IS {tf['inception_score_mean']:.6g}  KID {tf['kernel_inception_distance_mean']:.6g}")


if __name__ == "__main__":
    main()
