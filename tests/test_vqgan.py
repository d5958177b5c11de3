"""CLIP-GEN's VQGAN tokenizer (docs/DESIGN.md §13): the quantizer's math and its remedies
against collapse, the adaptive GAN weight, the perceptual loss's VGG weights, the networks'
shapes, caption-free data, and train_vqgan.py end to end (files, exact resume, the architecture
mismatch message, a 2-process run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_same_tensors, flat_tensors
from PIL import Image

from clipgen.data import TokenizerImages, folder_split
from clipgen.quantizer import VectorQuantizer, nearest_codes
from clipgen.vq_losses import adaptive_weight, hinge_d_loss, load_lpips
from clipgen.vq_trainer import judge_reconstructions
from clipgen.vqgan import VQArch, VQModel
from miscc.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 px images -> 4x4 tokens from 16 codes; 24 train images / batch 4 = 6 steps an epoch
VQ_TINY = ["GPU_ID=-1", "WORKERS=0", "TREE.BASE_SIZE=16", "TRAIN.BATCH_SIZE=4",
           "TRAIN.MAX_EPOCH=2", "TRAIN.SNAPSHOT_INTERVAL=1", "VQGAN.CH=8",
           "VQGAN.CH_MULT=[1,2,2]", "VQGAN.ATTN_RESOLUTIONS=[4]", "VQGAN.Z_CHANNELS=8",
           "VQGAN.N_EMBED=16", "VQGAN.EMBED_DIM=8", "VQGAN.RESTART_EVERY=2",
           "VQGAN.DISC_CH=8", "VQGAN.DISC_LAYERS=2", "VQGAN.VAL_IMAGES=8"]
ADVERSARIAL = ["VQGAN.DISC_WEIGHT=0.8", "VQGAN.DISC_START=3"]


def vq_cfg(data: Path, out: Path, *overrides: str):
    return load_config(ROOT / "cfg" / "VQGAN" / "shapes.yml",
                       [*VQ_TINY, f"DATA_DIR={data}", f"OUTPUT_DIR={out}", *overrides],
                       quiet=True)


def run_cli(*args: str) -> tuple[int, str]:
    """train_vqgan.main in this process; (exit code, stderr)."""
    import contextlib
    import io

    import train_vqgan

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_vqgan.main(["--no-progress", *args])
    return code, err.getvalue()


# ------------------------------------------------------------------------------ quantizer
def test_nearest_code_by_one_matmul_equals_cdist() -> None:
    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(300, 16, generator=g), torch.randn(64, 16, generator=g)
    assert torch.equal(nearest_codes(z, codes, normalized=False),
                       torch.cdist(z, codes).argmin(1))
    zn, cn = F.normalize(z, dim=1), F.normalize(codes, dim=1)
    assert torch.equal(nearest_codes(zn, cn, normalized=True), torch.cdist(zn, cn).argmin(1))


def test_vq_loss_and_gradients_go_where_the_paper_says() -> None:
    """loss = ‖sg(z) − e‖² + β‖z − sg(e)‖² (means): the codebook gets 2(e − z)/N, the encoder
    output β·2(z − e)/N plus the decoder's gradient passed straight through."""
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(8, 4, beta=beta, l2_norm=False, init_from_data=False).eval()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(8, 4))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out, loss, idx, _ = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    e = vq.embedding.weight.detach()[idx.flatten()]
    assert torch.equal(idx.flatten(), torch.cdist(flat, vq.embedding.weight.detach()).argmin(1))
    assert torch.allclose(out.detach().permute(0, 2, 3, 1).reshape(-1, 4), e)  # forward = e
    n = flat.numel()
    assert torch.isclose(loss, (1 + beta) * ((flat - e) ** 2).sum() / n)

    upstream = torch.randn_like(out)
    (loss + (out * upstream).sum()).backward()
    want_z = beta * 2 * (flat - e) / n + upstream.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).reshape(-1, 4), want_z, atol=1e-6)
    want_codes = torch.zeros(8, 4).index_add_(0, idx.flatten(), 2 * (e - flat) / n)
    assert torch.allclose(vq.embedding.weight.grad, want_codes, atol=1e-6)


