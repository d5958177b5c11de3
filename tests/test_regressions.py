"""Known answers for what decides whether a user's numbers are right (issue 17): the EMA
generator's decay schedule and lerp direction, the evaluation wiring (R-precision / CLIP score of
codes with a known answer; every `<key>_s<k>.png` drawn from caption k of key), and the
checkpoint plumbing (folder lookup, resume-state pruning, warm start from TRAIN.NET_G, stage-1
one-cycle learning rates per parameter group)."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import GAN_TINY
from easydict import EasyDict
from PIL import Image
from torch import nn

import sampling
from datasets import read_split
from miscc.config import load_config
from miscc.damsm import DAMSMTrainer
from miscc.protocol import caption_items
from miscc.training import resolve_checkpoint, save_resume_state, unwrap
from miscc.utils import atomic_torch_save, load_checkpoint
from model import Generator, gan_arch, generator_checkpoint, init_gan_weights
from r_precision import score_generated
from sampling import generate_test_set, generator_for_eval, seeded_noise
from trainer import GANTrainer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gan_cfg(data_dir, tiny_encoder_ckpt, tmp_path):
    def make(*overrides: str):
        return load_config(ROOT / "cfg" / "clip_shapes_DMGAN.yml",
                           [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={tmp_path / 'run'}",
                            f"TRAIN.NET_E={tiny_encoder_ckpt}", *GAN_TINY, *overrides],
                           quiet=True)

    return make


# ------------------------------------------------------------------------------------- EMA
def test_ema_decay_warm_up_cap_and_lerp_direction_by_hand() -> None:
    """ema ← d·ema + (1−d)·G with d = min(EMA_DECAY, (1+n)/(10+n)), n = steps so far. With
    EMA_DECAY 0.5, ema starting at 0 and G = n+1 at the n-th update, the warm-up gives exactly
    0.9·(n+1) (d = 0.1, 2/11, 3/12, …; the cap is reached at n = 8), then d = 0.5:
    ema = (8.1 + 10)/2 = 9.05, (9.05 + 11)/2 = 10.025, (10.025 + 12)/2 = 11.0125.
    A flipped lerp gives 0.1 first, an off-by-one step 9/11, no warm-up 0.5, no cap 9.0."""
    expected = [0.9, 1.8, 2.7, 3.6, 4.5, 5.4, 6.3, 7.2, 8.1, 9.05, 10.025, 11.0125]
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in netG.parameters():
            p.zero_()
    host = SimpleNamespace(cfg=EasyDict(TRAIN=EasyDict(EMA_DECAY=0.5)), step=0, netG=netG,
                           ema=copy.deepcopy(netG).requires_grad_(False))
    got = []
    for n in range(12):
        host.step = n
        with torch.no_grad():
            for p in netG.parameters():
                p.fill_(n + 1)
            netG[1].running_mean.fill_(-n)  # buffers are copied, not averaged
        GANTrainer._update_ema(host)
        values = torch.cat([p.flatten() for p in host.ema.parameters()])
        assert torch.all(values == values[0]), "every EMA weight follows the same recursion"
        got.append(float(values[0]))
        assert torch.equal(host.ema[1].running_mean, torch.full((2,), float(-n)))
    assert got == pytest.approx(expected, abs=1e-5)


def test_training_updates_the_ema_after_every_step_and_saves_it(gan_cfg, tmp_path) -> None:
    """Through the real loop: the EMA starts as a copy of G, is updated once after every G
    step with n = 0, 1, 2 (EMA_DECAY 0.999 is still warming up), and netG_step_3.pth holds it
    (not G), with G's buffers as released (TRAIN.EMA_BN_BATCHES 0)."""
    trainer = GANTrainer(gan_cfg("TRAIN.MAX_STEPS=3", "TRAIN.EMA_BN_BATCHES=0"), CPU,
                         progress=False)
    names = [n for n, _ in unwrap(trainer.netG).named_parameters()]
    start = dict(unwrap(trainer.netG).named_parameters())
    ema = {n: p.detach().double().clone() for n, p in trainer.ema.named_parameters()}
    assert all(torch.equal(ema[n], start[n].detach().double()) for n in names)
    seen: list[tuple[int, dict]] = []
    real_update = trainer._update_ema

    def spy() -> None:
        seen.append((trainer.step, {n: p.detach().double().clone()
                                    for n, p in unwrap(trainer.netG).named_parameters()}))
        real_update()

    trainer._update_ema = spy
    trainer.train()
    assert [n for n, _ in seen] == [0, 1, 2]
    for n, weights in seen:
        d = min(0.999, (1 + n) / (10 + n))
        ema = {k: d * ema[k] + (1 - d) * weights[k] for k in names}
    saved = load_checkpoint(tmp_path / "run" / "Model" / "netG_step_3.pth")["state_dict"]
    for k in names:
        torch.testing.assert_close(saved[k].double(), ema[k], rtol=0, atol=1e-6)
    g_now = unwrap(trainer.netG).state_dict()
    assert not torch.allclose(saved["ca.fc.weight"], g_now["ca.fc.weight"], atol=1e-4)
    for k, buf in unwrap(trainer.netG).named_buffers():
        assert torch.equal(saved[k], buf), k  # buffers (BatchNorm statistics) are copied


