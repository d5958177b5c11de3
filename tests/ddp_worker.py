"""Run by tests/test_ddp_sync.py under `torchrun --nproc_per_node 2` (gloo on the CPU): stage 1,
stage 2 and the test-set generation in one launch, each built and run as pretrain_DAMSM.py and
main.py do it; every rank then saves its own weights to <out>/rank<r>.pt (the commands save
rank 0's only).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py SPEC

SPEC is a JSON file: {"out": DIR, "stage1"|"stage2"|"eval": {"cfg": FILE, "set": [KEY=VALUE]}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    import torch

    from miscc.config import load_config
    from miscc.damsm import DAMSMTrainer
    from miscc.training import start_process, unwrap
    from miscc.utils import cleanup_distributed, seed_everything
    from sampling import generate_test_set
    from trainer import GANTrainer

    spec = json.loads(Path(argv[0]).read_text())
    cfgs = {name: load_config(ROOT / spec[name]["cfg"], spec[name]["set"], quiet=True)
            for name in ("stage1", "stage2", "eval")}
    rank, world, device = start_process(cfgs["stage1"])
    try:
        stage1 = DAMSMTrainer(cfgs["stage1"], device, rank, world, progress=False)
        stage1.train()
        seed_everything(int(cfgs["stage2"].SEED))
        stage2 = GANTrainer(cfgs["stage2"], device, rank, world, progress=False)
        stage2.train()
        torch.save({"world": world, "stage1": stage1.encoder.state_dict(),
                    "netG": unwrap(stage2.netG).state_dict(), "ema": stage2.ema.state_dict(),
                    "netDs": [unwrap(d).state_dict() for d in stage2.netDs]},
                   Path(spec["out"]) / f"rank{rank}.pt")
        seed_everything(int(cfgs["eval"].SEED))
        generate_test_set(cfgs["eval"], device, progress=False)
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
