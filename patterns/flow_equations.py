"""Flow-Attention's equations (REFERENCES.md, "Flow-Attention (Flowformer)") in the canonical expression
form of patterns/flow_expr.py, the roles of a lifted candidate (which leaf is Q, K, V; which atom is p, m,
e, f), and the proof: the candidate's canonical form equals the equations' at its own roles, eps and N/M.

The equations are built with the same constructors the lifter uses, so any spelling the constructors
normalise alike (the official code among them) gives the same form. When they differ, the first step
of the cascade (in dependency order) that the candidate does not compute is the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from . import flow_expr as E
from .axes import NoMatch
from .flow_normal import Lifted

aten = torch.ops.aten
CLOSE = 1e-12  # constants are compared up to float64 rounding of how the spelling computed them


@dataclass
class FlowRoles:
    q: Node
    k: Node
    v: Node
    batch: list[str]  # batch atoms, in q's dim order
    p: str  # query (sink) axis; causal: the one sequence axis
    m: str  # key (source) axis; causal: == p
    e: str
    f: str
    causal: bool


def _atoms(lifted: Lifted, node: Node) -> list[str]:
    return [a for ax in lifted.axes[node] for a in ax]


def _nodes_with(lifted: Lifted, head: str, name: str | None = None) -> list[E.Expr]:
    return [x for x in lifted.out.walk() if x.head == head and (name is None or x.args[0] == name)]


def looks_like_flow(lifted: Lifted) -> bool:
    """Worth a reason when refused: an allocation (a sigmoid of a value built by sums), another sigmoid,
    an exp or softmax (the competition) and four sums or more. A sigmoid gate on softmax attention has no
    allocation: it stays the softmax recogniser's."""
    sums = _nodes_with(lifted, "sum") + _nodes_with(lifted, "cumsum")
    competition = _nodes_with(lifted, "fn", "exp") + _nodes_with(lifted, "softmax")
    sigmoids = _nodes_with(lifted, "fn", "sigmoid")
    allocation = [x for x in sigmoids if any(y.head in ("sum", "cumsum") for y in x.args[1].walk())]
    return len(sigmoids) >= 2 and bool(allocation) and bool(competition) and len(sums) >= 4


def looks_like_flow_nodes(nodes: list[Node]) -> bool:
    """The same test on fx nodes, for a candidate the lifter could not model."""
    inside = set(nodes)
    reduces = ("aten.sum", "aten.cumsum", "aten.einsum", "aten.matmul", "aten.bmm")

    def built_by_sums(node: Node) -> bool:
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen or n not in inside:
                continue
            seen.add(n)
            if str(n.target).startswith(reduces):
                return True
            stack.extend(n.all_input_nodes)
        return False

    names = [str(n.target) for n in nodes]
    sigmoids = [n for n in nodes if n.target == aten.sigmoid.default]
    return (len(sigmoids) >= 2 and any(built_by_sums(a) for s in sigmoids for a in s.all_input_nodes)
            and any("exp" in t or "softmax" in t for t in names) and sum(t.startswith(reduces) for t in names) >= 4)


def _describe(lifted: Lifted, node: Node) -> str:
    if node in lifted.opaque:
        return f"{node.name} ({node.target} on values of the flow, an op the lifter does not model)"
    key = lifted.exprs[node].key
    maps = sorted({x.args[0] for x in _nodes_with(lifted, "fn") if x.args[1].key == key})
    return f"{node.name} ({'through ' + ', '.join(maps) if maps else 'as it is'})"


def _aggregation_query(lifted: Lifted) -> str | None:
    """The leaf whose sigmoid multiplies the aggregation directly (Σ_e σQ·…·Σ σK⊗V): the queries."""
    top = lifted.out.args[1] if lifted.out.head == "prod" else ((lifted.out, 1),)
    found = set()
    for base, _ in top:
        if base.head != "sum":
            continue
        body = base.args[1]
        for f, _ in (body.args[1] if body.head == "prod" else ((body, 1),)):
            if f.head == "fn" and f.args[0] == "sigmoid" and f.args[1].head == "leaf":
                found.add(f.args[1].key)
    return next(iter(found)) if len(found) == 1 else None


