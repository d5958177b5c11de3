"""Stage 2 command line: DM-GAN on frozen CLIP features (docs/DESIGN.md §8).

    python main.py --cfg cfg/clip_shapes_DMGAN.yml          # train (TRAIN.FLAG: True); resumes
    python main.py --cfg cfg/eval_clip_shapes.yml           # test set + R-precision + CLIP score
    python main.py --cfg cfg/eval_clip_shapes.yml --set B_VALIDATION=False [--captions FILE]
    torchrun --nproc_per_node 2 main.py --cfg ... --gpu -1  # distributed (gloo on CPU)
"""

from __future__ import annotations

from miscc.config import build_parser, config_from_args
from miscc.training import USER_ERRORS, start_process
from miscc.utils import EXIT_INTERRUPTED, is_main_process, run_command
from trainer import GANTrainer


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, pick the mode from TRAIN.FLAG / B_VALIDATION, run it. Exit codes: 0
    done, 2 a config/data/checkpoint/weights problem (an `error:` line on stderr), 3 a
    non-finite loss, 75 stopped by a signal with the resume state saved (re-run to continue)."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true",
                        help="start training over (removes this run's checkpoints)")
    parser.add_argument("--captions", default=None, metavar="FILE",
                        help="custom-caption mode: one caption per line (default: the files "
                             "listed in <DATA_DIR>/example_filenames.txt)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rank, world, device = start_process(cfg)

    def body() -> int | None:
        if cfg.TRAIN.FLAG:
            trainer = GANTrainer(cfg, device, rank, world, fresh=args.fresh,
                                 progress=not args.no_progress)
            summary = trainer.train()
            if summary["interrupted"]:
                return EXIT_INTERRUPTED
            if is_main_process():
                print(f"done: epoch {summary['epoch']}, step {summary['step']}; checkpoints in "
                      f"{trainer.model_dir}, sample grids in {trainer.image_dir}")
            return None
        from miscc.export import use_export

        use_export(cfg, "TRAIN.NET_G")  # TRAIN.NET_G may name an export of export.py
        if cfg.B_VALIDATION:
            from sampling import generate_test_set

            generate_test_set(cfg, device, progress=not args.no_progress)
        else:
            from sampling import generate_custom

            if is_main_process():
                generate_custom(cfg, device, args.captions)
        return None

    return run_command(body, USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