def test_l2_normalised_codes_and_outputs_have_unit_length() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, l2_norm=True, init_from_data=False).eval()
    out, _, idx, _ = vq(torch.randn(2, 8, 4, 4) * 5)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    assert torch.allclose(vq.lookup(idx), out, atol=1e-6)


def test_codebook_is_initialised_from_the_first_training_batch() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, l2_norm=False, init_from_data=True)
    z = torch.randn(2, 4, 4, 4) * 3 + 10  # far from the ±1/32 uniform init
    vq.eval()(z)
    assert not bool(vq.initialized)  # evaluation never initialises
    vq.train()(z)
    assert bool(vq.initialized)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    gap = torch.cdist(vq.embedding.weight.detach(), flat).min(1).values
    assert gap.max() < 0.05  # every code is one of this batch's vectors (+ a little noise)
    before = vq.embedding.weight.detach().clone()
    vq(z + 1)
    assert torch.equal(vq.embedding.weight.detach(), before)  # only once


def test_dead_codes_are_restarted_from_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, l2_norm=False, init_from_data=False)
    with torch.no_grad():  # codes 0-3 near the data, 4-7 far away: never chosen
        vq.embedding.weight.copy_(torch.tensor(
            [[0., 0.], [1, 0], [0, 1], [1, 1], [50, 50], [60, 50], [50, 60], [60, 60]]))
    z = torch.rand(4, 2, 4, 4)
    _, _, idx, stats = vq(z)
    assert set(idx.unique().tolist()) <= {0, 1, 2, 3}
    assert vq.usage[4:].sum() == 0 and vq.usage.sum() == 64
    kept = vq.embedding.weight.detach()[:4].clone()
    restarted, used = vq.restart_dead(stats["z"])
    assert len(idx.unique()) == 4  # the four near codes are used
    assert (restarted, used) == (4, 0.5)  # the four far ones are restarted
    assert torch.equal(vq.embedding.weight.detach()[:4], kept)
    revived = vq.embedding.weight.detach()[4:]
    assert torch.cdist(revived, stats["z"]).min(1).values.max() < 0.05
    assert vq.usage.sum() == 0  # counts start again
    _, _, idx2, _ = vq(z)
    assert (idx2 >= 4).any()  # revived codes are chosen


def test_perplexity_counts_equally_used_codes() -> None:
    vq = VectorQuantizer(4, 2, l2_norm=False, init_from_data=False).eval()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0., 0], [10, 0], [0, 10], [10, 10]]))
    z = torch.tensor([[0., 0], [10, 0], [0, 10], [10, 10]]).view(1, 2, 2, 2).permute(0, 3, 1, 2)
    assert float(vq(z.contiguous())[3]["perplexity"]) == pytest.approx(4.0)


# ------------------------------------------------------------------------------ networks
def test_tokenizer_shapes_and_token_round_trip(shapes_dir, tmp_path) -> None:
    cfg = vq_cfg(shapes_dir, tmp_path)
    torch.manual_seed(0)
    vq = VQModel.from_config(cfg).eval()
    assert vq.arch.tokens_side == 4
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    xrec, loss, idx, _ = vq(x)
    assert xrec.shape == x.shape and idx.shape == (3, 4, 4) and loss.ndim == 0
    assert torch.equal(vq.encode(x), idx)
    assert torch.allclose(vq.decode_indices(idx), xrec, atol=1e-5)
    # attention where the side is in ATTN_RESOLUTIONS: the 4x4 level and the middle blocks
    attn = [n for n, m in vq.named_modules() if type(m).__name__ == "AttnBlock"]
    assert len(attn) == 1 + 1 + 1 + 2  # encoder level 2, encoder mid, decoder mid, decoder lvl