# -------------------------------------------------------------------- evaluation wiring
def test_score_generated_known_answers() -> None:
    """Image codes along their own caption's sentence embedding: R-precision 1 (std 0) and
    CLIP score 100. Codes at chosen cosines 1, 0.9, 0.8, −1, −0.5 to their caption (captions 0–4
    of each image): the three positive ones rank first among 99 random negatives, the two
    negative ones last, so R-precision is exactly 3/5 (150 items, ten equal folds) and the
    CLIP score 100·(1 + 0.9 + 0.8 + 0 + 0)/5 = 54."""
    g = torch.Generator().manual_seed(0)
    n, c, dim = 30, 5, 32
    sent = torch.randn(n, c, dim, generator=g)
    class_ids = torch.arange(n) // 2  # pairs of images share a class
    num = torch.full((n,), c)
    items = caption_items(num)
    true = sent[items[:, 0], items[:, 1]]
    scale = 0.5 + 3 * torch.rand(len(items), 1, generator=g)  # the norm must not matter

    exact = score_generated(true * scale, items, sent, class_ids, num, seed=3)
    assert exact["images"] == 150 and exact["negatives"] == 99
    assert exact["smallest_pool"] == 150 - 10 and not exact["with_replacement"]
    assert exact["r_precision"] == 1.0 and exact["r_precision_std"] == 0.0
    assert exact["folds"] == [1.0] * 10
    assert exact["clip_score"] == pytest.approx(100.0, abs=1e-4)

    cosines = torch.tensor([1.0, 0.9, 0.8, -1.0, -0.5])[items[:, 1]]
    unit = torch.nn.functional.normalize(true, dim=1)
    other = torch.randn(len(items), dim, generator=g)
    other = torch.nn.functional.normalize(other - (other * unit).sum(1, keepdim=True) * unit,
                                          dim=1)
    codes = (cosines[:, None] * unit + (1 - cosines[:, None] ** 2).sqrt() * other) * scale
    mixed = score_generated(codes, items, sent, class_ids, num, seed=3)
    assert mixed["r_precision"] == pytest.approx(0.6, abs=1e-6)
    assert sum(round(f * 15) for f in mixed["folds"]) == 90 and len(mixed["folds"]) == 10
    assert mixed["r_precision_std"] == pytest.approx(float(np.std(mixed["folds"])))
    assert mixed["clip_score"] == pytest.approx(54.0, abs=1e-3)


