"""CLIP-GEN's transformer stage (clipgen/trainer.py, clipgen/generate.py, train_clipgen.py):
the reconstruction loss, the schedule, the cached batches, training without captions, exact
resume, checkpoints tied to their tokenizer/encoder, evaluation like stage 2's."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_same_tensors, flat_tensors
from PIL import Image
from test_vqgan import vq_cfg

from clipgen.gpt import CondGPT, GPTArch
from clipgen.models import draw_images, load_tokenizer
from clipgen.trainer import (
    CachedBatches,
    CLIPGenTrainer,
    decay_groups,
    lafite_noise,
    lr_at,
    recon_loss,
)
from clipgen.vqgan import VQModel
from miscc.config import load_config
from miscc.training import EpochSampler
from miscc.utils import atomic_torch_save
from model import ClipEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
# 16 px images -> 4x4 tokens of a 16-code book; a 1-layer GPT; 24 train images / 4 = 6 steps
GPT_TINY = ["GPU_ID=-1", "WORKERS=0", "TREE.BASE_SIZE=16", "TRAIN.BATCH_SIZE=4",
            "TRAIN.MAX_EPOCH=2", "TRAIN.SNAPSHOT_INTERVAL=1", "CLIPGEN.N_LAYER=1",
            "CLIPGEN.N_EMBD=16", "CLIPGEN.N_HEAD=2", "CLIPGEN.VIEWS=2",
            "CLIPGEN.WARMUP_STEPS=3", "CLIPGEN.LR=0.01", "EVAL.JUDGE=none", "CPU_THREADS=1",
            "CLIPGEN.CANDIDATES=1", "CLIPGEN.RECON_WEIGHT=0.2"]


@pytest.fixture(scope="module")
def vq_ckpt(shapes_dir, tmp_path_factory) -> Path:
    """A tiny (untrained, seeded) tokenizer checkpoint as train_vqgan.py writes it."""
    out = tmp_path_factory.mktemp("vq")
    torch.manual_seed(0)
    vq = VQModel.from_config(vq_cfg(shapes_dir, out))
    path = out / "Model" / "vqgan2.pth"
    atomic_torch_save(vq.checkpoint_state(), path)
    return path


def gen_cfg(data: Path, out: Path, vq: Path, encoder: Path, *overrides: str):
    return load_config(ROOT / "cfg" / "clipgen_shapes.yml",
                       [*GPT_TINY, f"DATA_DIR={data}", f"OUTPUT_DIR={out}",
                        f"CLIPGEN.VQGAN={vq}", f"TRAIN.NET_E={encoder}", *overrides],
                       quiet=True)


def run_cli(*args: str) -> tuple[int, str]:
    """train_clipgen.main in this process; (exit code, stderr)."""
    import train_clipgen

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_clipgen.main(["--no-progress", *args])
    return code, err.getvalue()


def cli_sets(data: Path, out: Path, vq: Path, encoder: Path, *overrides: str) -> list[str]:
    return ["--cfg", "cfg/clipgen_shapes.yml",
            *[f"--set={s}" for s in (*GPT_TINY, f"DATA_DIR={data}", f"OUTPUT_DIR={out}",
                                     f"CLIPGEN.VQGAN={vq}", f"TRAIN.NET_E={encoder}",
                                     *overrides)]]


def tiny_models(vq_ckpt: Path, encoder_ckpt: Path) -> tuple[CondGPT, VQModel, ClipEncoder]:
    vq = VQModel.from_checkpoint(vq_ckpt).eval().requires_grad_(False)
    encoder = ClipEncoder.from_checkpoint(encoder_ckpt).eval().requires_grad_(False)
    torch.manual_seed(1)
    gpt = CondGPT(GPTArch(vocab=16, tokens=16, cond_dim=64, n_layer=1, n_embd=16, n_head=2))
    return gpt, vq, encoder


def test_tokenizer_layout_follows_channels_last_and_changes_no_result(
        shapes_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path) -> None:
    """TRAIN.CHANNELS_LAST puts the frozen tokenizer in channels-last on CPU too (it is faster
    there); its tokens and decoded pixels match the contiguous tokenizer's."""
    loaded = {}
    for flag in (True, False):
        cfg = gen_cfg(shapes_dir, tmp_path, vq_ckpt, tiny_encoder_ckpt,
                      f"TRAIN.CHANNELS_LAST={flag}")
        loaded[flag] = load_tokenizer(cfg, CPU)[0]
    conv = loaded[True].decoder.conv_out.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert loaded[False].decoder.conv_out.weight.is_contiguous()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = loaded[True].encode(images)
        assert torch.equal(tokens, loaded[False].encode(images))
        assert torch.allclose(loaded[True].decode_indices(tokens),
                              loaded[False].decode_indices(tokens), atol=1e-5)


