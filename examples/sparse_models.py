"""Two models whose masks the passes prove sparse, compiled, inspected and timed against eager
(CPU, or the GPU when there is one):

- a vision transformer block with 2-D neighborhood attention (NAT-style, 7×7 window over the
  patch grid), its mask written row-major the way a user writes it;
- a long-context causal language-model block with a sliding window (Mistral-style), the mask
  built from arange comparisons.

    python examples/sparse_models.py
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timing import DEVICE, timed  # examples/timing.py

import rewrite


class NeighborhoodViTBlock(nn.Module):
    """Attention over an H×W patch grid where each patch sees a k×k window around itself."""

    def __init__(self, grid=(32, 32), window=7, d_model=128, n_heads=4):
        super().__init__()
        self.grid, self.window, self.h = grid, window, n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):  # x [B, H·W, C]
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        idx = torch.arange(n, device=x.device)
        row, col = idx // self.grid[1], idx % self.grid[1]
        r = self.window // 2
        near = ((row[:, None] - row[None, :]).abs() <= r) & ((col[:, None] - col[None, :]).abs() <= r)
        s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        s = s.masked_fill(~near, float("-inf"))
        return self.out((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class SlidingWindowBlock(nn.Module):
    """Causal attention restricted to the last ``window`` tokens (Mistral's sliding window)."""

    def __init__(self, window=256, d_model=128, n_heads=4):
        super().__init__()
        self.window, self.h = window, n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        i = torch.arange(n, device=x.device)
        dist = i[:, None] - i[None, :]
        bias = torch.where((dist >= 0) & (dist < self.window), 0.0, float("-inf"))
        s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5 + bias
        return self.out((torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))


def main():
    torch.manual_seed(0)
    cases = [(NeighborhoodViTBlock(grid=(32, 32)), 32 * 32), (SlidingWindowBlock(window=256), 4096)]
    for model, n in cases:
        model = model.to(DEVICE).eval()
        x = torch.randn(1, n, 128, device=DEVICE)
        torch._dynamo.reset()
        print(rewrite.inspect(model, x))
        torch._dynamo.reset()
        fast = rewrite.compile(model)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-3, atol=1e-4)
        print(f"{type(model).__name__}: N={n}, eager {timed(model, x):.2f} ms, rewritten {timed(fast, x):.2f} ms "
              f"({DEVICE})\n")


if __name__ == "__main__":
    main()
