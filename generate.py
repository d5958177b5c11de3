"""Draw your own captions with a trained DM-GAN or CLIP-GEN generator.

    python generate.py output/shapes_DMGAN "a large red star in the top left on a black background"
    python generate.py output/shapes_CLIPGEN "a small blue circle" "a green cross" --n 4 --seed 7
    python generate.py output/birds_DMGAN/Model/netG_epoch_600.pth --captions my_birds.txt
    echo "a red bird with black wings" | python generate.py output/birds_DMGAN -

    python generate.py ~/models/shapes-dmgan "a red star"              # an export (export.py)
    python generate.py owner/shapes-dmgan "a red star"                 # the same on the Hub
    python generate.py output/shapes_DMGAN "a dog" --n 100000          # streams, resumable

RUN is the folder main.py or train_clipgen.py wrote (its newest generator checkpoint is used),
one checkpoint file, an export folder of export.py, or the Hugging Face Hub id of one (fetched
into huggingface_hub's cache); a run's config.yml names the encoder (and tokenizer) to load.
Writes <out>/<i>_<caption>_<j>.png for each caption i and draw j as soon as it is drawn (a
re-run skips the files already there) and <out>/grid.png of the first 48.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import miscc  # noqa: F401  (sets the OpenMP wait policy before torch is imported)
from miscc.config import ConfigError
from miscc.training import USER_ERRORS
from miscc.utils import run_command


def read_captions(args: argparse.Namespace) -> list[str]:
    """Captions from the command line, `--captions FILE` and `-` (standard input), in that
    order; blank lines are skipped."""
    lines: list[str] = []
    for item in args.captions:
        if item == "-":
            lines += sys.stdin.read().splitlines()
        else:
            lines.append(item)
    if args.captions_file:
        path = Path(args.captions_file)
        if not path.is_file():
            raise ConfigError(f"--captions: caption file not found: {path}")
        try:
            lines += path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ConfigError(f"--captions: {path} is not a text file (UTF-8, one caption per "
                              f"line): byte {err.start} cannot be read") from err
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise ConfigError("no captions given: type them after RUN, pass --captions FILE "
                          "(one per line) or - to read standard input")
    return captions


def default_out(folder: Path, given: str) -> Path:
    """<run>/generated for a run; ./generated/<name> for an export or a Hub model, whose folder
    is a model to hand on (or huggingface_hub's cache), not a place for drawings."""
    from miscc.export import is_export

    return Path("generated") / Path(given).name if is_export(folder) else folder / "generated"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, draw every caption `--n` times, write the PNGs and the grid. Exit
    codes: 0 done, 2 a missing run, checkpoint, config or caption file (an `error:` line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN",
                        help="a DM-GAN or CLIP-GEN run folder (OUTPUT_DIR) or checkpoint")
    parser.add_argument("captions", nargs="*", metavar="CAPTION",
                        help="captions to draw; - reads one per line from standard input")
    parser.add_argument("--captions", dest="captions_file", metavar="FILE",
                        help="a text file with one caption per line")
    parser.add_argument("--n", type=int, default=1, help="images per caption (default 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the draws (default: the run's SEED)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <run folder>/generated; for an export "
                             "./generated/<its name>)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="GPU index, -1 for the CPU (default: GPU 0 when CUDA is available)")
    parser.add_argument("--batch", type=int, default=64,
                        help="images drawn at a time (memory stays that of one batch)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")

    def body() -> None:
        import torch

        from drawing import Drawer, find_run, write_stream
        from miscc.utils import select_device

        captions = read_captions(args)
        gpu = args.gpu if args.gpu is not None else (0 if torch.cuda.is_available() else -1)
        device = select_device(gpu)
        run = find_run(args.run)
        if device.type == "cpu" and int(run.cfg.CPU_THREADS) > 0:
            torch.set_num_threads(int(run.cfg.CPU_THREADS))
        print(f"{run.kind}: {run.checkpoint}")
        out = Path(args.out) if args.out else default_out(run.folder, args.run)
        written, skipped, grid = write_stream(Drawer(run, device), captions, args.n, out,
                                              args.seed, args.batch,
                                              progress=not args.no_progress)
        kept = f" ({skipped} already there)" if skipped else ""
        print(f"wrote {written} images to {out}/{kept} and the grid {grid}")

    return run_command(body, USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
