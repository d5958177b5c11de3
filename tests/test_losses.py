"""Tests for miscc/losses.py: batched DAMSM losses against a plain per-pair reference,
hand-computed cases, padding invariance, NT-Xent and the GAN/KL helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from miscc.losses import (
    discriminator_loss,
    generator_adv_loss,
    kl_loss,
    matching_aware_gp,
    minimal_pair_loss,
    mode_seeking_loss,
    negative_loss,
    nt_xent,
    sent_loss,
    words_loss,
)

G1, G2, G3 = 4.0, 5.0, 10.0


# --------------------------------------------------------------------------- references
def ref_words_loss(words, word_mask, regions, class_ids, g1, g2, g3, attngan_score=False,
                   similarity="cosine"):
    """Obviously-correct per-pair loops: scores[image j, caption i]; the attention comes from
    cosines or (AttnGAN's code) raw dot products of words and regions."""
    b = words.shape[0]
    scores = torch.zeros(b, b, dtype=words.dtype)
    attn = torch.zeros(words.shape[0], words.shape[1], regions.shape[1], dtype=words.dtype)
    for i in range(b):  # caption
        e = words[i][word_mask[i]]  # [L, D] real words only
        for j in range(b):  # image
            v = regions[j]  # [R, D]
            s = torch.zeros(e.shape[0], v.shape[0], dtype=words.dtype)
            for t in range(e.shape[0]):
                if similarity == "cosine":
                    s[t] = F.cosine_similarity(e[t][None, :], v, dim=-1)
                else:
                    s[t] = (e[t][None, :] * v).sum(-1)
            s_words = torch.softmax(s, dim=0)  # normalise over words
            alpha = torch.softmax(g1 * s_words, dim=1)  # attention over regions
            c = alpha @ v  # [L, D]
            r = F.cosine_similarity(c, e, dim=-1)  # [L]
            score = torch.logsumexp(g2 * r, dim=0)
            if not attngan_score:
                score = score / g2
            scores[j, i] = g3 * score
            if i == j:
                attn[i, word_mask[i]] = alpha
    if class_ids is not None:
        for i in range(b):
            for j in range(b):
                if i != j and int(class_ids[i]) == int(class_ids[j]):
                    scores[i, j] = float("-inf")
    labels = torch.arange(b)
    loss0 = F.cross_entropy(scores, labels)
    loss1 = F.cross_entropy(scores.t(), labels)
    return loss0, loss1, attn


def ref_sent_loss(code, sent, class_ids, g3):
    b = code.shape[0]
    scores = torch.zeros(b, b, dtype=code.dtype)
    for i in range(b):
        for j in range(b):
            scores[i, j] = g3 * F.cosine_similarity(code[i], sent[j], dim=0)
            if class_ids is not None and i != j and int(class_ids[i]) == int(class_ids[j]):
                scores[i, j] = float("-inf")
    labels = torch.arange(b)
    return F.cross_entropy(scores, labels), F.cross_entropy(scores.t(), labels)


def ref_sent_loss_with_pairs(code, sent, class_ids, g3, neg_sent, neg_sent_mask, neg_code,
                             neg_code_mask):
    """One image / one caption at a time: image i's candidates are every caption of the batch
    (same class masked) plus the real one-edit variants of its own caption; caption i's are
    every image plus the real redraws of its own image."""
    b = code.shape[0]
    cos = F.cosine_similarity
    loss0 = loss1 = 0.0
    for i in range(b):
        row = [g3 * cos(code[i], sent[j], dim=0) for j in range(b)
               if j == i or class_ids is None or int(class_ids[i]) != int(class_ids[j])]
        target0 = sum(1 for j in range(i)
                      if class_ids is None or int(class_ids[i]) != int(class_ids[j]))
        row += [g3 * cos(code[i], neg_sent[i, k], dim=0) for k in range(neg_sent.shape[1])
                if neg_sent_mask[i, k]]
        loss0 = loss0 - torch.log_softmax(torch.stack(row), 0)[target0]
        col = [g3 * cos(code[j], sent[i], dim=0) for j in range(b)
               if j == i or class_ids is None or int(class_ids[i]) != int(class_ids[j])]
        col += [g3 * cos(neg_code[i, m], sent[i], dim=0) for m in range(neg_code.shape[1])
                if neg_code_mask[i, m]]
        loss1 = loss1 - torch.log_softmax(torch.stack(col), 0)[target0]
    return loss0 / b, loss1 / b


def ref_minimal_pair_loss(anchor, positive, negatives, mask, scale):
    """Per item: -log softmax over [positive, each real negative] at the positive; the mean
    over the items that have a negative."""
    total, count = 0.0, 0
    for b in range(anchor.shape[0]):
        cands = [positive[b]] + [negatives[b, k] for k in range(negatives.shape[1]) if mask[b, k]]
        if len(cands) == 1:
            continue
        logits = torch.stack([scale * F.cosine_similarity(anchor[b], c, dim=0) for c in cands])
        total, count = total - torch.log_softmax(logits, 0)[0], count + 1
    return total / max(count, 1) if count else anchor.sum() * 0


def ref_nt_xent(z1, z2, tau):
    z = torch.cat([z1, z2])
    n = z.shape[0]
    b = z1.shape[0]
    total = 0.0
    for k in range(n):
        pos = (k + b) % n
        logits = torch.stack([F.cosine_similarity(z[k], z[m], dim=0) / tau
                              for m in range(n) if m != k])
        others = [m for m in range(n) if m != k]
        total = total - torch.log_softmax(logits, dim=0)[others.index(pos)]
    return total / n


# --------------------------------------------------------------------------- fixtures
def make_batch(b=5, t=7, r=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(b, t, d, generator=g, dtype=dtype)
    regions = torch.randn(b, r, d, generator=g, dtype=dtype)
    lengths = torch.tensor([t, 1, 3, t - 2, 5, 2, 4, 6][:b])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return words, mask, regions


def grads(fn, *tensors):
    ts = [x.detach().clone().requires_grad_(True) for x in tensors]
    out = fn(*ts)
    loss = out[0] + 2.0 * out[1]  # distinct weights so both terms are checked
    loss.backward()
    return out, [x.grad for x in ts]


# --------------------------------------------------------------------------- words_loss
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("attngan_score", [False, True])
@pytest.mark.parametrize("class_ids", [None, [3, 1, 3, 2, 1]])
def test_words_loss_matches_reference(attngan_score, class_ids, similarity):
    words, mask, regions = make_batch()
    cid = None if class_ids is None else torch.tensor(class_ids)

    (l0, l1, attn), (gw, gr) = grads(
        lambda w, r: words_loss(w, mask, r, cid, G1, G2, G3, attngan_score=attngan_score,
                                similarity=similarity),
        words, regions)
    (r0, r1, rattn), (rgw, rgr) = grads(
        lambda w, r: ref_words_loss(w, mask, r, cid, G1, G2, G3, attngan_score, similarity),
        words, regions)

    torch.testing.assert_close(l0, r0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, r1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, rattn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rgw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gr, rgr, atol=1e-5, rtol=1e-5)
    assert gw.abs().sum() > 0 and gr.abs().sum() > 0
    # padding words get exactly no gradient
    assert torch.all(gw[~mask] == 0)


def test_words_loss_non_prefix_mask_matches_reference():
    words, _, regions = make_batch(b=3, t=5, seed=3)
    mask = torch.tensor([[True, False, True, False, True],
                         [False, True, True, False, False],
                         [True, True, True, True, True]])
    l0, l1, attn = words_loss(words, mask, regions, None, G1, G2, G3)
    r0, r1, rattn = ref_words_loss(words, mask, regions, None, G1, G2, G3)
    torch.testing.assert_close((l0, l1, attn), (r0, r1, rattn), atol=1e-5, rtol=1e-5)


def test_words_loss_class_mask_is_effective():
    """All captions of the same class: no negatives left, so both losses are exactly 0."""
    words, mask, regions = make_batch(b=4)
    cid = torch.tensor([7, 7, 7, 7])
    l0, l1, _ = words_loss(words, mask, regions, cid, G1, G2, G3)
    assert l0.item() == 0.0 and l1.item() == 0.0
    # and a mask with one repeated pair differs from no mask
    n0, _, _ = words_loss(words, mask, regions, None, G1, G2, G3)
    m0, _, _ = words_loss(words, mask, regions, torch.tensor([0, 1, 0, 2]), G1, G2, G3)
    assert not torch.isclose(n0, m0)


def test_words_loss_hand_computed():
    # D = 2, T = 2, R = 2, B = 2; gamma1 = 4, gamma2 = 5, gamma3 = 10.
    # image 0 regions (1,0),(0,1); image 1 regions (1,0),(1,0).
    # caption 0 words (1,0),(0,1); caption 1 word (0,1) + one padding word.
    #
    # (img0, cap0): s = [[1,0],[0,1]] (rows = words). Softmax over words per region:
    #   s' = [[σ, 1-σ], [1-σ, σ]], σ = e/(e+1). Softmax over regions of γ1·s':
    #   word 0 -> (a, 1-a), word 1 -> (1-a, a) with a = 1/(1+exp(-γ1(2σ-1))).
    #   c0 = (a, 1-a), c1 = (1-a, a); cos(c0,e0) = cos(c1,e1) = ρ = a/sqrt(a²+(1-a)²).
    #   R = (1/γ2)·log(2·exp(γ2 ρ)) = ρ + log(2)/γ2.
    # (img1, cap0): s = [[1,1],[0,0]] -> s' is constant across regions for each word ->
    #   α uniform -> c = (1,0) for both words; cos = 1 and 0.
    #   R = (1/γ2)·log(exp(γ2) + 1).
    # (img0, cap1): one word -> s' = 1 for every region -> α uniform -> c = (.5,.5);
    #   R = cos((.5,.5),(0,1)) = 1/√2.
    # (img1, cap1): c = (1,0) -> R = cos((1,0),(0,1)) = 0.
    # scores[image, caption] = γ3·R; loss0 = mean_rows CE, loss1 = mean_cols CE.
    words = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                          [[0.0, 1.0], [9.0, -4.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                            [[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    sig = math.e / (math.e + 1)
    a = 1 / (1 + math.exp(-G1 * (2 * sig - 1)))
    rho = a / math.sqrt(a * a + (1 - a) ** 2)
    r = [[rho + math.log(2) / G2, 1 / math.sqrt(2)],
         [math.log(math.exp(G2) + 1) / G2, 0.0]]

    def ce(row, k):  # -log softmax(row)[k]
        return -(row[k] - math.log(sum(math.exp(x) for x in row)))

    sc = [[G3 * x for x in row] for row in r]
    exp0 = (ce(sc[0], 0) + ce(sc[1], 1)) / 2
    exp1 = (ce([sc[0][0], sc[1][0]], 0) + ce([sc[0][1], sc[1][1]], 1)) / 2
    l0, l1, attn = words_loss(words, mask, regions, None, G1, G2, G3)
    assert l0.item() == pytest.approx(exp0, abs=1e-9)
    assert l1.item() == pytest.approx(exp1, abs=1e-9)
    expected_attn = torch.tensor([[[a, 1 - a], [1 - a, a]],
                                  [[0.5, 0.5], [0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(attn, expected_attn)

    # AttnGAN variant: scores are γ3·γ2·R
    sc = [[G3 * G2 * x for x in row] for row in r]
    exp0 = (ce(sc[0], 0) + ce(sc[1], 1)) / 2
    l0, _, _ = words_loss(words, mask, regions, None, G1, G2, G3, attngan_score=True)
    assert l0.item() == pytest.approx(exp0, abs=1e-9)


def test_words_loss_padding_changes_nothing():
    words, mask, regions = make_batch(seed=1)
    l0, l1, attn = words_loss(words, mask, regions, None, G1, G2, G3)

    # change the values at padding positions
    w2 = words.clone()
    w2[~mask] = torch.randn(int((~mask).sum()), words.shape[2], dtype=words.dtype) * 50
    a0, a1, attn2 = words_loss(w2, mask, regions, None, G1, G2, G3)
    torch.testing.assert_close((a0, a1, attn2), (l0, l1, attn), atol=1e-12, rtol=0)

    # append 3 padded positions (T -> T+3), with garbage and with zeros
    for fill in (torch.randn, torch.zeros):
        extra = fill(words.shape[0], 3, words.shape[2], dtype=words.dtype)
        w3 = torch.cat([words, extra], dim=1).requires_grad_(True)
        m3 = torch.cat([mask, torch.zeros(mask.shape[0], 3, dtype=torch.bool)], dim=1)
        b0, b1, attn3 = words_loss(w3, m3, regions, None, G1, G2, G3)
        torch.testing.assert_close((b0, b1), (l0, l1), atol=1e-12, rtol=0)
        torch.testing.assert_close(attn3[:, : words.shape[1]], attn, atol=1e-12, rtol=0)
        assert torch.all(attn3[:, words.shape[1]:] == 0)
        (b0 + b1).backward()
        assert torch.isfinite(w3.grad).all()
        assert torch.all(w3.grad[:, words.shape[1]:] == 0)


def test_words_loss_attn_shape_and_normalisation():
    words, mask, regions = make_batch(b=4, t=7, r=6)
    _, _, attn = words_loss(words, mask, regions, None, G1, G2, G3)
    assert attn.shape == (4, 7, 6)
    sums = attn.sum(-1)
    torch.testing.assert_close(sums[mask], torch.ones_like(sums[mask]))
    assert torch.all(attn[~mask] == 0)
    assert torch.all(attn[mask] > 0)


def test_words_loss_float32_and_autocast():
    w64, mask, r64 = make_batch(seed=2)
    ref = words_loss(w64, mask, r64, None, G1, G2, G3)
    out32 = words_loss(w64.float(), mask, r64.float(), None, G1, G2, G3)
    assert out32[0].dtype == torch.float32
    torch.testing.assert_close(out32[0].double(), ref[0], atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outac = words_loss(w64.float().bfloat16(), mask, r64.float().bfloat16(), None,
                           G1, G2, G3)
        sl = sent_loss(w64[:, 0].float(), r64[:, 0].float(), None, G3)
    assert outac[0].dtype == torch.float32 and sl[0].dtype == torch.float32
    assert torch.isfinite(outac[0]) and torch.isfinite(outac[1])


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_words_loss_never_builds_bbtd_tensor():
    # D large relative to R so that any [B, B, T, D] tensor would dominate everything else.
    b, t, r, d = 6, 5, 4, 256
    words, mask, regions = make_batch(b=b, t=t, r=r, d=d, dtype=torch.float32)
    words.requires_grad_(True)
    regions.requires_grad_(True)
    with _LargestTensor() as probe:
        l0, l1, _ = words_loss(words, mask, regions, torch.tensor([0, 1, 0, 2, 3, 4]),
                               G1, G2, G3)
        (l0 + l1).backward()
    assert any("softmax_backward" in op for op in probe.ops)  # backward was observed
    allowed = max(b * t * d, b * r * d, b * b * t * r)
    assert probe.largest <= allowed < b * b * t * d


def test_words_loss_rejects_bad_shapes():
    words, mask, regions = make_batch(b=3)
    with pytest.raises(ValueError, match="word_mask must be"):
        words_loss(words, mask[:, :-1], regions, None, G1, G2, G3)
    with pytest.raises(ValueError, match="do not match words"):
        words_loss(words, mask, regions[:2], None, G1, G2, G3)
    with pytest.raises(ValueError, match="similarity must be one of"):
        words_loss(words, mask, regions, None, G1, G2, G3, similarity="euclid")


def test_dot_attention_follows_the_feature_norms():
    """Scaling one region's feature sharpens dot-product attention toward it; the cosine
    attention does not move (so the two options really differ)."""
    words, mask, regions = make_batch(b=3, seed=4)
    scaled = regions.clone()
    scaled[:, 0] *= 5.0
    _, _, cos_a = words_loss(words, mask, regions, None, G1, G2, G3, similarity="cosine")
    _, _, cos_b = words_loss(words, mask, scaled, None, G1, G2, G3, similarity="cosine")
    torch.testing.assert_close(cos_a, cos_b)
    _, _, dot_a = words_loss(words, mask, regions, None, G1, G2, G3, similarity="dot")
    _, _, dot_b = words_loss(words, mask, scaled, None, G1, G2, G3, similarity="dot")
    assert not torch.allclose(dot_a, dot_b)
    assert not torch.allclose(dot_a, cos_a)


# --------------------------------------------------------------------------- sent_loss
@pytest.mark.parametrize("class_ids", [None, [0, 4, 0, 1, 4, 2]])
def test_sent_loss_matches_reference(class_ids):
    g = torch.Generator().manual_seed(5)
    code = torch.randn(6, 9, generator=g, dtype=torch.float64)
    sent = torch.randn(6, 9, generator=g, dtype=torch.float64)
    cid = None if class_ids is None else torch.tensor(class_ids)
    (l0, l1), (gc, gs) = grads(lambda c, s: sent_loss(c, s, cid, G3), code, sent)
    (r0, r1), (rgc, rgs) = grads(lambda c, s: ref_sent_loss(c, s, cid, G3), code, sent)
    torch.testing.assert_close((l0, l1), (r0, r1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((gc, gs), (rgc, rgs), atol=1e-5, rtol=1e-5)


def test_sent_loss_hand_computed():
    # code0 = (1,0), code1 = (0,1); sent0 = (1,1), sent1 = (0,2).
    # cos: (c0,s0) = 1/√2, (c0,s1) = 0, (c1,s0) = 1/√2, (c1,s1) = 1.
    # scores = γ3·[[1/√2, 0], [1/√2, 1]]  (rows = images, columns = sentences), γ3 = 10.
    # loss0 = ½[-log(e^{10/√2}/(e^{10/√2}+1)) - log(e^{10}/(e^{10/√2}+e^{10}))]
    # loss1 = ½[-log(e^{10/√2}/(2e^{10/√2})) - log(e^{10}/(1+e^{10}))]
    #       = ½[log 2 + log(1+e^{-10})]
    code = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    sent = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    h = 10 / math.sqrt(2)
    exp0 = 0.5 * (math.log1p(math.exp(-h)) + math.log1p(math.exp(h - 10)))
    exp1 = 0.5 * (math.log(2) + math.log1p(math.exp(-10)))
    l0, l1 = sent_loss(code, sent, None, G3)
    assert l0.item() == pytest.approx(exp0, abs=1e-12)
    assert l1.item() == pytest.approx(exp1, abs=1e-12)
    # same class -> off-diagonals masked -> zero loss
    z0, z1 = sent_loss(code, sent, torch.tensor([2, 2]), G3)
    assert z0.item() == 0.0 and z1.item() == 0.0


@pytest.mark.parametrize("class_ids", [None, [1, 2, 1, 3, 2, 4]])
def test_sent_loss_with_minimal_pairs_matches_reference(class_ids):
    """Extra negatives of their own item, masked where a caption has fewer: values and
    gradients (code, sentences, negative captions, negative pictures) against a loop."""
    g = torch.Generator().manual_seed(11)
    b, k, m, d = 6, 3, 2, 9
    code, sent = (torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(2))
    neg_sent = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    neg_code = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    sent_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0],
                              [1, 1, 1]], dtype=torch.bool)
    code_mask = torch.tensor([[1, 1], [0, 0], [1, 0], [1, 1], [0, 1], [0, 0]],
                             dtype=torch.bool)
    cid = None if class_ids is None else torch.tensor(class_ids)
    (l0, l1), got = grads(lambda c, s, ns, nc: sent_loss(c, s, cid, G3, ns, sent_mask, nc,
                                                         code_mask),
                          code, sent, neg_sent, neg_code)
    (r0, r1), want = grads(lambda c, s, ns, nc: ref_sent_loss_with_pairs(
        c, s, cid, G3, ns, sent_mask, nc, code_mask), code, sent, neg_sent, neg_code)
    torch.testing.assert_close((l0, l1), (r0, r1), atol=1e-10, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # masked negatives get no gradient; with every negative masked it is the plain loss
    assert got[2][~sent_mask].abs().max() == 0 and got[3][~code_mask].abs().max() == 0
    plain = sent_loss(code, sent, cid, G3)
    none = sent_loss(code, sent, cid, G3, neg_sent, torch.zeros(b, k, dtype=torch.bool),
                     neg_code, torch.zeros(b, m, dtype=torch.bool))
    torch.testing.assert_close(none, plain, atol=1e-12, rtol=0)


def test_minimal_pair_loss_matches_reference():
    g = torch.Generator().manual_seed(12)
    b, k, d = 5, 4, 7
    anchor, positive = (torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(2))
    negatives = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0],
                         [1, 1, 0, 1]], dtype=torch.bool)
    for scale in (1.0, 10.0):
        fn = lambda a, p, n, s=scale: (minimal_pair_loss(a, p, n, mask, s),  # noqa: E731
                                       torch.zeros(()))
        ref = lambda a, p, n, s=scale: (ref_minimal_pair_loss(a, p, n, mask, s),  # noqa: E731
                                        torch.zeros(()))
        (got, _), g_got = grads(fn, anchor, positive, negatives)
        (want, _), g_want = grads(ref, anchor, positive, negatives)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=0)
    # hand value: one negative at cosine 0, the positive at cosine 1, scale 10
    one = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = minimal_pair_loss(one, one, torch.tensor([[[0.0, 3.0]]], dtype=torch.float64),
                            None, 10.0)
    assert out.item() == pytest.approx(math.log1p(math.exp(-10.0)), abs=1e-12)
    # no item with a negative: 0 (and still part of the graph)
    zero = minimal_pair_loss(anchor, positive, negatives, torch.zeros(b, k, dtype=torch.bool),
                             10.0)
    assert zero.item() == 0.0


# --------------------------------------------------------------------------- nt_xent
def test_nt_xent_matches_loop_reference_and_is_symmetric():
    g = torch.Generator().manual_seed(9)
    z1 = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    z2 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for tau in (0.5, 0.1):
        out = nt_xent(z1, z2, tau)
        torch.testing.assert_close(out, ref_nt_xent(z1, z2, tau), atol=1e-10, rtol=0)
        torch.testing.assert_close(nt_xent(z2, z1, tau), out, atol=1e-12, rtol=0)
    # gradients against the reference
    _, (ga1, ga2) = grads(lambda x, y: (nt_xent(x, y), torch.zeros(())), z1, z2)
    _, (gb1, gb2) = grads(lambda x, y: (ref_nt_xent(x, y, 0.5), torch.zeros(())), z1, z2)
    torch.testing.assert_close((ga1, ga2), (gb1, gb2), atol=1e-8, rtol=1e-6)


def test_nt_xent_hand_computed():
    # B = 1: after removing the self-pair each row only has its positive -> loss 0.
    z1 = torch.tensor([[1.0, 0.0]])
    z2 = torch.tensor([[0.0, 1.0]])
    assert nt_xent(z1, z2).item() == pytest.approx(0.0, abs=1e-7)
    # B = 2, both views identical: z = [e1, e2, e1, e2], τ = 0.5.
    # row of e1: others are e2 (cos 0), e1 (cos 1, positive), e2 (cos 0)
    # -> loss = -log(e^{2}/(e^{2} + 2)) for every row.
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert nt_xent(z, z, 0.5).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- GAN helpers
def test_discriminator_loss_hand_values():
    zero = torch.zeros(4)
    # all logits 0 -> every BCE = log 2 -> log2 + log2
    assert discriminator_loss(zero, zero, zero, zero, zero).item() == pytest.approx(
        2 * math.log(2))
    assert discriminator_loss(None, zero, None, zero, zero).item() == pytest.approx(
        2 * math.log(2))
    big = torch.full((4,), 30.0)
    # perfect D: real -> +30, fake/wrong -> -30: ≈ 0
    assert discriminator_loss(big, big, -big, -big, -big).item() < 1e-10
    # only the wrong term bad (logit +30 -> BCE ≈ 30): fake mean = 30/3 = 10; with
    # uncond dropped the divisor is 2 -> 15.
    assert discriminator_loss(big, big, -big, -big, big).item() == pytest.approx(10.0, rel=1e-6)
    assert discriminator_loss(None, big, None, -big, big).item() == pytest.approx(15.0, rel=1e-6)
    # only real_cond bad (logit -30): real mean = 30/2 = 15
    assert discriminator_loss(big, -big, -big, -big, -big).item() == pytest.approx(
        15.0, rel=1e-6)


def test_generator_adv_loss_and_kl_hand_values():
    zero = torch.zeros(3, 1)
    assert generator_adv_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert generator_adv_loss(None, zero).item() == pytest.approx(math.log(2))
    assert generator_adv_loss(None, torch.full((3,), -30.0)).item() == pytest.approx(
        30.0, rel=1e-6)

    mu = torch.zeros(2, 5)
    assert kl_loss(mu, torch.zeros(2, 5)).item() == 0.0
    # mu = 1, logvar = 0: -0.5(1 + 0 - 1 - 1) = 0.5 per element; mean = 0.5
    assert kl_loss(torch.ones(2, 5), torch.zeros(2, 5)).item() == pytest.approx(0.5)
    # one element with mu = 2 among 10: 0.5·4 / 10 = 0.2 (a mean, not a sum)
    mu = torch.zeros(2, 5)
    mu[0, 0] = 2.0
    assert kl_loss(mu, torch.zeros(2, 5)).item() == pytest.approx(0.2)
    # logvar = log 2, mu = 0: -0.5(1 + log2 - 2) = 0.5(1 - log 2)
    lv = torch.full((2, 5), math.log(2))
    assert kl_loss(torch.zeros(2, 5), lv).item() == pytest.approx(0.5 * (1 - math.log(2)))


def test_hinge_losses_hand_values():
    """TRAIN.GAN_LOSS hinge: relu(1 - x) for real logits, relu(1 + x) for fake and wrong ones,
    in DM-GAN's arrangement; G: -mean(logits) per head."""
    x = torch.tensor([0.5, 2.0, -1.0, 0.0])  # relu(1 - x) = .5, 0, 2, 1 -> mean .875
    # relu(1 + x) = 1.5, 3, 0, 1 -> mean 1.375
    assert discriminator_loss(None, x, None, x, x, kind="hinge").item() == pytest.approx(
        0.875 + 1.375)
    assert discriminator_loss(x, x, x, x, -x, kind="hinge").item() == pytest.approx(
        0.875 + (1.375 + 1.375 + 0.875) / 3)
    assert generator_adv_loss(x, 2 * x, kind="hinge").item() == pytest.approx(-0.375 - 0.75)
    assert generator_adv_loss(None, x, kind="hinge").item() == pytest.approx(-0.375)
    with pytest.raises(ValueError, match="hinge"):
        discriminator_loss(None, x, None, x, x, kind="wasserstein")


def test_matching_aware_gp_equals_the_hand_computed_gradient_of_a_linear_d():
    """A toy D that is linear in image and sentence, D(x, s) = <a, x> + <b, s>: its gradient
    is (a, b) for every pair, so the penalty is ‖(a, b)‖^p, and its own gradient with respect
    to a is p‖(a, b)‖^(p-2)·a (the penalty trains D)."""
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    images = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    sent = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    logits = (images * a).sum((1, 2, 3)) + sent @ b
    norm = torch.cat([a.flatten(), b]).norm()
    for power in (2.0, 6.0):
        penalty = matching_aware_gp(logits, images, sent, power)
        assert penalty.item() == pytest.approx(norm.item() ** power, rel=1e-6)
        grad_a, = torch.autograd.grad(penalty, a, retain_graph=True)
        expected = power * norm ** (power - 2) * a
        assert torch.allclose(grad_a.double(), expected.detach(), rtol=1e-5)
    # per pair: a D whose gradient differs between rows averages the rows' norms^p
    scale = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    logits = scale * ((images * a).sum((1, 2, 3)) + sent @ b)
    penalty = matching_aware_gp(logits, images, sent, 6.0)
    assert penalty.item() == pytest.approx(norm.item() ** 6 * (1 + 2**6) / 2, rel=1e-6)


def test_mode_seeking_loss_is_the_inverse_image_to_noise_distance_ratio():
    """MSGAN: 1 / (mean|a - b| / mean|z - z'| + 1e-5); two images that differ more for the same
    noise distance cost less, and identical images cost 1e5 (a G that ignores its noise)."""
    a = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])  # mean |a - b| = (1 + 0 + 2 + 0) / 4 = 0.75
    z = torch.tensor([[0.0, 0.0, 3.0]])
    z2 = torch.tensor([[1.0, -2.0, 3.0]])  # mean |z - z2| = 1
    assert mode_seeking_loss(a, b, z, z2).item() == pytest.approx(1 / (0.75 + 1e-5))
    assert mode_seeking_loss(a, 2 * b, z, z2).item() < mode_seeking_loss(a, b, z, z2).item()
    assert mode_seeking_loss(a, a, z, z2).item() == pytest.approx(1e5)
    assert mode_seeking_loss(a, b, z, 2 * z2 - z).item() == pytest.approx(1 / (0.375 + 1e-5))
    x = a.clone().requires_grad_()
    mode_seeking_loss(x, b, z, z2).backward()  # descent moves a away from b
    assert (-x.grad * (a - b)).sum() > 0


def test_negative_loss_scores_augmented_reals_as_fakes():
    x = torch.tensor([0.0, 0.0])
    assert negative_loss([x, x]).item() == pytest.approx(math.log(2))
    assert negative_loss([torch.full((3,), 30.0), torch.full((3,), -30.0)]).item() == \
        pytest.approx(15.0, rel=1e-6)  # (30 + 0) / 2
    assert negative_loss([torch.tensor([0.5, -2.0])], kind="hinge").item() == pytest.approx(
        (1.5 + 0.0) / 2)
