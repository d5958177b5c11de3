"""Build assets/shapes_side_by_side.png, README's picture: DM-GAN and CLIP-GEN drawing the
same shapes test captions, from the runs `make demo` and `make demo-clipgen` leave.

    python assets/side_by_side.py [--dmgan output/shapes_DMGAN] [--clipgen output/shapes_CLIPGEN]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import miscc  # noqa: F401  (sets the OpenMP wait policy before torch is imported)

CAPTIONS = ["a large red star in the top left on a black background",
            "a small blue circle in the center on a white background",
            "a large green triangle in the bottom left on a gray background",
            "a small purple cross in the top right on a white and gray background"]


def main(argv: list[str] | None = None) -> int:
    """Draw CAPTIONS once with each generator and write the two captioned grids side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dmgan", default="output/shapes_DMGAN")
    parser.add_argument("--clipgen", default="output/shapes_CLIPGEN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="assets/shapes_side_by_side.png")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image, ImageDraw

    from drawing import draw
    from miscc.pictures import caption_grid

    panels = []
    for title, run in (("DM-GAN", args.dmgan), ("CLIP-GEN", args.clipgen)):
        images = draw(run, CAPTIONS, n=1, seed=args.seed)[:, 0]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        grid = caption_grid(x, CAPTIONS, columns=2, cell=96)
        panel = Image.new("RGB", (grid.width, grid.height + 16), "white")
        panel.paste(grid, (0, 16))
        ImageDraw.Draw(panel).text((4, 2), title, fill="black")
        panels.append(panel)
    gap = 12
    sheet = Image.new("RGB", (sum(p.width for p in panels) + gap, max(p.height for p in panels)),
                      "white")
    sheet.paste(panels[0], (0, 0))
    sheet.paste(panels[1], (panels[0].width + gap, 0))
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
