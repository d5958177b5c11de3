"""Stage 2 end to end on a tiny shapes set: training steps, the text-feature cache, exact resume
(also after a real SIGKILL), non-finite losses, evaluation tree + metrics, R-precision against a
plain loop, custom captions, clear errors, and 2-process torchrun (gloo) runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GAN_TINY, assert_same_tensors, flat_tensors

import main as main_cli
import r_precision as r_precision_cli
import trainer as trainer_mod
from miscc.config import ConfigError, load_config
from miscc.protocol import caption_items
from miscc.training import NonFiniteLoss
from miscc.utils import atomic_torch_save, load_checkpoint
from model import ClipEncoder, resolve_clip_name
from r_precision import fold_stats, rank_first, rank_first_loop, sample_negatives, score_tree
from sampling import generate_custom, generate_test_set
from text_features import TextFeatures, load_frozen_encoder, text_feature_cache
from trainer import GANTrainer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = GAN_TINY


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory) -> Path:
    """A stage-1 encoder checkpoint in the format pretrain_DAMSM.py writes (tiny CLIP)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "Model" / "clip3.pth"
    atomic_torch_save(ClipEncoder(resolve_clip_name("tiny", ""), adapter=True)
                      .checkpoint_state(), path)
    return path


@pytest.fixture
def gan_cfg(data_dir, encoder_ckpt, tmp_path):
    """overrides -> tiny stage-2 config (cfg/clip_shapes_DMGAN.yml + TINY) writing to tmp."""

    def make(*overrides: str, out: Path | None = None, eval_cfg: bool = False):
        name = "eval_clip_shapes.yml" if eval_cfg else "clip_shapes_DMGAN.yml"
        return load_config(ROOT / "cfg" / name,
                           [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={out or tmp_path / 'run'}",
                            f"TRAIN.NET_E={encoder_ckpt}", *TINY, *overrides], quiet=True)

    return make


