"""Fréchet Inception Distance (and KID, and IS of the generated set) with torch-fidelity's
TF-faithful Inception-v3, one pass per image, the real set's statistics cached.

    python fid_score.py --path GEN_DIR REAL_DIR            # folders, searched recursively
    python fid_score.py --path GEN_DIR real_stats.npz      # precomputed real statistics
    python fid_score.py --path REAL_DIR --save-stats real_stats.npz   # compute + save only
    python fid_score.py --data bird --dims 2048 --batch_size 32  # cfg/eval_clip_bird.yml paths
    python fid_score.py --data bird --kid --isc --json --weights PATH/TO/weights-inception.pth

The weights file is torch-fidelity's weights-inception-2015-12-05-6726825d.pth.
"""

from __future__ import annotations

import argparse
import sys

from miscc.inception import DIMS_CHOICES, MetricsError
from miscc.metrics import compute_fid, compute_stats_file
from miscc.metrics_cli import (
    add_common_args,
    device_from_arg,
    emit,
    load_data_config,
    resolve_data,
    run_cli,
)
from miscc.statistics import is_stats_file


def build_parser() -> argparse.ArgumentParser:
    """Shared config options (miscc.config) plus the metric options."""
    from miscc.config import build_parser as base_parser

    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--path", nargs="+", metavar="PATH", default=None,
                        help="GEN REAL: image folders (recursive) or .npz statistics; a single "
                             "folder with --save-stats only saves its statistics; with --data, "
                             "a single folder replaces the generated set")
    parser.add_argument("--dims", type=int, choices=DIMS_CHOICES, default=2048,
                        help="Inception pool features to use (default 2048)")
    parser.add_argument("--save-stats", dest="save_stats", default=None, metavar="OUT.npz",
                        help="save the real set's statistics (with --kid: also its features)")
    parser.add_argument("--kid", action="store_true", help="also report KID")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--isc", action="store_true",
                        help="also report the IS of the generated set (same pass)")
    parser.add_argument("--splits", type=int, default=10, help="IS splits (default 10)")
    parser.add_argument("--allow-few-images", action="store_true",
                        help="compute FID even with fewer images than --dims + 1")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, resolve the inputs, compute, print (text lines or one JSON object)."""
    args = build_parser().parse_args(argv)
    paths = args.path or []
    use_cfg = bool(args.data or args.cfg_file or args.print_config)

    def body() -> int:
        if len(paths) > 2:
            raise MetricsError("--path takes GEN REAL (two paths) or one folder")
        if not paths and not use_cfg:
            raise MetricsError("give --path GEN REAL, or --data bird|coco|shapes (or --cfg)")
        cfg = load_data_config(args) if use_cfg else None
        device = device_from_arg(args.gpu_id, cfg)
        common = dict(dims=args.dims, batch_size=args.batch_size, device=device,
                      weights=args.weights, workers=args.workers,
                      progress=not args.no_progress, allow_few=args.allow_few_images)
        fid_opts = dict(kid=args.kid, isc=args.isc, splits=args.splits,
                        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                        save_real_stats=args.save_stats)
        if cfg is not None and len(paths) < 2:
            target = resolve_data(cfg, args.dims, cfg_file=args.cfg_file)
            gen = paths[0] if paths else target.gen_dir
            result = compute_fid(gen, target.real, cache_path=target.cache_path,
                                 **common, **fid_opts)
            result["real"] = f"{target.dataset_name} test split at {target.size}px"
        elif len(paths) == 1:
            if not args.save_stats:
                raise MetricsError("one --path computes statistics only: add --save-stats "
                                   "OUT.npz, or give --path GEN REAL")
            result = compute_stats_file(paths[0], args.save_stats, keep_features=args.kid,
                                        **common)
            if not args.json:
                print(f"saved: {result['saved_stats']} ({result['n']} images, "
                      f"{result['dims']}-d)")
        else:
            gen, real = paths
            if args.save_stats and is_stats_file(real):
                raise MetricsError(f"--save-stats: REAL {real} is already a statistics file")
            result = compute_fid(gen, real, **common, **fid_opts)
        emit(result, args.json)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
