"""Losses: DAMSM word/sentence matching, NT-Xent, GAN adversarial terms and the CA KL term.

Score-matrix convention (both DAMSM losses): ``scores[i, j]`` compares **image i** (row)
with **caption j** (column), as in AttnGAN. ``loss0`` is the cross-entropy over each row
(each image picks its caption among all captions), ``loss1`` the same on the transpose
(each caption picks its image). The diagonal holds the matching pairs.

All DAMSM/contrastive math runs in float32 (float64 inputs stay float64) with autocast
disabled, so the losses are stable under bf16/fp16 mixed precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GAN_LOSSES",
    "discriminator_loss",
    "generator_adv_loss",
    "kl_loss",
    "matching_aware_gp",
    "minimal_pair_loss",
    "negative_loss",
    "nt_xent",
    "sent_loss",
    "words_loss",
]

EPS = 1e-8
SIMILARITIES = ("dot", "cosine")  # word-region similarity the DAMSM attention is computed from
_NEG_INF = float("-inf")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16/bf16/fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(x: Tensor) -> torch.autocast:
    """A context that switches autocast off on ``x``'s device type."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _class_mask(class_ids: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
    """[B, B] bool, True where i != j share a class (those pairs are not negatives)."""
    if class_ids is None:
        return None
    ids = torch.as_tensor(class_ids, device=device).reshape(-1)
    if ids.numel() != batch:
        raise ValueError(f"class_ids has {ids.numel()} entries, batch size is {batch}")
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    return same


