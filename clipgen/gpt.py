"""CLIP-GEN's transformer (docs/DESIGN.md §13): a decoder-only GPT that predicts an image's
VQGAN tokens (row-major) after one prefix token made from the l2-normalised CLIP embedding,
and its sampler with a key/value cache.

    sequence  [prefix(e), t_0, …, t_{T-2}]  →  logits for t_0 … t_{T-1}
    prefix(e) = Linear(e / ‖e‖)

Pre-norm blocks (LayerNorm → causal self-attention on `scaled_dot_product_attention` →
residual; LayerNorm → 4× GELU MLP → residual), learned positions, dropout.

Sampling draws each token by the Gumbel-max trick with noise that is a hash of (seed, the
caption's id, the position, the code): the same caption gets the same image whatever the
batch it is drawn in and however many processes share the work, without a generator per row.

Classifier-free guidance (`GPTArch.null_cond`): training replaces the prefix of a share of the
rows by a learned "no condition" vector; sampling with guidance w draws from
logits_c + w·(logits_c − logits_∅), w = 0 being the plain conditional sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTArch:
    """The transformer's sizes: codebook `vocab`, `tokens` per image, CLIP `cond_dim`."""

    vocab: int
    tokens: int
    cond_dim: int
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    dropout: float = 0.0
    null_cond: bool = False  # a learned unconditional prefix (classifier-free guidance)


