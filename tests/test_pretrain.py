"""Stage 1 (pretrain_DAMSM.py) on the tiny shapes set: learning, outputs, exact resume, a
truncated resume state, non-finite losses, --fresh, CLI errors and a 2-process torchrun run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import miscc.damsm as damsm
import pretrain_DAMSM as cli
from miscc.damsm import DAMSMTrainer, retrieval_accuracy
from miscc.training import NonFiniteLoss, resolve_checkpoint
from miscc.utils import load_checkpoint
from model import ClipEncoder

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# 24 train images / batch 4 = 6 steps per epoch; 32 px crops, as the shapes demo
TINY = ["GPU_ID=-1", "WORKERS=0", "CPU_THREADS=1", "TREE.BASE_SIZE=32", "TEXT.WORDS_NUM=16",
        "TRAIN.BATCH_SIZE=4", "TRAIN.MAX_EPOCH=2", "TRAIN.SNAPSHOT_INTERVAL=1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest (and never oversubscribe 2 cores) on one thread; module scope so
    that the module-scoped runs use it too (results depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_cfg(shapes_dir):
    """overrides -> tiny stage-1 config (cfg/DAMSM/shapes.yml + TINY); a plain function so
    module-scoped fixtures can use it (conftest's shapes_cfg is function-scoped)."""
    from miscc.config import load_config

    def make(out: Path, *overrides: str):
        return load_config(ROOT / "cfg" / "DAMSM" / "shapes.yml",
                           [f"DATA_DIR={shapes_dir}", f"OUTPUT_DIR={out}", *TINY, *overrides],
                           quiet=True)

    return make


def train(cfg) -> tuple[DAMSMTrainer, dict]:
    trainer = DAMSMTrainer(cfg, CPU, progress=False)
    return trainer, trainer.train()


def tensors(state_file: Path) -> dict[str, torch.Tensor]:
    """Encoder weights and optimizer moments of a resume state, flattened by name."""
    state = load_checkpoint(state_file)
    out = {f"encoder.{k}": v for k, v in state["encoder"]["state_dict"].items()}
    for pid, moments in state["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in moments.items()})
    out["sched"] = torch.tensor(state["scheduler"]["last_epoch"])
    return out


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(tiny_cfg, tmp_path_factory):
    """12 steps = 2 epochs through the whole loop."""
    out = tmp_path_factory.mktemp("trained")
    trainer, summary = train(tiny_cfg(out))
    return {"trainer": trainer, "summary": summary, "out": out}


def test_steps_reduce_the_loss_of_a_fixed_batch(tiny_cfg, tmp_path) -> None:
    trainer = DAMSMTrainer(tiny_cfg(tmp_path), CPU, progress=False)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))

    def loss() -> float:
        with torch.no_grad():
            return trainer.losses(batch, trainer.encoder)[0].item()

    before = loss()
    first = trainer.train_step(batch)
    assert first["loss"] == pytest.approx(before, rel=1e-5)  # the step optimises this loss
    for _ in range(9):
        trainer.train_step(batch)
    after = loss()
    # random init is near chance (8 cross-entropies over 4 items + NT-Xent over 7: ~13)
    assert before > 12 and after < 0.5 * before, (before, after)


MINIMAL = ["TEXT.WORD_LISTS=shapes", "TRAIN.FLIP=True", "TRAIN.RANDOM_CROP=False",
           "TRAIN.HARD_NEGATIVES=3", "TRAIN.NEGATIVE_PICTURES=2"]


