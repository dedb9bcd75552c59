"""Decay factors on the scores of the quadratic linear form: RetNet / Lightning Attention's γ^(p−m) and
simple gated linear attention's exp(G_p − G_m), both causal.

    W = (φQ φKᵀ) ⊙ D ⊙ mask,   D[p, m] = exp(G_p − G_m) for m ≤ p

Two readings of a factor D the scores are multiplied by (``decay_factor``):

- a constant (it depends on no input: built from arange and per-head γ): its value is read and, in
  ``read_decay``, checked entry by entry to be exp(λ_b·(p − m)) on and below the diagonal and 0 above it
  (after the masks), with one rate λ_b per batch element (per head); then G_p = λ_b·p. Anything else
  (a per-row scale, a two-sided γ^|p−m|, an edited entry) is refused with where it differs.
- a run-time gate: ``exp(G[..., :, None] − G[..., None, :])`` of one tensor G over (batch, position),
  possibly with 0- or −inf-filled masks around it; those masks join the site's masks, which must then be
  exactly m ≤ p.

The op (codegen/decay_ops.py) gets G and computes only its differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from rewrite.ir.site import TensorPlan

from .axes import AtomSizes, Axes, NoMatch, canonical_plan, dtype_of, shape_of
from .softmax_chain import scalar_value

aten = torch.ops.aten

VERIFY_LIMIT = 1 << 27  # entries of a constant decay checked one by one (beyond: refused, with the reason)
FILL_OPS = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar,
            aten.masked_fill.Tensor}
UNSQUEEZE_OPS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                 aten.slice.Tensor, aten.alias.default, aten.clone.default}


@dataclass
class DecayFactor:
    """One factor the scores are multiplied by that is not a 0/1 mask."""

    node: Node
    value: torch.Tensor | None = None  # constant: the value over [*batch atoms, n, m] (float64)
    g: TensorPlan | None = None  # run-time: G in [*batch, N, 1] order (negate: the graph wrote G_m − G_p)
    masks: list = field(default_factory=list)  # (cond, invert, rows, cols) of masks peeled off the factor


@dataclass
class DecayPlan:
    """What the op gets: a constant G (log_rate per batch element, G_p = λ·p) or a run-time G."""

    log_rate: torch.Tensor | None = None  # [*batch sizes] float64
    g: TensorPlan | None = None
    describe: str = ""


def _is(node, targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _peel_fill(node: Node, fill: float) -> tuple[Node, tuple | None]:
    """``where(c, x, fill)`` / ``masked_fill(x, c, fill)`` / ``x * c`` (fill 0) → (x, (cond, invert))."""
    if _is(node, (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)):
        c, a, b = node.args[:3]
        if scalar_value(b) == fill and isinstance(a, Node):
            return a, (c, False)
        if scalar_value(a) == fill and isinstance(b, Node):
            return b, (c, True)
    if _is(node, (aten.masked_fill.Scalar, aten.masked_fill.Tensor)) and scalar_value(node.args[2]) == fill:
        return node.args[0], (node.args[1], True)
    if fill == 0.0 and _is(node, (aten.mul.Tensor,)):
        from .constants import constant_value

        for x, c in (node.args[:2], node.args[1::-1]):
            val = constant_value(c) if isinstance(c, Node) else None
            if isinstance(x, Node) and val is not None and bool(((val == 0) | (val == 1)).all()):
                return x, (c, False)
    return node, None


def _source(node: Node) -> Node:
    """Through the views that only insert size-1 dims (``G[..., :, None]``, ``G.unsqueeze(-1)``)."""
    squeezed = [s for s in shape_of(node) or () if s != 1]
    while _is(node, UNSQUEEZE_OPS) and isinstance(node.args[0], Node):
        below = node.args[0]
        if [s for s in shape_of(below) or () if s != 1] != squeezed:
            break
        node = below
    return node


def _right_axes(shape, axes: Axes) -> Axes:
    """The score axes a broadcast operand's dims stand for (size-1 dims: none)."""
    off = len(axes) - len(shape)
    if off < 0:
        raise NoMatch("a decay factor has more dims than the scores")
    return tuple(() if s == 1 else axes[i + off] for i, s in enumerate(shape))


