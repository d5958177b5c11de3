"""CLIP-GEN's transformer and sampler (clipgen/gpt.py; docs/DESIGN.md §13): causal teacher
forcing after the CLIP prefix, key/value-cached sampling equal to full recomputation, draws
that depend only on (seed, caption id) and follow the filtered softmax."""

from __future__ import annotations

import pytest
import torch

from clipgen.gpt import CondGPT, GPTArch, candidates, gumbel_draw, hashed_uniform, sample_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = GPTArch(vocab=32, tokens=9, cond_dim=16, n_layer=2, n_embd=32, n_head=4)


def tiny() -> CondGPT:
    torch.manual_seed(0)
    return CondGPT(ARCH).eval()


def test_teacher_forcing_is_causal_and_conditioned_on_the_normalised_prefix() -> None:
    model = tiny()
    tokens, cond = torch.randint(0, 32, (2, 9)), torch.randn(2, 16)
    logits = model(tokens, cond)
    assert logits.shape == (2, 9, 32)
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 32
    # position j predicts token j from the prefix and tokens < j: only 6.. see the change
    after = model(changed, cond)
    assert torch.allclose(after[:, :6], logits[:, :6], atol=1e-6)
    assert not torch.allclose(after[:, 6:], logits[:, 6:])
    assert torch.allclose(model(tokens, 3 * cond), logits, atol=1e-5)  # ‖e‖ does not matter
    assert not torch.allclose(model(tokens, torch.randn(2, 16))[:, 0], logits[:, 0])


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (10, 0.9)])
def test_cached_sampling_draws_the_same_tokens_as_full_recomputation(top_k, top_p) -> None:
    model = tiny()
    cond, ids = torch.randn(6, 16), torch.arange(100, 106)
    cached = sample_tokens(model, cond, ids, seed=7, top_k=top_k, top_p=top_p)
    full = sample_tokens(model, cond, ids, seed=7, top_k=top_k, top_p=top_p, use_cache=False)
    assert cached.shape == (6, 9) and torch.equal(cached, full)
    assert len({tuple(r) for r in cached.tolist()}) > 1  # not one fixed sequence


def test_draws_depend_only_on_seed_and_caption_id() -> None:
    model = tiny()
    cond, ids = torch.randn(6, 16), torch.arange(6)
    whole = sample_tokens(model, cond, ids, seed=1)
    parts = torch.cat([sample_tokens(model, cond[i: i + 2], ids[i: i + 2], seed=1)
                       for i in (4, 0, 2)])
    assert torch.equal(parts, whole[[4, 5, 0, 1, 2, 3]])  # any batch split, any order
    assert not torch.equal(sample_tokens(model, cond, ids, seed=2), whole)


def test_candidates_keep_the_top_k_then_the_top_p_mass() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.1, 0.05]]))
    values, codes = candidates(logits, top_k=3)
    assert codes.tolist() == [[0, 2, 3]] and torch.isfinite(values).all()
    # renormalised over the top 3 (0.5, 0.3, 0.1)/0.9: 0.556 + 0.333 reaches 0.85, 0.111 not
    values, codes = candidates(logits, top_k=3, top_p=0.85)
    assert codes.tolist() == [[0, 2, 3]]
    assert torch.isfinite(values).tolist() == [[True, True, False]]
    values, _ = candidates(logits, top_p=0.5)  # the best code alone reaches 0.5
    assert torch.isfinite(values).sum() == 1
    assert torch.allclose(candidates(logits, temperature=2.0)[0], logits.sort(descending=True)
                          .values / 2)


def test_gumbel_draws_follow_the_softmax() -> None:
    """20,000 draws (one per caption id) at fixed logits land on each code as often as its
    probability says (within 4 standard errors)."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    ids = torch.arange(20_000)
    values, codes = candidates(torch.log(probs).expand(len(ids), 4))
    drawn = gumbel_draw(values, codes, 3, ids, 0)
    freq = torch.bincount(drawn, minlength=4).double() / len(ids)
    se = (probs.double() * (1 - probs.double()) / len(ids)).sqrt()
    assert ((freq - probs.double()).abs() < 4 * se).all(), freq
    # codes outside every row's nucleus change nothing: the same draws with 4 more codes at -inf
    wider = torch.cat([values, torch.full((len(ids), 4), float("-inf"))], 1)
    assert torch.equal(gumbel_draw(wider, torch.cat([codes, codes + 4], 1), 3, ids, 0), drawn)
    u = hashed_uniform(0, torch.arange(512), 4, torch.arange(512).expand(512, 512))
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


def guided_model() -> CondGPT:
    from dataclasses import replace

    torch.manual_seed(0)
    return CondGPT(replace(ARCH, null_cond=True)).eval()


def test_a_dropped_condition_is_the_learned_null_prefix() -> None:
    """CLIPGEN.CFG_DROP trains rows without their condition: a dropped row's logits do not
    depend on its embedding, a kept row's do; a model without `null_cond` refuses."""
    model = guided_model()
    tokens, cond = torch.randint(0, 32, (3, 9)), torch.randn(3, 16)
    drop = torch.tensor([True, False, True])
    a, b = model(tokens, cond, drop), model(tokens, torch.randn(3, 16), drop)
    assert torch.equal(a[drop], b[drop]) and not torch.allclose(a[1], b[1])
    assert torch.allclose(model(tokens, cond, ~drop)[0], model(tokens, cond)[0])
    with pytest.raises(ValueError, match="null_cond"):
        tiny()(tokens, cond, drop)
    with pytest.raises(ValueError, match="CFG_DROP"):
        sample_tokens(tiny(), cond, torch.arange(3), seed=1, guidance=2.0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_guided_sampling_draws_from_the_guided_logits(use_cache) -> None:
    """Guidance w: each token is the Gumbel draw of logits_c + w·(logits_c − logits_∅), each
    from a full recomputation of the prefix (reference loop below); w = 0 is the unguided
    sampler."""
    model = guided_model()
    cond, ids, w = torch.randn(5, 16), torch.arange(20, 25), 1.5
    got = sample_tokens(model, cond, ids, seed=3, top_k=8, use_cache=use_cache, guidance=w)
    expect = torch.zeros(5, 9, dtype=torch.long)
    with torch.no_grad():
        for t in range(9):
            conditioned = model.run(model.embed(expect[:, :t], cond, 0))[:, -1]
            free = model.run(model.embed(expect[:, :t], cond, 0, torch.ones(5, dtype=bool)))[:, -1]
            expect[:, t] = gumbel_draw(*candidates(conditioned + w * (conditioned - free), 8),
                                       3, ids, t)
    assert torch.equal(got, expect)
    plain = sample_tokens(model, cond, ids, seed=3, top_k=8, use_cache=use_cache)
    assert torch.equal(sample_tokens(model, cond, ids, seed=3, top_k=8, use_cache=use_cache,
                                     guidance=0.0), plain)
    assert not torch.equal(got, plain)