class CaptionPainter(nn.Module):
    """A stand-in generator for `generate_test_set`: it looks its sentence feature up in the
    split's feature bank (an exact match), and paints that caption's image index i and caption
    index k into the picture: red = 10·i, green = 50·k. Blue is 255 where the words, the mask or
    the noise it was given are not those of that caption (noise row = the caption's position in
    caption order, drawn once from SEED), else 0."""

    def __init__(self, arch: dict, noise: tuple[torch.Tensor, torch.Tensor],
                 row_of: torch.Tensor) -> None:
        super().__init__()
        self.arch, (self.z, self.eps), self.row_of = arch, noise, row_of
        self.bank = None  # the TextFeatures generate_test_set opens

    def forward(self, z, sent, words, mask, eps):
        n, c, dim = self.bank.sent.shape
        gap = (sent[:, None] - self.bank.sent.reshape(n * c, dim)[None]).abs().amax(-1)
        best = gap.argmin(1)
        i, k = best // c, best % c
        w, _, m = self.bank.lookup(i, k)
        row = self.row_of[i, k]
        ok = ((gap.amin(1) == 0) & (words == w).flatten(1).all(1) & (mask == m).all(1)
              & (z == self.z[row]).all(1) & (eps == self.eps[row]).all(1))
        pixels = torch.stack([10.0 * i, 50.0 * k, torch.where(ok, 0.0, 255.0)], dim=1)
        images = pixels[:, :, None, None].expand(-1, -1, 8, 8) / 127.5 - 1.0
        return [images], None, None


def coco_eval_cfg(data_dir: Path, encoder: Path, out: Path, *overrides: str):
    """cfg/eval_clip_coco.yml shrunk to the tiny CLIP and GAN (COCO layout, no independent
    scorer)."""
    return load_config(ROOT / "cfg" / "eval_clip_coco.yml",
                       [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={out}", f"TRAIN.NET_E={encoder}",
                        *GAN_TINY, "TEXT.EMBEDDING_DIM=64", "CLIP.MODEL=tiny",
                        "CLIP.PRETRAINED=", "EVAL.INDEPENDENT_ENCODER=", *overrides],
                       quiet=True)


def test_every_test_image_is_drawn_from_its_own_caption(coco_dir, tiny_encoder_ckpt, tmp_path,
                                                        monkeypatch) -> None:
    """All 120 `<key>_s<k>.png` of the COCO-layout test split, generated in batches of 7 (so
    batches straddle images): each holds exactly the (image, caption) its name says, and the
    generator got that caption's words, mask and noise with it."""
    data = tmp_path / "coco"
    shutil.copytree(coco_dir, data)  # the text cache is written into the data dir
    cfg = coco_eval_cfg(data, tiny_encoder_ckpt, tmp_path / "run", "TRAIN.BATCH_SIZE=7",
                        "EVAL.NUM_IMAGES=0")  # every caption (the config draws 30k)
    info = read_split(cfg, "test")
    num = torch.tensor([len(c) for c in info.captions])
    items = caption_items(num)
    row_of = torch.full((len(num), int(num.max())), -1, dtype=torch.long)
    row_of[items[:, 0], items[:, 1]] = torch.arange(len(items))
    arch = gan_arch(cfg, 64)
    painter = CaptionPainter(arch, seeded_noise(cfg, len(items), arch), row_of)
    monkeypatch.setattr(sampling, "generator_for_eval", lambda *a, **k: painter)
    open_cache = sampling.text_feature_cache

    def capture(*args, **kwargs):
        painter.bank = open_cache(*args, **kwargs)
        return painter.bank

    monkeypatch.setattr(sampling, "text_feature_cache", capture)
    result = generate_test_set(cfg, CPU, progress=False)

    single = tmp_path / "run" / "valid" / "single"
    expected = {(key, k) for key, n in zip(info.keys, num.tolist(), strict=True)
                for k in range(n)}
    assert len(expected) == 120
    assert {p.name for p in single.iterdir()} == {f"{key}_s{k}.png" for key, k in expected}
    wrong = []
    for i, key in enumerate(info.keys):
        for k in range(int(num[i])):
            with Image.open(single / f"{key}_s{k}.png") as img:
                pixels = np.asarray(img.convert("RGB"))
            if not (pixels == [10 * i, 50 * k, 0]).all():
                wrong.append(f"{key}_s{k}.png holds {pixels[0, 0].tolist()}")
    assert not wrong, f"{len(wrong)} images from another caption or input, e.g. {wrong[:3]}"
    assert result["images"] == 120 and result["smallest_pool"] == 115