def _gate(node: Node, axes: Axes, sizes: AtomSizes, batch: list[str]) -> DecayFactor | None:
    """exp(G_p − G_m) with optional masks inside (−inf before exp, 0 after): the run-time reading."""
    masks = []
    x = node
    while True:
        x, peeled = _peel_fill(x, 0.0)
        if peeled is None:
            break
        masks.append(peeled)
    if not _is(x, (aten.exp.default,)):
        return None
    y = x.args[0]
    flip = False
    while True:
        y, peeled = _peel_fill(y, float("-inf"))
        if peeled is None and _is(y, (aten.neg.default,)):
            y, flip = y.args[0], not flip
            continue
        if peeled is None:
            break
        masks.append(peeled)
    if not _is(y, (aten.sub.Tensor,)) or len(y.args) != 2 or not all(isinstance(a, Node) for a in y.args):
        return None
    a, b = y.args
    ax_a, ax_b = _right_axes(shape_of(a), axes), _right_axes(shape_of(b), axes)
    flat_a, flat_b = [t for ax in ax_a for t in ax], [t for ax in ax_b for t in ax]
    if "p" in flat_a and "m" in flat_b:
        negate, gp, gm, axp, axm = False, a, b, ax_a, ax_b
    elif "m" in flat_a and "p" in flat_b:
        negate, gp, gm, axp, axm = True, b, a, ax_b, ax_a
    else:
        return None
    negate = negate != flip
    src = _source(gp)
    if _source(gm) is not src or [t if t != "m" else "p" for ax in axm for t in ax] != [t for ax in axp for t in ax]:
        return None
    if "m" in [t for ax in axp for t in ax] or dtype_of(src) is None or not dtype_of(src).is_floating_point:
        return None
    g_axes = tuple(ax for ax in axp if ax)
    g_shape = [s for s in shape_of(src) if s != 1]
    if len(g_shape) != len(g_axes):
        return None
    src_axes, it = [], iter(g_axes)
    for s in shape_of(src):
        src_axes.append(() if s == 1 else next(it))
    perm, shape = canonical_plan(tuple(src_axes), (batch, ["p"], []), sizes, "the log decay G", broadcast_ok=True)
    return DecayFactor(node, g=TensorPlan(src, perm, shape, negate=negate), masks=masks)


def decay_factor(node: Node, other: Node, axes: Axes, sizes: AtomSizes, batch: list[str]) -> DecayFactor | None:
    """The factor ``other`` of the scores as a decay (constant, not 0/1; or a run-time gate), else None."""
    from .constants import constant_value

    if not isinstance(other, Node) or dtype_of(other) is None or not dtype_of(other).is_floating_point:
        return None
    val = constant_value(other)
    if val is None:
        return _gate(other, axes, sizes, batch)
    if bool(((val == 0) | (val == 1)).all()):
        return None  # a 0/1 mask: the mask reader's
    dims = _right_axes(val.shape, axes)
    if any(len(ax) > 1 for ax in dims):
        raise NoMatch("a decay factor spans merged axes")
    atoms = [ax[0] if ax else None for ax in dims]
    keep = [*batch, "p", "m"]
    if any(a is not None and a not in keep for a in atoms):
        raise NoMatch("a decay factor varies along an axis that is not part of attention")
    v = val.to(torch.float64).reshape([s for s in val.shape])
    order = [atoms.index(a) for a in keep if a in atoms]
    rest = [d for d in range(v.dim()) if d not in order]
    v = v.permute(*order, *rest).reshape([v.shape[d] for d in order])
    full = [sizes.sizes[a] if a in atoms else 1 for a in keep]
    return DecayFactor(node, value=v.reshape(full).expand(*[sizes.sizes[a] for a in keep]))


