"""Run one of the command lines with a failure injected (tests/test_failures.py):

    python tests/failing_command.py worker[:N] SCRIPT ARGS...   # a data-loader worker raises
    python tests/failing_command.py rank:R:S SCRIPT ARGS...     # process R raises at step S
    python tests/failing_command.py none SCRIPT ARGS...         # nothing injected
    python -m torch.distributed.run ... tests/failing_command.py rank:1:2 main.py ...

`worker[:N]`: each DataLoader worker reads N items (default 0), then every item it reads
raises (the main process reads normally, so only a worker fails). `rank:R:S`: the training step
S (counted from 0) of process R raises. Both raise RuntimeError (a builtin type pickles across
processes). The script then runs as `python SCRIPT ARGS...` would, and this process exits with
its code.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _fail_in_workers(cls: type, after: int) -> None:
    original = cls.__getitem__
    reads = [0]  # items this process has read (each worker has its own copy)

    def getitem(self, index):
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            reads[0] += 1
            if reads[0] > after:
                raise RuntimeError(f"injected failure reading item {index} in a data worker")
        return original(self, index)

    cls.__getitem__ = getitem


def _fail_at_step(rank: int, step: int) -> None:
    from miscc.training import EpochTrainer

    original = EpochTrainer.train

    def train(self):
        step_fn = self.train_step

        def failing(batch):
            if self.rank == rank and self.step == step:
                raise RuntimeError(f"injected failure in process {rank} at step {step}")
            return step_fn(batch)

        self.train_step = failing
        return original(self)

    EpochTrainer.train = train


def main(argv: list[str]) -> None:
    mode, script, *args = argv
    if mode.startswith("worker"):
        import clipgen.data
        import datasets

        after = int(mode.split(":")[1]) if ":" in mode else 0
        _fail_in_workers(datasets.TextImageDataset, after)
        _fail_in_workers(clipgen.data.TokenizerImages, after)
    elif mode.startswith("rank:"):
        _, rank, step = mode.split(":")
        _fail_at_step(int(rank), int(step))
    elif mode != "none":
        raise SystemExit(f"unknown mode {mode!r}")
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
