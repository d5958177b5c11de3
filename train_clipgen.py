"""CLIP-GEN step 2: train the transformer on the token cache, then draw the test split.

    python train_clipgen.py --cfg cfg/clipgen_shapes.yml    # CPU demo; resumes when re-run
    python train_clipgen.py --cfg cfg/clipgen_coco.yml --gpu 0
    torchrun --nproc_per_node 8 train_clipgen.py --cfg cfg/clipgen_coco.yml
    python train_clipgen.py --cfg cfg/clipgen_shapes.yml --eval          # evaluate only
    python train_clipgen.py --cfg cfg/clipgen_shapes.yml --eval --set CLIPGEN.CONDITION=image
    python train_clipgen.py --cfg cfg/clipgen_shapes.yml --captions my_captions.txt

Training reads no caption: only the token cache (VQGAN tokens + CLIP image embeddings of
CLIPGEN.VIEWS seeded views of every training image, built on first use under CACHE_DIR).
Writes <OUTPUT_DIR>/Model/gpt_epoch_<N>.pth and state_step_<S>.pth (resume state),
Image/G_epoch_<N>.png (16 fixed captions), logs/ (TensorBoard), config.yml; then the test
split in valid/single/<key>_s<k>.png and metrics.json, read by r_precision.py, fid_score.py,
inception_score.py and the shapes judge like stage 2's.
"""

from __future__ import annotations

from miscc.config import build_parser, config_from_args
from miscc.training import USER_ERRORS, start_process
from miscc.utils import EXIT_INTERRUPTED, is_main_process, run_command


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; train (or resume) and evaluate, only evaluate (`--eval`), or draw custom
    captions (`--captions`). Exit codes: 0 done, 2 a config/data/checkpoint/weights problem (an
    `error:` line on stderr), 3 a non-finite loss, 75 stopped by a signal with the resume state
    saved (re-run to continue)."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true",
                        help="start training over (removes this run's checkpoints and logs)")
    parser.add_argument("--eval", action="store_true",
                        help="only draw and score the test split with CLIPGEN.NET (default: "
                             "this run's newest gpt_epoch_<N>.pth)")
    parser.add_argument("--captions", nargs="?", const="", default=None, metavar="FILE",
                        help="custom-caption grids: one caption per line (without FILE: the "
                             "files listed in <DATA_DIR>/example_filenames.txt)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rank, world, device = start_process(cfg)
    progress = not args.no_progress

    def body() -> int | None:
        from clipgen.generate import evaluate, generate_custom, has_captions
        from clipgen.trainer import CLIPGenTrainer

        if args.captions is not None or args.eval:
            from miscc.export import use_export

            use_export(cfg, "CLIPGEN.NET")  # CLIPGEN.NET may name an export of export.py
        if args.captions is not None:
            if is_main_process():
                generate_custom(cfg, device, args.captions or None)
            return None
        if args.eval:
            evaluate(cfg, device, progress)
            return None
        trainer = CLIPGenTrainer(cfg, device, rank, world, fresh=args.fresh, progress=progress)
        summary = trainer.train()
        if summary["interrupted"]:
            return EXIT_INTERRUPTED
        if trainer.main:
            print(f"done: epoch {summary['epoch']}, step {summary['step']}; checkpoints in "
                  f"{trainer.model_dir}, sample grids in {trainer.image_dir}")
        if not has_captions(cfg):
            if trainer.main:
                print(f"{cfg.DATA_DIR} has no captions: no test-split evaluation; draw text "
                      "prompts with --captions FILE")
            return None
        label = f"{trainer.model_dir} (step {summary['step']})"
        evaluate(cfg, device, progress, (trainer.gpt, trainer.vq, trainer.encoder, label))
        return None

    return run_command(body, USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