def weights(state_file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a training state (G, EMA, Ds, optimizer moments), flattened by name."""
    state = load_checkpoint(state_file)
    return flat_tensors({key: state[key] for key in ("netG", "ema", "netDs", "optG", "optDs")})


def assert_same_weights(a: Path, b: Path) -> None:
    assert_same_tensors(weights(a), weights(b))


# ------------------------------------------------------------------------------- training
def test_training_steps_write_everything(gan_cfg, tmp_path) -> None:
    cfg = gan_cfg("TRAIN.MAX_STEPS=8")
    trainer = GANTrainer(cfg, CPU, progress=False)
    assert all(o.defaults["fused"] for o in [trainer.optG, *trainer.optDs])
    before = {k: v.clone() for k, v in trainer.netG.state_dict().items()}
    d_before = [p.clone() for p in trainer.netDs[1].parameters()]
    summary = trainer.train()
    assert summary["step"] == 8 and summary["epoch"] == 1  # 24 images / 4 = 6 steps per epoch
    losses = summary["losses"]
    assert {"D0", "D1", "G", "G_adv", "DAMSM_words", "DAMSM_sent", "KL", "contrastive"} \
        <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.netG.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(d_before, trainer.netDs[1].parameters(),
                                                     strict=True))
    out = tmp_path / "run"
    model = out / "Model"
    assert (model / "netG_epoch_1.pth").is_file() and (model / "netG_step_8.pth").is_file()
    assert (model / "state_step_8.pth").is_file()
    assert {p.name for p in (out / "Image").iterdir()} == {"G_epoch_0.png", "G_epoch_1.png",
                                                          "G_step_8.png"}
    assert (out / "config.yml").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*"))
    # the EMA generator is what netG_epoch_<N>.pth holds, and it lags the trained G
    saved = load_checkpoint(model / "netG_step_8.pth")["state_dict"]
    ema = trainer.ema.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    g = trainer.netG.state_dict()
    assert not torch.equal(saved["ca.fc.weight"], g["ca.fc.weight"])
    # re-running the same command when training is complete does nothing
    again = GANTrainer(cfg, CPU, progress=False)
    assert again.step == 8 and again.train()["step"] == 8


def test_step_wiring_as_dmgan_cl(gan_cfg, monkeypatch) -> None:
    """One step, recorded: both captions share z; each D sees the real image with both captions
    and with the other images' captions, and the detached fakes; G's loss is the sum of both
    captions' adversarial + LAMBDA·DAMSM + KL terms plus CONTRASTIVE_WEIGHT·NT-Xent of the two
    fake batches' codes; D gets no gradient from the G step."""
    lam, weight = 2.0, 0.3
    trainer = GANTrainer(gan_cfg(f"TRAIN.SMOOTH.LAMBDA={lam}",
                                 f"TRAIN.CONTRASTIVE_WEIGHT={weight}",
                                 "TRAIN.G_MINIMAL_PAIR_WEIGHT=0", "TRAIN.TEXT_RAMP=0",
                                 "TRAIN.D_MINIMAL_PAIRS=0", "TRAIN.D_NEGATIVE_PICTURES=0"),
                         CPU, progress=False)
    calls: dict[str, list] = {}

    def record(name):
        real = getattr(trainer_mod, name)

        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            kept = out.detach() if torch.is_tensor(out) else tuple(o.detach() for o in out)
            calls.setdefault(name, []).append((args, kept))
            return out
        monkeypatch.setattr(trainer_mod, name, wrapper)

    for name in ("discriminator_loss", "generator_adv_loss", "words_loss", "sent_loss",
                 "kl_loss", "nt_xent"):
        record(name)
    inputs: dict[str, list] = {"G": [], "D": [], "code": []}
    trainer.netG.register_forward_pre_hook(lambda m, a: inputs["G"].append(a))
    for d in trainer.netDs:
        d.register_forward_pre_hook(lambda m, a: inputs["D"].append(a))
    real_encode = trainer.encoder.encode_image
    monkeypatch.setattr(trainer.encoder, "encode_image",
                        lambda x: inputs["code"].append(real_encode(x)) or inputs["code"][-1])
    d_grads = [0]
    for d in trainer.netDs:
        for p in d.parameters():
            p.register_hook(lambda g: d_grads.__setitem__(0, d_grads[0] + 1) or g)
    n_d_params = sum(1 for d in trainer.netDs for _ in d.parameters())

    batch = next(iter(trainer.loader))
    stats = trainer.train_step(batch)
    b = batch["imgs"][0].shape[0]

    z, sent, _, _, eps = inputs["G"][0]
    assert torch.equal(z[:b], z[b:]) and not torch.equal(eps[:b], eps[b:])
    expected_sent = trainer._text(batch)[1]
    torch.testing.assert_close(sent, expected_sent)  # caption 1 of every image, then caption 2
    assert not torch.equal(sent[:b], sent[b:])
    # D step: 2 calls per scale (real + wrong, fake), G step: 1 call per scale
    n_scales = len(trainer.netDs)
    assert len(inputs["D"]) == 3 * n_scales
    for i in range(n_scales):
        real_imgs, d_sent, wrong = inputs["D"][2 * i]
        assert real_imgs.shape[0] == b and torch.equal(d_sent, sent)
        torch.testing.assert_close(wrong, torch.cat([sent[:b].roll(1, 0),
                                                     sent[b:].roll(1, 0)]))
        fake_imgs, fake_sent = inputs["D"][2 * i + 1]  # no wrong sentences for fakes
        assert fake_imgs.shape[0] == 2 * b and not fake_imgs.requires_grad
        assert torch.equal(fake_sent, sent)
    # the D loss of each scale is the sum over both captions, each with b conditional logits
    d_calls = calls["discriminator_loss"]
    assert len(d_calls) == 2 * n_scales
    for i in range(n_scales):
        pair = d_calls[2 * i: 2 * i + 2]
        assert all(args[1].shape == (b,) and args[4].shape == (b,) for args, _ in pair)
        assert stats[f"D{i}"] == pytest.approx(float(pair[0][1] + pair[1][1]), rel=1e-5)
    # G: every term computed per caption half, on b items, then summed
    adv = sum(float(out) for _, out in calls["generator_adv_loss"])
    assert len(calls["generator_adv_loss"]) == 2 * n_scales
    assert [a[0].shape[0] for a, _ in calls["words_loss"]] == [b, b]
    # the shapes config switches DAMSM's same-class masking off (TRAIN.CLASS_MASK)
    assert all(a[3] is None for a, _ in calls["words_loss"])
    assert all(a[2] is None for a, _ in calls["sent_loss"])
    assert [a[0].shape[0] for a, _ in calls["sent_loss"]] == [b, b]
    assert len(calls["kl_loss"]) == 2
    words_total = sum(float(o[0] + o[1]) for _, o in calls["words_loss"])
    sent_total = sum(float(o[0] + o[1]) for _, o in calls["sent_loss"])
    kl = sum(float(o) for _, o in calls["kl_loss"])
    (z1, z2, tau), ntx = calls["nt_xent"][0][0][:3], float(calls["nt_xent"][0][1])
    code = inputs["code"][0][1]
    assert torch.equal(z1, code[:b]) and torch.equal(z2, code[b:]) and tau == 0.5
    assert stats["G_adv"] == pytest.approx(adv, rel=1e-5)
    assert stats["DAMSM_words"] == pytest.approx(words_total, rel=1e-5)
    assert stats["contrastive"] == pytest.approx(weight * ntx, rel=1e-5)
    assert stats["G"] == pytest.approx(adv + lam * (words_total + sent_total) + kl + weight * ntx,
                                       rel=1e-5)
    assert d_grads[0] == n_d_params  # one gradient per D parameter: the D step's alone


def test_hinge_loss_and_matching_aware_gp_reach_the_step(gan_cfg, monkeypatch) -> None:
    """TRAIN.GAN_LOSS hinge goes to every D and G adversarial term; TRAIN.MAGP_WEIGHT k adds
    k · the penalty of each D's conditional logits of the real images with their first
    captions, taken with respect to both (leaves of the step), to that D's loss."""
    k, power = 2.0, 6.0
    trainer = GANTrainer(gan_cfg("TRAIN.GAN_LOSS=hinge", f"TRAIN.MAGP_WEIGHT={k}"), CPU,
                         progress=False)
    kinds, penalties = [], []
    real_gp = trainer_mod.matching_aware_gp

    def gp(logits, images, sent, p):
        out = real_gp(logits, images, sent, p)
        penalties.append((logits.shape, images.shape, sent.shape, images.requires_grad,
                          sent.requires_grad, p, out.detach()))
        return out

    monkeypatch.setattr(trainer_mod, "matching_aware_gp", gp)
    for name in ("discriminator_loss", "generator_adv_loss"):
        real = getattr(trainer_mod, name)
        monkeypatch.setattr(trainer_mod, name,
                            lambda *a, _real=real, **kw: kinds.append(a[-1]) or _real(*a, **kw))
    batch = next(iter(trainer.loader))
    stats = trainer.train_step(batch)
    b = batch["imgs"][0].shape[0]
    assert set(kinds) == {"hinge"} and len(kinds) == 4 * len(trainer.netDs)
    assert len(penalties) == len(trainer.netDs)
    for logits, images, sent, image_leaf, sent_leaf, p, _ in penalties:
        assert logits == (b,) and images[0] == b and sent == (b, 64)
        assert image_leaf and sent_leaf and p == power
    assert stats["MA_GP"] == pytest.approx(float(sum(pen[-1] for pen in penalties)), rel=1e-5)
    # without the switch neither is there
    plain = GANTrainer(gan_cfg(), CPU, progress=False)
    assert "MA_GP" not in plain.train_step(batch)


def test_blurred_reals_are_d_negatives_of_their_captions(gan_cfg, monkeypatch) -> None:
    """TRAIN.D_BLUR_WEIGHT w: each D also sees the step's real images blurred (a sigma per image
    drawn in D_BLUR_SIGMA, pixels at the largest size, scaled to each D's size) with both
    captions, as fakes: w · the fake terms join that D's loss (logged as D<i>_blur); the blur
    is torchvision's Gaussian blur."""
    from torchvision.transforms.functional import gaussian_blur

    x = torch.rand(3, 3, 32, 32)
    sigma = torch.tensor([1.0, 1.5, 2.0])
    ref = torch.stack([gaussian_blur(x[i:i + 1], kernel_size=13, sigma=float(sigma[i]))[0]
                       for i in range(3)])
    assert torch.allclose(trainer_mod.gaussian_blurs(x, sigma), ref, atol=1e-5)

    trainer = GANTrainer(gan_cfg("TRAIN.D_BLUR_WEIGHT=0.5", "TRAIN.D_BLUR_SIGMA=[1.0,2.0]",
                                 "TRAIN.D_NEGATIVE_PICTURES=0"), CPU, progress=False)
    seen, blurs = [], []
    for d in trainer.netDs:
        d.register_forward_pre_hook(lambda m, a: seen.append(a))
    real_blur = trainer_mod.gaussian_blurs
    monkeypatch.setattr(trainer_mod, "gaussian_blurs",
                        lambda images, s: blurs.append((images, s)) or real_blur(images, s))
    batch = next(iter(trainer.loader))
    stats = trainer.train_step(batch)
    b = batch["imgs"][0].shape[0]
    assert [tuple(x.shape[-2:]) for x, _ in blurs] == [(16, 16), (32, 32)]
    small, large = blurs[0][1], blurs[1][1]
    assert torch.allclose(small, large / 2) and bool(((large >= 1) & (large <= 2)).all())
    # per scale: real + wrong, fake, blurred (3 D calls in the D step), then G's call
    for i in range(len(trainer.netDs)):
        images, sent = seen[3 * i + 2][:2]
        assert torch.equal(images, real_blur(batch["imgs"][i][:, 0], blurs[i][1]))
        assert sent.shape[0] == 2 * b
        assert stats[f"D{i}_blur"] > 0
    plain = GANTrainer(gan_cfg("TRAIN.D_NEGATIVE_PICTURES=0"), CPU, progress=False)
    assert not any(k.endswith("_blur") for k in plain.train_step(batch))
    for bad in ("[2.0, 1.0]", "[1.0]", "[0, 1]"):
        with pytest.raises(ConfigError, match="TRAIN.D_BLUR_SIGMA"):
            GANTrainer(gan_cfg("TRAIN.D_BLUR_WEIGHT=1", f"TRAIN.D_BLUR_SIGMA={bad}"), CPU,
                       progress=False)


@pytest.mark.parametrize("count", [1, 2])
def test_contradicting_pictures_are_mismatched_pairs_of_their_captions(gan_cfg, count) -> None:
    """TRAIN.D_NEGATIVE_PICTURES w: each D also scores the batch's contradicting pictures (N =
    D_NEGATIVE_PICTURE_COUNT per item) with the caption each contradicts (a row of the step's
    sentences) on its conditional logit, as a mismatch: D's loss = the DM-GAN terms + w · mean
    BCE(logit, 0) over the kept pictures (logged as D<i>_pictures)."""
    from miscc.losses import discriminator_loss, negative_loss

    trainer = GANTrainer(gan_cfg("TRAIN.D_NEGATIVE_PICTURES=0.5",
                                 f"TRAIN.D_NEGATIVE_PICTURE_COUNT={count}"), CPU, progress=False)
    calls = []
    for d in trainer.netDs:
        d.register_forward_hook(lambda m, a, o: calls.append((a, o)))
    batch = next(iter(trainer.loader))
    assert batch["contra_mask"].shape == (4, count) and batch["contra_mask"][:, 0].all()
    batch["contra_mask"][0, 0] = False  # a picture without a contradiction is left out
    batch["contra_cap"][1:3] = torch.tensor([0, 1])  # pictures against either caption
    stats = trainer.train_step(batch)
    b = batch["imgs"][0].shape[0]
    halves = (slice(0, b), slice(b, 2 * b))
    keep = batch["contra_mask"].flatten()
    for i in range(len(trainer.netDs)):
        (real_args, (ru, rc, wc)), (_, (fu, fc, _)), (args, (_, cc, _)) = calls[3 * i: 3 * i + 3]
        images, sent = args[:2]
        assert images.shape[0] == b * count
        for k in range(count):  # item by item: item j's pictures are rows j·N .. j·N + N - 1
            assert torch.equal(images[k::count], batch["contra_imgs"][i][:, k])
            rows = batch["contra_cap"] * b + torch.arange(b)
            assert torch.equal(sent[k::count], real_args[1][rows])
        pictures = negative_loss([cc[keep]]).detach()
        assert stats[f"D{i}_pictures"] == pytest.approx(float(pictures), rel=1e-5)
        rest = sum(discriminator_loss(ru, rc[h], fu[h], fc[h], wc[h]) for h in halves).detach()
        assert stats[f"D{i}"] == pytest.approx(float(rest + 0.5 * pictures), rel=1e-5)
    plain = GANTrainer(gan_cfg("TRAIN.D_NEGATIVE_PICTURES=0"), CPU, progress=False)
    assert "contra_imgs" not in next(iter(plain.loader))
    assert not any(k.endswith("_pictures") for k in plain.train_step(batch))
    with pytest.raises(ConfigError, match="TRAIN.D_NEGATIVE_PICTURES"):
        GANTrainer(gan_cfg("TRAIN.D_NEGATIVE_PICTURES=-1"), CPU, progress=False)
    with pytest.raises(ConfigError, match="TRAIN.D_NEGATIVE_PICTURE_COUNT is 0"):
        GANTrainer(gan_cfg("TRAIN.D_NEGATIVE_PICTURE_COUNT=0"), CPU, progress=False)


def test_text_ramp_lets_the_adversarial_terms_train_alone_first(gan_cfg) -> None:
    """TRAIN.TEXT_RAMP r: G's DAMSM, contrastive and one-edit terms are weighted by step/(r·T),
    capped at 1 (T = MAX_EPOCH epochs of steps); adversarial and KL terms always count fully."""
    f = trainer_mod.text_terms_factor
    assert [f(s, 100, 0.2) for s in (0, 5, 10, 20, 99)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert f(0, 100, 0.0) == 1.0
    trainer = GANTrainer(gan_cfg("TRAIN.TEXT_RAMP=0.5", "TRAIN.G_MINIMAL_PAIR_WEIGHT=0.5",
                                 "TEXT.WORD_LISTS=shapes"), CPU, progress=False)
    batch = next(iter(trainer.loader))
    lam = float(trainer.cfg.TRAIN.SMOOTH.LAMBDA)

    def text_part(st: dict) -> float:
        return (lam * (st["DAMSM_words"] + st["DAMSM_sent"]) + st["contrastive"]
                + 0.5 * st["G_pairs"])

    first = trainer.train_step(batch)  # step 0: text terms weighted 0
    assert text_part(first) > 0
    assert first["G"] == pytest.approx(first["G_adv"] + first["KL"], rel=1e-5)
    trainer.step = max(1, trainer.total_steps // 4)  # on the way up the ramp
    w = trainer.step / (0.5 * trainer.total_steps)
    assert 0 < w < 1
    mid = trainer.train_step(batch)
    assert mid["G"] == pytest.approx(mid["G_adv"] + mid["KL"] + w * text_part(mid), rel=1e-4)
    with pytest.raises(ConfigError, match="TRAIN.TEXT_RAMP"):
        GANTrainer(gan_cfg("TRAIN.TEXT_RAMP=1.5"), CPU, progress=False)


def test_mode_seeking_redraws_a_share_of_the_batch_with_fresh_noise(gan_cfg) -> None:
    """TRAIN.MODE_SEEKING_WEIGHT w, SHARE s: G draws the batch's 2B rows and again the first
    m = round(s·B) rows' captions (same sentence, words, mask and condition noise) with fresh z,
    in one pass; the discriminators see only the 2B fakes; G's loss adds w · MSGAN's term
    between the m images and their redraws (logged as G_mode_seeking)."""
    w = 0.5
    trainer = GANTrainer(gan_cfg(f"TRAIN.MODE_SEEKING_WEIGHT={w}", "TRAIN.MODE_SEEKING_SHARE=0.5",
                                 "TRAIN.TEXT_RAMP=0"), CPU, progress=False)
    calls, seen = [], []
    trainer.netG.register_forward_hook(lambda m, a, out: calls.append((a, out)))
    for d in trainer.netDs:
        d.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    batch = next(iter(trainer.loader))
    stats = trainer.train_step(batch)
    b = batch["imgs"][0].shape[0]
    m = round(0.5 * b)
    (z, sent, words, mask, eps), (images, _, _) = calls[0]
    assert len(calls) == 1 and z.shape[0] == 2 * b + m
    for t in (sent, words, mask, eps):
        assert torch.equal(t[2 * b:], t[:m])
    assert not torch.equal(z[2 * b:], z[:m])
    assert set(seen) == {b, 2 * b}  # real with matched/wrong, fakes: never the redraws
    expected = trainer_mod.mode_seeking_loss(images[-1][:m], images[-1][2 * b:], z[:m],
                                             z[2 * b:])
    assert stats["G_mode_seeking"] == pytest.approx(expected.item(), rel=1e-5)
    lam = float(trainer.cfg.TRAIN.SMOOTH.LAMBDA)
    rest = (stats["G_adv"] + lam * (stats["DAMSM_words"] + stats["DAMSM_sent"]) + stats["KL"]
            + stats["contrastive"]
            + float(trainer.cfg.TRAIN.G_MINIMAL_PAIR_WEIGHT) * stats.get("G_pairs", 0.0))
    assert stats["G"] == pytest.approx(rest + w * stats["G_mode_seeking"], rel=1e-4)
    assert "G_mode_seeking" not in GANTrainer(gan_cfg(), CPU, progress=False).train_step(batch)
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="TRAIN.MODE_SEEKING_SHARE"):
            GANTrainer(gan_cfg("TRAIN.MODE_SEEKING_WEIGHT=1", f"TRAIN.MODE_SEEKING_SHARE={bad}"),
                       CPU, progress=False)


def test_minimal_pairs_reach_d_and_g(gan_cfg, monkeypatch) -> None:
    """TRAIN.D_MINIMAL_PAIRS 1: every mismatched sentence D sees is the frozen text tower's code
    of a one-edit variant of that row's own caption (seed SEED + n·C + c), with the real image;
    G_MINIMAL_PAIR_WEIGHT w adds w · the per-item CE of each half's fake codes over [caption,
    its cached edits]."""
    from datasets import CaptionTokenizer
    from miscc.minimal_pairs import load_word_lists, one_edit_negatives

    w, k = 0.7, 3
    cfg = gan_cfg("TEXT.WORD_LISTS=shapes", "TRAIN.D_MINIMAL_PAIRS=1.0", "TRAIN.TEXT_RAMP=0",
                  f"TRAIN.G_MINIMAL_PAIR_WEIGHT={w}", f"TRAIN.MINIMAL_PAIR_EDITS={k}",
                  "TRAIN.D_NEGATIVE_PICTURES=0")
    trainer = GANTrainer(cfg, CPU, progress=False)
    calls: list = []
    real_loss = trainer_mod.minimal_pair_loss
    monkeypatch.setattr(trainer_mod, "minimal_pair_loss",
                        lambda *a: calls.append((a, real_loss(*a))) or calls[-1][1])
    inputs: dict[str, list] = {"D": [], "code": []}
    for d in trainer.netDs:
        d.register_forward_pre_hook(lambda m, a: inputs["D"].append(a))
    real_encode = trainer.encoder.encode_image
    monkeypatch.setattr(trainer.encoder, "encode_image",
                        lambda x: inputs["code"].append(real_encode(x)) or inputs["code"][-1])
    batch = next(iter(trainer.loader))
    stats = trainer.train_step(batch)
    b = batch["imgs"][0].shape[0]
    index = batch["index"].repeat(2)
    cap = torch.cat([batch["cap_idx"][:, 0], batch["cap_idx"][:, 1]])
    lists, tokenizer = load_word_lists("shapes"), CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))
    per_image = int(cfg.TEXT.CAPTIONS_PER_IMAGE)
    sent = trainer._text(batch)[1]
    edits = []
    for n, c in zip(index.tolist(), cap.tolist(), strict=True):
        caption = trainer.dataset.info.captions[n][c]
        texts = one_edit_negatives(caption, lists, k, int(cfg.SEED) + n * per_image + c)
        assert texts  # every shapes caption names a shape and a colour
        with torch.no_grad():
            edits.append(trainer.encoder.encode_text(tokenizer(texts))[1].float())
    for i in range(len(trainer.netDs)):
        _, d_sent, wrong = inputs["D"][2 * i]
        assert torch.equal(d_sent, sent)
        for r in range(2 * b):
            gaps = (edits[r] - wrong[r]).abs().amax(1)
            assert float(gaps.min()) < 1e-4, f"row {r}: D's wrong caption is not an edit"
    # G: one per-item CE per caption half, on that half's fake codes, captions and edits
    code = inputs["code"][0][1]
    assert len(calls) == 2
    for h, (args, _) in zip((slice(0, b), slice(b, 2 * b)), calls, strict=True):
        assert torch.equal(args[0], code[h]) and torch.equal(args[1], sent[h])
        assert args[2].shape == (b, k, sent.shape[1]) and bool(args[3].any(1).all())
    pairs = sum(float(out.detach()) for _, out in calls)
    assert stats["G_pairs"] == pytest.approx(pairs, rel=1e-5)
    lam = float(cfg.TRAIN.SMOOTH.LAMBDA)
    rest = stats["G_adv"] + lam * (stats["DAMSM_words"] + stats["DAMSM_sent"]) + stats["KL"] \
        + stats["contrastive"]
    assert stats["G"] == pytest.approx(rest + w * pairs, rel=1e-4)


