"""The softmax in any spelling, and the score chain behind it, in an ATen graph.

What `softmax_attention` reads before it builds a site: which node is a softmax (``softmax``, or
written out as ``exp(x − max)/Σ``, ``exp(x)/Σ``, or normalised after the product with V), which
argument of each op between the two products carries the scores (walked back to the Q·K
contraction), and the constants on that chain (``scalar_value``: as the graph's tensors hold them).
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from .axes import NoMatch, dtype_of, is_layout_op, propagate, shape_of
from .contraction import Contraction, as_contraction

aten = torch.ops.aten

SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int}
DROPOUT_OPS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
CAST_OPS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}


def scalar_value(x) -> float | None:
    """A Python number, or a 0-d tensor the graph holds as a constant, as that tensor holds it
    (``torch.tensor(d).sqrt()`` is a float32 value, not Python's float64 square root)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, Node):
        return None
    val = None
    if x.op == "get_attr":
        obj = x.graph.owning_module
        for part in x.target.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor) and obj.numel() == 1:
            val = float(obj.item())
    elif x.op == "call_function" and x.target in (aten.lift_fresh_copy.default, aten.clone.default,
                                                  *CAST_OPS, aten.detach.default):
        val = scalar_value(x.args[0])
    elif x.op == "call_function" and x.target in (aten.scalar_tensor.default, aten.full.default,
                                                  aten.full_like.default):
        val = scalar_value(x.args[0] if x.target == aten.scalar_tensor.default else x.args[1])
    elif x.op == "call_function" and x.target == aten.sqrt.default:
        v = scalar_value(x.args[0])
        val = math.sqrt(v) if v is not None and v >= 0 else None
    dtype = dtype_of(x)
    if val is not None and dtype is not None and not dtype.is_floating_point and dtype != torch.bool:
        return float(math.trunc(val))
    return as_stored(val, dtype)


def narrows(src: torch.dtype | None, dst: torch.dtype | None) -> bool:
    """Does a cast from ``src`` to ``dst`` lose range or precision (float types)?"""
    if src is None or dst is None or not src.is_floating_point or not dst.is_floating_point:
        return False
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.max < a.max or b.eps > a.eps


def as_stored(val: float | None, dtype: torch.dtype | None) -> float | None:
    """A constant as a tensor of ``dtype`` holds it (what eager writes into the scores)."""
    if val is None or dtype is None or not dtype.is_floating_point:
        return val
    return float(torch.tensor(val, dtype=torch.float64).to(dtype))


# ---- softmax, in any spelling -------------------------------------------------------------
def _strip(node):
    while isinstance(node, Node) and node.op == "call_function" and node.target in (
            aten.detach.default, aten.alias.default):
        node = node.args[0]
    return node


def _row_max_of(node, x, dim) -> bool:
    node = _strip(node)
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target == aten.amax.default:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return node.args[0] is x and list(dims) == [dim] and keep
    if node.target == operator.getitem and node.args[1] == 0:
        mx = node.args[0]
        return (mx.op == "call_function" and mx.target == aten.max.dim and mx.args[0] is x
                and mx.args[1] == dim and (mx.args[2] if len(mx.args) > 2 else False))
    return False


def _norm(d, node):
    shape = shape_of(node)
    return d + len(shape) if d < 0 and shape is not None else d


