"""CLIP-GEN step 1: train the VQGAN image tokenizer on images alone (docs/DESIGN.md §13).

    python train_vqgan.py --cfg cfg/VQGAN/shapes.yml   # CPU demo; resumes when re-run
    python train_vqgan.py --cfg cfg/VQGAN/coco.yml --gpu 0
    python train_vqgan.py --cfg cfg/VQGAN/imagenet.yml --data_dir /data/imagenet/train
    python train_vqgan.py --cfg cfg/VQGAN/shapes.yml --eval  # evaluate the newest checkpoint
    torchrun --nproc_per_node 8 train_vqgan.py --cfg cfg/VQGAN/coco.yml

Writes <OUTPUT_DIR>/Model/vqgan<epoch>.pth (the tokenizer train_clipgen.py loads) and
state_step_<step>.pth (resume state), Image/recon_epoch_<N>.png (inputs above reconstructions),
logs/ (TensorBoard), config.yml; at the end the test split's reconstructions in valid/single/
(for rFID with fid_score.py) and metrics.json (l1, psnr, codebook_usage).
"""

from __future__ import annotations

from clipgen.vq_losses import WeightsError
from miscc.config import build_parser, config_from_args
from miscc.training import USER_ERRORS, start_process
from miscc.utils import EXIT_INTERRUPTED, run_command


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train (or resume) and evaluate, or only evaluate (`--eval`). Exit
    codes: 0 done, 2 a config/data/checkpoint/weights problem (an `error:` line on stderr),
    3 a non-finite loss, 75 stopped by a signal with the resume state saved (re-run to continue)."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true",
                        help="start over (removes this run's checkpoints, logs and pictures)")
    parser.add_argument("--eval", action="store_true",
                        help="only reconstruct the test split with VQGAN.NET (default: this "
                             "run's newest vqgan<N>.pth) and write metrics.json")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rank, world, device = start_process(cfg)

    def body() -> int | None:
        from clipgen.vq_trainer import VQGANTrainer, evaluate_tokenizer

        if args.eval:
            evaluate_tokenizer(cfg, device, progress=not args.no_progress,
                               cfg_file=args.cfg_file)
            return
        trainer = VQGANTrainer(cfg, device, rank, world, fresh=args.fresh,
                               progress=not args.no_progress)
        summary = trainer.train()
        if summary["interrupted"]:
            return EXIT_INTERRUPTED
        if trainer.main:
            print(f"done: epoch {summary['epoch']}, step {summary['step']}; tokenizer "
                  f"checkpoints in {trainer.model_dir}")
        evaluate_tokenizer(cfg, device, trainer.vq, progress=not args.no_progress,
                           checkpoint=f"{trainer.model_dir} (step {summary['step']})",
                           cfg_file=args.cfg_file)

    return run_command(body, (*USER_ERRORS, WeightsError))


if __name__ == "__main__":
    raise SystemExit(main())
