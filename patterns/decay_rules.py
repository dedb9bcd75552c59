"""The value rules of patterns/decay_terms.py: products, constant factors and masks, sums, cat/stack.

Each rule maps the `Val`s of a node's operands to the node's `Val`, exactly, or raises NoMatch naming what
keeps the node out of the form Σ_m W[p, m] (q_p · k_m) v_m.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from .axes import NoMatch, shape_of
from .contraction import Contraction
from .linear_readers import norm_dim
from .softmax_chain import scalar_value

if TYPE_CHECKING:
    from .decay_terms import DecayTerms

aten = torch.ops.aten
ROW_ROLES = {"rows": ("R",), "state": (), "scores": ("P", "M"), "out": ("P",)}


@dataclass
class Val:
    """One node's value in the form above (kind "zero": all zeros; "const": a constant tensor)."""

    kind: str
    dims: tuple = ()
    coef: torch.Tensor | None = None  # rows [*bs, R], state [*bs, N], scores [*bs, P, M], out [*bs, P, N]
    pos: tuple = ()  # rows: their positions; scores and out: the query positions
    kpos: tuple = ()  # scores: the key positions
    bases: tuple = ()  # rows: (base,); state: (X's, Y's); scores: (P's, M's); out: (q, k, v)
    gated: str | None = None  # a run-time factor the state was multiplied by (its node): a gate, not read yet




def _coef_axes(val: Val, nb: int) -> dict[str, int]:
    """Role → axis of the value's coefficient tensor (batch roles first, then its row roles)."""
    table = {f"b{i}": i for i in range(nb)}
    table.update({r: nb + i for i, r in enumerate(ROW_ROLES[val.kind])})
    return table


def _factor(ev: DecayTerms, val: Val, node: Node, const: torch.Tensor) -> torch.Tensor:
    """``const`` (broadcast against ``node``'s value) as a factor of ``val``'s coefficients."""
    shape = shape_of(node)
    if shape is None or const.dim() > len(val.dims):
        raise NoMatch("a constant factor with more dims than the value it multiplies")
    nb = len(ev.bs)
    table = _coef_axes(val, nb)
    target = [1] * val.coef.dim()
    picked, axes = [], []
    off = len(val.dims) - const.dim()
    for j, s in enumerate(const.shape):
        role = val.dims[off + j]
        if s == 1:
            picked.append(0)
            continue
        if role is None:
            raise NoMatch("a constant factor broadcasts the value along a new dim")
        if role not in table:
            raise NoMatch("a factor that varies along the features (not a decay)")
        picked.append(slice(None))
        axes.append(table[role])
        target[table[role]] = s
    sub = const[tuple(picked)]
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    if order:
        sub = sub.permute(*order)
    return sub.reshape(target).to(torch.float64)


def _scaled(ev: DecayTerms, val: Val, node: Node, const: Val) -> Val:
    if val.kind == "zero":
        return val
    return replace(val, coef=val.coef * _factor(ev, val, node, const.coef))


def multiply(ev: DecayTerms, node: Node) -> Val:
    gate = _runtime_gate(ev, node)
    if gate is not None:
        return gate
    a, b = (ev.eval(x) for x in node.args[:2])
    if node.target in (aten.div.Tensor, aten.div.Scalar):
        if b.kind != "const" or not bool((b.coef != 0).all()):
            raise NoMatch("a division by a run-time value (a normaliser: not a plain decayed form)")
        return _scaled(ev, a, node, Val("const", coef=1.0 / b.coef))
    if a.kind == "const":
        a, b = b, a
    if b.kind == "const":
        if a.kind == "const":
            raise NoMatch("a product of constants outside the constant folding")
        return _scaled(ev, a, node, b)
    if "zero" in (a.kind, b.kind):
        return Val("zero")
    return _outer(ev, node, a, b)


