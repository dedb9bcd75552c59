"""The attention spellings themselves: plain torch code, written as people write it.

Nothing here knows about tests; ``tests/spellings.py`` pairs each function with its input
builder, layout and expected mask variant.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def matmul_operator(q, k, v):
    scale = q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1) @ v


def torch_matmul_divide(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def mT_functional_softmax(q, k, v):
    return F.softmax(q @ k.mT * q.shape[-1] ** -0.5, dim=-1) @ v


class SoftmaxModuleAttention(nn.Module):
    """K transposed with permute, softmax as an nn.Softmax submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.permute(0, 1, 3, 2)) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(self.softmax(scores), v)


def k_pretransposed(q, kT, v):
    """k arrives as [B, H, D, M]."""
    return torch.softmax(q @ kT / q.shape[-1] ** 0.5, dim=-1) @ v


def scale_on_q(q, k, v):
    q = q * q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def scale_on_q_and_k(q, k, v):
    r = q.shape[-1] ** -0.25
    return torch.softmax((q * r) @ (k * r).transpose(-2, -1), dim=-1) @ v


def no_scale(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def bmm_flat(q, k, v):
    """q, k, v are [B*H, N, D]."""
    scores = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.bmm(scores.softmax(dim=-1), v)


def bmm_reshape_inside(q, k, v):
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    qf, kf, vf = q.reshape(b * h, n, d), k.reshape(b * h, m, d), v.reshape(b * h, m, dv)
    p = torch.softmax(torch.bmm(qf, kf.transpose(1, 2)) / math.sqrt(d), dim=-1)
    return torch.bmm(p, vf).view(b, h, n, dv)


def baddbmm_bias(q, k, v, bias):
    """[B*H, N, D] inputs; bias [B*H, N, M] is baddbmm's input (beta=1)."""
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    return torch.bmm(F.softmax(scores, dim=-1), v)


def baddbmm_beta0(q, k, v):
    """The old HF GPT-2 / BLOOM idiom: an uninitialised input ignored through beta=0."""
    bh, n, d = q.shape
    empty = torch.empty(bh, n, k.shape[1], dtype=q.dtype, device=q.device)
    scores = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d))
    return torch.bmm(scores.softmax(-1), v)


def einsum_bhnd(q, k, v):
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)


def einsum_bnhd(q, k, v):
    """[B, N, H, D] in and out."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", torch.softmax(scores, dim=-1), v)


def einsum_bqhd(q, k, v):
    """[B, N, H, D] in and out, other letters, value head size its own letter."""
    attn = torch.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k).softmax(dim=-1)
    return torch.einsum("bhqk,bkhv->bqhv", attn, v)


def einsum_flat(q, k, v):
    """[B*H, N, D]."""
    attn = F.softmax(torch.einsum("xid,xjd->xij", q, k) * q.shape[-1] ** -0.5, dim=-1)
    return torch.einsum("xij,xjd->xid", attn, v)


def einsum_ellipsis(q, k, v):
    attn = torch.einsum("...id,...jd->...ij", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("...ij,...jd->...id", attn, v)


def einsum_k_pretransposed(q, kT, v):
    """k arrives as [B, H, D, M]."""
    attn = torch.einsum("bhqd,bhdk->bhqk", q, kT).div(q.shape[-1] ** 0.5).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", attn, v)


def heads_after_sequence(q, k, v):
    """HF style: [B, N, H, D] in, transpose to heads-first, out back to [B, N, H, Dv]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    attn = F.softmax(attn, dim=-1)
    return torch.matmul(attn, v).transpose(1, 2).contiguous()


def softmax_fp32_dtype(q, k, v):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def softmax_float_cast(q, k, v):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


