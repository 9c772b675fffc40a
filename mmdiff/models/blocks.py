"""Transformer building blocks shared by the MMDiT backbone and its context encoders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from .attention import attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x: (N, T, D); shift, scale: (N, D). One fused multiply-add over x."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + gate * branch with gate (N, D) per row, as one fused multiply-add."""
    return torch.addcmul(x, gate[:, None], branch)


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Self-attention with one fused QKV projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.slice_size: int | None = None  # attention slicing (the model's `set_attention_slice`)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        # unbind, not indexing: its backward writes the three gradients into one buffer (indexing zero-fills a full
        # (3, N, H, T, d) buffer per index)
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, key_mask, self.slice_size)  # (N, H, T, d)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class AbsorbedContext(NamedTuple):
    """A fixed cross-attention context with the query and output projections folded into its keys and values.

    For head h with query weight Wq_h (d, D) and bias bq_h, keys K_h and values V_h (S, d), and output projection
    Wo_h (D, d): softmax((x Wq_h^T + bq_h) K_h^T / sqrt(d)) V_h Wo_h^T summed over heads equals
    softmax_h(x A_h + c_h) B_h with A_h = Wq_h^T K_h^T / sqrt(d) (D, S), c_h = bq_h K_h^T / sqrt(d) and
    B_h = V_h Wo_h^T (S, D). Stacking the heads, a query row costs two matmuls of width H*S instead of two D x D
    projections and an attention call: fewer FLOPs whenever H*S < D (short prompts, small image contexts).

    weight: (M, D, H*S) the A_h side by side. bias: (M, 1, H*S) the c_h, -inf at padded keys (the key mask is
    folded in). values: (M, H*S, D) the B_h stacked.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    values: torch.Tensor


@dataclass
class BlockContext:
    """What one block's cross-attention reads (`mmdiff.models.transformer.PreparedContext` holds one per block).

    kv: keys and values, 2 x (M, H, S, d), with their key mask `mask` (M, S) bool; or an `AbsorbedContext` of M rows
        (which carries its mask).
    null_output: (1, D) or None. Set, the first N - M rows of the batch are on a one-token null context: their
        cross-attention output is this constant (`CrossAttention.single_key_output`; attending to one key returns its
        value), so they skip the query, attention and projection work.
    repeat: (K,) long or None (first block only). Set, the block's input holds only the last N - K rows: the batch is
        `cat([x[repeat], x])` from the cross-attention on, with the conditioning already in that layout. The
        self-attention branch does not see the context, so it runs once per distinct row (CFG pairs share latents
        and timestep).
    """

    kv: tuple[torch.Tensor, torch.Tensor] | AbsorbedContext
    mask: torch.Tensor | None = None
    null_output: torch.Tensor | None = None
    repeat: torch.Tensor | None = None


class CrossAttention(nn.Module):
    """Cross-attention to a context sequence; keys/values can be computed once and reused across sampling steps."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.slice_size: int | None = None  # attention slicing (the model's `set_attention_slice`)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context: (N, S, D) -> keys and values, each (N, H, S, d)."""
        n, s, d = context.shape
        k, v = self.kv(context).view(n, s, 2, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def absorb(self, context: torch.Tensor, key_mask: torch.Tensor | None) -> AbsorbedContext:
        """The `AbsorbedContext` of a context (N, S, D) with key mask (N, S) bool (None: every key)."""
        k, v = self.context_kv(context)  # (N, H, S, d)
        n, h, s, d = k.shape
        dim = h * d
        scale = d**-0.5
        weight = torch.einsum("hed,nhse->ndhs", self.q.weight.view(h, d, dim), k).reshape(n, dim, h * s) * scale
        bias = torch.einsum("he,nhse->nhs", self.q.bias.view(h, d), k) * scale
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask.bool()[:, None, :], float("-inf"))
        values = torch.einsum("nhse,dhe->nhsd", v, self.proj.weight.view(dim, h, d)).reshape(n, h * s, dim)
        return AbsorbedContext(weight, bias.reshape(n, 1, h * s), values)

    def single_key_output(self, context: torch.Tensor) -> torch.Tensor:
        """The output for a one-token context (1, D), the same for every query: softmax over one key is 1, so
        attention returns that key's value. (1, D)."""
        value = self.kv(context)[:, context.shape[-1] :]  # the kv layout is (2, H, d): values are the second half
        return self.proj(value)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | AbsorbedContext,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: (N, T, D); kv: keys and values (N, H, S, d) from `context_kv` with `key_mask` (N, S), or an
        `AbsorbedContext` (which carries its own mask; `key_mask` is then not used)."""
        n, t, d = x.shape
        if isinstance(kv, AbsorbedContext):
            scores = torch.baddbmm(kv.bias, x, kv.weight)  # (N, T, H*S)
            probs = scores.view(n, t, self.num_heads, -1).softmax(dim=-1).view(n, t, -1)
            return torch.baddbmm(self.proj.bias, probs, kv.values)
        q = self.q(x).view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # (N, H, T, d)
        out = attention(q, kv[0], kv[1], key_mask, self.slice_size)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-LN transformer layer (self-attention + MLP) for the context encoders."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention over the noisy stream, cross-attention to the context, MLP.

    The conditioning vector (timestep + task) modulates the self-attention and MLP branches and gates them; the gates
    start at zero so every block is the identity at initialisation (DiT). With `adaln_single` the block has no
    modulation linear of its own: it receives the model's one shared modulation (N, 6D) and adds its learned offsets
    `adaLN_table` (6, D) (PixArt-alpha's adaLN-single: 6 D^2 fewer parameters per block, and one small matmul per
    forward instead of one per block).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, adaln_single: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        if adaln_single:
            self.adaLN_table = nn.Parameter(torch.zeros(6, dim))
            self.adaLN_modulation = None
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """x: (N, T, D) noisy stream; cond: (N, D), or with adaLN-single the shared modulation (N, 6D); context: this
        block's `BlockContext` (its null rows and repeated rows, when set, change only what is computed, not the
        result)."""
        mods = self.adaLN_modulation(cond) if self.adaLN_modulation is not None else cond + self.adaLN_table.view(1, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)
        r = 0 if context.repeat is None else context.repeat.shape[0]  # cond covers the repeated rows first
        x = gated_residual(x, gate_msa[r:], self.attn(modulate(self.norm1(x), shift_msa[r:], scale_msa[r:])))
        if context.repeat is not None:
            x = torch.cat([x[context.repeat], x])
        x = self._cross_attend(x, context)
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))

    def _cross_attend(self, x: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """x + cross-attention to the context; rows on a one-token null context get its constant output."""
        if context.null_output is None:
            return x + self.cross_attn(self.norm_cross(x), context.kv, context.mask)
        k = x.shape[0] - context.kv[0].shape[0]
        cross = self.cross_attn(self.norm_cross(x[k:]), context.kv, context.mask)
        if torch.is_grad_enabled():
            return torch.cat([x[:k] + context.null_output, x[k:] + cross])
        # x is this block's own intermediate and nothing keeps it for a backward pass: add in place
        x[:k] += context.null_output
        x[k:] += cross
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a linear head (zero-initialised)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))
