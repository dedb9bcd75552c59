"""``@rewrite.compile`` on a function that spells attention with einsum and a padding mask.

    python examples/decorated_function.py
"""

import torch

import rewrite


@rewrite.compile(verify=True)  # verify: compare with the original on the first call
def attention(q, k, v, lengths):
    # q, k, v: [batch, seq, heads, dim]: heads after the sequence axis, einsum letters of our own.
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    keep = torch.arange(k.shape[1])[None, :] < lengths[:, None]  # [batch, keys]
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def main():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 64) for _ in range(3))
    lengths = torch.tensor([300, 180])
    out = attention(q, k, v, lengths)
    print("output", tuple(out.shape), "finite:", bool(torch.isfinite(out).all()))
    print(rewrite.inspect(attention.__wrapped__ if hasattr(attention, "__wrapped__") else attention,
                          q, k, v, lengths))


if __name__ == "__main__":
    main()
