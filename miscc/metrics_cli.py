"""Command-line helpers of fid_score.py and inception_score.py: `--data` targets, shared
options, device choice, output and error handling.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from miscc.inception import MetricsError, inception_filename
from miscc.metrics import human_lines
from miscc.statistics import stats_cache_path
from miscc.utils import run_command, select_device

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_CHOICES = ("bird", "birds", "coco", "shapes")


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
    from datasets import cache_root

    cache = stats_cache_path(cache_root(cfg), str(cfg.DATASET_NAME), split, size, dims)
    return DataTarget(gen_dir=gen_dir, real=real, cache_path=cache, size=size,
                      dataset_name=str(cfg.DATASET_NAME))



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