def test_minimal_pairs_reach_the_losses(tiny_cfg, tmp_path) -> None:
    """A batch's negative captions and redrawn pictures go through the one forward (packed:
    only the real ones) and into the sentence loss and the per-item term; with every negative
    masked out the step's loss is exactly the loss without minimal pairs."""
    from miscc.losses import minimal_pair_loss, sent_loss

    cfg = tiny_cfg(tmp_path, *MINIMAL, "TRAIN.HARD_NEGATIVE_WEIGHT=2.0")
    trainer = DAMSMTrainer(cfg, CPU, progress=False)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    b = batch["tokens"].shape[0]
    batch["neg_mask"][0, 0] = False  # one caption with fewer negatives
    calls = []
    forward = trainer.encoder.forward
    trainer.encoder.forward = lambda t, i: calls.append((len(t), len(i))) or forward(t, i)
    with torch.no_grad():
        loss, parts = trainer.losses(batch, trainer.encoder)
    # no crop and no flip: the two views are one picture, encoded once
    assert torch.equal(batch["imgs"][-1][:, 0], batch["imgs"][-1][:, 1])
    assert calls == [(2 * b + int(batch["neg_mask"].sum()),
                      b + int(batch["neg_img_mask"].sum()))]
    assert parts[4] > 0 and loss == pytest.approx(float(parts[:4].sum() - parts[0]
                                                        + 2.0 * parts[4]), rel=1e-5)
    # the same numbers from the encoder outputs by hand
    enc = trainer.encoder
    with torch.no_grad():
        tok, img = batch["tokens"], batch["imgs"][-1]
        _, sent, _ = enc.encode_text(torch.cat([tok[:, 0], tok[:, 1]]))
        _, code = enc.encode_image(torch.cat([img[:, 0], batch["neg_imgs"][:, 0]
                                              .flatten(0, 1), batch["neg_imgs"][:, 1]
                                              .flatten(0, 1)]))
        code, neg_code = code[:b].repeat(2, 1), code[b:].view(2, b, 2, -1).flatten(0, 1)
        neg_tok = torch.cat([batch["neg_tokens"][:, 0], batch["neg_tokens"][:, 1]])
        neg_sent = enc.encode_text(neg_tok.flatten(0, 1))[1].view(2 * b, 3, -1)
        mask = torch.cat([batch["neg_mask"][:, 0], batch["neg_mask"][:, 1]])
        img_mask = torch.cat([batch["neg_img_mask"][:, 0], batch["neg_img_mask"][:, 1]])
    pairs = (minimal_pair_loss(code, sent, neg_sent, mask, 10.0)
             + minimal_pair_loss(sent, code, neg_code, img_mask, 10.0))
    assert float(parts[4]) == pytest.approx(float(pairs), rel=1e-4)
    s = sum(sum(sent_loss(code[p], sent[p], None, 10.0, neg_sent[p], mask[p], neg_code[p],
                          img_mask[p])) for p in (slice(0, b), slice(b, 2 * b)))
    assert float(parts[2]) == pytest.approx(float(s), rel=1e-4)
    # all masked: exactly the plain step
    plain = {k: v for k, v in batch.items() if not k.startswith("neg_")}
    batch["neg_mask"][:] = False
    batch["neg_img_mask"][:] = False
    with torch.no_grad():
        masked, masked_parts = trainer.losses(batch, trainer.encoder)
        want, _ = trainer.losses(plain, trainer.encoder)
    assert masked_parts[4] == 0 and torch.equal(masked, want)


def test_channels_last_on_cpu_gives_the_same_losses(tiny_cfg, tmp_path) -> None:
    """TRAIN.CHANNELS_LAST: the image tower's convolutions and the batch it sees are
    channels-last on CPU too, and a step's losses equal the contiguous ones."""
    runs = {}
    for flag in (True, False):
        torch.manual_seed(0)
        trainer = DAMSMTrainer(tiny_cfg(tmp_path / str(flag), *MINIMAL,
                                        f"TRAIN.CHANNELS_LAST={flag}"), CPU, progress=False)
        convs = [m.weight for m in trainer.encoder.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == flag
                             for w in convs)
        seen = []
        encode = trainer.encoder.encode_image
        trainer.encoder.encode_image = lambda x, f=encode, s=seen: s.append(x) or f(x)
        trainer.sampler.set_epoch(0)
        batch = next(iter(trainer.loader))
        with torch.no_grad():
            runs[flag] = trainer.losses(batch, trainer.encoder)[1]
        assert seen[0].is_contiguous(memory_format=torch.channels_last) == flag
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-4, atol=1e-5)


def test_redraw_pairs_join_the_batch(tiny_cfg, tmp_path) -> None:
    """TRAIN.REDRAW_PAIRS: each item's redrawn partner is an item of its own in every loss
    (2B captions of each view, 2B views of each kind); partners have no negatives."""
    cfg = tiny_cfg(tmp_path, "TEXT.WORD_LISTS=shapes", "TRAIN.RANDOM_CROP=False",
                   "TRAIN.REDRAW_PAIRS=True", "TRAIN.HARD_NEGATIVES=2",
                   "TRAIN.NEGATIVE_PICTURES=0")
    trainer = DAMSMTrainer(cfg, CPU, progress=False)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    b = batch["tokens"].shape[0]
    merged = damsm._with_redraws(batch)
    assert torch.equal(merged["tokens"], torch.cat([batch["tokens"], batch["redraw_tokens"]]))
    assert torch.equal(merged["imgs"][-1], torch.cat([batch["imgs"][-1],
                                                      batch["redraw_imgs"]]))
    assert not merged["neg_mask"][b:].any() and torch.equal(merged["neg_mask"][:b],
                                                            batch["neg_mask"])
    calls = []
    forward = trainer.encoder.forward
    trainer.encoder.forward = lambda t, i: calls.append((len(t), len(i))) or forward(t, i)
    with torch.no_grad():
        trainer.losses(batch, trainer.encoder)
    # every item's two views are one picture (no crop, both mirrored alike): encoded once
    assert calls == [(4 * b + int(batch["neg_mask"].sum()), 2 * b)]