# ---------------------------------------------------------------------------- checkpoints
def _generator_files(model: Path, cfg, numbers: list[int]) -> dict[int, dict]:
    """netG_epoch_<n>.pth with different weights (seed n) for each n; returns the weights."""
    out = {}
    for n in numbers:
        torch.manual_seed(n)
        netG = Generator(gan_arch(cfg, 64))
        init_gan_weights(netG)
        atomic_torch_save(generator_checkpoint(netG), model / f"netG_epoch_{n}.pth")
        out[n] = {k: v.clone() for k, v in netG.state_dict().items()}
    return out


def _differ(module: nn.Module, weights: dict) -> list[str]:
    """Names of the tensors of `module` that are not bit-identical to `weights`."""
    return [k for k, v in module.state_dict().items() if not torch.equal(v, weights[k])]


def test_folder_lookup_takes_the_highest_number(gan_cfg, tmp_path) -> None:
    """A folder given as TRAIN.NET_G / TRAIN.NET_E means its newest checkpoint by number, not
    by name: netG_epoch_600 over netG_epoch_99 and netG_epoch_7, clip100 over clip99; files of
    other patterns (netG_step_*, state_step_*) are not candidates."""
    model = tmp_path / "Model"
    model.mkdir()
    weights = _generator_files(model, gan_cfg(), [7, 99, 600, 60])
    for name in ("netG_step_1000.pth", "state_step_5000.pth", "clip9.pth", "clip99.pth",
                 "clip100.pth", "clip10.pth"):
        (model / name).write_bytes(b"")
    pick = resolve_checkpoint(str(model), "netG_epoch_*.pth", "generator", "TRAIN.NET_G")
    assert pick == model / "netG_epoch_600.pth"
    assert resolve_checkpoint(str(model), "clip*.pth", "encoder", "TRAIN.NET_E").name == \
        "clip100.pth"
    # what evaluation loads from the folder
    cfg = gan_cfg(f"TRAIN.NET_G={model}")
    netG = generator_for_eval(cfg, SimpleNamespace(embed_dim=64), CPU)
    assert not _differ(netG, weights[600]) and _differ(netG, weights[99])


def test_resume_state_pruning_keeps_exactly_the_newest_two(tmp_path) -> None:
    keep_apart = tmp_path / "netG_epoch_1.pth"
    keep_apart.write_bytes(b"weights")
    history = {3: [3], 9: [3, 9], 10: [9, 10], 99: [10, 99], 100: [99, 100], 1000: [100, 1000]}
    for step, kept in history.items():
        save_resume_state(tmp_path, {"step": step}, step)
        found = sorted(int(p.stem.rsplit("_", 1)[1]) for p in tmp_path.glob("state_step_*.pth"))
        assert found == kept, f"after step {step}"
    assert load_checkpoint(tmp_path / "state_step_1000.pth")["step"] == 1000
    assert keep_apart.read_bytes() == b"weights"