def written_softmax(e: Node) -> tuple[Node, int, str] | None:
    """``exp(x − rowmax(x))`` or ``exp(x)``: return (x, dim, spelling) if e is that and the
    caller finds its normaliser; dim is read from the normalising sum."""
    if e.op != "call_function" or e.target != aten.exp.default:
        return None
    y = e.args[0]
    sums = [u for u in e.users if u.op == "call_function" and u.target == aten.sum.dim_IntList
            and len(u.args[1]) == 1 and (u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim"))]
    if len(sums) != 1:
        return None
    dim = _norm(sums[0].args[1][0], e)
    if isinstance(y, Node) and y.op == "call_function" and y.target == aten.sub.Tensor:
        x, mx = y.args[:2]
        if isinstance(x, Node) and _row_max_of(mx, x, dim) or _row_max_of(mx, x, dim - len(shape_of(x))):
            return x, dim, "exp(x − max)/Σ"
    return y, dim, "exp(x)/Σ (no max subtraction)"


def softmax_of(node: Node) -> tuple[Node, int, str] | None:
    """(input, dim, spelling) if node computes a softmax, normalised before the product."""
    if node.op != "call_function":
        return None
    if node.target in SOFTMAX_OPS:
        return node.args[0], _norm(node.args[1], node), "softmax"
    if node.target == aten.div.Tensor and isinstance(node.args[0], Node) and isinstance(node.args[1], Node):
        e, s = node.args[:2]
        w = written_softmax(e)
        if w is not None and s.op == "call_function" and s.target == aten.sum.dim_IntList and s.args[0] is e:
            return w
    return None


def late_softmax(e: Node) -> tuple[Node, int, str, Node] | None:
    """``exp(x − max)`` whose normaliser divides the product with V instead of the weights:
    ``(E @ v) / E.sum(-1, keepdim=True)``. Returns (x, dim, spelling, the sum node)."""
    w = written_softmax(e)
    if w is None:
        return None
    x, dim, spelling = w
    sums = [u for u in e.users if u.target == aten.sum.dim_IntList]
    if len(sums) != 1 or len(e.users) != 2:
        return None
    if any(u.target == aten.div.Tensor and u.args[1] is sums[0] and u.args[0] is e for u in sums[0].users):
        return None  # normalised before the product: softmax_of handles it
    return x, dim, spelling.replace("/Σ", "") + " → product → ÷Σ", sums[0]


# ---- the score chain, walked backwards to its contraction ---------------------------------
# Pointwise ops a score modifier may hold (patterns/score_mod.py lifts them).
MODIFIER_OPS = {aten.tanh.default, aten.sigmoid.default, aten.abs.default, aten.neg.default, aten.clamp.default,
                aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default}
_CHAIN_UNARY = {*MODIFIER_OPS, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
                aten.sub.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
                aten.where.ScalarOther, aten.where.ScalarSelf, *DROPOUT_OPS}


def _score_arg(node: Node, memo: dict) -> Node | None:
    """Which argument of a chain node carries the scores (leads back to a contraction)."""
    cands = [a for a in node.args if isinstance(a, Node)]
    hits = [a for a in cands if reaches_contraction(a, memo)]
    if node.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        hits = [a for a in hits if a is not node.args[0]]
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        hits = [a for a in hits if a is node.args[0]]
    if len(hits) != 1:
        return None
    return hits[0]


def reaches_contraction(node: Node, memo: dict, depth: int = 0) -> bool:
    if node in memo:
        return memo[node]
    ok = False
    if as_contraction(node) is not None:
        ok = True
    elif depth < 40 and node.op == "call_function" and (is_layout_op(node) or node.target in _CHAIN_UNARY):
        ok = any(reaches_contraction(a, memo, depth + 1) for a in node.args[:3] if isinstance(a, Node))
    memo[node] = ok
    return ok


TALKING_HEADS = ("talking-heads attention: a linear layer mixes the scores across heads before the softmax "
                 "(CaiT's proj_l); no kernel takes mixed heads yet (an exact fused form would give every query head "
                 "all H·E features against shared keys: H× the FLOPs of unmixed attention): left as written")


def mixes_products(node: Node) -> bool:
    """A square linear layer (``aten.linear``, H → H) applied to a 4-D product of two tensors whose
    axes a permute moved (the head axis last), through layout ops only: scores mixed across heads
    (talking heads), not scores of one head, and not a projection of an attention's output."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target == aten.linear.default):
        return False
    w = shape_of(node.args[1]) if isinstance(node.args[1], Node) else None
    if w is None or len(w) != 2 or w[0] != w[1]:
        return False
    cur, permuted = node.args[0], False
    for _ in range(8):
        if not isinstance(cur, Node) or cur.op != "call_function":
            return False
        if as_contraction(cur) is not None:
            out = shape_of(cur)
            return permuted and out is not None and len(out) >= 4
        if not is_layout_op(cur):
            return False
        permuted |= cur.target in (aten.permute.default, aten.transpose.int)
        cur = cur.args[0]
    return False


def chain_back(x: Node) -> tuple[Contraction, list[Node]]:
    memo: dict = {}
    chain: list[Node] = []
    cur = x
    for _ in range(64):
        c = as_contraction(cur)
        if c is not None:
            return c, list(reversed(chain))
        if mixes_products(cur):
            raise NoMatch(TALKING_HEADS)
        if cur.op != "call_function" or not (is_layout_op(cur) or cur.target in _CHAIN_UNARY):
            raise NoMatch(f"softmax input comes from {cur.target if cur.op == 'call_function' else cur.op}, "
                          "not from a product of queries and keys")
        chain.append(cur)
        nxt = cur.args[0] if is_layout_op(cur) else _score_arg(cur, memo)
        if nxt is None:
            raise NoMatch(f"cannot tell which operand of {cur.name} holds the scores")
        cur = nxt
    raise NoMatch("score chain too long")


# Ops that read only a tensor's shape and dtype (``torch.full_like(s, -inf)`` as a fill).
SHAPE_READERS = {aten.full_like.default, aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default}


def only_user(node: Node, allowed: Node | None = None) -> None:
    """Raise unless ``node``'s value feeds only the next link (``allowed``, or its one user); users that
    read only its shape (a fill built with ``full_like``) keep no value alive and do not count."""
    users = [u for u in node.users if not (u.op == "call_function" and u.target in SHAPE_READERS)]
    if allowed is None and len(users) != 1 or allowed is not None and [u for u in users if u is not allowed]:
        raise NoMatch(f"{node.name} is also used outside attention (e.g. the weights are returned)")


def find_softmax_candidates(graph: Graph) -> list[Node]:
    out = []
    for node in graph.nodes:
        if softmax_of(node) is not None or late_softmax(node) is not None:
            out.append(node)
    return out


def deviation_notes(softmax_spelling: str, score_dtype: torch.dtype | None, exp_dtype: torch.dtype | None) -> list[str]:
    """Where the rewrite deliberately gives a finite result that eager makes NaN: the kernels compute
    scores with float32 accumulation and the softmax in its stable form."""
    notes = []
    if score_dtype == torch.float16:
        notes.append("float16 scores: eager's q·kᵀ overflows to ±inf beyond 65504 (its rows become NaN); "
                     "the rewrite accumulates in float32 and stays finite there")
    if softmax_spelling.startswith("exp(x)/Σ"):
        dt = exp_dtype if exp_dtype is not None and exp_dtype.is_floating_point else torch.float32
        notes.append("softmax written without the max subtraction: the rewrite is the stable form "
                     f"(eager's exp overflows to inf, its rows to NaN, for scores above "
                     f"{math.log(torch.finfo(dt).max):.4g} in {str(dt).replace('torch.', '')})")
    return notes


def repeat_factor(node: Node) -> int:
    """How many times a key/value operand repeats its heads (repeat_kv's expand+reshape,
    repeat_interleave), found by walking back through layout ops; 1 if it does not."""
    for _ in range(12):
        if not isinstance(node, Node) or node.op != "call_function":
            return 1
        t = node.target
        if t in (aten.repeat_interleave.self_int, aten.repeat_interleave.self_Tensor):
            reps = node.args[1]
            return int(reps) if isinstance(reps, int) else 2
        if t == aten.expand.default:
            src, dst = shape_of(node.args[0]), shape_of(node)
            if src is not None and dst is not None:
                grown = [d for s_, d in zip((1,) * (len(dst) - len(src)) + src, dst) if s_ == 1 and d > 1]
                if grown:
                    return math.prod(grown)
        if not (is_layout_op(node) or t == aten.repeat.default):
            return 1
        node = node.args[0]
    return 1


def pass_through(node: Node, axes, sizes, where: str):
    """The score axes after ``node`` when it only moves, views or widens the scores (or is dropout
    with p = 0 / in eval mode); None when it computes. Refused: a narrowing cast (it rounds the
    scores, and makes those beyond its range ±inf) and dropout in training mode. ``where`` names the
    place for the reason ("before the softmax", "inside a score modifier")."""
    if is_layout_op(node):
        if node.target in CAST_OPS and narrows(dtype_of(node.args[0]), dtype_of(node)):
            raise NoMatch(f"the scores are cast from {dtype_of(node.args[0])} to {dtype_of(node)} {where} (a "
                          "narrowing cast rounds them, and makes scores beyond its range ±inf)")
        return propagate(node, axes, sizes)
    if node.target in DROPOUT_OPS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train and p > 0:
            raise NoMatch("dropout in training mode (its random mask is not reproduced)")
        return axes
    return None


def score_of(node: Node, chain: list[Node]) -> Node | None:
    """The argument of ``node`` that is the previous link of the chain (or the contraction)."""
    for a in node.args:
        if isinstance(a, Node) and (a in chain or as_contraction(a) is not None):
            return a
    return None


def demote_unshared_rows(n_atoms: list[str], batch: list[str], operands, sizes) -> tuple[list[str], list[str]]:
    """Query atoms besides the query position (heads that only q has: MQA/GQA by broadcasting) are
    rows by default (one key head read once for its group). A bias, mask or modifier tensor that
    covers only part of those rows (a [B, 1, N, M] mask, a [1, H, 1, M] bias) cannot be laid out over
    them merged; then the heads become batch atoms instead, K and V broadcast over them (the same
    sums, another layout)."""
    rows = {a for a in n_atoms if sizes.sizes[a] != 1}
    for node_axes in operands:
        present = rows & {x for ax in sizes.expand_axes(node_axes) for x in ax}
        if present and present != rows:
            return n_atoms[-1:], batch + n_atoms[:-1]
    return n_atoms, batch
