"""DistributedDataParallel really synchronises (issue 17, item 4).

One 2-process gloo `torchrun` launch (tests/ddp_worker.py) trains stage 1 and stage 2 on the
tiny shapes set and generates the test set. Then:

- both ranks hold bit-identical parameters (a run whose replicas never exchange gradients
  drifts apart at the first step);
- they equal a 1-process run over the same global batches. The DAMSM and NT-Xent losses compare
  every pair in a batch, so a batch of 2B is not two batches of B: the 1-process run is the two
  replicas of rank 0 and 1 (same data shares, same per-rank noise) stepping in two threads,
  with DistributedDataParallel replaced by its arithmetic — after each backward every gradient
  becomes the mean of the two replicas' (`GradMean`) — and everything else the trainers' own
  code;
- the test images written by the two processes are byte-identical to a 1-process run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import miscc.damsm as damsm_mod
import trainer as trainer_mod
from miscc.config import load_config
from miscc.damsm import DAMSMTrainer
from miscc.training import EpochSampler
from miscc.utils import seed_everything
from sampling import generate_test_set
from trainer import GANTrainer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
STAGE1 = ["GPU_ID=-1", "WORKERS=0", "CPU_THREADS=1", "TREE.BASE_SIZE=32", "TEXT.WORDS_NUM=16",
          "TRAIN.BATCH_SIZE=4", "TRAIN.MAX_EPOCH=1"]  # 24 images / 2 ranks / 4 = 3 steps
GAN_TINY = ["GPU_ID=-1", "WORKERS=0", "TREE.BRANCH_NUM=2", "TREE.BASE_SIZE=16", "GAN.GF_DIM=8",
            "GAN.DF_DIM=8", "GAN.Z_DIM=16", "GAN.CONDITION_DIM=8", "GAN.R_NUM=1"]
# 24 / 2 / 3 = 4 steps, in fp32: bf16 rounding would magnify the ranks' different summation
# orders beyond the comparison's tolerance
STAGE2 = [*GAN_TINY, "TRAIN.BATCH_SIZE=3", "TRAIN.MAX_EPOCH=1", "TRAIN.AMP_CPU=False"]
SEED = 100  # the configs' (default) SEED


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ddp(shapes_dir, tiny_encoder_ckpt, tmp_path_factory) -> dict:
    """The 2-process run: its spec (configs) and output folder."""
    out = tmp_path_factory.mktemp("ddp")
    data = out / "data"
    shutil.copytree(shapes_dir, data)  # rank 0 writes the text cache into it
    spec = {
        "out": str(out),
        "stage1": {"cfg": "cfg/DAMSM/shapes.yml",
                   "set": [*STAGE1, f"DATA_DIR={data}", f"OUTPUT_DIR={out / 's1'}"]},
        "stage2": {"cfg": "cfg/clip_shapes_DMGAN.yml",
                   "set": [*STAGE2, f"DATA_DIR={data}", f"OUTPUT_DIR={out / 's2'}",
                           f"TRAIN.NET_E={tiny_encoder_ckpt}"]},
        "eval": {"cfg": "cfg/eval_clip_shapes.yml",
                 "set": [*GAN_TINY, "TRAIN.BATCH_SIZE=7", "EVAL.NUM_IMAGES=50",
                         f"DATA_DIR={data}",
                         f"OUTPUT_DIR={out / 'gen2'}", f"TRAIN.NET_E={tiny_encoder_ckpt}",
                         f"TRAIN.NET_G={out / 's2' / 'Model'}"]},
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "tests/ddp_worker.py", str(out / "spec.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    return {"spec": spec, "out": out, "ranks": ranks}


def cfg_of(spec: dict, name: str, out: Path):
    entry = spec[name]
    return load_config(ROOT / entry["cfg"], [*entry["set"], f"OUTPUT_DIR={out}"], quiet=True)


# ---------------------------------------------------------------- the 1-process reference
class GradMean:
    """DistributedDataParallel's gradient all-reduce for replicas stepping in threads of one
    process: each replica calls `sync(slot, key, params)` after its backward; when all have
    arrived, every replica's gradient of each parameter becomes the mean over the replicas."""

    def __init__(self, n: int) -> None:
        self.n, self.arrived = n, {}
        self.barrier = threading.Barrier(n, timeout=120)

    def sync(self, slot: int, key, params) -> None:
        self.arrived[slot, key] = [p for p in params if p.grad is not None]
        self.barrier.wait()
        if slot == 0:
            for same in zip(*(self.arrived[s, key] for s in range(self.n)), strict=True):
                mean = torch.stack([p.grad for p in same]).mean(0)
                for p in same:
                    p.grad.copy_(mean)
        self.barrier.wait()


