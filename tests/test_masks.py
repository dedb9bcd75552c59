"""The symbolic mask lifter: the predicate it proves equals the mask the graph computes.

Masks are built the ways people build them (arange comparisons, abs, tril/triu with a
diagonal, logical and/or/not, floor-division), traced to ATen, lifted to a sympy predicate
over (p, m), and the predicate is evaluated on every (p, m) of the grid: it must equal the
tensor, and a mask classified causal must be exactly m <= p + offset."""

from __future__ import annotations

import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM
from rewrite.ir.mask import check_causal
from rewrite.passes import masks
from rewrite.patterns import lift


def _builders(n, m, k, w, d):
    def ij():  # built inside each traced function, as model code builds them
        return torch.arange(n), torch.arange(m)

    def floor(x):
        return torch.div(x, d, rounding_mode="floor")

    return {
        "tril": lambda: torch.tril(torch.ones(n, m, dtype=torch.bool), diagonal=k),
        "not_triu": lambda: ~torch.triu(torch.ones(n, m, dtype=torch.bool), diagonal=k + 1),
        "ge": lambda: (lambda i, j: i[:, None] + k >= j[None, :])(*ij()),
        "lt_swapped": lambda: (lambda i, j: j[None, :] < i[:, None] + k + 1)(*ij()),
        "window": lambda: (lambda i, j: (i[:, None] - j[None, :]).abs() <= w)(*ij()),
        "causal_window": lambda: (lambda i, j: (i[:, None] >= j[None, :]) & (i[:, None] - j[None, :] < w + 1))(
            *ij()),
        "blocked": lambda: (lambda i, j: floor(i)[:, None] == floor(j)[None, :])(*ij()),
        "or_not": lambda: (lambda i, j: ~((j[None, :] > i[:, None] + k) | (i[:, None] - j[None, :] > w + 5)))(
            *ij()),
        "float_eq0": lambda: torch.tril(torch.ones(n, m), diagonal=k) != 0,
    }


def _lift(fn):
    gm = make_fx(fn)()
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    return lift.keep_predicate(out, False, 0, 1), fn()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 13), extra=st.integers(-3, 6), k=st.integers(-3, 4), w=st.integers(0, 5),
       d=st.integers(1, 5), name=st.sampled_from(sorted(_builders(1, 1, 0, 0, 1))))
def test_lifted_predicate_equals_the_mask(n, extra, k, w, d, name):
    m = max(1, n + extra)
    pred, tensor = _lift(_builders(n, m, k, w, d)[name])
    fn = sympy.lambdify((P_SYM, M_SYM), pred, modules="numpy")
    grid = torch.tensor([[bool(fn(pi, mi)) for mi in range(m)] for pi in range(n)])
    assert torch.equal(grid, tensor.expand(n, m)), f"{name}: {pred}"
    spec = masks.classify(pred)
    if spec.kind == "causal":
        assert check_causal(tensor.expand(n, m), spec.offset), f"{name}: {pred} → {spec}"
    if name in ("tril", "not_triu", "ge", "lt_swapped", "float_eq0") and n * m > 1:
        # (a 1×1 mask has no position symbols left: it is a constant, dense or empty)
        assert spec.kind == "causal" and spec.offset == k, f"{name}: {pred} → {spec}"
    if name in ("window", "blocked"):
        assert spec.kind != "causal"