def _runtime_gate(ev: DecayTerms, node: Node) -> Val | None:
    """A state times a run-time factor that is one number per batch element (simple GLA's exp(g_t)·S): the
    state marked gated, so the site is reported, not read (a zero state stays zero)."""
    if node.target != aten.mul.Tensor or not all(isinstance(x, Node) for x in node.args[:2]):
        return None
    for x, y in (node.args[:2], node.args[1::-1]):
        try:
            val = ev.eval(x)
        except NoMatch:
            continue
        if val.kind not in ("state", "zero"):
            continue
        try:
            ev.eval(y)
            return None
        except NoMatch:
            pass
        ys = shape_of(y)
        if val.kind == "zero" or ys is None or len(ys) > len(val.dims):
            return val if val.kind == "zero" and ys is not None and tuple(shape_of(node)) == tuple(shape_of(x)) \
                else None
        off = len(val.dims) - len(ys)
        if any(s != 1 and val.dims[off + i] in ("X", "Y") for i, s in enumerate(ys)):
            return None
        return replace(val, gated=val.gated or y.name)
    return None


def _outer(ev: DecayTerms, node: Node, a: Val, b: Val) -> Val:
    """``k_t[..., :, None] * v_t[..., None, :]``: one position's k_tᵀ v_t by broadcasting."""
    if a.kind != "rows" or b.kind != "rows" or "R" in a.dims or "R" in b.dims:
        raise NoMatch("a product of two run-time values that is not one position's k_tᵀ v_t")
    rank = len(shape_of(node))
    da = (None,) * (rank - len(a.dims)) + a.dims
    db = (None,) * (rank - len(b.dims)) + b.dims
    dims = []
    for ra, rb in zip(da, db):
        if ra == "D" and rb is None:
            dims.append("X")
        elif rb == "D" and ra is None:
            dims.append("Y")
        elif ra == rb or rb is None or ra is None:
            dims.append(ra or rb)
        else:
            raise NoMatch("an elementwise product of features (not an outer product k_tᵀ v_t)")
    if dims.count("X") != 1 or dims.count("Y") != 1:
        raise NoMatch("an elementwise product of features (not an outer product k_tᵀ v_t)")
    return _state_of(ev, a, b, tuple(dims))


def _state_of(ev: DecayTerms, a: Val, b: Val, dims: tuple) -> Val:
    if a.pos != b.pos:
        raise NoMatch(f"a state product pairs positions {list(a.pos)[:4]} with {list(b.pos)[:4]}")
    coef = torch.zeros(*ev.bs, ev.n, dtype=torch.float64)
    coef[..., list(a.pos)] = a.coef * b.coef
    return Val("state", dims, coef, bases=(a.bases[0], b.bases[0]))


def _swap_state(val: Val) -> Val:
    swap = {"X": "Y", "Y": "X"}
    return replace(val, dims=tuple(swap.get(r, r) for r in val.dims), bases=val.bases[::-1])


def add(ev: DecayTerms, node: Node) -> Val:
    a, b = (ev.eval(x) for x in node.args[:2])
    shape = tuple(shape_of(node))
    for x, y, arg in ((a, b, node.args[1]), (b, a, node.args[0])):
        if x.kind == "zero":
            if y.kind == "zero":
                return y
            if tuple(shape_of(arg)) != shape:
                raise NoMatch("a sum that broadcasts")
            return y
    if "const" in (a.kind, b.kind):
        raise NoMatch("a constant added to a run-time value")
    if a.kind != b.kind or a.kind == "rows" or any(tuple(shape_of(x)) != shape for x in node.args[:2]):
        raise NoMatch(f"a sum of a {a.kind} and a {b.kind}")
    if a.kind == "state" and a.bases != b.bases and a.bases == b.bases[::-1]:
        b = _swap_state(b)
    if a.dims != b.dims or a.bases != b.bases or a.pos != b.pos or a.kpos != b.kpos:
        raise NoMatch(f"a sum of two {a.kind} values of other tensors, rows or layouts")
    return replace(a, coef=a.coef + b.coef, gated=a.gated or b.gated)


