"""Data preparation: generate the shapes set, validate a data directory, build the image cache.

    python prepare_data.py shapes --out data/shapes
    python prepare_data.py check --cfg cfg/DAMSM/shapes.yml
    python prepare_data.py cache --cfg cfg/clip_shapes_DMGAN.yml
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from datasets import (
    SHAPES_VERSION,
    DataError,
    build_image_cache,
    image_sizes,
    load_image,
    load_size_for,
    make_shapes_dataset,
    read_split,
)
from miscc.config import add_common_args, config_from_args
from miscc.utils import atomic_write_bytes, disk_writes, run_command

SHAPES_MARKER = "shapes.json"  # the generator's parameters, written once the set is complete


def cmd_shapes(args: argparse.Namespace) -> None:
    """Write the synthetic shapes set, unless the same set is already complete at --out."""
    params = {"n_train": args.n_train, "n_test": args.n_test, "size": args.size,
              "seed": args.seed, "version": SHAPES_VERSION}
    marker = Path(args.out) / SHAPES_MARKER
    if not args.force and marker.is_file() and json.loads(marker.read_text()) == params:
        print(f"shapes set already complete at {args.out} ({marker.name} matches); "
              "--force rewrites it")
        return
    marker.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    stale = Path(args.out) / "cache"  # image/text caches of the previous pictures
    if stale.is_dir():
        shutil.rmtree(stale)
        print(f"removed the caches of the previous set: {stale}")
    with disk_writes(args.out):  # a full disk or a read-only place: one `error:` line
        summary = make_shapes_dataset(args.out, args.n_train, args.n_test, args.size,
                                      args.seed)
    atomic_write_bytes(marker, json.dumps(params).encode())  # written last: the set is whole
    print(f"wrote shapes set to {args.out}: {summary['train']} train / {summary['test']} test "
          f"images of {summary['size']}px, {summary['classes']} classes")


def cmd_check(cfg) -> int:
    """Validate both splits, decoding every image; print a summary. Returns the exit code."""
    from tqdm import tqdm

    problems = 0
    print(f"data directory: {cfg.DATA_DIR} ({cfg.DATASET_NAME})")
    for split in ("train", "test"):
        info = read_split(cfg, split)
        caps = Counter(len(c) for c in info.captions)
        corrupt = []
        for path, box in tqdm(list(zip(info.image_paths, info.boxes, strict=True)),
                              desc=f"check {split}", leave=False):
            try:
                load_image(path, box, 8)
            except (OSError, ValueError, SyntaxError):
                corrupt.append(str(path))
        print(f"[{split}] images: {len(info.keys)} usable, {len(info.skipped_missing)} missing "
              f"files, {len(info.skipped_no_caption)} without captions, {len(corrupt)} corrupt")
        print(f"[{split}] captions per image: "
              + ", ".join(f"{n}: {c} images" for n, c in sorted(caps.items()))
              + f"; empty caption lines ignored: {info.empty_lines}")
        print(f"[{split}] classes: {len(set(info.class_ids))}")
        for key in info.skipped_missing[:10]:
            print(f"  missing: {key}")
        for path in corrupt[:10]:
            print(f"  corrupt: {path}")
        problems += len(corrupt) + len(info.skipped_missing) + len(info.skipped_no_caption)
    print("OK" if problems == 0 else f"{problems} problem(s) found (these images are skipped)")
    return 0


def cmd_cache(cfg) -> None:
    """Build the memory-mapped caches the training/evaluation datasets will read."""
    sizes = image_sizes(cfg)
    train_size = load_size_for(sizes) if cfg.TRAIN.RANDOM_CROP else max(sizes)
    for split, size in (("train", train_size), ("test", max(sizes))):
        index = build_image_cache(cfg, split, size)
        print(f"[{split}] cached {len(index['keys'])} images at {size}px "
              f"({len(index['bad'])} unreadable)")


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Exit codes: 0 done, 2 a data problem or a write that failed for space
    or permission (an `error:` line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="generate the synthetic shapes set (CUB layout)")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--n-train", type=int, default=800)
    shapes.add_argument("--n-test", type=int, default=200)
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--force", action="store_true",
                        help="rewrite the set even if the same one is already complete")
    add_common_args(sub.add_parser("check", help="validate a data directory"))
    add_common_args(sub.add_parser("cache", help="build the preprocessed image cache"))
    args = parser.parse_args(argv)
    if args.command == "shapes":
        return run_command(lambda: cmd_shapes(args), (DataError,))
    cfg = config_from_args(args)

    def body() -> int | None:
        return cmd_check(cfg) if args.command == "check" else cmd_cache(cfg)

    return run_command(body, (DataError,))


if __name__ == "__main__":
    sys.exit(main())