# ------------------------------------------------------------------------------ the loss
def test_recon_loss_value_and_gradient_through_the_decoder(vq_ckpt, tiny_encoder_ckpt) -> None:
    """Forward: the image of the argmax tokens, through CLIP, vs the target (unit vectors).
    Backward: the gradient reaches the transformer's weights through the frozen decoder and
    image tower (straight-through softmax), at a 4x4 grid (not a hard-coded 16x16)."""
    gpt, vq, encoder = tiny_models(vq_ckpt, tiny_encoder_ckpt)
    tokens = torch.randint(0, 16, (3, 16))
    emb = torch.randn(3, 64)
    logits = gpt(tokens, emb)
    loss = recon_loss(logits, vq, encoder, emb)
    with torch.no_grad():
        image = vq.decode_indices(logits.argmax(-1).view(3, 4, 4))
        pred = F.normalize(encoder.encode_image(image)[1], dim=-1)
        want = ((pred - F.normalize(emb, dim=-1)) ** 2).sum(-1).mean()
    assert torch.allclose(loss, want, atol=1e-5)
    loss.backward()
    assert gpt.head.weight.grad is not None and gpt.head.weight.grad.abs().sum() > 0
    assert gpt.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vq.parameters())
    assert all(p.grad is None for p in encoder.parameters())


def test_lafite_noise_moves_unit_embeddings_by_the_level() -> None:
    emb = torch.randn(5, 64) * 7
    out = lafite_noise(emb, 0.25, torch.Generator().manual_seed(0))
    offset = out - F.normalize(emb, dim=-1)
    assert torch.allclose(offset.norm(dim=-1), torch.full((5,), 0.25), atol=1e-6)
    again = lafite_noise(emb, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_warmup_then_cosine_schedule() -> None:
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.5)  # half way through the cosine
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(32, 100, 2.0, 10) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_weight_decay_only_on_linear_weights() -> None:
    gpt = CondGPT(GPTArch(vocab=16, tokens=16, cond_dim=8, n_layer=2, n_embd=16, n_head=2))
    decay, rest = decay_groups(gpt, 0.01)
    assert decay["weight_decay"] == 0.01 and rest["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in gpt.named_parameters() if id(p) in decayed}
    assert "head.weight" in names and "cond.weight" in names
    assert "blocks.1.attn.qkv.weight" in names and "blocks.0.mlp.0.weight" in names
    for kept in ("pos", "tok.weight", "ln_f.weight", "blocks.0.ln1.bias", "cond.bias"):
        assert kept not in names
    assert len(decay["params"]) + len(rest["params"]) == len(list(gpt.parameters()))


def test_cached_batches_take_view_epoch_mod_views() -> None:
    from clipgen.tokens import TokenCache

    n, views = 6, 2
    tokens = torch.arange(views * n)[:, None].repeat(1, 4).numpy()  # row r holds r
    emb = torch.arange(views * n)[:, None].float().repeat(1, 3).numpy()
    sampler = EpochSampler(n, 2, seed=3)
    batches = CachedBatches(TokenCache(tokens, emb, views), sampler, 2)
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        order = [i for _, i in sampler]
        rows = torch.cat([b["tokens"][:, 0] for b in batches])
        assert rows.tolist() == [(epoch % views) * n + i for i in order]
        assert len(batches) == 3
    sampler.set_epoch(1, skip_batches=2)
    assert len(batches) == 1 and len(list(batches)) == 1


# --------------------------------------------------------------------------- sampling
def test_draw_images_same_for_any_batch_split_and_reranks(vq_ckpt, tiny_encoder_ckpt,
                                                          tmp_path) -> None:
    """Images depend on (SEED, id) only; with CANDIDATES 3 each row is the candidate (ids
    3b + j) whose CLIP embedding is closest to its condition."""
    gpt, vq, encoder = tiny_models(vq_ckpt, tiny_encoder_ckpt)
    cfg = load_config(ROOT / "cfg" / "clipgen_shapes.yml", ["CLIPGEN.TOP_K=5"], quiet=True)
    cond, ids = torch.randn(5, 64), torch.tensor([4, 9, 0, 7, 2])
    whole = draw_images(cfg, gpt, vq, cond, ids)
    parts = torch.cat([draw_images(cfg, gpt, vq, cond[:2], ids[:2]),
                       draw_images(cfg, gpt, vq, cond[2:], ids[2:])])
    assert torch.equal(whole, parts) and whole.shape == (5, 3, 16, 16)
    assert not torch.equal(whole[0], whole[1])
    cfg.CLIPGEN.CANDIDATES = 3
    best = draw_images(cfg, gpt, vq, cond, ids, encoder)
    cfg.CLIPGEN.CANDIDATES = 1
    for b in range(5):
        cands = draw_images(cfg, gpt, vq, cond[b].repeat(3, 1), ids[b] * 3 + torch.arange(3))
        with torch.no_grad():
            score = F.cosine_similarity(encoder.encode_image(cands)[1], cond[b][None], dim=-1)
        assert torch.equal(best[b], cands[score.argmax()])


def test_pair_margin_hand_computed() -> None:
    """cos(code, caption) − the largest cos(code, real variant); the caption's cosine alone
    for a row without variants (padded slots never count)."""
    from clipgen.models import pair_margin

    codes = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                          [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, True], [False, False]])
    got = pair_margin(codes, texts, mask)
    torch.testing.assert_close(got, torch.tensor([1.0 - 2 ** -0.5, 2 ** -0.5]))