def explicit_exp_amax(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def explicit_exp_max_values(q, k, v):
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    e = (s - s.max(dim=-1, keepdim=True).values).exp()
    p = e / torch.sum(e, dim=-1, keepdim=True)
    return torch.matmul(p, v)


def explicit_exp_no_max(q, k, v):
    e = torch.exp(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5)
    return e / e.sum(-1, keepdim=True) @ v


def explicit_normalise_after(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True)


def dropout_eval_functional(q, k, v):
    p = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    p = F.dropout(p, p=0.1, training=False)
    return p @ v


class DropoutModuleAttention(nn.Module):
    """nn.Dropout submodule; the catalogue instance is in .eval()."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.attn_dropout = nn.Dropout(p)

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.attn_dropout(p) @ v


def bias_add(q, k, v, bias):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias, dim=-1) @ v


def hf_finfo_min_padding(q, k, v, attention_mask):
    """attention_mask: [B, M] of 1 (attend) / 0 (pad), as HF tokenizers give it."""
    ext = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + ext
    return torch.matmul(F.softmax(scores, dim=-1), v)


def hf_bert_minus_10000(q, k, v, attention_mask):
    """HF BERT (pre-4.x masks): (1.0 - mask) * -10000.0 added to the scores."""
    ext = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * -10000.0
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores + ext
    return torch.matmul(nn.functional.softmax(scores, dim=-1), v)


def masked_fill_neg_inf(q, k, v, keep):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def masked_fill_finfo_min(q, k, v, masked_out):
    """masked_out: True where a key must be ignored; filled with the dtype's lowest value."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(masked_out, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


def where_neg_inf(q, k, v, keep):
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = torch.where(keep, scores, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def lengths_padding(q, k, v, lengths):
    """Padding mask built in the graph from a lengths tensor [B] (int64)."""
    m = k.shape[-2]
    keep = torch.arange(m, device=q.device)[None, :] < lengths[:, None]
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def causal_tril_bool(q, k, v):
    n = q.shape[-2]
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def causal_tril_float_eq0(q, k, v):
    n = q.size(-2)
    tril = torch.tril(torch.ones(n, n, device=q.device))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(tril == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v


def causal_triu_masked_fill(q, k, v):
    n = q.shape[-2]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1), v)


def causal_triu_additive(q, k, v):
    """nn.Transformer.generate_square_subsequent_mask style: -inf above the diagonal, added."""
    n = q.shape[-2]
    additive = torch.triu(torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device), diagonal=1)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + additive
    return scores.softmax(-1) @ v


def causal_arange(q, k, v):
    """Top-left aligned, any N and M."""
    n, m = q.shape[-2], k.shape[-2]
    keep = torch.arange(n, device=q.device)[:, None] >= torch.arange(m, device=q.device)[None, :]
    scores = torch.where(keep, q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class GPT2BufferAttention(nn.Module):
    """Old HF GPT-2: a bool tril buffer sliced to [:, :, :N, :N], torch.where with finfo.min."""

    def __init__(self, max_positions: int = 128) -> None:
        super().__init__()
        self.register_buffer(
            "bias",
            torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool)).view(
                1, 1, max_positions, max_positions
            ),
            persistent=False,
        )

    def forward(self, q, k, v):
        attn_weights = torch.matmul(q, k.transpose(-1, -2))
        attn_weights = attn_weights / torch.full(
            [], v.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device
        )
        n = q.size(-2)
        causal_mask = self.bias[:, :, :n, :n]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype)
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1).type(v.dtype)
        return torch.matmul(attn_weights, v)


class NanoGPTBufferAttention(nn.Module):
    """nanoGPT: a float tril buffer, masked_fill(bias[:, :, :T, :T] == 0, -inf)."""

    def __init__(self, block_size: int = 128) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def gqa_repeat_interleave(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = torch.repeat_interleave(v, n_rep, dim=1)
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Llama's repeat_kv, verbatim."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def gqa_llama_repeat_kv(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    attn = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    attn = nn.functional.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn, v)


def mqa_expand(q, k, v):
    """One key/value head broadcast to all query heads with expand."""
    h = q.shape[1]
    k, v = k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def gqa_grouped_einsum(q, k, v):
    """No repeat at all: query heads grouped as [B, Hkv, R, N, D] against [B, Hkv, M, D]."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, n, d)
    attn = torch.einsum("bgrnd,bgmd->bgrnm", qg, k).mul(d**-0.5).softmax(-1)
    return torch.einsum("bgrnm,bgmf->bgrnf", attn, v).reshape(b, h, n, v.shape[-1])


def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_mask(q, k, v, attn_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def sdpa_is_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def sdpa_enable_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sdpa_dropout_zero(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)


def sdpa_heads_after_sequence(q, k, v):
    """[B, N, H, D] in and out, as HF's sdpa_attention_forward."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()