def test_optimizer_is_fused_and_steps_like_plain_adamw(tiny_cfg, tmp_path) -> None:
    """The trainer's AdamW runs the fused kernel and moves every parameter as torch's
    reference (single-tensor) AdamW does with the same groups, learning rates and gradients."""
    trainer = DAMSMTrainer(tiny_cfg(tmp_path), CPU, progress=False)
    opt = trainer.optimizer
    assert opt.defaults["fused"] is True
    torch.manual_seed(1)
    copies = []
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
        copies.append([p.detach().clone().requires_grad_() for p in group["params"]])
    reference = torch.optim.AdamW(
        [{"params": c, "lr": g["lr"]} for c, g in zip(copies, opt.param_groups, strict=True)],
        weight_decay=opt.defaults["weight_decay"], foreach=False)
    for c, group in zip(copies, opt.param_groups, strict=True):
        for copy_, p in zip(c, group["params"], strict=True):
            copy_.grad = p.grad.clone()
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    opt.step()
    reference.step()
    after = [p for g in opt.param_groups for p in g["params"]]
    expected = [c for cs in copies for c in cs]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    for a, e in zip(after, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-5, atol=1e-7)


def test_training_loop_summary(trained) -> None:
    summary = trained["summary"]
    assert summary["step"] == 12 and summary["epoch"] == 2
    assert set(summary["losses"]) == {"loss", "words", "sent", "contrastive", "pairs"}
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["losses"].values())
    val = summary["val"]
    assert val["images"] == 12 and val["captions"] == 120 and 0 <= val["R1"] <= val["R5"] <= 1
    assert all(torch.isfinite(torch.tensor(val[k])) for k in ("loss", "words", "sent"))


def test_encoder_checkpoint_loads_for_stage_2(trained) -> None:
    model = trained["out"] / "Model"
    assert sorted(p.name for p in model.glob("clip*.pth")) == ["clip1.pth", "clip2.pth"]
    assert resolve_checkpoint(str(model), "clip*.pth", "encoder", "TRAIN.NET_E").name \
        == "clip2.pth"
    loaded = ClipEncoder.from_checkpoint(model / "clip2.pth")
    own = trained["trainer"].encoder.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    assert loaded.adapter is not None and loaded.embed_dim == 64


def test_attention_maps_and_tensorboard(trained) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = trained["out"]
    for epoch in (1, 2):
        with Image.open(out / "Image" / f"attention_epoch_{epoch}.png") as img:
            assert img.width >= 128 * 2 and img.height >= 4 * 128  # 4 items, image + words
    logs = EventAccumulator(str(out / "logs"))
    logs.Reload()
    tags = set(logs.Tags()["scalars"])
    assert {"train/loss", "train/contrastive", "lr/group0", "lr/group1", "val/loss",
            "val/R1"} <= tags
    assert [e.step for e in logs.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in logs.Scalars("val/R1")] == [6, 12]
    assert (out / "config.yml").is_file()