def test_minimal_pair_wrong_replaces_a_share_with_real_edits() -> None:
    """Share 0 keeps every mismatched row; share 1 replaces each row that has a real edit by
    one of its real edits (never a padded slot) and keeps rows without any; share 0.5 about
    half, reproducibly under the generator."""
    n, k, dim = 400, 3, 4
    wrong = torch.zeros(n, dim)
    edits = torch.arange(1, k + 1, dtype=torch.float32).view(1, k, 1).expand(n, k, dim).clone()
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[::2, 1:] = True  # even rows: slots 1 and 2 are real; odd rows: none
    g = torch.Generator().manual_seed(0)
    assert torch.equal(trainer_mod.minimal_pair_wrong(wrong, edits, mask, 0.0, g), wrong)
    out = trainer_mod.minimal_pair_wrong(wrong, edits, mask, 1.0, g)
    assert torch.equal(out[1::2], wrong[1::2])
    assert set(out[::2, 0].tolist()) == {2.0, 3.0}
    half = trainer_mod.minimal_pair_wrong(wrong, edits, mask, 0.5,
                                          torch.Generator().manual_seed(1))
    again = trainer_mod.minimal_pair_wrong(wrong, edits, mask, 0.5,
                                           torch.Generator().manual_seed(1))
    assert torch.equal(half, again)
    assert 70 < int((half[::2, 0] > 0).sum()) < 130