def test_draw_images_reranks_by_the_pair_margin(vq_ckpt, tiny_encoder_ckpt) -> None:
    """With pair_texts each row keeps the candidate of the largest pair margin (not the
    closest to its condition)."""
    from clipgen.models import pair_margin

    gpt, vq, encoder = tiny_models(vq_ckpt, tiny_encoder_ckpt)
    cfg = load_config(ROOT / "cfg" / "clipgen_shapes.yml", ["CLIPGEN.TOP_K=5"], quiet=True)
    torch.manual_seed(3)
    cond, ids = torch.randn(4, 64), torch.tensor([4, 9, 0, 7])
    texts, mask = torch.randn(4, 3, 64), torch.tensor([[True, True], [True, False],
                                                      [False, False], [True, True]])
    cfg.CLIPGEN.CANDIDATES = 4
    best = draw_images(cfg, gpt, vq, cond, ids, encoder, (texts, mask))
    plain = draw_images(cfg, gpt, vq, cond, ids, encoder)
    cfg.CLIPGEN.CANDIDATES = 1
    differs = 0
    for b in range(4):
        cands = draw_images(cfg, gpt, vq, cond[b].repeat(4, 1), ids[b] * 4 + torch.arange(4))
        with torch.no_grad():
            score = pair_margin(encoder.encode_image(cands)[1], texts[b].expand(4, 3, 64),
                                mask[b].expand(4, 2))
        # the same candidate (decoded in another batch: float rounding apart)
        torch.testing.assert_close(best[b], cands[score.argmax()], atol=1e-4, rtol=0)
        differs += not torch.allclose(best[b], plain[b], atol=1e-4)
    assert differs > 0