def read_decay(factors: list[DecayFactor], keep: torch.Tensor | None, n: int, m: int,
               dtype: torch.dtype | None) -> tuple[DecayPlan | None, str | None]:
    """(the op's G, None) or (None, the reason the decay is refused)."""
    if len(factors) > 1:
        return None, "the scores are multiplied by two decay factors"
    (f,) = factors
    if n != m:
        return None, f"a decay with {n} queries and {m} keys: only as many queries as keys runs in O(N)"
    causal = torch.ones(n, m, dtype=torch.bool).tril()
    if f.g is not None:
        if keep is None or not torch.equal(keep.cpu(), causal):
            return None, ("a gated decay exp(G_p − G_m) without exactly the causal mask m ≤ p: "
                          "the pairs m > p would grow, not decay, and have no O(N) scan")
        return DecayPlan(g=f.g, describe="exp(G_p − G_m), G a run-time tensor (gated)"), None
    if f.value.numel() > VERIFY_LIMIT:  # decided before the float64 copy below is made
        return None, (f"a constant decay of {f.value.numel()} entries: above the {VERIFY_LIMIT} checked one by one, "
                      "so it is not proven (pass it as a gate, exp(G_p − G_m), to run it in O(N))")
    if dtype in (torch.float16, torch.bfloat16):
        return None, "a constant decay in half precision: its rounding cannot be told from an edited entry"
    d = f.value if keep is None else f.value * keep.to(torch.float64)
    upper = ~causal
    if bool((d[..., upper] != 0).any()):
        return None, ("the decay keeps pairs m > p (not causal; a two-sided γ^|p−m| has no single-scan form): "
                      "mask it with m ≤ p")
    batch = d.shape[:-2]
    flat = d.reshape(-1, n, m)
    diag = flat.diagonal(dim1=-2, dim2=-1)
    if not bool((diag == 1).all()):
        return None, "the decay's diagonal is not 1 (a per-row or per-key scale, e.g. a normalised decay)"
    rates = []
    for b in range(flat.shape[0]):
        col = flat[b, :, 0]
        ok = (col > 1e-30).nonzero().flatten()
        far = int(ok.max()) if ok.numel() else 0
        if n > 1 and far == 0:
            return None, "the decay drops to 0 within one step"
        rates.append(math.log(float(col[far])) / far if far else 0.0)
    lam = torch.tensor(rates, dtype=torch.float64)
    dist = (torch.arange(n, dtype=torch.float64)[:, None] - torch.arange(m, dtype=torch.float64)[None, :])
    tol = 3e-5 if dtype in (torch.float32, None) else 1e-10
    for b in range(flat.shape[0]):
        want = torch.where(causal, (lam[b] * dist).exp(), torch.zeros(()))
        bad = (flat[b] - want).abs() > tol * want + 1e-30
        if bool(bad.any()):
            p, c = bad.nonzero()[0].tolist()
            return None, (f"the constant factor is not γ^(p−m) (γ = {math.exp(lam[b]):.6g} from its first column): "
                          f"at (p={p}, m={c}) it is {float(flat[b, p, c]):.6g}, γ^(p−m) is {float(want[p, c]):.6g}")
    gammas = sorted({round(math.exp(x), 6) for x in rates})
    shown = ", ".join(f"{g:g}" for g in gammas[:4]) + (", …" if len(gammas) > 4 else "")
    describe = f"γ^(p−m), γ ∈ {{{shown}}} (constant, checked entry by entry)"
    return DecayPlan(log_rate=lam.reshape(batch), describe=describe), None


def looks_like_gate(node) -> bool:
    """``exp(a − b)`` under 0-filled masks: a decay factor, never the scores (which come from a product)."""
    x = node
    for _ in range(4):
        x, peeled = _peel_fill(x, 0.0)
        if peeled is None:
            break
    if not _is(x, (aten.exp.default,)):
        return False
    y = _peel_fill(x.args[0], float("-inf"))[0]
    y = y.args[0] if _is(y, (aten.neg.default,)) else y
    return _is(y, (aten.sub.Tensor,))