def test_minimal_pair_accuracy_in_validation(tiny_cfg, tmp_path) -> None:
    """With word lists, each validation scores the test pictures' minimal pairs with the
    encoder (the same numbers as score_pair_set on its codes), prints them, and writes them to
    TensorBoard and <OUTPUT_DIR>/metrics.json with chance beside them."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from miscc.pair_metric import score_pair_set

    cfg = tiny_cfg(tmp_path, *MINIMAL, "TRAIN.MAX_STEPS=2")
    trainer, summary = train(cfg)
    pairs = summary["val"]["minimal_pairs"]
    # 12 test pictures; shapes captions name all five attributes (one query each), and with
    # the variant cap of 8 each is asked against every other value of its category
    chance = {"shape": 1 / 6, "colour": 1 / 6, "size": 1 / 3, "position": 1 / 5,
              "background": 1 / 5}
    for category, c in chance.items():
        assert pairs[category]["chance"] == pytest.approx(c)
        assert pairs[category]["count"] == 12
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["minimal_pairs"] == pairs
    assert metrics["R1"] == summary["val"]["R1"]
    enc = trainer.encoder.eval()
    with torch.no_grad():
        images = torch.stack([trainer.test[i]["imgs"][-1][0] for i in range(len(trainer.test))])
        codes = enc.encode_image(images)[1]
        again = score_pair_set(codes, trainer.pairs, lambda t: enc.encode_text(
            trainer.tokenizer(t))[1])
    assert {k: v["accuracy"] for k, v in again.items()} == pytest.approx(
        {k: v["accuracy"] for k, v in pairs.items()})
    logs = EventAccumulator(str(tmp_path / "logs"))
    logs.Reload()
    assert {f"val_pairs/{c}" for c in [*chance, "mean"]} <= set(logs.Tags()["scalars"])


def test_retrieval_accuracy_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    images, text = torch.randn(7, 5, generator=g), torch.randn(20, 5, generator=g)
    owner = torch.randint(0, 7, (20,), generator=g)
    text[:6] = images[owner[:6]] * 3  # some exact hits
    got = retrieval_accuracy(text, owner, images, ks=(1, 3), chunk=8)
    sims = torch.nn.functional.normalize(text, dim=1) @ torch.nn.functional.normalize(
        images, dim=1).t()
    ranks = [int((row > row[o]).sum()) for row, o in zip(sims, owner, strict=True)]
    expected = {"R1": sum(r < 1 for r in ranks) / 20, "R3": sum(r < 3 for r in ranks) / 20}
    assert got == pytest.approx(expected) and expected["R1"] >= 0.3


# -------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def straight(tiny_cfg, tmp_path_factory) -> Path:
    """9 steps uninterrupted (epoch 1 + half of epoch 2): states at steps 6 and 9."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_cfg(out, "TRAIN.MAX_STEPS=9"))
    return out


def test_interrupted_and_resumed_equals_uninterrupted(straight, tiny_cfg, tmp_path) -> None:
    out = tmp_path / "resumed"
    _, summary = train(tiny_cfg(out, "TRAIN.MAX_STEPS=4"))
    assert summary["step"] == 4 and (out / "Model" / "encoder_step_4.pth").is_file()
    _, summary = train(tiny_cfg(out, "TRAIN.MAX_STEPS=9"))
    assert summary["step"] == 9 and summary["epoch"] == 1
    assert_same(out / "Model" / "state_step_9.pth", straight / "Model" / "state_step_9.pth")
    assert not (out / "Model" / "state_step_4.pth").exists()  # only the newest 2 are kept


def test_truncated_latest_state_falls_back_to_previous(straight, tiny_cfg, tmp_path) -> None:
    out = tmp_path / "truncated"
    shutil.copytree(straight, out)
    latest = out / "Model" / "state_step_9.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping unreadable training state"):
        trainer = DAMSMTrainer(tiny_cfg(out, "TRAIN.MAX_STEPS=9"), CPU, progress=False)
    assert trainer.step == 6
    assert trainer.train()["step"] == 9
    assert_same(latest, straight / "Model" / "state_step_9.pth")


def test_longer_max_epoch_replans_the_schedule(straight, tiny_cfg, tmp_path) -> None:
    out = tmp_path / "longer"
    shutil.copytree(straight, out)
    with pytest.warns(UserWarning, match="re-planned from 12 to 18 steps"):
        trainer = DAMSMTrainer(tiny_cfg(out, "TRAIN.MAX_EPOCH=3", "TRAIN.MAX_STEPS=10"), CPU,
                               progress=False)
    assert trainer.scheduler.total_steps == 18 and trainer.train()["step"] == 10


def test_non_finite_loss_stops_and_keeps_the_checkpoint(straight, tiny_cfg, tmp_path,
                                                        monkeypatch, capsys) -> None:
    out = tmp_path / "nan"
    shutil.copytree(straight, out)
    kept = (out / "Model" / "state_step_9.pth").read_bytes()
    monkeypatch.setattr(damsm, "nt_xent", lambda *a, **k: torch.tensor(float("nan")))
    args = ["--cfg", str(ROOT / "cfg" / "DAMSM" / "shapes.yml"), "--data_dir",
            load_checkpoint(out / "Model" / "state_step_6.pth")["config"]["DATA_DIR"],
            "--no-progress", "--set", f"OUTPUT_DIR={out}", "--set", "TRAIN.MAX_STEPS=12"]
    for item in TINY:
        args += ["--set", item]
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 10" in err and "Traceback" not in err
    assert (out / "Model" / "state_step_9.pth").read_bytes() == kept
    assert sorted(p.name for p in (out / "Model").glob("state_step_*.pth")) == \
        ["state_step_6.pth", "state_step_9.pth"]
    # the library raises the dedicated error (what main.py/pretrain_DAMSM.py catch)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 10 \(loss=nan"):
        train(tiny_cfg(out, "TRAIN.MAX_STEPS=12"))