def test_config_lists_are_checked(tmp_path) -> None:
    cfg = load_config(None, ["VQGAN.CH_MULT=[1,2]"], quiet=True)
    assert cfg.VQGAN.CH_MULT == [1, 2]
    with pytest.raises(ConfigError, match="VQGAN.CH_MULT expects a list of integers"):
        load_config(None, ["VQGAN.CH_MULT=[1, two]"], quiet=True)
    with pytest.raises(ConfigError, match="not divisible by 4"):
        VQArch(18, 8, (1, 2, 2), 1, (), 8, 16, 8, True).check()


# ---------------------------------------------------------------------------------- losses
def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(7, 5)
    rec = (x @ w.t()).abs().mean()
    adv = -(x @ w.t()).pow(3).mean()
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, w, retain_graph=True)[0]
    want = 0.8 * g_rec.norm() / (g_adv.norm() + 1e-4)
    got = adaptive_weight(rec, adv, w, 0.8)
    assert torch.isclose(got, want) and not got.requires_grad
    assert float(adaptive_weight(100 * rec, rec * 0, w, 1.0)) == pytest.approx(1e4)  # clamped


def test_hinge_discriminator_loss() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # ½·(mean(relu(1 − real)) + mean(relu(1 + fake))) = ½·(0.25 + 0.5)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.375)


def test_missing_vgg_weights_is_one_error_line(shapes_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    base = [f"--set={s}" for s in (*VQ_TINY, f"DATA_DIR={shapes_dir}",
                                   f"OUTPUT_DIR={tmp_path / 'out'}", "VQGAN.PERCEPTUAL_WEIGHT=1")]
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml", *base)
    hub = tmp_path / "hub" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert code == 2 and err.startswith("error: VGG16 weights") and err.count("\n") == 1
    assert str(hub) in err and "download.pytorch.org/models/vgg16-397923af.pth" in err
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml", *base,
                        "--set", f"VQGAN.VGG_WEIGHTS={tmp_path / 'vgg.pth'}")
    assert code == 2 and f"{tmp_path / 'vgg.pth'} (VQGAN.VGG_WEIGHTS)" in err


def test_lpips_takes_the_vgg_trunk_from_the_weights_file(tmp_path) -> None:
    """A torchvision VGG16 state dict (here random, features only) becomes LPIPS's trunk; the
    package's own calibration layers stay; every weight is frozen."""
    torch.manual_seed(0)
    widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
              (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # the convs of vgg16().features
    features = {}
    for i, (c_in, c_out) in zip(indices, widths, strict=True):
        features[f"{i}.weight"] = torch.randn(c_out, c_in, 3, 3) * 0.05
        features[f"{i}.bias"] = torch.randn(c_out) * 0.05
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    lp = load_lpips(str(path))
    assert torch.equal(lp.net.slice1[0].weight, features["0.weight"])
    assert torch.equal(getattr(lp.net.slice5, "28").bias, features["28.bias"])
    assert not any(p.requires_grad for p in lp.parameters()) and not lp.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = lp(x, x.flip(-1)).flatten()
    assert d.shape == (2,) and (d > 0).all() and lp(x, x).abs().max() < 1e-6


# ------------------------------------------------------------------------ caption-free data
def test_folder_of_images_split_and_corrupt_images(tmp_path) -> None:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(30):
        sub = root / f"class{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        ext = ".png" if i % 4 else ".JPG"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(
            sub / f"img{i}{ext}", format="PNG" if ext == ".png" else "JPEG")
    (root / "class0" / "notes.txt").write_text("not an image")
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG garbage")
    train_keys, _ = folder_split(root, "train", 0.1)
    test_keys, _ = folder_split(root, "test", 0.1)
    assert len(test_keys) == 3 and len(train_keys) == 28  # 31 image files, 10 % held out
    assert not set(train_keys) & set(test_keys)
    assert folder_split(root, "test", 0.1)[0] == test_keys  # the same every time

    cfg = load_config(None, [f"DATA_DIR={root}", "TREE.BRANCH_NUM=1", "TREE.BASE_SIZE=16",
                             "VQGAN.HOLDOUT=0.1"], quiet=True)
    assert len(TokenizerImages(cfg, "train", train=True)) == 28
    split = "train" if "class1/broken" in train_keys else "test"
    data = TokenizerImages(cfg, split, train=split == "train")
    assert not data.layout and data.skipped == 0
    with pytest.warns(UserWarning, match="unreadable image skipped: .*broken.png"):
        items = [data[i] for i in range(len(data))]
    assert data.skipped == 1
    assert all(it["image"].shape == (3, 16, 16) for it in items)
    assert all(-1 <= float(it["image"].min()) and float(it["image"].max()) <= 1 for it in items)

    other = tmp_path / "val"
    other.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(other / "a.png")
    assert folder_split(root, "test", 0.1, str(other))[0] == ["a"]
    assert len(folder_split(root, "train", 0.1, str(other))[0]) == 31  # nothing held out