class KVCache:
    """Keys and values of every layer for up to `length` positions, filled as sampling goes."""

    def __init__(self, arch: GPTArch, batch: int, length: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (batch, arch.n_head, length, arch.n_embd // arch.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(arch.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(arch.n_layer)]
        self.filled = 0


class SelfAttention(nn.Module):
    """Causal multi-head self-attention; with a cache, the new positions attend to all the
    cached ones."""

    def __init__(self, arch: GPTArch) -> None:
        super().__init__()
        self.n_head, self.dropout = arch.n_head, arch.dropout
        self.qkv = nn.Linear(arch.n_embd, 3 * arch.n_embd)
        self.proj = nn.Linear(arch.n_embd, arch.n_embd)
        self.resid_drop = nn.Dropout(arch.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.qkv(x).split(c, dim=2))
        if cache is not None:
            start = cache.filled
            cache.k[layer][:, :, start: start + t] = k
            cache.v[layer][:, :, start: start + t] = v
            k, v = cache.k[layer][:, :, : start + t], cache.v[layer][:, :, : start + t]
            # new positions see every cached one and, among themselves, the earlier ones
            causal = t > 1
            if causal and start > 0:
                raise ValueError("a cached forward takes either the first chunk or one token")
        else:
            causal = True
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, arch: GPTArch) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(arch.n_embd), SelfAttention(arch)
        self.ln2 = nn.LayerNorm(arch.n_embd)
        self.mlp = nn.Sequential(nn.Linear(arch.n_embd, 4 * arch.n_embd), nn.GELU(),
                                 nn.Linear(4 * arch.n_embd, arch.n_embd),
                                 nn.Dropout(arch.dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class CondGPT(nn.Module):
    """`forward(tokens [B, T], cond [B, E])` → logits [B, T, vocab] for every token given the
    prefix and the tokens before it (teacher forcing)."""

    def __init__(self, arch: GPTArch) -> None:
        super().__init__()
        self.arch = arch
        self.cond = nn.Linear(arch.cond_dim, arch.n_embd)
        self.tok = nn.Embedding(arch.vocab, arch.n_embd)
        self.pos = nn.Parameter(torch.zeros(1, arch.tokens, arch.n_embd))
        self.drop = nn.Dropout(arch.dropout)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.n_layer))
        self.ln_f = nn.LayerNorm(arch.n_embd)
        self.head = nn.Linear(arch.n_embd, arch.vocab, bias=False)
        self.null = nn.Parameter(torch.zeros(arch.n_embd)) if arch.null_cond else None
        self.apply(self._init)
        if self.null is not None:
            nn.init.normal_(self.null, 0.0, 0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, tokens: torch.Tensor, cond: torch.Tensor | None, start: int,
              drop: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors of positions start, start+1, …: the prefix (when `cond` is given;
        the learned unconditional one in the rows where `drop` [B] is True) followed by
        `tokens`, each plus its position's embedding."""
        parts = []
        if cond is not None:
            prefix = self.cond(F.normalize(cond.float(), dim=-1)).to(self.tok.weight.dtype)
            if drop is not None:
                if self.null is None:
                    raise ValueError("dropping the condition needs GPTArch.null_cond")
                prefix = torch.where(drop[:, None].to(prefix.device), self.null.to(prefix.dtype),
                                     prefix)
            parts.append(prefix[:, None])
        if tokens.shape[1]:
            parts.append(self.tok(tokens))
        x = torch.cat(parts, dim=1)
        return self.drop(x + self.pos[:, start: start + x.shape[1]])

    def run(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.filled += x.shape[1]
        return self.head(self.ln_f(x))

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(self.embed(tokens[:, :-1], cond, 0, drop))


# --------------------------------------------------------------------------------- sampling
_M32 = 0xFFFFFFFF


def _h32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32): xor-shift and
    multiply rounds; every product stays below 2^63, so nothing relies on overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x297A2D39) & _M32
    return x ^ (x >> 16)


def hashed_uniform(seed: int, ids: torch.Tensor, position: int,
                   columns: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise [B, K] for the codes `columns` [B, K]: a pure function of (seed,
    ids[b], position, code), so it can be drawn for the surviving candidates only."""
    key = _h32(_h32(torch.full_like(ids, seed & _M32, dtype=torch.int64))
               ^ (ids.to(torch.int64) & _M32))
    key = _h32(key ^ (position & _M32))
    bits = _h32(key[:, None] ^ ((columns.to(torch.int64) * 0x9E3779B1) & _M32))
    return (bits.double() + 0.5) / float(1 << 32)


def candidates(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, codes) [B, K] of the codes that may be drawn, best first: the top k (all when
    0), then the smallest prefix whose probability (renormalised over those) reaches top_p;
    the others' values are -inf. Values are logits / temperature."""
    logits = logits.float() / max(temperature, 1e-8)
    if 0 < top_k < logits.shape[-1]:
        values, codes = logits.topk(top_k, dim=-1)
    else:
        values, codes = logits.sort(dim=-1, descending=True)
    if top_p < 1.0:
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the codes ranked above each
        values = values.masked_fill(before >= top_p, float("-inf"))
    return values, codes


@torch.inference_mode()
def sample_tokens(model: CondGPT, cond: torch.Tensor, ids: torch.Tensor, seed: int,
                  top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                  use_cache: bool = True, guidance: float = 0.0) -> torch.Tensor:
    """Tokens [B, T] for conditions cond [B, E]; row b's draws depend only on (seed, ids[b]).
    With `use_cache` each step feeds one new token through the key/value cache; without it
    every step re-runs the whole prefix (the reference sampler; kept for tests/benchmarks).
    `guidance` w ≠ 0 (a model with `null_cond`) runs each row twice, with its condition and
    with none, and draws from logits_c + w·(logits_c − logits_∅)."""
    arch, b = model.arch, len(cond)
    out = torch.zeros(b, arch.tokens, dtype=torch.long, device=cond.device)
    drop = None
    if guidance:
        if model.null is None:
            raise ValueError("classifier-free guidance needs a transformer trained with the "
                             "condition dropped (CLIPGEN.CFG_DROP > 0)")
        cond = torch.cat([cond, cond])
        drop = torch.arange(2 * b, device=cond.device) >= b
    rows = len(cond)
    cache = (KVCache(arch, rows, arch.tokens, cond.device, model.tok.weight.dtype)
             if use_cache else None)
    for t in range(arch.tokens):
        seen = out.repeat(rows // b, 1)
        if cache is not None:
            x = model.embed(seen[:, t - 1: t] if t else seen[:, :0], None if t else cond, t,
                            None if t else drop)
            logits = model.run(x, cache)[:, -1]
        else:
            logits = model.run(model.embed(seen[:, :t], cond, 0, drop))[:, -1]
        if guidance:
            logits = logits[:b] + guidance * (logits[:b] - logits[b:])
        out[:, t] = gumbel_draw(*candidates(logits, top_k, top_p, temperature), seed, ids, t)
    return out


def gumbel_draw(values: torch.Tensor, codes: torch.Tensor, seed: int, ids: torch.Tensor,
                position: int) -> torch.Tensor:
    """One code per row [B] drawn from the softmax of `values` over `codes` [B, K] (as
    `candidates` gives them, best first): Gumbel-max with the hashed noise of (seed, ids[b],
    position, code), so the draw is the same whatever else is in the batch."""
    gumbel = -torch.log(-torch.log(hashed_uniform(seed, ids, position, codes)))
    pick = (values.double() + gumbel).argmax(-1, keepdim=True)
    return codes.gather(1, pick)[:, 0]
