"""Inception Score (mean ± std over splits) with torch-fidelity's TF-faithful Inception-v3.

    python inception_score.py --path GEN_DIR --splits 10        # folder, searched recursively
    python inception_score.py --data bird --batch_size 32  # <OUTPUT_DIR>/valid/single of the cfg
    python inception_score.py --path GEN_DIR --json --weights PATH/TO/weights-inception.pth
"""

from __future__ import annotations

import argparse
import sys

from miscc.inception import MetricsError
from miscc.metrics import compute_is
from miscc.metrics_cli import (
    add_common_args,
    device_from_arg,
    emit,
    load_data_config,
    resolve_generated_dir,
    run_cli,
)


def build_parser() -> argparse.ArgumentParser:
    """Shared config options (miscc.config) plus the metric options."""
    from miscc.config import build_parser as base_parser

    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=None, metavar="DIR",
                        help="image folder (searched recursively)")
    parser.add_argument("--splits", type=int, default=10, help="IS splits (default 10)")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, resolve the folder, compute IS, print (text line or one JSON object)."""
    args = build_parser().parse_args(argv)
    use_cfg = bool(args.data or args.cfg_file or args.print_config)

    def body() -> int:
        if args.path is None and not use_cfg:
            raise MetricsError("give --path DIR, or --data bird|coco|shapes (or --cfg)")
        path, cfg = args.path, None
        if path is None or args.print_config:
            cfg = load_data_config(args)
            path = path or resolve_generated_dir(cfg, args.cfg_file)
        device = device_from_arg(args.gpu_id, cfg)
        result = compute_is(path, splits=args.splits, batch_size=args.batch_size,
                            device=device, weights=args.weights, workers=args.workers,
                            progress=not args.no_progress)
        emit(result, args.json)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