def test_layout_data_never_reads_captions(shapes_dir, tmp_path) -> None:
    data = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data)
    shutil.rmtree(data / "text")
    cfg = vq_cfg(data, tmp_path / "out")
    test = TokenizerImages(cfg, "test", train=False)
    assert test.layout and len(test) == 12
    item = test[0]
    assert item["image"].shape == (3, 16, 16) and item["key"] == test.keys[0]


# ------------------------------------------------------------------------ train_vqgan.py
@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory) -> Path:
    """Two epochs of train_vqgan.py with the adversarial term switched on at step 3."""
    out = tmp_path_factory.mktemp("vqgan") / "run"
    sets = [f"--set={s}" for s in (*VQ_TINY, *ADVERSARIAL, f"DATA_DIR={shapes_dir}",
                                   f"OUTPUT_DIR={out}")]
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml", *sets)
    assert code == 0, err
    return out


def test_training_writes_checkpoints_pictures_and_metrics(trained, shapes_dir) -> None:
    model = trained / "Model"
    assert sorted(p.name for p in model.glob("vqgan*.pth")) == ["vqgan1.pth", "vqgan2.pth"]
    assert (trained / "Image" / "recon_epoch_2.png").is_file()
    with Image.open(trained / "Image" / "recon_epoch_2.png") as grid:
        assert grid.size == (8 * 64, 2 * 64)  # eight inputs above their reconstructions
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["images"] == 12 and 0 < metrics["codebook_usage"] <= 1
    assert metrics["codes_used"] == round(metrics["codebook_usage"] * 16)
    assert 0 < metrics["l1"] < 2 and metrics["psnr"] > 0
    pngs = sorted((trained / "valid" / "single").rglob("*.png"))
    assert len(pngs) == 12
    with Image.open(pngs[0]) as img:
        assert img.size == (16, 16)
    state = torch.load(model / "state_step_12.pth", weights_only=True)
    assert state["disc"] is not None and state["step"] == 12
    logs = list((trained / "logs").glob("events.out.tfevents.*"))
    assert logs
    # on a shapes set the judge reads the reconstructions (what CLIP-GEN's tokens can carry)
    assert metrics["judge"]["images"] == 12 and metrics["judge_real"]["shape"] == 1.0
    assert set(metrics["judge"]) == {"shape", "colour", "size", "pos", "bg", "mean", "images",
                                     "weights"}


