"""The VQGAN's vector quantizer (docs/DESIGN.md §13): nearest code by one matmul, the VQ-VAE
loss as published, straight-through gradients, and three switches against codebook collapse.

    loss = ‖sg(z) − e‖² + β·‖z − sg(e)‖²      (codebook term + β · commitment term)

(taming-transformers and CLIP-GEN put β on the codebook term instead.) The remedies, each a
config switch: codes and encoder outputs l2-normalised (`L2_NORM`), the codebook initialised
from the encoder outputs of the first training batch (`INIT_FROM_DATA`), and codes unused for
`RESTART_EVERY` steps re-seeded from current encoder outputs (`restart_dead`, called by the
trainer). Under DistributedDataParallel every codebook change is broadcast from rank 0 and the
usage counts are summed over ranks first, so the replicas never drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def nearest_codes(z: torch.Tensor, codes: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Index of the nearest row of `codes` [K, D] for each row of `z` [N, D], by one matmul:
    argmax z·e on the unit sphere, else argmin ‖e‖² − 2 z·e (‖z‖² does not change the argmin)."""
    if normalized:
        return (z @ codes.t()).argmax(1)
    return torch.addmm((codes * codes).sum(1), z, codes.t(), alpha=-2.0).argmin(1)


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


class VectorQuantizer(nn.Module):
    """z [B, C, H, W] → (straight-through quantized z, VQ loss, indices [B, H, W], stats).

    Buffers (saved with the model, so resume is exact): `initialized` and `usage`, the count of
    each code's selections in training since the last `restart_dead`.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, l2_norm: bool = True,
                 init_from_data: bool = True) -> None:
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.l2_norm, self.init_from_data = l2_norm, init_from_data
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        self.register_buffer("initialized", torch.tensor(not init_from_data))
        self.register_buffer("usage", torch.zeros(n_embed))
        # `initialized` as a Python bool for forward: reading the buffer there would be a
        # host sync every step on CUDA; re-read once whenever a state dict is loaded
        self._ready = not init_from_data
        self.register_load_state_dict_post_hook(VectorQuantizer._sync_ready)

    @staticmethod
    def _sync_ready(module: VectorQuantizer, incompatible: object) -> None:
        module._ready = bool(module.initialized)

    def codebook(self) -> torch.Tensor:
        """The code vectors as the lookup sees them (unit length when L2_NORM)."""
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_norm else w

    @torch.no_grad()
    def _seed_codes(self, rows: torch.Tensor, z: torch.Tensor,
                    generator: torch.Generator | None = None) -> None:
        """Overwrite codebook rows `rows` with encoder outputs drawn (with replacement when
        there are fewer outputs than rows) from `z` [N, D], plus a little noise so that
        duplicates split; rank 0's draw is used on every rank."""
        g = generator
        pick = torch.randint(0, len(z), (len(rows),), generator=g, device=g.device if g else None)
        noise = torch.randn(len(rows), z.shape[1], generator=g, device=g.device if g else None)
        new = z[pick.to(z.device)] + 1e-3 * z.std() * noise.to(z.device)
        new = _from_rank0(new.contiguous())
        self.embedding.weight[rows] = new.to(self.embedding.weight.dtype)

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[int, float]:
        """Re-seed the codes nobody chose since the last call from encoder outputs `z`
        [N, D] (this step's, pre-quantization), drawn with `generator` (default: the global
        RNG); returns (codes restarted, fraction of codes that had been used). Counts are
        summed over processes first; resets the counts."""
        usage = self.usage.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(usage)
        dead = (usage == 0).nonzero().flatten()
        used = 1.0 - len(dead) / self.n_embed
        if len(dead):
            flat = F.normalize(z.float(), dim=1) if self.l2_norm else z.float()
            self._seed_codes(dead, flat, generator)
        self.usage.zero_()
        return len(dead), used

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        b, c, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
            if self.l2_norm:
                flat = F.normalize(flat, dim=1)
            if self.training and not self._ready:
                self._seed_codes(torch.arange(self.n_embed, device=z.device), flat.detach())
                self.initialized.fill_(True)
                self._ready = True
            codes = self.codebook()
            idx = nearest_codes(flat.detach(), codes.detach(), self.l2_norm)
            q = F.embedding(idx, codes)
            codebook_term = F.mse_loss(q, flat.detach())
            commitment = F.mse_loss(flat, q.detach())
            loss = codebook_term + self.beta * commitment
            out = flat + (q - flat).detach()  # straight-through: d out / d flat = identity
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        if self.training:
            self.usage += counts
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        stats = {"perplexity": perplexity.detach(), "z": flat.detach(),
                 "codebook": codebook_term.detach(), "commitment": commitment.detach()}
        out = out.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return out.to(z.dtype), loss, idx.view(b, h, w), stats

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Code vectors of indices [B, H, W] as a [B, D, H, W] map (decoding tokens)."""
        return F.embedding(idx, self.codebook()).permute(0, 3, 1, 2).contiguous()