def bind_roles(lifted: Lifted, out: Node) -> list[FlowRoles]:
    """The role assignments the atoms allow (both orders of the two sigmoid inputs when causal)."""
    leaf_of = {lifted.exprs[n].key: n for n in lifted.leaves}
    fed = [leaf_of[x.args[1].key] for x in _nodes_with(lifted, "fn", "sigmoid") if x.args[1].key in leaf_of]
    fed = sorted(set(fed), key=lambda n: lifted.leaves.index(n))
    bare = [n for n in lifted.leaves if n not in fed and _atoms(lifted, n)]
    if len(fed) != 2:
        raise NoMatch(f"Flow-Attention's queries and keys both enter through a sigmoid; here {len(fed)} input(s) "
                      f"do, and {', '.join(_describe(lifted, n) for n in bare) or 'nothing'} enter(s) without one")
    if len(bare) != 1:
        raise NoMatch(f"one value tensor expected besides the two sigmoid inputs, found "
                      f"{', '.join(_describe(lifted, n) for n in bare) or 'none'}")
    v = bare[0]
    scans = {x.args[0] for x in _nodes_with(lifted, "cumsum")}
    if len(scans) > 1:
        raise NoMatch("prefix sums along more than one axis")
    causal = bool(scans)
    oa, va = set(_atoms(lifted, out)), set(_atoms(lifted, v))
    found = []
    orders = [(fed[0], fed[1]), (fed[1], fed[0])]
    hint = _aggregation_query(lifted)
    if causal and hint is not None:  # both orders fit the atoms; the aggregation says which leaf is Q
        orders = [(q, k) for q, k in orders if lifted.exprs[q].key == hint] or orders
    for q, k in orders:
        qa, ka = set(_atoms(lifted, q)), set(_atoms(lifted, k))
        if causal:
            s = next(iter(scans))
            batch = (qa & ka & va) - {s}
            e, f, p, m = (qa & ka) - batch - {s}, va - ka, {s}, {s}
        else:
            batch = qa & ka & va
            e, p, m, f = (qa & ka) - batch, qa - ka, (ka & va) - qa, va - ka
        if not all(len(x) == 1 for x in (e, p, m, f)):
            continue
        e, p, m, f = (next(iter(x)) for x in (e, p, m, f))
        if (qa, ka, va, oa) != (batch | {p, e}, batch | {m, e}, batch | {m, f}, batch | {p, f}):
            continue
        found.append(FlowRoles(q, k, v, [a for a in _atoms(lifted, q) if a in batch], p, m, e, f, causal))
    if not found:
        raise NoMatch("the axes of the two sigmoid inputs, the values and the output are not Flow-Attention's "
                      "(queries [batch, p, e], keys [batch, m, e], values [batch, m, f], output [batch, p, f])")
    return found


def flow_steps(lifted: Lifted, r: FlowRoles, eps: float, clamp: bool) -> list[tuple[str, E.Expr]]:
    """The cascade's named steps, in dependency order, in canonical form; the last is the output."""
    sizes = lifted.sizes
    n, m_ = sizes[r.p], sizes[r.m]
    fq, fk = E.fn("sigmoid", lifted.exprs[r.q]), E.fn("sigmoid", lifted.exprs[r.k])
    val = lifted.exprs[r.v]

    def dot(a, b):
        return E.reduce_sum({r.e}, E.mul(E.add(a, eps), E.add(b, eps)), sizes)

    if r.causal:
        normal = E.add(E.pos(r.p), 1.0)
        over_keys = over_queries = (lambda x: E.prefix_sum(r.p, x))
    else:
        over_keys, over_queries = (lambda x: E.reduce_sum({r.m}, x, sizes)), (lambda x: E.reduce_sum({r.p}, x, sizes))
    inc, outg = dot(fq, over_keys(fk)), dot(fk, over_queries(fq))
    si, so = E.power(inc, -1), E.power(outg, -1)
    if r.causal:
        si, so = E.mul(si, normal), E.mul(so, normal)
    c_sink, c_src = dot(fq, over_keys(E.mul(fk, so))), dot(fk, over_queries(E.mul(fq, si)))
    if r.causal:
        c_sink, c_src = E.mul(c_sink, E.power(normal, -1)), E.mul(c_src, E.power(normal, -1))
    steps = [("the sinks' feature map σ(Q)", fq), ("the sources' feature map σ(K)", fk),
             ("the incoming flow I", inc), ("the outgoing flow O", outg),
             ("the conserved incoming flow Î (Σ over sources of σK/O)", c_sink),
             ("the conserved outgoing flow Ô (Σ over sinks of σQ/I)", c_src)]
    if clamp:
        c_src = E.clamp(c_src, -1.0, 1.0)
        steps.append(("the clamp of Ô to [-1, 1]", c_src))
    if r.causal:
        alloc = E.fn("sigmoid", c_sink)
        x = E.fn("exp", c_src)
        comp = E.mul(x, E.power(E.prefix_sum(r.p, x), -1), normal)
        kv = E.prefix_sum(r.p, E.mul(fk, val, comp))
        agg = E.reduce_sum({r.e}, E.mul(fq, si, E.power(normal, -1), kv), sizes)
    else:
        alloc = E.fn("sigmoid", E.mul(c_sink, float(n) / float(m_)))
        comp = E.mul(E.softmax(r.m, c_src, sizes), float(m_))
        kv = E.reduce_sum({r.m}, E.mul(fk, val, comp), sizes)
        agg = E.reduce_sum({r.e}, E.mul(fq, si, kv), sizes)
    where = "prefix " if r.causal else ""
    steps += [("the competition " + ("exp(Ô)/cumΣ exp(Ô)·(p+1)" if r.causal else "softmax over the sources (m) · M"),
               comp),
              (f"the {where}sum over sources of σK ⊗ V·competition", kv),
              ("the aggregation R = σQ/I · Σ σK ⊗ V̂", agg),
              ("the allocation " + ("σ(Î)" if r.causal else "σ(Î · N/M)"), alloc),
              ("the output R ⊙ allocation", E.mul(agg, alloc))]
    return steps