def test_judge_reconstructions_reads_each_picture_against_its_own_caption(shapes_dir,
                                                                         tmp_path) -> None:
    """The real test pictures as "reconstructions" score as the real ones do; each one saved
    under its neighbour's name scores what the judge sees against the neighbour's caption."""
    from datasets import read_split
    from miscc.judge import ATTRIBUTES, SHIPPED, caption_truth, load_judge, predict, to_tensor

    cfg = vq_cfg(shapes_dir, tmp_path / "out")
    info = read_split(cfg, "test")
    real = [Image.open(p).convert("RGB") for p in info.image_paths]
    same, shifted = tmp_path / "same", tmp_path / "shifted"
    for i, key in enumerate(info.keys):
        for folder, img in ((same, real[i]), (shifted, real[(i + 1) % len(real)])):
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{key}.png")
    got = judge_reconstructions(cfg, same)
    assert got["judge"] == {**got["judge_real"], "weights": str(SHIPPED)}
    assert got["judge_fd"]["generated"] == pytest.approx(0.0, abs=1e-4)  # the same pictures
    pred = predict(load_judge(SHIPPED)[0], torch.stack([to_tensor(im) for im in real]))
    truth = torch.tensor([caption_truth(c[0]) for c in info.captions])
    moved = judge_reconstructions(cfg, shifted)["judge"]
    for j, name in enumerate(ATTRIBUTES):
        want = float((pred.roll(-1, 0)[:, j] == truth[:, j]).float().mean())
        assert moved[name] == pytest.approx(want)
    assert moved["colour"] < 1.0  # neighbours differ, so the comparison can fail
    assert judge_reconstructions(cfg, tmp_path / "empty") == {}
    off = vq_cfg(shapes_dir, tmp_path / "out", "EVAL.JUDGE=none")
    assert judge_reconstructions(off, same) == {}


def test_eval_mode_recomputes_the_same_metrics(trained, shapes_dir, tmp_path) -> None:
    first = json.loads((trained / "metrics.json").read_text())
    out = tmp_path / "eval"
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml", "--eval",
                        *[f"--set={s}" for s in (*VQ_TINY, f"DATA_DIR={shapes_dir}",
                                                 f"OUTPUT_DIR={out}",
                                                 f"VQGAN.NET={trained / 'Model'}")])
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    for key in ("l1", "psnr", "codebook_usage", "images"):
        assert again[key] == pytest.approx(first[key])
    assert again["checkpoint"].endswith("vqgan2.pth")


def test_checkpoint_of_another_architecture_names_the_values(trained, shapes_dir,
                                                             tmp_path) -> None:
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml", "--eval",
                        *[f"--set={s}" for s in (*VQ_TINY, f"DATA_DIR={shapes_dir}",
                                                 f"OUTPUT_DIR={tmp_path}", "VQGAN.CH=16",
                                                 "VQGAN.N_EMBED=32",
                                                 f"VQGAN.NET={trained / 'Model'}")])
    assert code == 2 and err.count("\n") == 1
    assert "VQGAN.CH: checkpoint 8, config 16" in err
    assert "VQGAN.N_EMBED: checkpoint 16, config 32" in err and "VQGAN.EMBED_DIM" not in err
    # a resume state of another architecture: the same message, before any step
    shutil.copytree(trained / "Model", tmp_path / "run" / "Model")
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml",
                        *[f"--set={s}" for s in (*VQ_TINY, f"DATA_DIR={shapes_dir}",
                                                 f"OUTPUT_DIR={tmp_path / 'run'}",
                                                 "VQGAN.CH=16")])
    assert code == 2 and "state_step_12.pth was trained with another architecture" in err


