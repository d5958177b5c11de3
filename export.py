"""Export a trained generator as one self-contained folder (docs/DESIGN.md §15).

    python export.py output/shapes_DMGAN ~/models/shapes-dmgan
    python export.py output/shapes_CLIPGEN ~/models/shapes-clipgen
    python generate.py ~/models/shapes-dmgan "a red star"       # draws from the folder alone
    hf upload <user>/shapes-dmgan ~/models/shapes-dmgan          # publish it on the Hub

RUN is what generate.py takes (a run folder, its Model/ or a checkpoint). The folder holds the
generator (DM-GAN's EMA, or CLIP-GEN's transformer), the stage-1 encoder and CLIP-GEN's tokenizer
as safetensors, the resolved config, the run's metrics and a model card (README.md with the
Hub's YAML header). Nothing in it refers back to the training tree.
"""

from __future__ import annotations

import argparse

from miscc.training import USER_ERRORS
from miscc.utils import run_command


def main(argv: list[str] | None = None) -> int:
    """Export RUN into OUT. Exit codes: 0 done, 2 a missing run, checkpoint or an OUT that is
    neither empty nor an export (an `error:` line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN", help="a DM-GAN or CLIP-GEN run folder or checkpoint")
    parser.add_argument("out", metavar="OUT", help="the export folder (new, empty or an export)")
    args = parser.parse_args(argv)

    def body() -> None:
        from miscc.export import MANIFEST, export_run, open_export

        out = export_run(args.run, args.out)
        exported = open_export(out)
        print(f"exported the {exported.kind} generator of {args.run} to {out}/ "
              f"({', '.join(sorted(p.name for p in exported.files.values()))}, config.yml, "
              f"README.md, {MANIFEST})")

    return run_command(body, USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