def replicas(make, monkeypatch) -> list:
    """Rank 0 and rank 1 of a 2-process run, built in this process: the trainers' own
    constructors with world=2 (this rank's share of every epoch, its noise, the schedule's
    length) and DistributedDataParallel as the plain module. Each replica's batches are drawn up
    front, since threads would share the global RNG the per-item augmentation re-seeds."""
    for module in (trainer_mod, damsm_mod):
        monkeypatch.setattr(module, "DistributedDataParallel", lambda net, **_: net)
    built = []
    for rank in (0, 1):
        seed_everything(SEED)  # as start_process does
        trainer = make(rank)
        assert trainer.cfg.SEED == SEED
        trainer._check_replicas = lambda: None  # compared by the test instead
        trainer.sampler.set_epoch(0)
        trainer.loader = list(trainer.loader)
        built.append(trainer)
    return built


def assert_shares_of_the_global_batches(replicas: list) -> None:
    """Step s of rank 0 and of rank 1 together train on batch s of a 1-process run of twice the
    batch size (same SEED, same epoch permutation): no item twice, none left out."""
    batch, n = replicas[0].batch, len(replicas[0].dataset)
    whole = EpochSampler(n, 2 * batch, SEED)
    whole.set_epoch(0)
    order = [i for _, i in whole]
    steps = list(zip(*(r.loader for r in replicas), strict=True))
    assert len(steps) == n // (2 * batch)
    for s, shares in enumerate(steps):
        got = sorted(i for share in shares for i in share["index"].tolist())
        assert got == sorted(order[2 * batch * s: 2 * batch * (s + 1)]), f"step {s}"


def run_in_threads(trainers: list) -> None:
    with ThreadPoolExecutor(len(trainers)) as pool:
        for done in [pool.submit(t.train) for t in trainers]:
            done.result()


def assert_close_tensors(a: dict, b: dict, what: str, exact: bool = False) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=f"{what}: {k}")


