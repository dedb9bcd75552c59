"""Decay-gated linear attention written step by step or chunk by chunk, read back as its quadratic form.

A recurrent or chunked spelling (RetNet's recurrent and chunkwise retention, Lightning Attention's blocks)
is, whatever its order of ops, a sum of terms c · (q_p · k_m) v_m with constant coefficients c. `DecayTerms`
evaluates the graph region below an output symbolically, rule by rule, into that one form:

    rows    a slice or select of q, k or v along the position dim, times constant per-row/per-head weights
    state   Σ_m c[m] · k_mᵀ v_m                     (a [.., D, F] matrix; zeros are the empty state)
    scores  c[p, m] · (q_p · k_m)                   (a block of q kᵀ times constant masks and decays)
    out     Σ_m W[p, m] · (q_p · k_m) v_m           (query rows p of the result)

Each op maps values to values exactly (products of slices, × constants along batch or row dims, sums,
cat/stack of outputs along the query rows); anything else (a nonlinearity, a run-time factor, a product over
the features of one operand) stops the reading with NoMatch. The coefficients are float64 and exact in what
the graph's constants hold, so the site's W [*batch, N, N] is what the graph computes, not a sample of it;
patterns/decay_loop.py then checks W entry by entry (patterns/linear_decay.read_decay), as for the quadratic
spelling.

Roles of a value's dims: "b0", "b1", … the batch dims of q/k/v (every dim but the position and feature dims),
"R"/"D" rows and features of a slice, "X"/"Y" the state's features (of its first and second base), "P"/"M" the
query and key rows of scores, "P"/"F" the rows and features of an output. A size-1 dim has no role.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.fx import Node

from .axes import AtomSizes, NoMatch, is_layout_op, propagate, shape_of
from .contraction import as_contraction
from .decay_rules import Val, add, assemble, contract, masked, multiply
from .linear_readers import FULL_OPS, ZERO_OPS, is_zero, norm_dim, slice_range
from .softmax_chain import scalar_value

aten = torch.ops.aten
MUL_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
WHERE_OPS = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
SAME_VALUE_OPS = (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default)


class DecayTerms:
    """Evaluates nodes into `Val`s, memoised; ``visited`` holds every node read (the site's body)."""

    def __init__(self, runtime: dict[Node, bool] | None = None):
        self.memo: dict[Node, Val | NoMatch] = {}
        self.runtime: dict[Node, bool] = {} if runtime is None else runtime
        self.layout: tuple | None = None  # (rank, position dim, batch sizes) shared by q, k and v
        self.n = 0
        self.visited: list[Node] = []

    @property
    def bs(self) -> tuple[int, ...]:
        return self.layout[2]

    def eval(self, node) -> Val:
        if not isinstance(node, Node):
            s = scalar_value(node)
            if s is None:
                raise NoMatch(f"{node!r} is not a number")
            return Val("const", coef=torch.tensor(s, dtype=torch.float64))
        got = self.memo.get(node)
        if got is None:
            try:
                got = self._eval(node)
            except RecursionError:
                got = NoMatch("the region is too deep to read")
            except NoMatch as exc:
                got = exc
            self.memo[node] = got
            if isinstance(got, Val):
                self.visited.append(node)
        if isinstance(got, NoMatch):
            raise got
        return got

    def depends_on_input(self, node: Node) -> bool:
        stack = [node]
        while stack:
            nd = stack[-1]
            if nd in self.runtime:
                stack.pop()
                continue
            todo = [a for a in nd.all_input_nodes if a not in self.runtime]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            self.runtime[nd] = nd.op == "placeholder" or any(self.runtime[a] for a in nd.all_input_nodes)
        return self.runtime[node]

    def _eval(self, node: Node) -> Val:
        from .constants import constant_value

        if node.op != "call_function":
            raise NoMatch(f"{node.name} is an input, not a slice of one")
        if node.target in ZERO_OPS or node.target in FULL_OPS:  # new_zeros(q, …): zero whatever q holds
            if is_zero(node):
                return Val("zero")
            raise NoMatch("a filled tensor that is not zero")
        if not self.depends_on_input(node):
            val = constant_value(node)
            if val is None:
                raise NoMatch(f"{node.name}: a constant that cannot be evaluated")
            return Val("zero") if not bool(val.any()) else Val("const", coef=val.to(torch.float64))
        t = node.target
        if t in (aten.slice.Tensor, aten.select.int):
            return self._slice(node)
        if t in SAME_VALUE_OPS or (t == aten._to_copy.default and set(node.kwargs) <= {"dtype"}
                                   and node.kwargs.get("dtype") in (None, node.args[0].meta["val"].dtype)):
            return self.eval(node.args[0])
        c = as_contraction(node)
        if c is not None:
            return contract(self, node, c)
        if is_layout_op(node):
            return self._layout(node)
        if t in MUL_OPS:
            return multiply(self, node)
        if t == aten.add.Tensor and node.kwargs.get("alpha", 1) == 1:
            return add(self, node)
        if t in WHERE_OPS or t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            return masked(self, node)
        if t in (aten.cat.default, aten.stack.default):
            return assemble(self, node)
        raise NoMatch(f"{t} is not part of a decayed linear form")

    # ---- rules that only move dims ---------------------------------------------------------------
    def _slice(self, node: Node) -> Val:
        x = node.args[0]
        shape = shape_of(x)
        if shape is None:
            raise NoMatch("shapes unknown")
        if node.target == aten.slice.Tensor:
            rng = slice_range(node)
            if rng is None:
                raise NoMatch("a strided slice")
            _, d, a, b = rng
            if (a, b) == (0, shape[d]):
                return self.eval(x)  # the whole dim: the same value
            picked, keep_dim = tuple(range(a, b)), True
        else:
            d = norm_dim(node.args[1], len(shape))
            i = node.args[2]
            picked, keep_dim = (i + shape[d] if i < 0 else i,), False
        try:
            below = self.eval(x)
        except NoMatch:
            return self._new_rows(node, x, d, picked, keep_dim)
        if below.kind != "rows" or below.dims[d] != "R":
            raise NoMatch("a slice of something other than the rows of q, k or v")
        coef = below.coef[..., list(picked)]
        dims = list(below.dims)
        if not keep_dim:
            del dims[d]
        elif len(picked) == 1:
            dims[d] = None
        return replace(below, dims=tuple(dims), coef=coef, pos=tuple(below.pos[i] for i in picked))

    def _new_rows(self, node: Node, base: Node, d: int, picked: tuple, keep_dim: bool) -> Val:
        shape = shape_of(base)
        rank = len(shape)
        if rank < 2 or d == rank - 1:
            raise NoMatch("a slice along the features")
        bs = tuple(s for i, s in enumerate(shape) if i not in (d, rank - 1))
        if self.layout is None:
            self.layout, self.n = (rank, d, bs), shape[d]
        elif self.layout != (rank, d, bs) or shape[d] != self.n:
            raise NoMatch("q, k and v are sliced along different dims or have different shapes")
        dims, j = [], 0
        for i, s in enumerate(shape):
            if i == d:
                role = "R"
            elif i == rank - 1:
                role = "D"
            else:
                role, j = f"b{j}", j + 1
            dims.append(role if s != 1 else None)
        if not keep_dim:
            del dims[d]
        elif len(picked) == 1:
            dims[d] = None
        return Val("rows", tuple(dims), torch.ones(*bs, len(picked), dtype=torch.float64), picked, (), (base,))

    def _layout(self, node: Node) -> Val:
        x = self.eval(node.args[0])
        if x.kind == "zero":
            return x
        if x.kind == "const":
            raise NoMatch("a constant reached through a run-time value")
        shape_in, shape_out = shape_of(node.args[0]), shape_of(node)
        if node.target == aten.expand.default and tuple(shape_in) != tuple(shape_out):
            raise NoMatch("an expanded value (broadcast along a new dim)")
        sizes = AtomSizes({r: s for r, s in zip(x.dims, shape_in) if r is not None})
        axes = tuple((r,) if r is not None else () for r in x.dims)
        out = propagate(node, axes, sizes)
        if any(len(ax) > 1 for ax in out):
            raise NoMatch("a view that merges dims")
        return replace(x, dims=tuple(ax[0] if ax else None for ax in out))