def same(a: E.Expr, b: E.Expr) -> bool:
    """Equal canonical forms, constants equal up to float64 rounding."""
    if a.shape_key != b.shape_key:
        return False
    return all(math.isclose(x, y, rel_tol=CLOSE, abs_tol=0.0) for x, y in zip(a.constants(), b.constants()))


def eps_and_clamp(lifted: Lifted) -> tuple[float, bool]:
    """The eps (free, but one positive number everywhere) and whether Ô is clamped (to [-1, 1] only)."""
    added = []
    for x in lifted.out.walk():
        if x.head == "add" and x.args[0] != 0.0 and not all(t.head == "pos" for t in x.args[1]):
            added.append(x.args[0])
    values = sorted({v for v in added})
    if not values:
        raise NoMatch("no eps is added to the flows (Flow-Attention adds one eps > 0 to every factor of its flows)")
    if any(not math.isclose(v, values[0], rel_tol=CLOSE) for v in values):
        raise NoMatch(f"eps is not one number: {', '.join(f'{v:g}' for v in values)} are added in different places")
    if values[0] <= 0:
        raise NoMatch(f"eps = {values[0]:g} is not positive")
    clamps = _nodes_with(lifted, "clamp")
    if len(clamps) > 1:
        raise NoMatch("more than one clamp")
    if clamps and tuple(clamps[0].args[1:]) != (-1.0, 1.0):
        lo, hi = clamps[0].args[1:]
        raise NoMatch(f"a clamp to [{lo}, {hi}]: Flow-Attention clamps the conserved outgoing flow to [-1, 1]")
    return values[0], bool(clamps)


def _nearest_constant(twins: list[E.Expr], want: E.Expr) -> tuple[float, float]:
    """(found, wanted): the first differing constant of the value that differs from ``want`` the least."""
    def gap(x):
        return sum(abs(c - w) / max(abs(w), 1e-30) for c, w in zip(x.constants(), want.constants()))

    best = min(twins, key=gap)
    return next((c, w) for c, w in zip(best.constants(), want.constants()) if not math.isclose(c, w, rel_tol=CLOSE))


def prove_flow(lifted: Lifted, out: Node) -> tuple[FlowRoles, float, bool, str]:
    """(roles, eps, clamp, proof) when ``out`` is Flow-Attention, else NoMatch with the first step that differs."""
    eps, clamp = eps_and_clamp(lifted)
    present: dict[str, list[E.Expr]] = {}  # every value the graph computes (a product may be flattened later)
    for x in {y for node_expr in lifted.exprs.values() for y in node_expr.walk()}:
        present.setdefault(x.shape_key, []).append(x)
    best = None
    for roles in bind_roles(lifted, out):
        steps = flow_steps(lifted, roles, eps, clamp)
        if same(steps[-1][1], lifted.out):
            kind = "causal " if roles.causal else ""
            return roles, eps, clamp, (
                f"the canonical form of the graph equals {kind}Flow-Attention's equations ({len(steps)} steps, "
                f"eps = {eps:g}, {'clamped' if clamp else 'no clamp'}"
                + ("" if roles.causal else f", N/M = {lifted.sizes[roles.p]}/{lifted.sizes[roles.m]}") + ")")
        for i, (name, want) in enumerate(steps):
            if any(same(want, x) for x in present.get(want.shape_key, [])):
                continue
            twins = present.get(want.shape_key, [])
            if twins:
                got, wanted = _nearest_constant(twins, want)
                why = f"{name}: a constant is {got:g} where Flow-Attention has {wanted:g}"
            else:
                why = f"{name} is not what the graph computes"
            if best is None or i > best[0]:
                best = (i, why)
            break
    if any(_softmax_unclamped(x) for xs in present.values() for x in xs):
        raise NoMatch("the competition is exp(Ô)/Σ exp(Ô) written out on an unclamped Ô: eager overflows to "
                      "inf/NaN there where softmax (and the flow op) does not")
    raise NoMatch("not Flow-Attention: " + (best[1] if best else "the output is not R ⊙ allocation"))


def _softmax_unclamped(x: E.Expr) -> bool:
    """A product holding exp(y) and (Σ_a exp(y))⁻¹ (y unclamped: clamped, it is read as softmax)."""
    if x.head != "prod":
        return False
    keys = {b.key: e for b, e in x.args[1]}
    return any(b.head == "sum" and e == -1 and b.args[1].head == "fn" and b.args[1].args[0] == "exp"
               and keys.get(b.args[1].key) == 1 for b, e in x.args[1])