def test_pair_reranker_codes_each_caption_then_its_edits(data_dir, vq_ckpt,
                                                         tiny_encoder_ckpt, tmp_path) -> None:
    """CLIPGEN.RERANK pairs: row r holds the encoder's codes of caption (n, c) and of its
    one-edit variants (seed SEED + n·C + c), mask True on real ones; needs word lists."""
    from clipgen.generate import pair_reranker
    from datasets import CaptionTokenizer
    from miscc.config import ConfigError
    from miscc.minimal_pairs import load_word_lists, one_edit_negatives
    from sampling import test_split

    _, _, encoder = tiny_models(vq_ckpt, tiny_encoder_ckpt)
    cfg = gen_cfg(data_dir, tmp_path, vq_ckpt, tiny_encoder_ckpt, "CLIPGEN.RERANK=pairs",
                  "CLIPGEN.CANDIDATES=2", "TEXT.WORD_LISTS=shapes",
                  "TRAIN.MINIMAL_PAIR_EDITS=3")
    data = test_split(cfg)
    texts, mask = pair_reranker(cfg, data, encoder, CPU)(torch.tensor([2, 0]),
                                                         torch.tensor([1, 4]))
    assert texts.shape == (2, 4, 64) and mask.shape == (2, 3)
    lists, tokenizer = load_word_lists("shapes"), CaptionTokenizer(int(cfg.TEXT.WORDS_NUM))
    for r, (n, c) in enumerate(((2, 1), (0, 4))):
        caption = data.info.captions[n][c]
        edits = one_edit_negatives(caption, lists, 3, int(cfg.SEED) + n * 10 + c)
        with torch.no_grad():
            want = encoder.encode_text(tokenizer([caption, *edits]))[1].float()
        torch.testing.assert_close(texts[r, : 1 + len(edits)], want, atol=1e-5, rtol=1e-5)
        assert mask[r].tolist() == [i < len(edits) for i in range(3)]
    cfg.TEXT.WORD_LISTS = ""
    with pytest.raises(ConfigError, match="TEXT.WORD_LISTS"):
        pair_reranker(cfg, data, encoder, CPU)


# ---------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def trained(data_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path_factory) -> Path:
    """train_clipgen.py: 2 epochs, then the test split drawn and scored (judge on)."""
    out = tmp_path_factory.mktemp("clipgen")
    code, err = run_cli(*cli_sets(data_dir, out, vq_ckpt, tiny_encoder_ckpt, "EVAL.JUDGE="))
    assert code == 0, err
    return out


def test_training_writes_checkpoints_grids_logs_and_the_evaluation(trained) -> None:
    model = trained / "Model"
    assert sorted(p.name for p in model.glob("gpt_*.pth")) == ["gpt_epoch_1.pth",
                                                               "gpt_epoch_2.pth"]
    ckpt = torch.load(model / "gpt_epoch_2.pth", weights_only=True)
    assert ckpt["format"] == "clipgen-gpt/1" and ckpt["step"] == 12
    assert set(ckpt["sources"]) == {"tokenizer", "encoder"}
    with Image.open(trained / "Image" / "G_epoch_2.png") as grid:
        assert grid.size[0] > 4 * 16  # a captioned grid of the 12 test captions' images
    assert (trained / "Image" / "G_epoch_0.png").is_file()
    assert list((trained / "logs").glob("events.*"))
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["generator"] == "CLIP-GEN" and metrics["condition"] == "text"
    assert metrics["images"] == 120  # every test caption: 12 images x 10
    assert 0 <= metrics["r_precision"] <= 1 and "clip_score" in metrics
    assert set(metrics["judge"]) >= {"shape", "colour", "size", "pos", "bg"}
    gap = metrics["modality_gap"]
    assert gap["images"] == 12 and gap["captions"] == 120
    assert -1 <= gap["unpaired_cosine"] <= 1 and gap["mean_offset"] >= 0
    pngs = sorted((trained / "valid" / "single").rglob("*.png"))
    assert len(pngs) == 120 and pngs[0].name.endswith("_s0.png")
    with Image.open(pngs[0]) as img:
        assert img.size == (16, 16)


