"""What every linear-attention recogniser produces and shares: the `LinearSite`, the operand plans,
the row-sum normaliser readers, and the common ending (`finish_linear_site`).

The recognisers (linear_attention.py: quadratic; linear_reassociated.py; linear_cumsum.py;
linear_chunked.py; linear_loop.py) import these public helpers from here and from
linear_readers.py, never each other's private names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
from torch.fx import Node

from rewrite.ir.cascade import Cascade
from rewrite.ir.site import TensorPlan

from .axes import AtomSizes, Axes, NoMatch, canonical_plan, dtype_of, is_layout_op, shape_of
from .feature_maps import feature_map
from .softmax_chain import scalar_value

aten = torch.ops.aten


class NotOurs(Exception):
    """A chain that belongs to another recogniser (softmax attention): skip silently."""


@dataclass
class LinearSite:
    """A linear-attention sub-graph: out = (φQ φKᵀ ⊙ mask) V ÷ ((φQ φKᵀ ⊙ mask) 1 + eps)."""

    spelling: str
    location: str
    form: str  # "quadratic" | "reassociated" | "cumsum" | "chunked"
    fq: TensorPlan | None
    fk: TensorPlan | None
    v: TensorPlan | None
    out_node: Node
    out_atoms: list[str] = field(default_factory=list)  # atoms of out_node, dim by dim, flattened
    out_shape: list[int] = field(default_factory=list)
    out_dtype: torch.dtype = torch.float32
    batch_atoms: list[str] = field(default_factory=list)
    atom_sizes: dict[str, int] = field(default_factory=dict)
    scale: float = 1.0
    normalize: bool = False
    eps: float = 0.0
    mask_pred: sympy.Basic | None = None  # keep predicate over (p, m), shown in the cascade; None: no mask
    mask_const: torch.Tensor | None = None  # the mask's value (what the graph computes): decides
    cascade: Cascade | None = None  # what the graph computes, as written
    n: int = 0
    m: int = 0
    e: int = 0
    f: int = 0
    kind: str = "linear"
    decay: object | None = None  # a DecayPlan (patterns/linear_decay.py): decay-gated, run by its own op
    rejected: str | None = None  # set when the site is attention-like but cannot be expressed
    notes: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)  # the products and every node between them
    # The quadratic form's operands and their named axes (q, k, v, weights nodes; q_axes, k_axes, v_axes,
    # out_axes of the second product; axes_of: each chain node's axes), for recognisers built on it.
    bindings: dict = field(default_factory=dict)

    @property
    def batch_sizes(self) -> list[int]:
        return [self.atom_sizes[a] for a in self.batch_atoms]

    @property
    def feature_maps(self) -> tuple[tuple[str, bool], tuple[str, bool]]:
        """(name, provably non-negative) of φ for the queries and the keys."""
        return feature_map(self.fq.node), feature_map(self.fk.node)


def row_sum(node, of: Node | None = None) -> tuple[Node, int, float] | None:
    """``sum(x, [d], keepdim=True) [+ eps]``: (x, d, eps)."""
    eps = 0.0
    if isinstance(node, Node) and node.op == "call_function" and node.target == aten.add.Tensor:
        a, b = node.args[:2]
        if scalar_value(b) is not None:
            node, eps = a, scalar_value(b)
        elif scalar_value(a) is not None:
            node, eps = b, scalar_value(a)
        else:
            return None
    if not (isinstance(node, Node) and node.op == "call_function" and node.target == aten.sum.dim_IntList):
        return None
    dims = node.args[1]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if len(dims) != 1 or not keep or (of is not None and node.args[0] is not of):
        return None
    x = node.args[0]
    d = dims[0] + len(shape_of(x)) if dims[0] < 0 else dims[0]
    return x, d, float(eps)


def peel_den(node) -> tuple[Node, float, list[int]]:
    """A denominator ``d [+ eps]`` through unsqueezes, either side of the eps: (d, eps, the unsqueezed dims,
    outermost last)."""
    eps, unsq = 0.0, []
    for _ in range(8):
        if not (isinstance(node, Node) and node.op == "call_function"):
            break
        if node.target == aten.unsqueeze.default:
            unsq.append(node.args[1])
            node = node.args[0]
        elif node.target == aten.add.Tensor and not eps and len(node.args) == 2 and \
                (scalar_value(node.args[1]) is not None or scalar_value(node.args[0]) is not None):
            a, b = node.args
            node, eps = (a, scalar_value(b)) if scalar_value(b) is not None else (b, scalar_value(a))
        else:
            break
    return node, float(eps), list(reversed(unsq))


def same_weights(a: Node, w: Node) -> bool:
    """a is w up to layout ops (the normaliser sums the very weights that multiply V)."""
    for _ in range(8):
        if a is w:
            return True
        if not (isinstance(w, Node) and is_layout_op(w)):
            return False
        w = w.args[0]
    return False


def den_axes(summed: Node, dim: int, axes: Axes) -> Axes | None:
    """The axes of Σ over ``dim`` (keepdim) of a tensor with ``axes``, if that dim holds the keys."""
    shape = shape_of(summed)
    if shape is None or len(shape) != len(axes) or axes[dim] != ("m",):
        return None
    return tuple(() if d == dim else ax for d, ax in enumerate(axes))


def broadcasts_as(den: Axes, num: Axes) -> bool:
    """den (right-aligned) names, dim by dim, the same atoms as the numerator or broadcasts (size 1)."""
    if len(den) > len(num):
        return False
    off = len(num) - len(den)
    return all(not ax or ax == num[i + off] for i, ax in enumerate(den))


def plan_operand(node: Node, axes: Axes, groups, sizes: AtomSizes, what: str) -> TensorPlan:
    """How to bring an operand to the op's canonical [*batch, N, D] layout."""
    have = {a for ax in axes for a in ax}
    if any(a not in have for a in groups[0]):
        raise NoMatch(f"{what} lack a batch axis (a weight, not attention)")
    perm, shape = canonical_plan(axes, groups, sizes, what)
    return TensorPlan(node, perm, shape)


def phi_name(node: Node) -> str:
    return feature_map(node)[0]


def rejected_site(node: Node, spelling: str, form: str, reason: str) -> LinearSite:
    """An attention-like chain left alone with ``reason`` (the report's row; nothing is rewritten)."""
    from .softmax_attention import location_of

    site = LinearSite(spelling=spelling, location=location_of(node), form=form, fq=None, fk=None, v=None,
                      out_node=node, rejected=reason)
    site.nodes = [node]
    return site


def finish_linear_site(site: LinearSite, out: Node, out_axes, nodes: list[Node], q_node: Node, k_node: Node,
                       causal: bool, form: str) -> LinearSite:
    """The part every linear recogniser ends with: the output binding, the nodes the site
    replaces, and the as-written cascade (without the normaliser's Einsums when there is none)."""
    site.out_node = out
    site.out_atoms = [a for ax in out_axes for a in ax]
    site.out_shape = list(shape_of(out))
    site.out_dtype = dtype_of(out) or torch.float32
    site.nodes = [*nodes, *([out] if out is not nodes[-1] else [])]
    site.notes.append(f"φQ, φK: {phi_name(q_node)}, {phi_name(k_node)}")
    es = Cascade.linear_attention(causal=causal).einsums
    if not site.normalize:
        es = tuple(e for e in es if e.name not in ("KS", "DEN", "AV"))
    site.cascade = Cascade(es, name=f"linear-attention ({form}, as written)")
    return site