def _matching_losses(scores: Tensor, class_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """Row-wise and column-wise cross-entropy with the diagonal as target (AttnGAN loss0/1)."""
    batch = scores.shape[0]
    mask = _class_mask(class_ids, batch, scores.device)
    if mask is not None:
        scores = scores.masked_fill(mask, _NEG_INF)
    labels = torch.arange(batch, device=scores.device)
    return F.cross_entropy(scores, labels), F.cross_entropy(scores.t(), labels)


def words_loss(
    words: Tensor,
    word_mask: Tensor,
    regions: Tensor,
    class_ids: Tensor | None,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    attngan_score: bool = False,
    similarity: str = "cosine",
) -> tuple[Tensor, Tensor, Tensor]:
    """DAMSM word-level matching loss over all B x B (image, caption) pairs, batched.

    words [B, T, D], word_mask [B, T] bool (True = real word; every caption needs at least
    one), regions [B, R, D], class_ids [B] or None. Returns ``(loss0, loss1, attn)``:
    loss0 = CE over rows of ``scores[image, caption]``, loss1 = CE over its columns (batch
    means), attn [B, T, R] = each caption's attention over its own image's regions (detached,
    zeros at padding words). ``attngan_score=True`` drops the 1/gamma2 factor of
    R(Q, D) (the original AttnGAN code); the default is the paper's definition.
    ``similarity`` is what the attention is computed from: ``"dot"``, the raw products
    e_t . v_r of the AttnGAN/DM-GAN code, or ``"cosine"``, cos(e_t, v_r) as the earlier
    CLIP + DM-GAN code. R(c_t, e_t) is a cosine either way.

    The context vector c_t = sum_r a_tr v_r is never formed for all pairs: with unit words
    e^_t, c_t . e^_t = sum_r a_tr |v_r| cos(e_t, v_r) and |c_t|^2 = a^T G a with the region
    Gram matrix G = V V^T (computed as x^T G^ x, x = a|v|, G^ the cosine Gram), so the
    largest intermediate is [B, B, T, R], never [B, B, T, D].
    """
    if words.dim() != 3 or regions.dim() != 3:
        raise ValueError(f"words must be [B,T,D] and regions [B,R,D], got "
                         f"{tuple(words.shape)} and {tuple(regions.shape)}")
    batch, n_words, dim = words.shape
    if regions.shape[0] != batch or regions.shape[2] != dim:
        raise ValueError(f"regions {tuple(regions.shape)} do not match words "
                         f"{tuple(words.shape)}")
    if tuple(word_mask.shape) != (batch, n_words):
        raise ValueError(f"word_mask must be [{batch}, {n_words}], got {tuple(word_mask.shape)}")

    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    dtype = _compute_dtype(words)
    with _no_autocast(words):
        e = words.to(dtype)
        v = regions.to(dtype)
        real = word_mask.to(device=e.device, dtype=torch.bool)

        e_len = e.norm(dim=-1).clamp_min(EPS)  # [B, T]
        e_hat = e / e_len.unsqueeze(-1)  # [B, T, D]
        v_len = v.norm(dim=-1).clamp_min(EPS)  # [B, R]
        v_hat = v / v_len.unsqueeze(-1)  # [B, R, D]

        # Layout [j (image), i (caption), t, r]: the Gram contraction below is then one bmm
        # over j with no copy. s[j, i, t, r] = cos(word t of caption i, region r of image j).
        # One [B*T, D] x [D, B*R] matmul, then a single [B, B, T, R] copy into that layout.
        s = e_hat.reshape(batch * n_words, dim) @ v_hat.reshape(-1, dim).t()  # [(i t), (j r)]
        s = s.view(batch, n_words, batch, -1).permute(2, 0, 1, 3).contiguous()

        pad = ~real  # [i, T]
        # attention logits: the cosines, or the raw products e_t . v_r = |e_t| |v_r| cos
        att = s if similarity == "cosine" else s * e_len[None, :, :, None] * v_len[:, None, None]
        # Normalise over words (softmax over t, padding excluded), then over regions.
        s_words = torch.softmax(att.masked_fill(pad[None, :, :, None], _NEG_INF), dim=2)
        alpha = torch.softmax(gamma1 * s_words, dim=3)  # [j, i, T, R]

        # Weights on unit regions: c_t = sum_r x_tr v^_r with x = alpha * |v_r|.
        x = alpha * v_len[:, None, None, :]
        num = (x * s).sum(-1)  # c_t . e^_t                         [j, i, T]
        gram = torch.bmm(v_hat, v_hat.mT)  # [j, R, R]
        xg = torch.bmm(x.reshape(batch, batch * n_words, -1), gram).view_as(x)
        c_sq = (xg * x).sum(-1)  # |c_t|^2                           [j, i, T]
        r_ct = num / c_sq.clamp_min(EPS * EPS).sqrt()  # cos(c_t, e_t)

        logits = (gamma2 * r_ct).masked_fill(pad[None], _NEG_INF)
        sim = torch.logsumexp(logits, dim=2)  # [j, i]
        if not attngan_score:
            sim = sim / gamma2
        scores = gamma3 * sim  # rows = images, columns = captions
        loss0, loss1 = _matching_losses(scores, class_ids)

        attn = alpha.detach().diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # [B, T, R]
        attn = attn.masked_fill(pad[:, :, None], 0.0)
    return loss0, loss1, attn


def sent_loss(
    code: Tensor, sent: Tensor, class_ids: Tensor | None, gamma3: float,
    neg_sent: Tensor | None = None, neg_sent_mask: Tensor | None = None,
    neg_code: Tensor | None = None, neg_code_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DAMSM sentence-level loss: scores[image i, sentence j] = gamma3 * cos(code_i, sent_j).

    Returns ``(loss0, loss1)``: CE over rows (images) and over columns (sentences), batch
    means, with same-class off-diagonal pairs masked out when ``class_ids`` is given.
    Minimal pairs (docs/DESIGN.md §14) are extra negatives of their own item only:
    ``neg_sent`` [B, K, D] (one-edit captions of caption i) join row i of loss0, ``neg_code``
    [B, M, D] (redrawn pictures of image i) join caption i's choice in loss1; their masks
    [B, K] / [B, M] are True at real ones (None = all real).
    """
    if code.dim() != 2 or code.shape != sent.shape:
        raise ValueError(f"code and sent must both be [B, D], got {tuple(code.shape)} "
                         f"and {tuple(sent.shape)}")
    dtype = _compute_dtype(code)
    with _no_autocast(code):
        c = F.normalize(code.to(dtype), dim=-1, eps=EPS)
        s = F.normalize(sent.to(dtype), dim=-1, eps=EPS)
        scores = gamma3 * (c @ s.t())
        if neg_sent is None and neg_code is None:
            return _matching_losses(scores, class_ids)
        batch = scores.shape[0]
        mask = _class_mask(class_ids, batch, scores.device)
        if mask is not None:
            scores = scores.masked_fill(mask, _NEG_INF)
        rows, cols = scores, scores.t()
        if neg_sent is not None:  # image i also picks against its own caption's edits
            rows = torch.cat([rows, gamma3 * _own_cosines(c, neg_sent, neg_sent_mask)], 1)
        if neg_code is not None:  # caption i also picks against its image's redraws
            cols = torch.cat([cols, gamma3 * _own_cosines(s, neg_code, neg_code_mask)], 1)
        labels = torch.arange(batch, device=scores.device)
        return F.cross_entropy(rows, labels), F.cross_entropy(cols, labels)


def _own_cosines(anchor: Tensor, negatives: Tensor, mask: Tensor | None) -> Tensor:
    """[B, K] cosines of anchor b [B, D] with its own negatives [B, K, D], -inf where masked."""
    if negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0] \
            or negatives.shape[2] != anchor.shape[1]:
        raise ValueError(f"negatives must be [B, K, D] = [{anchor.shape[0]}, K, "
                         f"{anchor.shape[1]}], got {tuple(negatives.shape)}")
    n = F.normalize(negatives.to(anchor.dtype), dim=-1, eps=EPS)
    cos = torch.einsum("bd,bkd->bk", anchor, n)
    if mask is not None:
        cos = cos.masked_fill(~mask.to(device=cos.device, dtype=torch.bool), _NEG_INF)
    return cos


def minimal_pair_loss(anchor: Tensor, positive: Tensor, negatives: Tensor,
                      mask: Tensor | None, scale: float) -> Tensor:
    """Per-item cross-entropy over [positive, its own negatives] (NegCLIP / TSVLC style).

    anchor, positive [B, D]; negatives [B, K, D] with mask [B, K] (True = real; None = all).
    logits_b = scale * [cos(anchor_b, positive_b), cos(anchor_b, negatives_bk) ...], target
    0. Mean over the items with at least one real negative (0 when none has any): image codes
    against a caption and its one-edit variants, or a caption against its picture and the
    picture redrawn with one attribute changed.
    """
    if anchor.dim() != 2 or anchor.shape != positive.shape:
        raise ValueError(f"anchor and positive must both be [B, D], got "
                         f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
    dtype = _compute_dtype(anchor)
    with _no_autocast(anchor):
        a = F.normalize(anchor.to(dtype), dim=-1, eps=EPS)
        p = F.normalize(positive.to(dtype), dim=-1, eps=EPS)
        logits = scale * torch.cat([(a * p).sum(-1, keepdim=True),
                                    _own_cosines(a, negatives, mask)], 1)
        has = logits[:, 1:].isfinite().any(1)  # items with at least one real negative
        per_item = torch.logsumexp(logits, 1) - logits[:, 0]
        return (per_item * has).sum() / has.sum().clamp_min(1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR NT-Xent between two views z1, z2 [B, D] (L2-normalised here).

    Builds the 2B x 2B cosine matrix / temperature, removes self-pairs, and takes the
    cross-entropy of each row against the other view of the same item (mean over 2B rows).
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    batch = z1.shape[0]
    dtype = _compute_dtype(z1)
    with _no_autocast(z1):
        z = F.normalize(torch.cat([z1, z2], dim=0).to(dtype), dim=-1, eps=EPS)
        logits = (z @ z.t()) / temperature
        eye = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, _NEG_INF)
        idx = torch.arange(batch, device=z.device)
        targets = torch.cat([idx + batch, idx])
        return F.cross_entropy(logits, targets)


def _bce(logits: Tensor, target: float) -> Tensor:
    """Mean BCE-with-logits against a constant target."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


GAN_LOSSES = ("bce", "hinge")  # TRAIN.GAN_LOSS: DM-GAN's BCE, or DF-GAN's hinge


def _d_term(logits: Tensor, real: bool, kind: str) -> Tensor:
    """One D term: BCE against 1/0, or the hinge mean(relu(1 ∓ logits))."""
    if kind == "hinge":
        return F.relu(1.0 - logits).mean() if real else F.relu(1.0 + logits).mean()
    if kind != "bce":
        raise ValueError(f"GAN loss {kind!r}: expected one of {GAN_LOSSES}")
    return _bce(logits, 1.0 if real else 0.0)


def discriminator_loss(
    real_uncond: Tensor | None,
    real_cond: Tensor,
    fake_uncond: Tensor | None,
    fake_cond: Tensor,
    wrong_cond: Tensor,
    kind: str = "bce",
) -> Tensor:
    """One scale's D loss: mean of the real terms + mean of the fake/wrong terms (DM-GAN).

    (BCE(real_u,1)+BCE(real_c,1))/2 + (BCE(fake_u,0)+BCE(fake_c,0)+BCE(wrong_c,0))/3;
    an unconditional logit given as None is dropped and the divisor shrinks accordingly.
    `kind` "hinge" puts DF-GAN's relu(1 - x) for real and relu(1 + x) for fake/wrong logits
    in place of each BCE, in the same arrangement.
    """
    real_terms = [_d_term(x, True, kind) for x in (real_uncond, real_cond) if x is not None]
    fake_terms = [_d_term(x, False, kind) for x in (fake_uncond, fake_cond, wrong_cond)
                  if x is not None]
    return torch.stack(real_terms).mean() + torch.stack(fake_terms).mean()


def negative_loss(logits: list[Tensor], kind: str = "bce") -> Tensor:
    """The mean of the fake terms of D (BCE against 0, or hinge relu(1 + x)) over `logits`:
    D's loss on negatively augmented real images (e.g. blurred), scored as fakes."""
    return torch.stack([_d_term(x, False, kind) for x in logits]).mean()


def generator_adv_loss(fake_uncond: Tensor | None, fake_cond: Tensor,
                       kind: str = "bce") -> Tensor:
    """One scale's G adversarial loss: BCE(fake_uncond, 1) + BCE(fake_cond, 1) (uncond
    optional); `kind` "hinge": -mean(logits) for each (DF-GAN's generator loss)."""
    terms = [x for x in (fake_cond, fake_uncond) if x is not None]
    if kind == "hinge":
        return sum(-x.mean() for x in terms)
    if kind != "bce":
        raise ValueError(f"GAN loss {kind!r}: expected one of {GAN_LOSSES}")
    return sum(_bce(x, 1.0) for x in terms)


def matching_aware_gp(real_cond: Tensor, images: Tensor, sent: Tensor,
                      power: float = 6.0) -> Tensor:
    """DF-GAN's matching-aware zero-centred gradient penalty, without its weight: the mean
    over the matched pairs of ‖(∂D/∂image, ∂D/∂sentence)‖^power, D's conditional logits
    `real_cond` [B] of real `images` with their own sentences `sent` [B, D] (both leaves that
    require grad, one logit per row). The gradient is kept in the graph (create_graph) so the
    penalty trains D. Computed in float32."""
    grads = torch.autograd.grad(real_cond.float().sum(), (images, sent), create_graph=True)
    flat = torch.cat([g.float().flatten(1) for g in grads], dim=1)
    return flat.pow(2).sum(1).sqrt().pow(power).mean()


def mode_seeking_loss(images: Tensor, redrawn: Tensor, z: Tensor, z_redrawn: Tensor,
                      eps: float = 1e-5) -> Tensor:
    """MSGAN's mode-seeking term (Mao et al., CVPR 2019): 1 / (d_img / d_z + eps), where d_img
    is the mean absolute difference between images drawn from the same captions with noises
    `z` and `z_redrawn`, d_z that of the noises. Minimising it makes G's images depend on
    its noise, so that it draws the modes a caption leaves open (and does not drop one)."""
    ratio = (images.float() - redrawn.float()).abs().mean() \
        / (z.float() - z_redrawn.float()).abs().mean()
    return 1.0 / (ratio + eps)


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of conditioning augmentation, averaged over batch
    and dimensions (a mean, not a sum, as AttnGAN/DM-GAN's KL_loss)."""
    return torch.mean(-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()))
