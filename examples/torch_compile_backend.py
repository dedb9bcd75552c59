"""``torch.compile(model, backend="rewrite")``: the entry point for torch.compile users.

    python examples/torch_compile_backend.py
"""

import torch
from torch import nn

import rewrite  # noqa: F401  (the backend is also registered as an entry point)


class SelfAttention(nn.Module):
    def __init__(self, dim=128, heads=4):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def main():
    torch.manual_seed(0)
    model = SelfAttention().eval()
    x = torch.randn(2, 257, 128)
    pad = torch.zeros(2, 257, dtype=torch.bool)
    pad[1, 200:] = True
    fast = torch.compile(model, backend="rewrite")
    with torch.no_grad():
        torch.testing.assert_close(fast(x, pad), model(x, pad), rtol=1e-5, atol=1e-5)
    print("torch.compile(backend='rewrite') matches eager")


if __name__ == "__main__":
    main()
