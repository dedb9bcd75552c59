"""A causal linear-attention transformer (written quadratic, and as a loop over chunks) and a
Flowformer, compiled and inspected: the report shows
the complexity change, and the rewritten model is timed against eager at growing N (CPU, or the
GPU when there is one).

    python examples/linear_models.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import DEVICE, timed  # examples/timing.py

import rewrite
from rewrite.patterns.flow_attention import official_flow


class _FeatureMapped(nn.Module):
    """The projections both linear-attention models share: φ(Q), φ(K) = elu + 1 and V per head, in;
    the heads merged and projected, out."""

    def __init__(self, d_model=256, n_heads=4):
        super().__init__()
        self.h = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def heads(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        return F.elu(q) + 1, F.elu(k) + 1, v

    def merge(self, o):
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class LinearAttention(_FeatureMapped):
    """Katharopoulos et al.'s causal linear attention, written the way it is explained: φ(Q)φ(K)ᵀ,
    masked with tril, normalised by its row sums, times V (quadratic in N as written)."""

    def forward(self, x):
        q, k, v = self.heads(x)
        n = q.shape[2]
        s = (q @ k.transpose(-2, -1)) * torch.tril(torch.ones(n, n, device=x.device))
        a = s / (s.sum(-1, keepdim=True) + 1e-6)
        return self.merge(a @ v)


class ChunkLoopLinearAttention(_FeatureMapped):
    """Causal linear attention as Lightning Attention's reference writes it (no decay): a Python loop
    over chunks, the quadratic form inside a chunk, a running K^T V state across chunks. torch.compile
    unrolls the loop; rewrite proves the unrolled chunks add up to causal linear attention and runs one
    kernel instead."""

    def __init__(self, d_model=256, n_heads=4, chunk=256):
        super().__init__(d_model, n_heads)
        self.chunk = chunk

    def forward(self, x):
        q, k, v = self.heads(x)
        n, c = q.shape[2], self.chunk
        mask = torch.tril(torch.ones(c, c, dtype=torch.bool, device=x.device))
        state = q.new_zeros(q.shape[0], self.h, q.shape[-1], v.shape[-1])
        outs = []
        for s in range(0, n, c):
            qi, ki, vi = q[:, :, s:s + c], k[:, :, s:s + c], v[:, :, s:s + c]
            li = qi.shape[2]
            intra = (qi @ ki.transpose(-2, -1)).masked_fill(~mask[:li, :li], 0.0) @ vi
            outs.append(qi @ state + intra)
            state = state + ki.transpose(-2, -1) @ vi
        return self.merge(torch.cat(outs, 2))


class Flowformer(nn.Module):
    """A Flowformer block: projections, the official Flow_Attention forward, out projection."""

    def __init__(self, d_model=256, n_heads=4):
        super().__init__()
        self.h = n_heads
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)
        self.flow = official_flow(1e-6, clamp=True)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.h, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.out(self.flow(q, k, v).transpose(1, 2).reshape(b, n, -1))


def main():
    torch.manual_seed(0)
    for model in (LinearAttention().to(DEVICE).eval(), ChunkLoopLinearAttention().to(DEVICE).eval(),
                  Flowformer().to(DEVICE).eval()):
        name = type(model).__name__
        x = torch.randn(1, 257, 256, device=DEVICE)
        torch._dynamo.reset()
        print(rewrite.inspect(model, x))
        print(f"{name}: N, eager ms, rewritten ms")
        for n in (512, 1024, 2048, 4096):
            x = torch.randn(1, n, 256, device=DEVICE)
            torch._dynamo.reset()
            fast = rewrite.compile(model)
            with torch.no_grad():
                # Against float64: the rewritten fp32 result must be about as accurate as eager's fp32.
                want = copy.deepcopy(model).double()(x.double())
                err_fast = float((fast(x).double() - want).norm() / want.norm())
                err_eager = float((model(x).double() - want).norm() / want.norm())
                assert err_fast <= max(4 * err_eager, 1e-6), (f"{name} N={n}: error {err_fast:.2e} "
                                                              f"vs eager {err_eager:.2e}")
            print(f"  {n:6d} {timed(model, x):9.2f} {timed(fast, x):9.2f}")


if __name__ == "__main__":
    main()
