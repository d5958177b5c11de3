"""Stage 1 command line: fine-tune CLIP with DAMSM + NT-Xent losses (docs/DESIGN.md §7).

    python pretrain_DAMSM.py --cfg cfg/DAMSM/bird.yml --gpu 0        # resumes when re-run
    python pretrain_DAMSM.py --cfg cfg/DAMSM/shapes.yml --fresh      # start over
    torchrun --nproc_per_node 2 pretrain_DAMSM.py --cfg ... --gpu -1  # distributed (gloo on CPU)

Writes <OUTPUT_DIR>/Model/clip<epoch>.pth (the encoder stage 2 loads via TRAIN.NET_E) and
state_step_<step>.pth (resume state), Image/attention_*.png, logs/ (TensorBoard), config.yml.
"""

from __future__ import annotations

from miscc.config import build_parser, config_from_args
from miscc.damsm import DAMSMTrainer
from miscc.training import USER_ERRORS, start_process
from miscc.utils import EXIT_INTERRUPTED, is_main_process, run_command


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train (or resume), print where the checkpoints are. Exit codes: 0 done,
    2 a config/data/checkpoint/weights problem (an `error:` line on stderr), 3 a non-finite
    loss, 75 stopped by a signal with the resume state saved (re-run to continue)."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true",
                        help="start over (removes this run's checkpoints, logs and pictures)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rank, world, device = start_process(cfg)

    def body() -> int | None:
        trainer = DAMSMTrainer(cfg, device, rank, world, fresh=args.fresh,
                               progress=not args.no_progress)
        summary = trainer.train()
        if summary["interrupted"]:
            return EXIT_INTERRUPTED
        if is_main_process():
            val = summary["val"]
            score = f", val R@1 {val['R1']:.3f}" if val else ""
            print(f"done: epoch {summary['epoch']}, step {summary['step']}{score}; "
                  f"encoder checkpoints in {trainer.model_dir}")

    return run_command(body, USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