def test_warm_start_from_net_g_for_a_fresh_run_only(gan_cfg, tmp_path) -> None:
    """TRAIN.NET_G (here a folder: its highest netG_epoch_*) sets both G and its EMA before the
    first step; a run that resumes keeps its own state instead."""
    model = tmp_path / "start"
    model.mkdir()
    weights = _generator_files(model, gan_cfg(), [7, 99, 600])
    trainer = GANTrainer(gan_cfg(f"TRAIN.NET_G={model}", "TRAIN.MAX_STEPS=1"), CPU,
                         progress=False)
    assert not _differ(unwrap(trainer.netG), weights[600]), "G is not netG_epoch_600"
    assert not _differ(trainer.ema, weights[600]), "the EMA does not start from netG_epoch_600"
    trainer.train()
    trained = {k: v.clone() for k, v in unwrap(trainer.netG).state_dict().items()}
    assert _differ(unwrap(trainer.netG), weights[600])
    resumed = GANTrainer(gan_cfg(f"TRAIN.NET_G={model / 'netG_epoch_7.pth'}",
                                 "TRAIN.MAX_STEPS=2"), CPU, progress=False)
    assert resumed.step == 1 and not _differ(unwrap(resumed.netG), trained)
    # a resume never reads TRAIN.NET_G: the warm-start file may be gone by then
    shutil.rmtree(model)
    again = GANTrainer(gan_cfg(f"TRAIN.NET_G={model}", "TRAIN.MAX_STEPS=2"), CPU,
                       progress=False)
    assert again.step == 1 and not _differ(unwrap(again.netG), trained)


def test_stage1_one_cycle_learning_rates_per_group(shapes_cfg, tmp_path) -> None:
    """Two parameter groups: the CLIP towers at ENCODER_LR, the adapter at ADAPTER_LR (CLIP's
    logit_scale in neither), each on its own cosine one-cycle over MAX_EPOCH epochs of 6 steps
    (12 steps), warm-up PCT_START·12 = 3 steps: peak/25 at step 0, (peak/25 + peak)/2 at step 1
    (stepped by a real training step), the peak at step 2, then cosine down to peak/25/1e4 at
    step 11."""
    cfg = shapes_cfg(f"OUTPUT_DIR={tmp_path}", "GPU_ID=-1", "WORKERS=0", "TREE.BASE_SIZE=32",
                     "TEXT.WORDS_NUM=16", "TRAIN.BATCH_SIZE=4", "TRAIN.MAX_EPOCH=2",
                     "TRAIN.ENCODER_LR=0.001", "TRAIN.ADAPTER_LR=0.01", "TRAIN.PCT_START=0.25")
    trainer = DAMSMTrainer(cfg, CPU, progress=False)
    groups = trainer.optimizer.param_groups
    adapter = {id(p) for p in trainer.encoder.new_parameters()}
    assert len(groups) == 2 and adapter and {id(p) for p in groups[1]["params"]} == adapter
    towers = {id(p) for p in trainer.encoder.parameters() if p.requires_grad} - adapter
    assert {id(p) for p in groups[0]["params"]} == towers
    assert id(trainer.encoder.clip.logit_scale) not in towers | adapter

    def by_hand(step: int, peak: float) -> float:
        start, low = peak / 25, peak / 25 / 1e4
        if step <= 2:
            return peak + (start - peak) / 2 * (1 + math.cos(math.pi * step / 2))
        return low + (peak - low) / 2 * (1 + math.cos(math.pi * (step - 2) / 9))

    def lrs() -> list[float]:
        return [g["lr"] for g in groups]

    assert lrs() == pytest.approx([4e-5, 4e-4], rel=1e-9)
    trainer.sampler.set_epoch(0)
    trainer.train_step(next(iter(trainer.loader)))
    assert lrs() == pytest.approx([5.2e-4, 5.2e-3], rel=1e-9)
    for step in range(2, 12):
        trainer.scheduler.step()
        if step in (2, 6, 11):
            assert lrs() == pytest.approx([by_hand(step, 1e-3), by_hand(step, 1e-2)],
                                          rel=1e-9), f"step {step}"
    assert lrs() == pytest.approx([4e-9, 4e-8], rel=1e-9)