def masked(ev: DecayTerms, node: Node) -> Val:
    """``where(c, x, 0)``, ``where(c, 0, x)``, ``masked_fill(x, c, 0)`` with a constant c."""
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        x, cond, fill, invert = node.args[0], node.args[1], node.args[2], True
    else:
        cond, x, fill = node.args[:3]
        invert = False
        if scalar_value(x) is not None or (isinstance(x, Node) and ev.eval(x).kind in ("zero", "const")):
            x, fill, invert = fill, x, True
    if isinstance(fill, Node):
        fv = ev.eval(fill)
        if fv.kind != "zero" and not (fv.kind == "const" and fv.coef.numel() == 1 and float(fv.coef) == 0):
            raise NoMatch("a fill other than 0")
    elif scalar_value(fill) != 0.0:
        raise NoMatch("a fill other than 0 (−inf or a value: not a product with a mask)")
    c = ev.eval(cond)
    if c.kind not in ("const", "zero"):
        raise NoMatch("a run-time mask")
    keep = c.coef != 0 if c.kind == "const" else torch.zeros((), dtype=torch.bool)
    keep = ~keep if invert else keep
    val = ev.eval(x)
    if tuple(shape_of(x)) != tuple(shape_of(node)):
        raise NoMatch("a mask that broadcasts the value")
    return _scaled(ev, val, node, Val("const", coef=keep.to(torch.float64)))


def assemble(ev: DecayTerms, node: Node) -> Val:
    """cat of outputs along their query rows, or stack of one-position outputs along a new dim."""
    parts = [ev.eval(p) for p in node.args[0]]
    if any(p.kind not in ("out", "zero") for p in parts) or len(parts) < 2 or all(p.kind == "zero" for p in parts):
        raise NoMatch("a cat of something other than outputs")
    nb = len(ev.bs)
    rank = len(shape_of(node))
    parts = _fill_zero_parts(ev, node, parts)
    first = parts[0]
    if node.target == aten.stack.default:
        d = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
        if any("P" in p.dims or len(p.pos) != 1 for p in parts):
            raise NoMatch("a stack of outputs of several rows")
        dims = tuple([*first.dims[:d], "P", *first.dims[d:]])
    else:
        d = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
        if any(p.dims[d] not in ("P", None) or (p.dims[d] is None and len(p.pos) != 1) for p in parts):
            raise NoMatch("a cat along a dim other than the query rows")
        dims = tuple("P" if i == d else r for i, r in enumerate(first.dims))
        strip = [tuple(r for i, r in enumerate(p.dims) if i != d) for p in parts]
        if any(s != strip[0] for s in strip):
            raise NoMatch("a cat of outputs laid out differently")
    if node.target == aten.stack.default and any(p.dims != first.dims for p in parts):
        raise NoMatch("a stack of outputs laid out differently")
    if any(p.bases != first.bases for p in parts):
        raise NoMatch("a cat of outputs of other queries, keys or values")
    coef = torch.cat([p.coef for p in parts], nb)
    gated = next((p.gated for p in parts if p.gated), None)
    return Val("out", dims, coef, tuple(i for p in parts for i in p.pos), (), first.bases, gated)


def _fill_zero_parts(ev: DecayTerms, node: Node, parts: list[Val]) -> list[Val]:
    """A zero part (q_0 · the empty state) as zero rows at the positions that follow the part before it: its
    rows are 0 whatever positions they stand for."""
    model = next(p for p in parts if p.kind == "out")
    stack = node.target == aten.stack.default
    d = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape_of(node)))
    out, nxt = [], 0
    for p, arg in zip(parts, node.args[0]):
        if p.kind == "zero":
            rows = 1 if stack else shape_of(arg)[d]
            if tuple(shape_of(arg)) != tuple(shape_of(node.args[0][parts.index(model)])) and stack:
                raise NoMatch("a zero part of another shape")
            p = replace(model, coef=torch.zeros(*ev.bs, rows, ev.n, dtype=torch.float64),
                        pos=tuple(range(nxt, nxt + rows)))
            if not stack:
                p = replace(p, dims=tuple(("P" if rows > 1 else None) if i == d else r for i, r in enumerate(p.dims)))
        out.append(p)
        nxt = max(p.pos) + 1
    return out


# ---- products ----------------------------------------------------------------------------------
def _roles(val: Val, labels, shape) -> dict[str, str]:
    table = {}
    for lab, r, s in zip(labels, val.dims, shape):
        if lab and r is not None and s != 1:
            table[lab] = r
    return table