def test_eval_only_reproduces_the_images_and_r_precision_reads_them(
        trained, data_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path) -> None:
    """--eval of the saved checkpoint draws the same PNGs (into another folder, with another
    batch size) and r_precision.py scores that tree without a missing-image warning."""
    out = tmp_path / "again"
    code, err = run_cli("--eval", *cli_sets(data_dir, out, vq_ckpt, tiny_encoder_ckpt,
                                            f"CLIPGEN.NET={trained / 'Model'}",
                                            "TRAIN.BATCH_SIZE=7"))
    assert code == 0, err
    tree = trained / "valid" / "single"
    first = sorted(tree.rglob("*.png"))
    for p in first[:30]:
        assert p.read_bytes() == (out / "valid" / "single" / p.relative_to(tree)).read_bytes()
    from r_precision import score_tree

    cfg = gen_cfg(data_dir, out, vq_ckpt, tiny_encoder_ckpt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = score_tree(cfg, out / "valid" / "single", CPU, progress=False)
    assert not [w for w in caught if "missing" in str(w.message)]
    stored = json.loads((out / "metrics.json").read_text())
    assert result["r_precision"] == pytest.approx(stored["r_precision"])
    assert result["images"] == 120


def test_image_condition_writes_its_own_tree(trained, data_dir, vq_ckpt,
                                             tiny_encoder_ckpt) -> None:
    code, err = run_cli("--eval", *cli_sets(data_dir, trained, vq_ckpt, tiny_encoder_ckpt,
                                            "CLIPGEN.CONDITION=image"))
    assert code == 0, err
    metrics = json.loads((trained / "image_condition" / "metrics.json").read_text())
    assert metrics["condition"] == "image" and metrics["images"] == 120
    images = trained / "image_condition" / "valid" / "single"
    assert len(list(images.rglob("*.png"))) == 120
    # the ten captions of an image share its embedding as the prompt, not their noise ids
    first = sorted(images.rglob("*_s0.png"))[0]
    second = first.with_name(first.name.replace("_s0.png", "_s1.png"))
    assert first.read_bytes() != second.read_bytes()


def test_custom_captions_grid(trained, data_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path) -> None:
    captions = tmp_path / "mine.txt"
    captions.write_text("a red circle\n\na small blue square on the left\n")
    code, err = run_cli("--captions", str(captions),
                        *cli_sets(data_dir, trained, vq_ckpt, tiny_encoder_ckpt))
    assert code == 0, err
    assert (trained / "examples" / "mine.png").is_file()
    assert sorted(p.name for p in (trained / "examples" / "mine").glob("*.png")) == \
        ["0.png", "1.png"]


def test_a_checkpoint_of_another_tokenizer_is_one_clear_error(
        trained, data_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path) -> None:
    other = tmp_path / "Model" / "vqgan2.pth"
    state = torch.load(vq_ckpt, weights_only=True)
    state["state_dict"]["decoder.conv_out.bias"] += 1.0
    atomic_torch_save(state, other)
    code, err = run_cli("--eval", *cli_sets(data_dir, tmp_path / "e", other, tiny_encoder_ckpt,
                                            f"CLIPGEN.NET={trained / 'Model'}"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {trained / 'Model' / 'gpt_epoch_2.pth'} was trained with "
                          f"the tokenizer {vq_ckpt}")
    assert f"CLIPGEN.VQGAN loads {other}" in err


def test_training_reads_no_caption(shapes_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path,
                                   monkeypatch) -> None:
    """With every caption file gone, training (reconstruction term on, zero-weight path off)
    completes, and the sample grids fall back to test images' own embeddings."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    shutil.rmtree(data / "text")
    cfg = gen_cfg(data, tmp_path / "out", vq_ckpt, tiny_encoder_ckpt, "TRAIN.MAX_EPOCH=1")
    trainer = CLIPGenTrainer(cfg, CPU, progress=False)
    summary = trainer.train()
    assert summary["step"] == 6 and math.isfinite(summary["losses"]["recon"])
    assert summary["losses"]["recon"] > 0
    with Image.open(tmp_path / "out" / "Image" / "G_epoch_1.png") as grid:
        assert grid.size == (12 * 64, 2 * 64)  # 12 test images above their samples


def test_zero_reconstruction_weight_runs_neither_decoder_nor_image_tower(
        data_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path) -> None:
    cfg = gen_cfg(data_dir, tmp_path, vq_ckpt, tiny_encoder_ckpt, "CLIPGEN.RECON_WEIGHT=0")
    trainer = CLIPGenTrainer(cfg, CPU, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("called with RECON_WEIGHT 0")

    trainer.vq.decode_codes = forbidden
    trainer.encoder.encode_image = forbidden
    trainer.sampler.set_epoch(0)
    for batch, _ in zip(trainer.loader, range(3), strict=False):
        stats = trainer.train_step(batch)
        trainer.step += 1
    assert stats["recon"] == 0.0 and stats["ce"] > 0


def test_resume_is_exact(data_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path) -> None:
    """7 steps, stop, resume to 12 = 12 straight: weights, optimizer, with dropout, LAFITE
    noise and the reconstruction term all on (the schedule follows MAX_EPOCH, not MAX_STEPS)."""
    extra = ("CLIPGEN.NOISE=0.2", "CLIPGEN.DROPOUT=0.1")

    def run(out: Path, *overrides: str) -> dict:
        cfg = gen_cfg(data_dir, out, vq_ckpt, tiny_encoder_ckpt, *extra, *overrides)
        return CLIPGenTrainer(cfg, CPU, progress=False).train()

    run(tmp_path / "a", "TRAIN.MAX_STEPS=7")
    assert run(tmp_path / "a")["step"] == 12
    run(tmp_path / "b")
    a, b = (torch.load(p / "Model" / "state_step_12.pth", weights_only=True)
            for p in (tmp_path / "a", tmp_path / "b"))
    assert_same_tensors(flat_tensors(a["gpt"]["state_dict"]), flat_tensors(b["gpt"]["state_dict"]))
    assert_same_tensors(flat_tensors(a["opt"]), flat_tensors(b["opt"]))


def test_two_process_run_keeps_replicas_equal(data_dir, vq_ckpt, tiny_encoder_ckpt,
                                              tmp_path) -> None:
    """torchrun --nproc_per_node 2 (gloo): train_clipgen.py checks the replicas are equal after
    training, and the evaluation draws every test caption once across the two processes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "train_clipgen.py", "--no-progress",
                          *cli_sets(data_dir, out, vq_ckpt, tiny_encoder_ckpt,
                                    "TRAIN.BATCH_SIZE=2", "TRAIN.MAX_EPOCH=1")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    state = torch.load(out / "Model" / "state_step_6.pth", weights_only=True)
    assert state["world"] == 2 and state["step"] == 6
    assert json.loads((out / "metrics.json").read_text())["images"] == 120


def test_evaluation_of_folder_data_without_captions_is_one_clear_error(
        shapes_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path) -> None:
    folder = tmp_path / "pictures"
    shutil.copytree(shapes_dir / "CUB_200_2011" / "images", folder)
    code, err = run_cli("--eval", *cli_sets(folder, tmp_path / "out", vq_ckpt,
                                            tiny_encoder_ckpt))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: DATA_DIR {folder} is a folder of images without captions")
    assert "--captions FILE" in err


def test_paper_configs_give_gpt2_medium_on_the_coco_tokenizer() -> None:
    """cfg/clipgen_coco.yml and the ImageNet variant: GPT-2 medium over the 16x16 tokens of a
    16384-code book, conditioned on pretrained ViT-B/32 (never fine-tuned on captions)."""
    from types import SimpleNamespace

    from clipgen.models import gpt_arch
    from clipgen.vqgan import VQArch

    tokenizer = SimpleNamespace(arch=VQArch.from_config(
        load_config(ROOT / "cfg" / "VQGAN" / "coco.yml", quiet=True)))
    for name in ("clipgen_coco.yml", "clipgen_imagenet.yml"):
        cfg = load_config(ROOT / "cfg" / name, quiet=True)
        a = gpt_arch(cfg, tokenizer, SimpleNamespace(embed_dim=512))
        assert (a.vocab, a.tokens, a.cond_dim, a.n_layer, a.n_embd, a.n_head) == \
            (16384, 256, 512, 24, 1024, 16), name
        assert cfg.TRAIN.NET_E == "" and cfg.CLIP.MODEL == "ViT-B/32", name
        assert cfg.CLIP.PRETRAINED == "openai" and cfg.TREE.BASE_SIZE == 256, name
    coco = load_config(ROOT / "cfg" / "clipgen_coco.yml", quiet=True)
    assert (coco.CLIPGEN.TOP_K, coco.CLIPGEN.TOP_P, coco.CLIPGEN.RECON_WEIGHT) == (500, 0.95, 0.2)
    assert coco.EVAL.NUM_IMAGES == 30000


def test_finite_check_runs_after_the_step(data_dir, vq_ckpt, tiny_encoder_ckpt,
                                          tmp_path) -> None:
    from conftest import assert_checked_after_step

    cfg = gen_cfg(data_dir, tmp_path / "out", vq_ckpt, tiny_encoder_ckpt)
    trainer = CLIPGenTrainer(cfg, CPU, progress=False)
    assert_checked_after_step(trainer, trainer.opt)


def test_draw_images_runs_in_inference_precision(vq_ckpt, tiny_encoder_ckpt,
                                                 monkeypatch) -> None:
    """The sampler, the decoder and the re-ranking run inside `inference_precision` (on
    CUDA with TRAIN.AMP: autocast); under CPU bf16 autocast they give fp32 images in [-1, 1]
    of the same shape."""
    import clipgen.models as models

    gpt, vq, encoder = tiny_models(vq_ckpt, tiny_encoder_ckpt)
    cfg = load_config(ROOT / "cfg" / "clipgen_shapes.yml", ["CLIPGEN.CANDIDATES=2"],
                      quiet=True)
    entered = []

    def bf16(cfg, device):
        entered.append(device)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(models, "inference_precision", bf16)
    images = draw_images(cfg, gpt, vq, torch.randn(3, 64), torch.arange(3), encoder)
    assert entered == [CPU]
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.abs().max() <= 1


def test_condition_dropout_trains_a_null_prefix_and_guidance_draws_with_it(
        data_dir, vq_ckpt, tiny_encoder_ckpt, tmp_path, monkeypatch) -> None:
    """CLIPGEN.CFG_DROP p: the rows of each step whose condition is dropped (p of them, seeded by
    the step) reach the model as its `drop` mask, and the checkpoint has the learned null
    prefix; CLIPGEN.GUIDANCE draws with it, and without a null prefix is one error line."""
    import clipgen.trainer as trainer_mod

    masks = []
    forward = trainer_mod.CondGPT.forward

    def spy(self, tokens, cond, drop=None):
        masks.append(drop)
        return forward(self, tokens, cond, drop)

    monkeypatch.setattr(trainer_mod.CondGPT, "forward", spy)
    out = tmp_path / "guided"
    code, err = run_cli(*cli_sets(data_dir, out, vq_ckpt, tiny_encoder_ckpt, "CLIPGEN.CFG_DROP=0.5",
                                  "TRAIN.MAX_EPOCH=1", "EVAL.NUM_IMAGES=6",
                                  "CLIPGEN.GUIDANCE=2.0"))
    assert code == 0, err
    drops = torch.stack([m.cpu() for m in masks if m is not None])
    assert drops.shape[1] == 4 and 0 < drops.float().mean() < 1  # some rows of some steps
    ckpt = torch.load(out / "Model" / "gpt_epoch_1.pth", weights_only=True)
    assert ckpt["arch"]["null_cond"] and "null" in ckpt["state_dict"]
    assert json.loads((out / "metrics.json").read_text())["images"] == 6
    code, err = run_cli("--eval", *cli_sets(data_dir, tmp_path / "plain", vq_ckpt,
                                            tiny_encoder_ckpt, f"CLIPGEN.NET={out / 'Model'}",
                                            "EVAL.NUM_IMAGES=6", "CLIPGEN.GUIDANCE=0"))
    assert code == 0, err
    code, err = run_cli(*cli_sets(data_dir, tmp_path / "unguided", vq_ckpt, tiny_encoder_ckpt,
                                  "TRAIN.MAX_EPOCH=1", "CLIPGEN.GUIDANCE=2.0"))
    assert code == 2 and "CLIPGEN.GUIDANCE 2.0 needs a transformer trained with" in err
