"""``python -m rewrite demo``: a small transformer, its report, and eager vs rewritten."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

import rewrite


class EagerCausalAttention(nn.Module):
    """Attention as people write it by hand: scores, a tril mask, softmax, product."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EagerCausalAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 256, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)))


def _time(fn, *args, repeat: int = 5) -> float:
    with torch.no_grad():
        fn(*args)
        best = math.inf
        for _ in range(repeat):
            t = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t)
    return best


def main(seq_len: int = 1024, batch: int = 2) -> int:
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    ids = torch.randint(0, 256, (batch, seq_len))
    report = rewrite.inspect(model, ids)
    print(report)
    fast = rewrite.compile(model)
    with torch.no_grad():
        want, got = model(ids), fast(ids)
    err = (want - got).abs().max().item()
    t_eager, t_fast = _time(model, ids), _time(fast, ids)
    print(f"check: max |eager − rewritten| = {err:.2e} (float32, {batch}×{seq_len} tokens)")
    print(f"time (CPU, best of 5): eager {t_eager * 1e3:.1f} ms, rewritten {t_fast * 1e3:.1f} ms, "
          f"{t_eager / t_fast:.2f}× faster")
    if not err < 1e-3:
        print("MISMATCH: the rewritten model differs from eager")
        return 1
    return 0