def params_only(state: dict, module: torch.nn.Module) -> dict:
    names = {n for n, _ in module.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


# ----------------------------------------------------------------------------------- tests
def test_stage1_ranks_agree_and_equal_one_process(ddp, tmp_path, monkeypatch) -> None:
    spec, ranks = ddp["spec"], ddp["ranks"]
    grads = GradMean(2)

    def make(rank: int) -> DAMSMTrainer:
        t = DAMSMTrainer(cfg_of(spec, "stage1", tmp_path / f"r{rank}"), CPU, rank=rank, world=2,
                         progress=False)
        unscale = t.scaler.unscale_

        def synced_unscale(optimizer) -> None:  # the first call after the backward
            grads.sync(rank, "encoder", t.params)
            unscale(optimizer)

        t.scaler.unscale_ = synced_unscale
        return t

    ref = replicas(make, monkeypatch)
    assert_shares_of_the_global_batches(ref)
    run_in_threads(ref)
    assert [t.step for t in ref] == [3, 3]
    encoder = ref[0].encoder
    ddp_params = [params_only(r["stage1"], encoder) for r in ranks]
    assert len(ddp_params[0]) == len(list(encoder.parameters()))
    assert_close_tensors(ddp_params[0], ddp_params[1], "stage 1, rank 0 vs rank 1", exact=True)
    for rank, t in enumerate(ref):
        assert_close_tensors(ddp_params[rank], params_only(t.encoder.state_dict(), encoder),
                             f"stage 1, rank {rank} vs the 1-process run")
    # rank 0's own batch-norm statistics are those of its data share
    assert_close_tensors(ranks[0]["stage1"], ref[0].encoder.state_dict(), "stage 1 buffers")
    # training moved the weights: the comparisons above are not of untouched initial weights
    start = DAMSMTrainer(cfg_of(spec, "stage1", tmp_path / "start"), CPU, progress=False)
    moved = params_only(start.encoder.state_dict(), encoder)
    assert any(not torch.allclose(moved[k], ddp_params[0][k], atol=1e-4) for k in moved)


def test_stage2_ranks_agree_and_equal_one_process(ddp, tmp_path, monkeypatch) -> None:
    spec, ranks = ddp["spec"], ddp["ranks"]
    grads = GradMean(2)

    def make(rank: int) -> GANTrainer:
        t = GANTrainer(cfg_of(spec, "stage2", tmp_path / f"r{rank}"), CPU, rank=rank, world=2,
                       progress=False)
        step = t.scaler.step

        def synced_step(optimizer, *args, **kwargs):  # each optimizer step follows a backward
            key = "G" if optimizer is t.optG else t.optDs.index(optimizer)
            grads.sync(rank, key, [p for g in optimizer.param_groups for p in g["params"]])
            return step(optimizer, *args, **kwargs)

        t.scaler.step = synced_step
        return t

    ref = replicas(make, monkeypatch)
    assert_shares_of_the_global_batches(ref)
    run_in_threads(ref)
    assert [t.step for t in ref] == [4, 4]
    netG, netDs = ref[0].netG, ref[0].netDs
    for part, module in [("netG", netG), ("ema", netG),
                         *[(("netDs", i), d) for i, d in enumerate(netDs)]]:
        def pick(source, part=part):
            return source[part[0]][part[1]] if isinstance(part, tuple) else source[part]

        mine = [params_only(pick(r), module) for r in ranks]
        assert mine[0], part
        assert_close_tensors(mine[0], mine[1], f"stage 2 {part}, rank 0 vs rank 1", exact=True)
        for rank, t in enumerate(ref):
            state = {"netG": t.netG.state_dict(), "ema": t.ema.state_dict(),
                     "netDs": [d.state_dict() for d in t.netDs]}
            assert_close_tensors(mine[rank], params_only(pick(state), module),
                                 f"stage 2 {part}, rank {rank} vs the 1-process run")


def test_generated_test_set_is_byte_identical_to_one_process(ddp, tmp_path) -> None:
    spec, out = ddp["spec"], ddp["out"]
    one = generate_test_set(cfg_of(spec, "eval", tmp_path / "gen1"), CPU, progress=False)
    two = json.loads((out / "gen2" / "metrics.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    folders = [out / "gen2" / "valid" / "single", tmp_path / "gen1" / "valid" / "single"]
    trees = [sorted(p.relative_to(f).as_posix() for p in f.rglob("*.png")) for f in folders]
    # EVAL.NUM_IMAGES=50 of the 120 test captions: the seeded draw is the same for 2 processes
    assert len(trees[0]) == 50 and trees[0] == trees[1]
    assert two["protocol"] == one["protocol"] and two["protocol"]["images"] == 50
    pictures = [[(f / name).read_bytes() for name in trees[0]] for f in folders]
    differ = [n for n, a, b in zip(trees[0], *pictures, strict=True) if a != b]
    assert not differ, f"{len(differ)} of 50 images differ, e.g. {differ[:3]}"
    assert len(set(pictures[1])) == 50  # and they are not all the same picture
    assert two["judge"] == one["judge"]
    for key in ("r_precision", "folds"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    assert two["clip_score"] == pytest.approx(one["clip_score"], abs=1e-4)