def test_resume_after_a_kill_is_exact(shapes_dir, tmp_path) -> None:
    """Steps 1-7 (adversarial from step 3, restarts every 2, an epoch boundary at 6), a new
    process, steps 8-12: the same weights, optimizer moments and codebook usage as 12 steps in
    one go."""
    from clipgen.vq_trainer import VQGANTrainer

    cpu = torch.device("cpu")

    def run(out: Path, max_steps: int) -> VQGANTrainer:
        torch.manual_seed(0)
        t = VQGANTrainer(vq_cfg(shapes_dir, out, *ADVERSARIAL, f"TRAIN.MAX_STEPS={max_steps}"),
                         cpu, progress=False)
        t.train()
        return t

    whole = run(tmp_path / "a", 12)
    run(tmp_path / "b", 7)
    resumed = run(tmp_path / "b", 12)
    assert resumed.step == whole.step == 12
    for a, b in ((whole.vq, resumed.vq), (whole.disc, resumed.disc)):
        assert_same_tensors(flat_tensors(a.state_dict()), flat_tensors(b.state_dict()))
    assert_same_tensors(flat_tensors(whole.opt_ae.state_dict()["state"]),
                        flat_tensors(resumed.opt_ae.state_dict()["state"]))
    start = VQModel.from_config(vq_cfg(shapes_dir, tmp_path / "c"))
    assert not torch.equal(start.last_layer, whole.vq.last_layer)


def test_two_process_run_keeps_replicas_equal(shapes_dir, tmp_path) -> None:
    """torchrun --nproc_per_node 2 (gloo): dead-code restarts, the codebook initialisation and
    the adversarial steps keep both processes' weights equal (train_vqgan.py checks and fails
    otherwise); the test split is shared out and every image is counted once."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    sets = [f"--set={s}" for s in (*VQ_TINY, *ADVERSARIAL, "TRAIN.BATCH_SIZE=2",
                                   f"DATA_DIR={shapes_dir}", f"OUTPUT_DIR={out}")]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "train_vqgan.py", "--cfg",
                          "cfg/VQGAN/shapes.yml", "--no-progress", *sets],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 12 and len(list((out / "valid" / "single").rglob("*.png"))) == 12
    state = torch.load(out / "Model" / "state_step_12.pth", weights_only=True)
    assert state["world"] == 2 and state["step"] == 12


def test_non_finite_loss_stops_with_the_step(shapes_dir, tmp_path) -> None:
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml",
                        *[f"--set={s}" for s in (*VQ_TINY, f"DATA_DIR={shapes_dir}",
                                                 f"OUTPUT_DIR={tmp_path}", "VQGAN.LR=1e12")])
    assert code == 3 and err.startswith("error: non-finite loss at step 2 (loss=nan")
    assert not list((tmp_path / "Model").glob("*.pth"))  # nothing saved after a bad step


def test_training_on_a_plain_folder_of_images(tmp_path) -> None:
    """`--data_dir` with a folder (nested, no layout): trains, holds out VQGAN.HOLDOUT for the
    test split, and writes the held-out inputs beside their reconstructions for rFID."""
    rng = np.random.default_rng(1)
    for i in range(20):
        sub = tmp_path / "imgs" / f"n{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    out = tmp_path / "out"
    code, err = run_cli("--cfg", "cfg/VQGAN/shapes.yml", "--data_dir", str(tmp_path / "imgs"),
                        *[f"--set={s}" for s in (*VQ_TINY, "TRAIN.MAX_EPOCH=1",
                                                 "VQGAN.HOLDOUT=0.2", f"OUTPUT_DIR={out}")])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4
    real = sorted(p.relative_to(out / "valid" / "real") for p in (out / "valid").rglob("*.png")
                  if "real" in p.parts)
    fake = sorted(p.relative_to(out / "valid" / "single")
                  for p in (out / "valid" / "single").rglob("*.png"))
    assert len(real) == 4 and real == fake


def test_finite_check_runs_after_the_steps(shapes_dir, tmp_path) -> None:
    from conftest import assert_checked_after_step

    from clipgen.vq_trainer import VQGANTrainer

    trainer = VQGANTrainer(vq_cfg(shapes_dir, tmp_path / "run", *ADVERSARIAL,
                                  "VQGAN.DISC_START=0"), torch.device("cpu"), progress=False)
    assert_checked_after_step(trainer, trainer.opt_d)  # the discriminator's steps last