def test_minimal_pair_switches_need_word_lists(gan_cfg) -> None:
    with pytest.raises(ConfigError, match="TEXT.WORD_LISTS"):
        GANTrainer(gan_cfg("TEXT.WORD_LISTS=", "TRAIN.D_MINIMAL_PAIRS=0.5"), CPU,
                   progress=False)
    with pytest.raises(ConfigError, match="TRAIN.D_MINIMAL_PAIRS is 2.0"):
        GANTrainer(gan_cfg("TEXT.WORD_LISTS=shapes", "TRAIN.D_MINIMAL_PAIRS=2"), CPU,
                   progress=False)


def test_lr_factor_decays_linearly_to_zero_from_the_start_fraction() -> None:
    f = trainer_mod.lr_factor
    assert [f(s, 100, 0.5) for s in (0, 49, 50, 75, 99, 100)] == [1.0, 1.0, 1.0, 0.5, 0.02, 0.0]
    assert [f(s, 100, 0.0) for s in (0, 50, 90)] == [1.0, 0.5, pytest.approx(0.1)]
    assert [f(s, 100, 1.0) for s in (0, 99, 100)] == [1.0, 1.0, 1.0]


def test_lr_decay_sets_g_and_d_rates_in_each_step(gan_cfg) -> None:
    """TRAIN.LR_DECAY_START 0: the rates of the step just taken are the configured ones times
    (total - step) / total, for G and every D; outside [0, 1] is a config error."""
    trainer = GANTrainer(gan_cfg("TRAIN.MAX_STEPS=2", "TRAIN.LR_DECAY_START=0.0",
                                 "TRAIN.GENERATOR_LR=0.001", "TRAIN.DISCRIMINATOR_LR=0.003"),
                         CPU, progress=False)
    total = trainer.steps_per_epoch * 3
    trainer.train()
    last = (total - 1) / total  # the second step is step 1
    assert trainer.optG.param_groups[0]["lr"] == pytest.approx(0.001 * last)
    assert len(trainer.optDs) == 2
    assert all(o.param_groups[0]["lr"] == pytest.approx(0.003 * last) for o in trainer.optDs)
    trainer.step = total * 3 // 4
    trainer._set_learning_rates()
    assert trainer.optG.param_groups[0]["lr"] == pytest.approx(0.001 * (total - total * 3 // 4)
                                                              / total)
    with pytest.raises(ConfigError, match="TRAIN.LR_DECAY_START is 1.5"):
        GANTrainer(gan_cfg("TRAIN.LR_DECAY_START=1.5"), CPU, progress=False)


def test_class_mask_switch_passes_the_batch_class_ids(gan_cfg) -> None:
    from miscc.training import damsm_class_ids

    batch = {"class_id": torch.tensor([3, 1, 3])}
    on, off = gan_cfg("TRAIN.CLASS_MASK=True"), gan_cfg()
    assert torch.equal(damsm_class_ids(on, batch, CPU), batch["class_id"])
    assert damsm_class_ids(off, batch, CPU) is None and not off.TRAIN.CLASS_MASK


def test_without_discriminators_the_generator_learns_from_damsm_alone(gan_cfg) -> None:
    trainer = GANTrainer(gan_cfg("TRAIN.MAX_STEPS=2", "TRAIN.B_NET_D=False"), CPU,
                         progress=False)
    head = trainer.netG.heads[-1][0].weight.clone()
    losses = trainer.train()["losses"]
    assert trainer.netDs == [] and not any(k[1:].isdigit() for k in losses)
    assert losses["G_adv"] == 0 and losses["DAMSM_words"] > 0
    assert not torch.equal(head, trainer.netG.heads[-1][0].weight)


def test_text_cache_holds_the_frozen_text_tower(gan_cfg, data_dir) -> None:
    cfg = gan_cfg()
    encoder = load_frozen_encoder(cfg, CPU)
    trainer = GANTrainer(cfg, CPU, progress=False)
    text = trainer.text
    assert isinstance(text, TextFeatures)
    tokens = trainer.dataset.tokens
    index, cap = torch.tensor([0, 5, 23]), torch.tensor([0, 9, 3])
    words, sent, mask = text.lookup(index, cap)
    with torch.no_grad():
        w_ref, s_ref, m_ref = encoder.encode_text(tokens[index, cap])
    length = words.shape[1]
    assert length < tokens.shape[-1] and not m_ref[:, length:].any()  # padding tail trimmed
    torch.testing.assert_close(words, w_ref[:, :length], atol=2e-3, rtol=2e-3)  # fp16 storage
    torch.testing.assert_close(sent, s_ref)
    assert torch.equal(mask, m_ref[:, :length])
    folders = list((data_dir / "cache").glob("text_train_*"))
    assert len(folders) == 1
    stamp = (folders[0] / "meta.json").stat().st_mtime_ns
    text_feature_cache(cfg, "train", tokens, encoder, CPU)  # reused, not rebuilt
    assert (folders[0] / "meta.json").stat().st_mtime_ns == stamp
    torch.nn.init.normal_(encoder.clip.token_embedding.weight)  # another encoder: another key
    text_feature_cache(cfg, "train", tokens, encoder, CPU)
    assert len(list((data_dir / "cache").glob("text_train_*"))) == 2


def test_text_cache_and_reencoding_train_alike(gan_cfg, tmp_path) -> None:
    """The TEXT_CACHE switch only changes where the features come from (fp16 rounding)."""
    trainer = GANTrainer(gan_cfg(out=tmp_path / "direct"), CPU, progress=False)
    trainer.sampler.set_epoch(1)
    batch = next(iter(trainer.loader))
    assert not torch.equal(batch["cap_idx"][:, 0], batch["cap_idx"][:, 1])
    cached = trainer._text(batch)
    trainer.text = None  # the baseline: the text tower on this batch's two captions
    words, sent, mask = trainer._text(batch)
    length = cached[0].shape[1]  # the cache keeps the split's longest caption, not the context
    assert not mask[:, length:].any()
    torch.testing.assert_close(cached[0], words[:, :length], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached[1], sent)
    assert torch.equal(cached[2], mask[:, :length])
    runs = {}
    for flag in ("True", "False"):
        cfg = gan_cfg("TRAIN.MAX_STEPS=2", f"TRAIN.TEXT_CACHE={flag}", out=tmp_path / flag)
        runs[flag] = GANTrainer(cfg, CPU, progress=False).train()["losses"]
    for key in runs["True"]:
        assert abs(runs["True"][key] - runs["False"][key]) < 1e-2 * max(1, abs(runs["True"][key]))


def test_resume_reproduces_uninterrupted_run(gan_cfg, tmp_path) -> None:
    """8 steps straight vs. 4 steps, stop, resume to 8 (mid-epoch, crossing an epoch end;
    the resumed half even uses a data-loader worker): identical weights and optimizer state."""
    straight = gan_cfg("TRAIN.MAX_STEPS=8", out=tmp_path / "a")
    GANTrainer(straight, CPU, progress=False).train()
    GANTrainer(gan_cfg("TRAIN.MAX_STEPS=4", out=tmp_path / "b"), CPU, progress=False).train()
    resumed = GANTrainer(gan_cfg("TRAIN.MAX_STEPS=8", "WORKERS=1", out=tmp_path / "b"), CPU,
                         progress=False)
    assert resumed.step == 4 and resumed.in_epoch == 4
    resumed.train()
    assert_same_weights(tmp_path / "a" / "Model" / "state_step_8.pth",
                        tmp_path / "b" / "Model" / "state_step_8.pth")
    # ... and a genuinely different run differs (so the comparison can fail)
    GANTrainer(gan_cfg("TRAIN.MAX_STEPS=8", "SEED=5", out=tmp_path / "c"), CPU,
               progress=False).train()
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_weights(tmp_path / "a" / "Model" / "state_step_8.pth",
                            tmp_path / "c" / "Model" / "state_step_8.pth")


def _cli_args(cfg_file: str, data_dir: Path, encoder_ckpt: Path, out: Path, *extra: str):
    args = ["--cfg", str(ROOT / "cfg" / cfg_file), "--data_dir", str(data_dir), "--gpu", "-1",
            "--set", f"OUTPUT_DIR={out}", "--set", f"TRAIN.NET_E={encoder_ckpt}"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_sigkill_then_rerun_matches_uninterrupted(gan_cfg, data_dir, encoder_ckpt,
                                                  tmp_path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "main.py", *_cli_args("clip_shapes_DMGAN.yml", data_dir,
                                                 encoder_ckpt, out, "TRAIN.MAX_EPOCH=30"),
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / "Model").glob("state_step_*.pth")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    time.sleep(0.5)  # land somewhere inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {int(p.stem.split("_")[-1]) for p in (out / "Model").glob("state_step_*.pth")}
    assert done and max(done) < 30 * 6, "the run finished before it was killed"
    target = (max(done) // 6 + 2) * 6  # two more epochs past the newest complete checkpoint
    resumed = GANTrainer(gan_cfg(f"TRAIN.MAX_STEPS={target}", "TRAIN.MAX_EPOCH=30", out=out),
                         CPU, progress=False)
    assert resumed.step == max(done)
    resumed.train()
    GANTrainer(gan_cfg(f"TRAIN.MAX_STEPS={target}", "TRAIN.MAX_EPOCH=30",
                       out=tmp_path / "straight"), CPU, progress=False).train()
    assert_same_weights(out / "Model" / f"state_step_{target}.pth",
                        tmp_path / "straight" / "Model" / f"state_step_{target}.pth")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(gan_cfg, tmp_path,
                                                              monkeypatch) -> None:
    cfg = gan_cfg("TRAIN.MAX_STEPS=20")
    trainer = GANTrainer(cfg, CPU, progress=False)
    real_kl = trainer_mod.kl_loss

    def poisoned(mu, logvar):
        return real_kl(mu, logvar) * (float("nan") if trainer.step == 8 else 1.0)

    monkeypatch.setattr(trainer_mod, "kl_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="step 9"):
        trainer.train()
    states = sorted((tmp_path / "run" / "Model").glob("state_step_*.pth"))
    assert [p.name for p in states] == ["state_step_6.pth"]
    assert all(torch.isfinite(t).all() for t in weights(states[0]).values())


def test_ema_statistics_are_recomputed_from_its_own_activations(gan_cfg, tmp_path) -> None:
    """TRAIN.EMA_BN_BATCHES = 3: each batch norm of the saved EMA generator holds the mean of
    its inputs' per-batch channel means and unbiased variances over 3 passes (read by hooks),
    the same at every save; its weights and the training itself are those of the switch off."""
    on = GANTrainer(gan_cfg("TRAIN.MAX_STEPS=3", "TRAIN.EMA_BN_BATCHES=3", out=tmp_path / "on"),
                    CPU, progress=False)
    norms = {n: m for n, m in on.ema.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert {type(m).__name__ for m in norms.values()} == {"BatchNorm1d", "BatchNorm2d"}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in norms}

    def record(name: str):
        def hook(module, args) -> None:
            if module.training:  # the recomputation's passes, not the eval-mode sample grids
                seen[name].append(args[0].detach().float())
        return hook

    for name, m in norms.items():
        m.register_forward_pre_hook(record(name))
    on.train()  # one save: the stop at step 3
    saved = load_checkpoint(tmp_path / "on" / "Model" / "netG_step_3.pth")["state_dict"]
    for name, inputs in seen.items():
        assert len(inputs) == 3 and inputs[0].shape[0] == 2 * 4  # 2·BATCH_SIZE captions
        dims = [d for d in range(inputs[0].dim()) if d != 1]
        mean = torch.stack([x.mean(dims) for x in inputs]).mean(0)
        var = torch.stack([x.var(dims, correction=1) for x in inputs]).mean(0)
        torch.testing.assert_close(saved[f"{name}.running_mean"], mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(saved[f"{name}.running_var"], var, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(saved[f"{name}.running_mean"],
                                  on.netG.state_dict()[f"{name}.running_mean"])
    on.recompute_ema_statistics()  # the next save writes the same statistics
    assert_same_tensors(dict(on.ema.state_dict()), saved)
    assert all(m.momentum == 0.1 and not m.training for m in norms.values())
    off = GANTrainer(gan_cfg("TRAIN.MAX_STEPS=3", "TRAIN.EMA_BN_BATCHES=0", out=tmp_path / "off"),
                     CPU, progress=False)
    off.train()
    off_saved = load_checkpoint(tmp_path / "off" / "Model" / "netG_step_3.pth")["state_dict"]
    params = dict(off.ema.named_parameters())
    assert_same_tensors({k: v for k, v in off_saved.items() if k in params},
                        {k: v for k, v in saved.items() if k in params})
    assert_same_tensors(load_checkpoint(tmp_path / "off" / "Model" / "state_step_3.pth")["netG"],
                        load_checkpoint(tmp_path / "on" / "Model" / "state_step_3.pth")["netG"])
    assert torch.equal(off_saved["init.fc.1.running_mean"],
                       off.netG.state_dict()["init.fc.1.running_mean"])  # as released: G's
    with pytest.raises(ConfigError, match="TRAIN.EMA_BN_BATCHES is -1"):
        GANTrainer(gan_cfg("TRAIN.EMA_BN_BATCHES=-1", out=tmp_path / "bad"), CPU, progress=False)


def test_fresh_starts_over(gan_cfg) -> None:
    GANTrainer(gan_cfg("TRAIN.MAX_STEPS=2"), CPU, progress=False).train()
    assert GANTrainer(gan_cfg("TRAIN.MAX_STEPS=2"), CPU, progress=False).step == 2
    fresh = GANTrainer(gan_cfg("TRAIN.MAX_STEPS=2"), CPU, fresh=True, progress=False)
    assert fresh.step == 0 and not list(fresh.model_dir.glob("*.pth"))


def test_user_errors_are_one_clear_line(gan_cfg, data_dir, encoder_ckpt, tmp_path,
                                        capsys) -> None:
    bad = tmp_path / "clip9.pth"
    bad.write_bytes(b"not a checkpoint")
    args = _cli_args("clip_shapes_DMGAN.yml", data_dir, encoder_ckpt, tmp_path / "x",
                     f"TRAIN.NET_E={bad}")
    assert main_cli.main([*args, "--no-progress"]) == 2
    assert "error: encoder checkpoint" in capsys.readouterr().err
    assert main_cli.main([*args[:-2], "--set", f"TRAIN.NET_E={tmp_path / 'missing'}"]) == 2
    assert "TRAIN.NET_E: stage-1 encoder not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="set TEXT.EMBEDDING_DIM: 64"):
        load_frozen_encoder(gan_cfg("TEXT.EMBEDDING_DIM=512"), CPU)


# ----------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def trained(data_dir, encoder_ckpt, tmp_path_factory) -> Path:
    """Output dir of a 6-step (one epoch) tiny run: Model/netG_epoch_1.pth."""
    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(ROOT / "cfg" / "clip_shapes_DMGAN.yml",
                      [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={out}", f"TRAIN.NET_E={encoder_ckpt}",
                       *TINY, "TRAIN.MAX_EPOCH=1"], quiet=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    GANTrainer(cfg, CPU, progress=False).train()
    torch.set_num_threads(before)
    return out


def test_evaluation_writes_one_image_per_test_caption(gan_cfg, trained, tmp_path, data_dir,
                                                      encoder_ckpt, capsys) -> None:
    cfg = gan_cfg(f"TRAIN.NET_G={trained / 'Model' / 'netG_epoch_1.pth'}", "TRAIN.BATCH_SIZE=7",
                  eval_cfg=True)
    result = generate_test_set(cfg, CPU, progress=False)
    single = tmp_path / "run" / "valid" / "single"
    from datasets import read_split

    info = read_split(cfg, "test")
    expected = {f"{key}_s{k}.png" for key, caps in zip(info.keys, info.captions, strict=True)
                for k in range(len(caps))}
    found = {str(p.relative_to(single)) for p in single.rglob("*.png")}
    assert found == expected and len(found) == 120
    from PIL import Image

    with Image.open(single / sorted(expected)[0]) as img:
        assert img.size == (32, 32)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["images"] == 120 and metrics["negatives"] == 99
    assert len(metrics["folds"]) == 10  # 12 images each, mean ± population std of the folds
    assert metrics["r_precision"] == pytest.approx(np.mean(metrics["folds"]))
    assert metrics["r_precision_std"] == pytest.approx(np.std(metrics["folds"]))
    # the standalone script scores the same tree (<OUTPUT_DIR>/valid/single) the same way
    capsys.readouterr()
    args = _cli_args("eval_clip_shapes.yml", data_dir, encoder_ckpt, tmp_path / "run")
    assert r_precision_cli.main([*args, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["images"] == 120 and again["path"] == str(single)
    assert again["r_precision"] == pytest.approx(metrics["r_precision"])
    assert again["clip_score"] == pytest.approx(metrics["clip_score"], abs=1e-4)
    assert r_precision_cli.main([*args, "--path", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: generated image folder not found")
    # with images missing it scores the rest and says so
    for p in sorted(single.rglob("*_s9.png")):
        p.unlink()
    with pytest.warns(UserWarning, match="12 of 120 test-caption images are missing"):
        assert score_tree(cfg, single, CPU, progress=False)["images"] == 108


def test_evaluation_scores_minimal_pairs_of_the_generated_images(gan_cfg, trained, tmp_path,
                                                                  monkeypatch) -> None:
    """With TEXT.WORD_LISTS the evaluation adds the generated images' minimal-pair accuracy
    per category (each image against its own caption's variants) for the training encoder and,
    with EVAL.INDEPENDENT_ENCODER, for the independent scorer; the independent entry is
    scored with the independent encoder's own codes and text side."""
    import sampling

    seen: list = []
    real = sampling.generated_pair_accuracy
    monkeypatch.setattr(sampling, "generated_pair_accuracy",
                        lambda codes, caps, *a: seen.append((codes, caps)) or real(codes, caps,
                                                                                    *a))
    torch.manual_seed(1)  # another encoder as the independent scorer
    other = tmp_path / "other" / "clip1.pth"
    atomic_torch_save(ClipEncoder(resolve_clip_name("tiny", ""), adapter=True)
                      .checkpoint_state(), other)
    cfg = gan_cfg(f"TRAIN.NET_G={trained / 'Model'}", "TEXT.WORD_LISTS=shapes",
                  "EVAL.MINIMAL_PAIR_IMAGES=40", f"EVAL.INDEPENDENT_ENCODER={other}",
                  eval_cfg=True)
    result = generate_test_set(cfg, CPU, progress=False)
    for entry in (result["minimal_pairs"], result["independent"]["minimal_pairs"]):
        assert {"shape", "colour", "mean"} <= set(entry)
        assert entry["colour"]["count"] == 40 and 0 < entry["colour"]["chance"] < 1
        assert 0 <= entry["mean"]["accuracy"] <= 1
    assert len(seen) == 2 and seen[0][1] == seen[1][1] and len(seen[0][1]) == 120
    # each scorer's own image codes of the same 120 images
    assert seen[0][0].shape == seen[1][0].shape == (120, 64)
    assert not torch.allclose(seen[0][0], seen[1][0])
    metrics = json.loads((Path(cfg.OUTPUT_DIR) / "metrics.json").read_text())
    assert metrics["minimal_pairs"] == json.loads(json.dumps(result["minimal_pairs"]))


def test_evaluation_on_a_tiny_test_split_samples_with_replacement(tmp_path, gan_cfg, trained,
                                                                  shapes_dir) -> None:
    """3 test images: fewer than 99 captions of other classes -> with replacement, noted."""
    from datasets import safe_load_pickle, write_pickle

    small = tmp_path / "small"
    shutil.copytree(shapes_dir, small)
    for name in ("filenames.pickle", "class_info.pickle"):
        write_pickle(safe_load_pickle(small / "test" / name)[:3], small / "test" / name)
    cfg = gan_cfg(f"DATA_DIR={small}", f"TRAIN.NET_G={trained / 'Model'}", eval_cfg=True)
    result = generate_test_set(cfg, CPU, progress=False)
    assert result["images"] == 30 and result["with_replacement"]
    assert "with replacement" in result["note"] and len(result["folds"]) == 10
    assert result["r_precision"] == pytest.approx(np.mean(result["folds"]))


def test_custom_captions_grid(gan_cfg, trained, tmp_path, data_dir) -> None:
    captions = tmp_path / "mine.txt"
    captions.write_text("a large red circle in the center\n\na small blue square\n")
    cfg = gan_cfg(f"TRAIN.NET_G={trained / 'Model'}", "B_VALIDATION=False", eval_cfg=True)
    [grid] = generate_custom(cfg, CPU, str(captions))
    assert grid == tmp_path / "run" / "examples" / "mine.png" and grid.is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "examples" / "mine").iterdir()) == \
        ["0.png", "1.png"]
    # without --captions: the files listed in <DATA_DIR>/example_filenames.txt
    assert [p.name for p in generate_custom(cfg, CPU)] == ["example_captions.png"]


def test_generator_of_another_architecture_is_refused(gan_cfg, trained, data_dir, encoder_ckpt,
                                                      tmp_path, capsys) -> None:
    args = _cli_args("eval_clip_shapes.yml", data_dir, encoder_ckpt, tmp_path / "x",
                     f"TRAIN.NET_G={trained / 'Model' / 'netG_epoch_1.pth'}",
                     "TREE.BRANCH_NUM=3")
    assert main_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "does not match this architecture" in err and "missing keys: " in err
    assert "stages.1." in err and "BRANCH_NUM: checkpoint 2 vs config 3" in err


# --------------------------------------------------------------------------- R-precision
def test_r_precision_batched_equals_loop() -> None:
    g = torch.Generator().manual_seed(0)
    n_img, caps, dim = 40, 5, 16
    sent = torch.randn(n_img, caps, dim, generator=g)
    classes = torch.arange(n_img) % 8
    num = torch.full((n_img,), caps)
    num[3] = 2  # an image with fewer captions: its padded rows are never negatives
    items = caption_items(num)
    bank = sent.reshape(-1, dim)
    true_idx = items[:, 0] * caps + items[:, 1]
    # half the images are close to their caption, half are random: R-precision strictly inside
    codes = torch.randn(len(items), dim, generator=g)
    codes[::2] = bank[true_idx[::2]] + 0.3 * codes[::2]
    valid = (torch.arange(caps)[None] < num[:, None]).reshape(-1)
    bank_class = classes.repeat_interleave(caps)
    negatives, info = sample_negatives(classes[items[:, 0]], bank_class, valid, 99, seed=1)
    assert not info["with_replacement"] and negatives.shape == (len(items), 99)
    assert torch.all(bank_class[negatives] != classes[items[:, 0]][:, None])
    assert torch.all(valid[negatives])
    assert all(len(set(row.tolist())) == 99 for row in negatives)  # without replacement
    batched = rank_first(codes, bank, true_idx, negatives, max_elements=500)
    looped = rank_first_loop(codes, bank, true_idx, negatives)
    assert torch.equal(batched, looped)
    mean, _, rates = fold_stats(batched)
    assert 0.3 < mean < 0.9 and len(rates) == 10
    folds = [sum(part) / len(part) for part in np.array_split(looped.tolist(), 10)]
    assert mean == pytest.approx(sum(folds) / 10)


@pytest.mark.parametrize("captions", [1, 3])  # pools of ~595 and ~1785 (>= 4·99: redraw repeats)
def test_negatives_large_pools_are_distinct_and_cover_other_classes(captions: int) -> None:
    classes = torch.arange(600) // 2  # pairs of images share a class
    bank_class = classes.repeat_interleave(captions)
    valid = torch.ones(len(bank_class), dtype=torch.bool)
    valid[::7] = False
    negatives, info = sample_negatives(classes, bank_class, valid, 99, seed=0)
    assert not info["with_replacement"] and negatives.shape == (600, 99)
    assert torch.all(bank_class[negatives] != classes[:, None]) and torch.all(valid[negatives])
    assert all(len(set(row.tolist())) == 99 for row in negatives)
    # every allowed caption can be drawn (no part of the pool is unreachable)
    hits = torch.bincount(negatives.flatten(), minlength=len(valid))
    assert torch.all(hits[valid] > 0) and torch.all(hits[~valid] == 0)


def test_r_precision_small_pools() -> None:
    classes = torch.tensor([0, 0, 1])
    bank_class = classes.repeat_interleave(2)
    valid = torch.ones(6, dtype=torch.bool)
    negatives, info = sample_negatives(classes, bank_class, valid, 99)
    assert info["with_replacement"] and info["smallest_pool"] == 2
    assert negatives.shape == (3, 99)
    assert torch.all(bank_class[negatives] != classes[:, None])
    none, info = sample_negatives(torch.zeros(3, dtype=torch.long),
                                  torch.zeros(6, dtype=torch.long), valid, 99)
    assert none is None and info["smallest_pool"] == 0


# --------------------------------------------------------------------------- distributed
def test_torchrun_two_processes_train_and_generate(data_dir, encoder_ckpt, tmp_path) -> None:
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "main.py", "--no-progress"]
    train = subprocess.run(
        [*torchrun, *_cli_args("clip_shapes_DMGAN.yml", data_dir, encoder_ckpt, out,
                               "TRAIN.MAX_EPOCH=2", "TRAIN.BATCH_SIZE=3")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "done: epoch 2, step 8" in train.stdout  # 24 images / 2 ranks / 3 = 4 steps
    state = load_checkpoint(out / "Model" / "state_step_8.pth")
    assert state["step"] == 8
    gen = subprocess.run(
        [*torchrun, *_cli_args("eval_clip_shapes.yml", data_dir, encoder_ckpt, out,
                               f"TRAIN.NET_G={out / 'Model'}", "TRAIN.BATCH_SIZE=16")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 120 and metrics["processes"] == 2
    assert len(list((out / "valid" / "single").rglob("*.png"))) == 120
    # one process generates the same images (noise does not depend on the rank count)
    cfg = load_config(ROOT / "cfg" / "eval_clip_shapes.yml",
                      [f"DATA_DIR={data_dir}", f"OUTPUT_DIR={tmp_path / 'one'}",
                       f"TRAIN.NET_E={encoder_ckpt}", *TINY, f"TRAIN.NET_G={out / 'Model'}",
                       "TRAIN.BATCH_SIZE=16"], quiet=True)
    single = generate_test_set(cfg, CPU, progress=False)
    assert single["r_precision"] == pytest.approx(metrics["r_precision"], abs=0.02)
    assert single["clip_score"] == pytest.approx(metrics["clip_score"], abs=0.05)
