"""DM-GAN networks: shapes per branch count, masked memory attention, gradient path through the
frozen CLIP image tower, and clear errors for generator checkpoints of another architecture."""

from __future__ import annotations

import pytest
import torch

from miscc.config import load_config
from miscc.losses import sent_loss, words_loss
from miscc.utils import CheckpointError, atomic_torch_save
from model import (
    ClipEncoder,
    Discriminator,
    Generator,
    build_discriminators,
    gan_arch,
    generator_checkpoint,
    init_gan_weights,
    load_generator,
    resolve_clip_name,
)

TEXT_DIM = 24


def small_arch(branches: int, base: int = 16, **changes) -> dict:
    cfg = load_config(overrides=[f"TREE.BRANCH_NUM={branches}", f"TREE.BASE_SIZE={base}",
                                 "GAN.GF_DIM=8", "GAN.DF_DIM=8", "GAN.Z_DIM=10",
                                 "GAN.CONDITION_DIM=6", "GAN.R_NUM=1"], quiet=True)
    arch = gan_arch(cfg, TEXT_DIM)
    arch.update(changes)
    return arch


def text_inputs(batch: int, words: int = 7, dim: int = TEXT_DIM, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, words, dim, generator=g)
    mask = torch.zeros(batch, words, dtype=torch.bool)
    for i in range(batch):
        mask[i, 1: 2 + (i % (words - 2))] = True
    return w, w[:, -1].clone(), mask


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_generator_and_discriminator_shapes(branches: int) -> None:
    arch = small_arch(branches)
    netG, netDs = Generator(arch), build_discriminators(arch)
    init_gan_weights(netG)
    words, sent, mask = text_inputs(3)
    images, mu, logvar = netG(torch.randn(3, arch["Z_DIM"]), sent, words, mask)
    assert [tuple(x.shape) for x in images] == [(3, 3, 16 * 2**i, 16 * 2**i)
                                                for i in range(branches)]
    # each picture is drawn from its own inputs (eval mode: batch norm from running statistics):
    # an item alone equals it inside the batch, another sentence changes it
    netG.eval()
    z, eps = torch.randn(3, arch["Z_DIM"]), torch.randn(3, arch["CONDITION_DIM"])
    with torch.no_grad():
        batch = netG(z, sent, words, mask, eps)[0][-1]
        alone = netG(z[:1], sent[:1], words[:1], mask[:1], eps[:1])[0][-1]
        other = netG(z[:1], sent[1:2], words[1:2], mask[1:2], eps[:1])[0][-1]
    torch.testing.assert_close(alone[0], batch[0])
    assert not torch.allclose(alone, other, atol=1e-3)
    assert mu.shape == logvar.shape == (3, arch["CONDITION_DIM"])
    assert len(netDs) == branches
    for image, netD in zip(images, netDs, strict=True):
        uncond, cond, wrong = netD(image, sent, sent.roll(1, 0))
        assert uncond.shape == cond.shape == wrong.shape == (3,)
        assert netD(image, sent)[2] is None


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
def test_discriminator_any_scale(size: int) -> None:
    netD = build_discriminators(small_arch(1, base=size))[0]
    uncond, cond, _ = netD(torch.randn(2, 3, size, size), torch.randn(2, TEXT_DIM))
    assert uncond.shape == cond.shape == (2,)
    assert netD.trunk(torch.randn(2, 3, size, size)).shape == (2, 64, 4, 4)  # DF_DIM * 8


def test_hyper_parameters_change_the_networks() -> None:
    """GF_DIM, R_NUM, CONDITION_DIM, Z_DIM and BASE_SIZE all reach the modules."""
    ref = sum(p.numel() for p in Generator(small_arch(2)).parameters())
    for change in ({"GF_DIM": 16}, {"R_NUM": 3}, {"CONDITION_DIM": 12}, {"Z_DIM": 20},
                   {"BASE_SIZE": 32}):
        assert sum(p.numel() for p in Generator(small_arch(2, **change)).parameters()) != ref
    netG = Generator(small_arch(2, R_NUM=3))
    assert len(netG.stages[0].res) == 3
    with pytest.raises(ValueError, match="BASE_SIZE"):
        small_arch(1, base=24)
    with pytest.raises(ValueError, match="BRANCH_NUM"):
        small_arch(4)


