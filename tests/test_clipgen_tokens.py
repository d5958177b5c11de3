"""CLIP-GEN's token cache (clipgen/tokens.py): tokens and CLIP image embeddings of seeded
augmented views, computed once, reused, keyed by both models and the images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_vqgan import vq_cfg

import clipgen.tokens as tokens_mod
from clipgen.data import TokenizerImages
from clipgen.tokens import cache_key, token_cache, view_recipe
from clipgen.vqgan import VQModel
from miscc.training import SeededItems
from model import ClipEncoder, resolve_clip_name

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def models(cfg) -> tuple[VQModel, ClipEncoder]:
    torch.manual_seed(0)
    return (VQModel.from_config(cfg).eval(),
            ClipEncoder(resolve_clip_name("tiny", ""), adapter=False).eval())


def test_token_cache_holds_tokens_and_embeddings_of_seeded_views(shapes_dir, tmp_path,
                                                                 monkeypatch) -> None:
    cfg = vq_cfg(shapes_dir, tmp_path / "out")
    data = TokenizerImages(cfg, "train", train=True, use_cache=False)
    vq, encoder = models(cfg)
    cache = token_cache(tmp_path / "cache", data, vq, encoder, CPU, views=2, seed=5, batch=7,
                        progress=False)
    assert cache.tokens.shape == (48, 16) and cache.tokens.dtype == np.int16
    assert cache.emb.shape == (48, 64) and cache.emb.dtype == np.float32
    items = SeededItems(data, 5)
    for v, i in [(0, 0), (1, 0), (1, 23)]:
        x = items[(v, i)]["image"][None]
        with torch.no_grad():
            want_tokens = vq.encode(x).flatten(1)
            want_emb = encoder.encode_image(x)[1]
        got_tokens, got_emb = cache.rows(torch.tensor([v * 24 + i]))
        assert torch.equal(got_tokens, want_tokens)
        assert torch.allclose(got_emb, want_emb, atol=1e-5)
    assert not np.array_equal(cache.emb[:24], cache.emb[24:])  # the two views differ

    def rebuilt(*args, **kwargs):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(tokens_mod, "write_token_cache", rebuilt)
    again = token_cache(tmp_path / "cache", data, vq, encoder, CPU, views=2, seed=5,
                        progress=False)
    assert np.array_equal(again.tokens, cache.tokens)
    assert not list((tmp_path / "cache").rglob(".*tmp"))


def test_cache_key_follows_models_images_and_views(shapes_dir, tmp_path) -> None:
    cfg = vq_cfg(shapes_dir, tmp_path)
    data = TokenizerImages(cfg, "train", train=True, use_cache=False)
    vq, encoder = models(cfg)
    recipe = view_recipe(data)
    key = cache_key(vq, encoder, data.keys, 2, recipe, 5)
    assert cache_key(vq, encoder, data.keys, 2, recipe, 5) == key
    assert cache_key(vq, encoder, data.keys, 3, recipe, 5) != key
    assert cache_key(vq, encoder, data.keys[:-1], 2, recipe, 5) != key
    assert cache_key(vq, encoder, data.keys, 2, recipe, 6) != key
    with torch.no_grad():
        vq.decoder.conv_out.bias.add_(1.0)
    assert cache_key(vq, encoder, data.keys, 2, recipe, 5) != key


@pytest.mark.parametrize("setting", ["TRAIN.FLIP", "TRAIN.RANDOM_CROP"])
def test_views_drawn_otherwise_get_a_cache_of_their_own(shapes_dir, tmp_path, setting) -> None:
    """Switching flips or the random crop must not reuse tokens of differently drawn views."""
    cfg = vq_cfg(shapes_dir, tmp_path / "out")
    vq, encoder = models(cfg)
    root = tmp_path / "cache"
    first = TokenizerImages(cfg, "train", train=True, use_cache=False)
    token_cache(root, first, vq, encoder, CPU, views=1, seed=5, progress=False)
    section, key = setting.split(".")
    switched = vq_cfg(shapes_dir, tmp_path / "out", f"{setting}={not cfg[section][key]}")
    other = TokenizerImages(switched, "train", train=True, use_cache=False)
    assert view_recipe(other) != view_recipe(first)
    again = token_cache(root, other, vq, encoder, CPU, views=1, seed=5, progress=False)
    assert len(list(root.glob("tokens_*"))) == 2
    want = SeededItems(other, 5)[(0, 0)]["image"][None]
    with torch.no_grad():
        assert torch.equal(again.rows(torch.tensor([0]))[0], vq.encode(want).flatten(1))
