"""Peak memory of building the caption-feature cache at COCO's size: the text tower's outputs
are streamed to disk batch by batch (`text_features.encode_all_captions`), so the resident
set stays flat however many captions there are.

    python bench/bench_scale.py                       # COCO train: 82,783 images x 5 captions
    python bench/bench_scale.py --images 1000 --dim 64 --out /tmp/x   # small (the tests)

A tiny random text tower (2 layers, width 64) projects to `--dim` (512 = ViT-B/32's joint
space); tokens are random with the end token at `--length`. Prints the arrays' sizes, the
minutes, the peak RSS of this process, and what the earlier in-memory build would have held
(every array at once plus the serialised copy of the word features), estimated from the
sizes. Deletes the cache afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model import ClipEncoder
from text_features import encode_all_captions


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=82783)
    parser.add_argument("--captions", type=int, default=5, help="per image")
    parser.add_argument("--length", type=int, default=20,
                        help="word tokens per caption (SOT and EOT come on top: 22)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="cache folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = {"embed_dim": args.dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                           "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 2}}
    encoder = ClipEncoder({"model": "bench", "pretrained": "", "arch": arch}, adapter=False,
                          load_weights=False).eval()
    n, c, length = args.images, args.captions, args.length
    tokens = torch.zeros(n, c, length + 2, dtype=torch.long)
    tokens[..., 0] = 49406  # start
    tokens[..., 1:-1] = torch.randint(1, 49405, (n, c, length))
    tokens[..., -1] = 49407  # end (the highest id: where the pooled feature is read)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    folder = base / "text_bench"
    before = peak_rss_bytes()
    start = time.perf_counter()
    shapes = encode_all_captions(encoder, tokens, torch.device("cpu"), folder,
                                 batch=args.batch, progress=False)
    minutes = (time.perf_counter() - start) / 60
    peak = peak_rss_bytes()
    words = n * c * (length + 2) * args.dim * 2
    sent = n * c * args.dim * 4
    mask = n * c * (length + 2)
    print(f"{n * c:,} captions x {length + 2} tokens x {args.dim}: words "
          f"{words / 1e9:.2f} GB (fp16), sent {sent / 1e9:.2f} GB, mask {mask / 1e9:.3f} GB; "
          f"files {shapes['words']}")
    print(f"streamed build: {minutes:.2f} min, peak RSS {peak / 1e9:.2f} GB ({peak >> 20} MB; "
          f"{before >> 20} MB before the build)")
    print(f"earlier in-memory build (estimated): every array + a serialised copy of the word "
          f"features = {(2 * words + sent + mask) / 1e9:.2f} GB on top of the "
          f"{before / 1e9:.2f} GB start")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