def test_fresh_removes_the_old_run(straight, tiny_cfg, tmp_path) -> None:
    out = tmp_path / "fresh"
    shutil.copytree(straight, out)
    trainer = DAMSMTrainer(tiny_cfg(out, "TRAIN.MAX_STEPS=9"), CPU, fresh=True, progress=False)
    assert trainer.step == 0
    assert not list((out / "Model").glob("*.pth")) and not (out / "logs").exists()


# ------------------------------------------------------------------------------ commands
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys) -> None:
    base = ["--cfg", str(ROOT / "cfg" / "DAMSM" / "shapes.yml"), "--gpu", "-1",
            "--set", f"OUTPUT_DIR={tmp_path / 'out'}", "--no-progress"]
    assert cli.main([*base, "--data_dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: DATA_DIR") and str(tmp_path / "missing") in err.splitlines()[0]
    assert "Traceback" not in err and not (tmp_path / "out" / "Model").exists()
    with pytest.raises(SystemExit, match=r"^2$") as exit_info:
        cli.main([*base, "--set", "TRAIN.BATCHSIZE=4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did you mean TRAIN.BATCH_SIZE" in err


def test_torchrun_two_processes(shapes_dir, tmp_path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "pretrain_DAMSM.py", "--cfg", str(ROOT / "cfg" / "DAMSM" / "shapes.yml"),
           "--data_dir", str(shapes_dir), "--no-progress", "--set", f"OUTPUT_DIR={out}"]
    for item in [*TINY, "TRAIN.MAX_EPOCH=1"]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: epoch 1, step 3") == 1  # 24 images / 2 ranks / 4 = 3 steps
    model = out / "Model"
    assert sorted(p.name for p in model.iterdir()) == ["clip1.pth", "state_step_3.pth"]
    state = load_checkpoint(model / "state_step_3.pth")
    assert state["world"] == 2 and state["step"] == 3
    ClipEncoder.from_checkpoint(model / "clip1.pth")


def test_finite_check_runs_after_the_step(tiny_cfg, tmp_path) -> None:
    from conftest import assert_checked_after_step

    trainer = DAMSMTrainer(tiny_cfg(tmp_path / "run"), torch.device("cpu"), progress=False)
    assert_checked_after_step(trainer, trainer.optimizer)


def test_one_picture_in_both_views_goes_through_the_tower_once(tiny_cfg, tmp_path) -> None:
    """Without crops or flips the two views are the same picture: the image tower sees it once
    and both (caption, view) pairs read its outputs (in eval mode, where a picture's outputs
    do not depend on its batch, the losses equal encoding it twice); with random crops each
    view is encoded."""
    for crop, views_encoded in (("False", 1), ("True", 2)):
        cfg = tiny_cfg(tmp_path / crop, "TRAIN.RANDOM_CROP=" + crop, "TRAIN.FLIP=False")
        trainer = DAMSMTrainer(cfg, CPU, progress=False)
        trainer.sampler.set_epoch(0)
        batch = next(iter(trainer.loader))
        b = batch["tokens"].shape[0]
        negatives = int(batch["neg_img_mask"].sum()) if "neg_img_mask" in batch else 0
        seen = []
        images = trainer.encoder.encode_image
        trainer.encoder.encode_image = lambda x, f=images, s=seen: s.append(len(x)) or f(x)
        trainer.encoder.eval()
        with torch.no_grad():
            _, parts = trainer.losses(batch, trainer.encoder)
        assert seen == [views_encoded * b + negatives]
        assert torch.equal(batch["imgs"][-1][:, 0], batch["imgs"][-1][:, 1]) == (
            views_encoded == 1)
        if views_encoded == 1:  # the same losses as a batch whose second view differs in bits
            twice = dict(batch, imgs=[batch["imgs"][-1].clone()])
            twice["imgs"][0][:, 1] += 1e-9
            with torch.no_grad():
                _, again = trainer.losses(twice, trainer.encoder)
            assert seen[-1] == 2 * b + negatives
            assert torch.allclose(parts, again, rtol=1e-5)
