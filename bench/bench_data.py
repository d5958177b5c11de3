"""Dataset items/s with and without the prepare_data.py image cache (same run, same items).

    python bench/bench_data.py [--n 400 --size 128]
Prints items/s for on-the-fly JPEG decoding vs the memory-mapped cache and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from datasets import (
    CaptionTokenizer,
    TextImageDataset,
    build_image_cache,
    load_size_for,
    make_shapes_dataset,
)
from miscc.config import load_config


def items_per_second(ds: TextImageDataset, n: int) -> float:
    torch.manual_seed(0)
    start = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images in the synthetic set")
    parser.add_argument("--size", type=int, default=256, help="image side (px) on disk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_shapes_dataset(tmp, n_train=args.n, n_test=2, size=args.size, seed=0)
        cfg = load_config(None, [f"DATA_DIR={tmp}", "DATASET_NAME=shapes", "TREE.BASE_SIZE=64",
                                 "TREE.BRANCH_NUM=2", "TEXT.WORDS_NUM=20"], quiet=True)
        sizes = [64, 128]
        tok = CaptionTokenizer(20)
        plain = TextImageDataset(cfg, "train", tok, sizes, use_cache=False)
        start = time.perf_counter()
        build_image_cache(cfg, "train", load_size_for(sizes), progress=False)
        build_s = time.perf_counter() - start
        cached = TextImageDataset(cfg, "train", tok, sizes)
        assert cached.cache is not None
        slow = items_per_second(plain, args.n)
        fast = items_per_second(cached, args.n)
    print(f"images {args.n} at {args.size}px on disk, scales {sizes}, 1 thread of work")
    print(f"decode per item : {slow:8.1f} items/s")
    print(f"image cache     : {fast:8.1f} items/s   (cache built once in {build_s:.1f} s)")
    print(f"ratio cache/decode: {fast / slow:.2f}x")


if __name__ == "__main__":
    main()
