"""ClipEncoder on the tiny random-weight CLIP: shapes, masks, gradients, checkpoints, errors."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

import model
from datasets import CaptionTokenizer
from miscc.utils import CheckpointError, atomic_torch_save
from model import ClipEncoder, EncoderLoadError, resize_bicubic, resolve_clip_name


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ClipEncoder(resolve_clip_name("tiny", ""), adapter=True).eval()


def test_text_shapes_and_mask(encoder):
    tok = CaptionTokenizer(12)
    tokens = tok(["a red circle", "the picture shows a small blue square"])
    words, sent, mask = encoder.encode_text(tokens)
    assert words.shape == (2, 14, 64) and sent.shape == (2, 64) and mask.shape == (2, 14)
    n_words = [len(tok.decode(t)) for t in tokens]
    assert mask.sum(1).tolist() == n_words
    assert not mask[:, 0].any()  # start token
    eot = tokens.argmax(1)
    assert not mask[torch.arange(2), eot].any()  # end token
    assert torch.equal(sent, words[torch.arange(2), eot])


def test_padding_length_does_not_change_features(encoder):
    short, long = CaptionTokenizer(8), CaptionTokenizer(30)
    caption = ["a large red circle in the center"]
    w1, s1, m1 = encoder.encode_text(short(caption))
    w2, s2, m2 = encoder.encode_text(long(caption))
    n = m1.shape[1]
    assert torch.allclose(w1, w2[:, :n], atol=1e-5) and torch.allclose(s1, s2, atol=1e-5)
    assert torch.equal(m1, m2[:, :n]) and not m2[:, n:].any()


def test_image_shapes_and_gradient_to_pixels(encoder):
    images = (torch.rand(3, 3, 48, 48) * 2 - 1).requires_grad_()
    regions, code = encoder.encode_image(images)
    assert regions.shape == (3, 16, 64) and code.shape == (3, 64)  # (32/8)^2 patches
    regions.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_image_normalisation(encoder):
    x = encoder.prepare_images(torch.zeros(1, 3, 32, 32))
    expected = (0.5 - encoder.mean) / encoder.std
    assert torch.allclose(x, expected.expand_as(x), atol=1e-6)


@pytest.mark.parametrize(("shape", "size", "antialias"), [
    ((2, 3, 32, 32), 64, False),   # the demo's generated 32 px into the tiny tower's 64 px
    ((1, 3, 256, 256), 224, True),  # a 256 px DM-GAN image into ViT-B/32
    ((2, 3, 40, 24), 32, True),     # not square: each side has its own weights
])
def test_resize_bicubic_equals_interpolate_in_values_and_gradients(shape, size, antialias):
    """The matmul resize is F.interpolate's bicubic resize, forward and backward (float64:
    equal to rounding; float32 interpolate computes its weights less precisely, ~2e-5)."""
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                        antialias=antialias)
    ours = resize_bicubic(x, size, antialias)
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-12)
    probe = torch.rand(ref.shape, dtype=torch.float64)
    g_ref, = torch.autograd.grad((ref * probe).sum(), x)
    g_ours, = torch.autograd.grad((ours * probe).sum(), x)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)


def test_adapter_starts_as_identity():
    torch.manual_seed(0)
    with_adapter = ClipEncoder(resolve_clip_name("tiny", ""), adapter=True)
    without = ClipEncoder(resolve_clip_name("tiny", ""), adapter=False)
    without.load_state_dict({k: v for k, v in with_adapter.state_dict().items()
                             if not k.startswith("adapter.")})
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(with_adapter.encode_image(images)[0],
                          without.encode_image(images)[0], atol=1e-6)
    assert len(with_adapter.new_parameters()) == 2 and without.new_parameters() == []


def test_checkpoint_round_trip(encoder, tmp_path):
    path = tmp_path / "clip3.pth"
    atomic_torch_save(encoder.checkpoint_state(), path)
    again = ClipEncoder.from_checkpoint(path).eval()
    tokens = CaptionTokenizer(10)(["a green star"])
    assert torch.equal(encoder.encode_text(tokens)[1], again.encode_text(tokens)[1])
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(encoder.encode_image(images)[1], again.encode_image(images)[1])


def test_checkpoint_errors(encoder, tmp_path):
    state = encoder.checkpoint_state()
    del state["state_dict"]["adapter.bias"]
    state["state_dict"]["extra.weight"] = torch.zeros(1)
    atomic_torch_save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: adapter.bias.*unexpected keys: "
                       r"extra.weight"):
        ClipEncoder.from_checkpoint(tmp_path / "bad.pth")
    atomic_torch_save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an encoder checkpoint"):
        ClipEncoder.from_checkpoint(tmp_path / "other.pth")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "bad.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        ClipEncoder.from_checkpoint(tmp_path / "trunc.pth")


def test_unknown_name_and_failed_download_explain_themselves(monkeypatch):
    with pytest.raises(EncoderLoadError, match="unknown CLIP model 'ViT-Q/99'"):
        resolve_clip_name("ViT-Q/99", "openai")
    fetched, built = [], []

    def offline(cfg):  # what open_clip's download raises without network (no real attempt,
        fetched.append(cfg)  # which here would wait for connection time-outs)
        raise FileNotFoundError("Failed to download file (open_clip_pytorch_model.bin)")

    monkeypatch.setattr(model, "download_pretrained", offline)
    # the download fails before the model is built
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: built.append(a))
    with pytest.raises(EncoderLoadError, match="pretrained='openai'") as err:
        ClipEncoder(resolve_clip_name("ViT-B/32", "openai"))
    msg = str(err.value)
    assert built == [] and fetched[0]["hf_hub"] == "timm/vit_base_patch32_clip_224.openai/"
    assert "FileNotFoundError: Failed to download" in msg
    assert "'ViT-B-32'" in msg and "pretrained='openai'" in msg
    assert "--set CLIP.PRETRAINED=" in msg and "vit_base_patch32_clip_224.openai" in msg


def _resnet_arch(heads_one: bool = False) -> dict:
    spec = resolve_clip_name("tiny_rn", "")
    if heads_one:  # one attention head: the pool's mixing weights are easy to recompute
        spec["arch"]["vision_cfg"]["head_width"] = spec["arch"]["vision_cfg"]["width"] * 32
        spec["model"] = "tiny_rn_one_head"
    return spec


def test_resnet_tower_regions_are_the_cells_the_pool_mixes():
    torch.manual_seed(0)
    encoder = ClipEncoder(_resnet_arch(heads_one=True), adapter=False).eval()
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    regions, code = encoder.encode_image(images)
    assert regions.shape == (2, 4, 64) and code.shape == (2, 64)  # (64/32)^2 cells
    # recompute the attention pool by hand: code = softmax(q·k) mix of per-token values
    visual = encoder.clip.visual
    x = encoder.prepare_images(images)
    for layer in (visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)
    pool = visual.attnpool
    cells = x.flatten(2).transpose(1, 2)
    tokens = torch.cat([cells.mean(1, keepdim=True), cells], 1) + pool.positional_embedding
    q = pool.q_proj(tokens[:, :1]) / pool.q_proj.out_features**0.5  # one head: full width
    weights = torch.softmax(q @ pool.k_proj(tokens).transpose(1, 2), -1)  # [B, 1, 5]
    values = pool.c_proj(pool.v_proj(tokens))                              # [B, 5, D]
    assert torch.allclose(values[:, 1:], regions, atol=1e-5)
    assert torch.allclose((weights @ values)[:, 0], code, atol=1e-5)


def test_resnet_encoder_gradient_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoder = ClipEncoder(_resnet_arch(), adapter=True).eval()
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    regions, _ = encoder.encode_image(images)
    regions.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    path = tmp_path / "clip1.pth"
    atomic_torch_save(encoder.checkpoint_state(), path)
    again = ClipEncoder.from_checkpoint(path).eval()
    assert torch.equal(encoder.encode_image(images)[1], again.encode_image(images)[1])