def contract(ev: DecayTerms, node: Node, c: Contraction) -> Val:
    if c.added is not None:
        raise NoMatch("a product that adds a term (baddbmm)")
    a, b = ev.eval(c.a), ev.eval(c.b)
    if "zero" in (a.kind, b.kind):
        return Val("zero")
    order = {"rows": 0, "scores": 1, "state": 2}
    if a.kind not in order or b.kind not in order:
        raise NoMatch(f"a product of a {a.kind} and a {b.kind}")
    ra, rb = _roles(a, c.a_labels, shape_of(c.a)), _roles(b, c.b_labels, shape_of(c.b))
    if order[a.kind] > order[b.kind]:
        a, b, ra, rb = b, a, rb, ra
    out_labels = c.out_labels
    summed = {lab for lab in [*ra, *rb] if lab not in out_labels}
    pairs = {(ra.get(lab), rb.get(lab)) for lab in summed}
    for lab in set(ra) & set(rb) - summed:
        if ra[lab] != rb[lab] or not ra[lab].startswith("b"):
            raise NoMatch("a product that pairs dims of different meaning elementwise")
    if any(x is None or y is None for x, y in pairs):
        raise NoMatch("a product that sums over a dim of one operand only")
    names: dict[tuple[int, str], str]  # (operand, role) → the result's role
    if (a.kind, b.kind) == ("rows", "rows"):
        if pairs == {("D", "D")}:
            coef = a.coef[..., :, None] * b.coef[..., None, :]
            val = Val("scores", (), coef, a.pos, b.pos, (a.bases[0], b.bases[0]))
            names = {(0, "R"): "P", (1, "R"): "M"}
        elif pairs in ({("R", "R")}, set()):
            val = _state_of(ev, a, b, ())
            names = {(0, "D"): "X", (1, "D"): "Y"}
        else:
            raise NoMatch("a product of two slices over other dims than the features or the positions")
    elif (a.kind, b.kind) == ("rows", "state"):
        if len(pairs) != 1 or next(iter(pairs))[0] != "D" or next(iter(pairs))[1] not in ("X", "Y"):
            raise NoMatch("a product with the state that does not contract the query features")
        st = b if next(iter(pairs))[1] == "X" else _swap_state(b)
        coef = a.coef[..., :, None] * st.coef[..., None, :]
        val = Val("out", (), coef, a.pos, (), (a.bases[0], *st.bases))
        names = {(0, "R"): "P", (1, "Y" if st is b else "X"): "F"}
    elif (a.kind, b.kind) == ("rows", "scores"):
        if len(pairs) != 1 or next(iter(pairs))[0] != "R" or next(iter(pairs))[1] not in ("P", "M"):
            raise NoMatch("a product of scores and values that does not sum over the key rows")
        sc = b
        kept = "P" if next(iter(pairs))[1] == "M" else "M"
        if kept == "M":  # the scores were written kᵀq-wise: their M rows are the queries
            sc = replace(b, coef=b.coef.transpose(-1, -2), pos=b.kpos, kpos=b.pos, bases=b.bases[::-1])
        if sc.kpos != a.pos:
            raise NoMatch("the scores' keys and the values are of different positions")
        coef = torch.zeros(*ev.bs, len(sc.pos), ev.n, dtype=torch.float64)
        coef[..., list(sc.kpos)] = sc.coef * a.coef[..., None, :]
        val = Val("out", (), coef, sc.pos, (), (*sc.bases, a.bases[0]))
        names = {(1, kept): "P", (0, "D"): "F"}
    else:
        raise NoMatch(f"a product of a {a.kind} and a {b.kind}")
    table = {}
    for i, roles in enumerate((ra, rb)):
        for lab, r in roles.items():
            if lab in out_labels:
                table[lab] = names.get((i, r), r if r.startswith("b") else None)
                if table[lab] is None:
                    raise NoMatch(f"a product that keeps the {r} dim of an operand")
    dims = tuple(table.get(lab) if lab and s != 1 else None for lab, s in zip(out_labels, shape_of(node)))
    want = {"scores": {"P", "M"}, "state": {"X", "Y"}, "out": {"F"}}[val.kind]
    if not want <= set(dims) or len([r for r in dims if r]) != len({r for r in dims if r}):
        raise NoMatch("a product whose result is not laid out as one value")
    return replace(val, dims=dims, coef=val.coef * c.alpha, gated=a.gated or b.gated)
