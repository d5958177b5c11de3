"""A local page that draws a typed caption with DM-GAN and CLIP-GEN side by side.

    make app                                   # installs requirements-app.txt, serves :7860
    python app.py [--dmgan output/shapes_DMGAN] [--clipgen output/shapes_CLIPGEN] [--port 7860]

Each run is a folder main.py / train_clipgen.py wrote, or one of its checkpoints; both are
loaded once. The page shows each generator's images with their CLIP scores, DM-GAN's stage-1
word-attention map, and example captions of the test split (docs/DESIGN.md §16).
"""

from __future__ import annotations

import argparse
import os

import miscc  # noqa: F401  (sets the OpenMP wait policy before torch is imported)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page: no calls home

CSS = ".pixels img { image-rendering: pixelated; }"  # 32 px drawings, shown larger


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The runs, device and port."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dmgan", default="output/shapes_DMGAN",
                        help="DM-GAN run folder or netG checkpoint (default: the demo's)")
    parser.add_argument("--clipgen", default="output/shapes_CLIPGEN",
                        help="CLIP-GEN run folder or gpt checkpoint (default: the demo's)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="GPU index, -1 for the CPU (default: GPU 0 when CUDA is available)")
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (7860)")
    return parser.parse_args(argv)


def build_page(sides: list, examples: list[str], seed: int):
    """The gradio Blocks: caption, count and seed in; per generator a gallery and its scores;
    DM-GAN's attention map; example captions that fill the box."""
    import gradio as gr

    from comparison import score_line

    def answer(caption: str, n: float, seed: float) -> list:
        out: list = []
        attention = None
        for side in sides:
            got = side.answer(caption, int(n), int(seed))
            images = [] if got.images is None else [
                (img, f"draw {j}") for j, img in enumerate(got.images)]
            out += [images, score_line(got)]
            attention = got.attention if got.attention is not None else attention
        return [*out, attention]

    with gr.Blocks(title="DM-GAN and CLIP-GEN") as page:
        gr.Markdown("## Draw a caption with DM-GAN and CLIP-GEN")
        missing = [side.error for side in sides if side.error]
        gr.Markdown("  \n".join(f"**{m}**" for m in missing), elem_id="status")
        with gr.Row():
            caption = gr.Textbox(label="Caption", elem_id="caption", scale=4,
                                 placeholder="a large red star in the top left on a black "
                                             "background")
            n = gr.Slider(1, 8, value=4, step=1, label="Images", elem_id="n")
            seed_box = gr.Number(value=seed, precision=0, label="Seed", elem_id="seed")
        button = gr.Button("Draw", variant="primary", elem_id="draw")
        if examples:
            gr.Examples([[c] for c in examples], inputs=[caption], label="Test captions")
        outputs = []
        with gr.Row():
            for side in sides:
                key = side.kind.lower().replace("-", "")
                with gr.Column():
                    gr.Markdown(f"### {side.kind}")
                    outputs.append(gr.Gallery(label=side.kind, elem_id=f"{key}-images",
                                              elem_classes="pixels", columns=4, format="png",
                                              allow_preview=False, height=280))
                    outputs.append(gr.Markdown(elem_id=f"{key}-scores"))
        outputs.append(gr.Image(label="DM-GAN stage-1 word attention over draw 0",
                                elem_id="attention", format="png"))
        button.click(answer, [caption, n, seed_box], outputs)
        caption.submit(answer, [caption, n, seed_box], outputs)
    return page


def main(argv: list[str] | None = None) -> int:
    """Load both runs once and serve the page on 127.0.0.1 until interrupted."""
    args = parse_args(argv)
    import torch

    from comparison import Side, example_captions
    from drawing import CLIPGEN, DMGAN
    from miscc.utils import select_device

    gpu = args.gpu if args.gpu is not None else (0 if torch.cuda.is_available() else -1)
    device = select_device(gpu)
    sides = [Side(DMGAN, args.dmgan, device), Side(CLIPGEN, args.clipgen, device)]
    loaded = [side for side in sides if side.drawer is not None]
    for side in sides:
        print(side.error or f"{side.kind}: {side.drawer.run.checkpoint}", flush=True)
    threads = max((int(s.drawer.run.cfg.CPU_THREADS) for s in loaded), default=0)
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    seed = int(loaded[0].drawer.run.cfg.SEED) if loaded else 0
    page = build_page(sides, example_captions(sides), seed)
    page.launch(server_name="127.0.0.1", server_port=args.port, css=CSS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