def test_memory_attention_ignores_padding_words() -> None:
    torch.manual_seed(0)
    netG = Generator(small_arch(2)).eval()
    stage = netG.stages[0]
    words, _, mask = text_inputs(4)
    h = torch.randn(4, 8, 16, 16)
    fused, attn = stage.memory(h, words, mask)
    assert torch.all(attn[~mask] == 0)
    torch.testing.assert_close(attn.sum(1), torch.ones(4, 256))
    noisy = torch.where(mask[..., None], words, 100 * torch.randn_like(words))
    fused2, _ = stage.memory(h, noisy, mask)
    torch.testing.assert_close(fused, fused2)
    # ... while a real word does change the output (so the test above can fail)
    changed = words.clone()
    changed[0, 1] += 5.0
    fused3, _ = stage.memory(h, changed, mask)
    assert not torch.allclose(fused[0], fused3[0])
    torch.testing.assert_close(fused[1:], fused3[1:])
    # a caption with no real word reads nothing from memory and stays finite
    empty = mask.clone()
    empty[2] = False
    fused4, attn4 = stage.memory(h, words, empty)
    assert torch.isfinite(fused4).all() and torch.all(attn4[2] == 0)


def test_generator_batch_matches_items() -> None:
    """Batched memory attention gives each item what it would get alone (eval-mode BN)."""
    torch.manual_seed(0)
    netG = Generator(small_arch(3)).eval()
    words, sent, mask = text_inputs(3)
    z, eps = torch.randn(3, 10), torch.randn(3, 6)
    with torch.no_grad():
        batch = netG(z, sent, words, mask, eps)[0][-1]
        alone = torch.cat([netG(z[i:i + 1], sent[i:i + 1], words[i:i + 1], mask[i:i + 1],
                                eps[i:i + 1])[0][-1] for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


def test_conditioning_augmentation_noise() -> None:
    netG = Generator(small_arch(1))
    sent = torch.randn(2, TEXT_DIM)
    eps = torch.randn(2, 6)
    c1, mu, logvar = netG.ca(sent, eps)
    torch.testing.assert_close(c1, mu + eps * torch.exp(0.5 * logvar))
    c2, _, _ = netG.ca(sent, torch.zeros(2, 6))
    torch.testing.assert_close(c2, mu)


def test_gradients_reach_generator_through_clip_image_tower() -> None:
    torch.manual_seed(0)
    encoder = ClipEncoder(resolve_clip_name("tiny", ""), adapter=True).eval()
    encoder.requires_grad_(False)
    arch = small_arch(2)
    arch["TEXT_DIM"] = encoder.embed_dim
    netG = Generator(arch)
    tokens = torch.zeros(4, 9, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:5], tokens[:, 5] = 49406, torch.arange(320, 336).view(4, 4), 49407
    words, sent, mask = encoder.encode_text(tokens)
    images, _, _ = netG(torch.randn(4, 10), sent, words, mask)
    regions, code = encoder.encode_image(images[-1])
    w0, w1, _ = words_loss(words, mask, regions, None, 4.0, 5.0, 10.0)
    s0, s1 = sent_loss(code, sent, None, 10.0)
    (w0 + w1 + s0 + s1).backward()
    on_path = [netG.ca, netG.init, netG.stages[0], netG.heads[1]]
    for module in on_path:
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in netG.heads[0].parameters())  # smaller image: not used
    assert all(p.grad is None for p in encoder.parameters())


def test_generator_checkpoint_roundtrip_and_mismatch(tmp_path) -> None:
    netG = Generator(small_arch(2))
    path = tmp_path / "netG_epoch_1.pth"
    atomic_torch_save(generator_checkpoint(netG), path)
    other = Generator(small_arch(2))
    load_generator(other, path)
    for a, b in zip(netG.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    plain = tmp_path / "plain.pth"  # a bare state_dict (what older DM-GAN code saved) loads too
    atomic_torch_save(netG.state_dict(), plain)
    load_generator(Generator(small_arch(2)), plain)

    with pytest.raises(CheckpointError, match="does not match this architecture") as info:
        load_generator(Generator(small_arch(3)), path)
    message = str(info.value)
    assert "missing keys" in message and "stages.1." in message
    assert "BRANCH_NUM: checkpoint 2 vs config 3" in message
    with pytest.raises(CheckpointError, match="shape mismatches.*GF_DIM: checkpoint 8"):
        load_generator(Generator(small_arch(2, GF_DIM=16)), path)
    with pytest.raises(CheckpointError, match="unexpected keys: heads.1.*stages.0"):
        load_generator(Generator(small_arch(1)), plain)
    old = tmp_path / "netG_epoch_old.pth"  # an earlier version's checkpoint: one clear line
    atomic_torch_save({**generator_checkpoint(netG), "format": "dmgan-generator/1"}, old)
    with pytest.raises(CheckpointError, match=r"earlier version .*dmgan-generator/1.*train the "
                                              r"generator again"):
        load_generator(Generator(small_arch(2)), old)


@pytest.mark.parametrize("name", ["bird", "coco"])
def test_published_configs_build_256px_networks(name: str) -> None:
    """cfg/clip_<name>_DMGAN.yml: DM-GAN's hyper-parameters on 512-d CLIP features."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "cfg" / f"clip_{name}_DMGAN.yml", quiet=True)
    evaluation = load_config(root / "cfg" / f"eval_clip_{name}.yml", quiet=True)
    arch = gan_arch(cfg, cfg.TEXT.EMBEDDING_DIM)
    assert gan_arch(evaluation, evaluation.TEXT.EMBEDDING_DIM) == arch
    assert not evaluation.TRAIN.FLAG and evaluation.B_VALIDATION
    published = {"bird": (10, 5.0, 2, 10), "coco": (16, 50.0, 3, 5)}[name]
    assert (cfg.TRAIN.BATCH_SIZE, cfg.TRAIN.SMOOTH.LAMBDA, cfg.GAN.R_NUM,
            cfg.TEXT.CAPTIONS_PER_IMAGE) == published
    # lambda was tuned on AttnGAN's code path: dot-product attention, no 1/gamma2; stage 1 too
    stage1 = load_config(root / "cfg" / "DAMSM" / f"{name}.yml", quiet=True)
    for c in (cfg, stage1):
        assert (c.TRAIN.SMOOTH.SIMILARITY, c.TRAIN.SMOOTH.ATTNGAN_SCORE) == ("dot", True)
    assert arch == {"BRANCH_NUM": 3, "BASE_SIZE": 64, "GF_DIM": 64, "DF_DIM": 32, "Z_DIM": 100,
                    "CONDITION_DIM": 100, "R_NUM": published[2], "TEXT_DIM": 512}
    netG = Generator(arch)
    words, sent, mask = text_inputs(2, dim=512)
    with torch.no_grad():
        images, _, _ = netG(torch.randn(2, 100), sent, words, mask)
    assert images[-1].shape == (2, 3, 256, 256)
    # D_NET64/128/256: 4, 5, 6 stride-2 convolutions, then 0, 1, 2 3x3 ones (each + LeakyReLU)
    assert [len(d.trunk) for d in build_discriminators(arch)] == [8, 12, 16]


def test_discriminator_convs_are_spectrally_normalised_without_batch_norm() -> None:
    """The release's D: every trunk and joint convolution spectrally normalised, with bias,
    LeakyReLU(0.2), no BatchNorm; the two 4x4 logit convolutions plain."""
    from torch import nn
    from torch.nn.utils import parametrize

    for i, netD in enumerate(build_discriminators(small_arch(3, base=16))):
        convs = [m for m in netD.modules() if isinstance(m, nn.Conv2d)]
        plain = {netD.uncond, netD.cond}
        assert len(convs) > len(plain)
        for conv in convs:
            assert conv.bias is not None
            assert parametrize.is_parametrized(conv, "weight") == (conv not in plain)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in netD.modules())
        relus = [m for m in netD.modules() if isinstance(m, nn.LeakyReLU)]
        assert relus and all(m.negative_slope == 0.2 for m in relus)
        # the normalised weight really has spectral norm 1 (after the power iterations)
        netD.train()
        for _ in range(20):
            netD(torch.randn(2, 3, 16 * 2**i, 16 * 2**i), torch.randn(2, TEXT_DIM))
        conv = netD.trunk[0]
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=2e-2)
        assert torch.linalg.matrix_norm(conv.parametrizations.weight.original.detach().flatten(1),
                                        ord=2) != pytest.approx(1.0, abs=0.1)


def test_memory_stage_widths_as_released() -> None:
    """M_w/M_r write 2·ngf wide memory, key/value read it back to ngf (each with ReLU); the
    gate projections have no bias; residual blocks and the up-block run at 2·ngf."""
    from torch import nn

    ngf = 8
    stage = Generator(small_arch(2, R_NUM=2)).stages[0]
    assert stage.gate_word.bias is None and stage.gate_img.bias is None
    assert stage.gate_word.weight.shape == (1, TEXT_DIM)
    assert stage.gate_img.weight.shape == (1, ngf)
    for proj, (cin, cout) in ((stage.mem_word, (TEXT_DIM, 2 * ngf)),
                              (stage.mem_img, (ngf, 2 * ngf)),
                              (stage.key, (2 * ngf, ngf)), (stage.value, (2 * ngf, ngf))):
        assert isinstance(proj[1], nn.ReLU)
        assert proj[0].weight.shape == (cout, cin)
    assert stage.response.weight.shape == (1, 2 * ngf, 1, 1)
    assert [blk.body[0].in_channels for blk in stage.res] == [2 * ngf, 2 * ngf]
    assert stage.up[1].in_channels == 2 * ngf and stage.up[1].out_channels == 2 * ngf
    h = torch.randn(2, ngf, 16, 16)
    words, _, mask = text_inputs(2)
    assert stage(h, words, mask).shape == (2, ngf, 32, 32)


def test_memory_write_gate_reads_a_detached_image_feature() -> None:
    """The writing gate B(r_avg) and M_r see the pooled image feature without its gradient,
    while the image features still get gradient through key addressing and the response gate."""
    stage = Generator(small_arch(2)).stages[0]
    seen = {}
    stage.gate_img.register_forward_hook(lambda m, i, o: seen.__setitem__("gate", i[0]))
    stage.mem_img[0].register_forward_hook(lambda m, i, o: seen.__setitem__("mem", i[0]))
    h = torch.randn(2, 8, 16, 16, requires_grad=True)
    words, _, mask = text_inputs(2)
    fused, _ = stage.memory(h, words, mask)
    assert not seen["gate"].requires_grad and not seen["mem"].requires_grad
    torch.testing.assert_close(seen["gate"], h.detach().mean(dim=(2, 3)))
    fused.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_memory_addressing_is_a_raw_dot_product() -> None:
    """Key addressing: softmax over the real words of keys · image features, unscaled."""
    torch.manual_seed(1)
    netG = Generator(small_arch(2))
    init_gan_weights(netG)
    stage = netG.stages[0]
    h = 3 * torch.randn(3, 8, 4, 4)
    words, _, mask = text_inputs(3)  # item 2 has three real words
    _, attn = stage.memory(h, words, mask)
    real = attn[2][mask[2]]
    assert (real.max(0).values - real.min(0).values).max() > 0.5  # far from uniform: scale shows
    r_avg = h[2:].mean(dim=(2, 3))
    g = torch.sigmoid(stage.gate_word(words[2]) + stage.gate_img(r_avg))
    mem = stage.mem_word(words[2]) * g + stage.mem_img(r_avg) * (1 - g)
    keys = stage.key(mem)[mask[2]]                                   # real words only
    expected = torch.softmax(keys @ h[2].flatten(1), dim=0)          # over words
    torch.testing.assert_close(real, expected)


def test_discriminator_conditional_logits_equal_the_release_concatenation() -> None:
    """D_GET_LOGITS concatenates the 4x4 features with the sentence replicated 4x4 and runs a
    3x3 convolution: `Discriminator` sums the features' and the sentence's parts instead, and
    the 4x4 logit convolutions run as one matrix product. Same values and gradients (float64),
    for one or two sentences per image and with wrong sentences."""
    torch.manual_seed(0)
    for size in (16, 32):
        netD = Discriminator(size, 4, TEXT_DIM).double().eval()  # eval: a fixed SN weight
        images = torch.randn(3, 3, size, size, dtype=torch.float64, requires_grad=True)
        for k in (1, 2):
            sent = torch.randn(3 * k, TEXT_DIM, dtype=torch.float64, requires_grad=True)
            wrong = torch.randn(3 * k, TEXT_DIM, dtype=torch.float64)
            uncond, cond, cond_wrong = netD(images, sent, wrong)
            feats = netD.trunk(images)

            def release(s, feats=feats, netD=netD):
                tiled = feats.repeat(s.shape[0] // feats.shape[0], 1, 1, 1)
                joint = torch.cat([tiled, s[:, :, None, None].expand(-1, -1, 4, 4)], dim=1)
                return netD.cond(netD.joint(joint)).flatten()

            ref_cond = release(sent)
            assert torch.allclose(uncond, netD.uncond(feats).flatten(), atol=1e-12)
            assert torch.allclose(cond, ref_cond, atol=1e-12)
            assert torch.allclose(cond_wrong, release(wrong), atol=1e-12)
            params = [images, sent, *netD.parameters()]
            got = torch.autograd.grad(cond.sum() + uncond.sum(), params, retain_graph=True)
            ref = torch.autograd.grad(ref_cond.sum() + netD.uncond(feats).sum(), params)
            for g, r in zip(got, ref, strict=True):
                assert torch.allclose(g, r, atol=1e-10)
