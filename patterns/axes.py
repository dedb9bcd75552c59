"""Axis algebra: follow named axes ("atoms") through layout operations.

Every spelling of attention moves the same four or five logical axes (batch, heads,
query position, key position, embedding) through views, permutes, transposes and
reshapes. Instead of one pattern per spelling, the recogniser names the axes once, at
the contraction that produces the scores, and this module carries those names through
any layout op. An axis is a tuple of atoms (several when axes were merged, as in
``[B*H, N, D]``); ``()`` is a size-1 axis that names nothing (it broadcasts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import Node

aten = torch.ops.aten

Axis = tuple[str, ...]
Axes = tuple[Axis, ...]


class NoMatch(Exception):
    """The sub-graph is not (provably) the pattern; carries the reason for the report."""


@dataclass
class AtomSizes:
    """Atom sizes. With ``splittable``, a reshape may split an atom at any factor of its size
    (``[B·H, N, M]`` viewed as ``[B, H, N, M]``, Bloom's and Swin's spelling): the atom is refined into
    row-major parts recorded in ``parts``, and ``expand`` rewrites axes in the refined atoms, so every
    tensor that holds the merged atom reads the same split."""

    sizes: dict[str, int]
    splittable: bool = False
    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def of(self, axis: Axis) -> int:
        return math.prod(self.sizes[a] for a in axis)

    def split(self, atom: str, outer: int) -> tuple[str, str]:
        inner = self.sizes[atom] // outer
        names = (f"{atom}.0", f"{atom}.1")
        self.sizes.update({names[0]: outer, names[1]: inner})
        self.parts[atom] = names
        return names

    def expand(self, axis: Axis) -> Axis:
        out: list[str] = []
        for a in axis:
            out.extend(self.expand(self.parts[a]) if a in self.parts else (a,))
        return tuple(out)

    def expand_axes(self, axes: Axes) -> Axes:
        return tuple(self.expand(ax) for ax in axes)


def shape_of(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def dtype_of(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


LAYOUT_IDENTITY = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.lift_fresh_copy.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
}


def is_layout_op(node: Node) -> bool:
    return node.op == "call_function" and node.target in _LAYOUT_RULES


def propagate(node: Node, axes: Axes, sizes: AtomSizes) -> Axes:
    """The axes of ``node``'s output given the axes of its first argument."""
    rule = _LAYOUT_RULES.get(node.target)
    if rule is None:
        raise NoMatch(f"{node.target} is not a layout op")
    out = rule(node, axes, sizes)
    shape = shape_of(node)
    if shape is not None and (len(out) != len(shape) or any(
            sizes.of(a) != s for a, s in zip(out, shape))):
        raise NoMatch(f"layout of {node.name} does not follow from its input")
    return out


def _identity(node, axes, sizes):
    return axes


def _transpose(node, axes, sizes):
    r = len(axes)
    d0, d1 = (_norm_dim(d, r) for d in node.args[1:3])
    out = list(axes)
    out[d0], out[d1] = out[d1], out[d0]
    return tuple(out)


def _t(node, axes, sizes):
    return tuple(reversed(axes)) if len(axes) == 2 else axes


def _permute(node, axes, sizes):
    dims = [_norm_dim(d, len(axes)) for d in node.args[1]]
    return tuple(axes[d] for d in dims)


def _unsqueeze(node, axes, sizes):
    d = _norm_dim(node.args[1], len(axes) + 1)
    return (*axes[:d], (), *axes[d:])


def _squeeze(node, axes, sizes):
    r = len(axes)
    if len(node.args) < 2:
        dims = [i for i, a in enumerate(axes) if sizes.of(a) == 1]
    else:
        arg = node.args[1]
        dims = [_norm_dim(d, r) for d in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return tuple(a for i, a in enumerate(axes) if not (i in dims and sizes.of(a) == 1))


def _view(node, axes, sizes):
    out_shape = shape_of(node)
    if out_shape is None:
        raise NoMatch(f"{node.name}: unknown shape")
    return reshape_axes(axes, out_shape, sizes)


def _expand(node, axes, sizes):
    out_shape = shape_of(node)
    if out_shape is None:
        raise NoMatch(f"{node.name}: unknown shape")
    lead = len(out_shape) - len(axes)
    if lead < 0:
        raise NoMatch("expand to fewer dims")
    out = [()] * lead + list(axes)
    for i, s in enumerate(out_shape):
        if sizes.of(out[i]) != s:
            raise NoMatch("expand broadcasts an axis of the scores")
    return tuple(out)


def _slice(node, axes, sizes):
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(axes))
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full = sizes.of(axes[dim])
    if (start in (0, None)) and (end is None or end >= full) and step == 1:
        return axes
    raise NoMatch("a slice of the scores")


_LAYOUT_RULES = {
    **{op: _identity for op in LAYOUT_IDENTITY},
    aten.transpose.int: _transpose, aten.t.default: _t, aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze, aten.view.default: _view, aten.reshape.default: _view,
    aten._unsafe_view.default: _view, aten.expand.default: _expand, aten.slice.Tensor: _slice,
    aten.numpy_T.default: lambda n, a, s: tuple(reversed(a)),
}


def reshape_axes(axes: Axes, out_shape: Sequence[int], sizes: AtomSizes) -> Axes:
    """Regroup atoms into ``out_shape``: merged axes concatenate atoms, split axes must
    split at atom boundaries (otherwise the reshape mixes logical axes: no match)."""
    atoms = [a for axis in sizes.expand_axes(axes) for a in axis]
    out: list[Axis] = []
    i = 0
    for s in out_shape:
        if s == 1:
            # A size-1 axis may still be a size-1 atom; consume those, they carry no data.
            group: list[str] = []
            while i < len(atoms) and sizes.sizes[atoms[i]] == 1:
                group.append(atoms[i])
                i += 1
            out.append(tuple(group))
            continue
        group = []
        prod = 1
        while prod < s and i < len(atoms):
            size = sizes.sizes[atoms[i]]
            if prod * size > s and sizes.splittable and s % prod == 0 and size % (s // prod) == 0:
                atoms[i:i + 1] = sizes.split(atoms[i], s // prod)  # the reshape splits this atom
                continue
            group.append(atoms[i])
            prod *= size
            i += 1
        while i < len(atoms) and sizes.sizes[atoms[i]] == 1 and prod == s:
            group.append(atoms[i])
            i += 1
        if prod != s:
            raise NoMatch("a reshape splits a logical axis")
        out.append(tuple(group))
    if i != len(atoms) and any(sizes.sizes[a] != 1 for a in atoms[i:]):
        raise NoMatch("a reshape drops atoms")
    return tuple(out)


def align_broadcast(tensor_shape: Sequence[int], target: Axes, sizes: AtomSizes) -> Axes:
    """Axes of a tensor broadcast against ``target`` (right-aligned, numpy rules)."""
    r = len(tensor_shape)
    if r > len(target):
        if any(s != 1 for s in tensor_shape[: r - len(target)]):
            raise NoMatch("a mask or bias has more dims than the scores")
        tensor_shape = tensor_shape[r - len(target):]
        r = len(tensor_shape)
    out = []
    for s, axis in zip(tensor_shape, target[len(target) - r:]):
        if s == 1:
            out.append(())
        elif s == sizes.of(axis):
            out.append(axis)
        else:
            raise NoMatch("a mask or bias does not broadcast to the scores")
    return tuple(out)


def canonical_plan(axes: Axes, groups: Sequence[Sequence[str]], sizes: AtomSizes,
                   what: str, broadcast_ok: bool = False) -> tuple[list[int], list[int]]:
    """A permutation and a shape that turn a tensor with ``axes`` into the canonical
    layout ``[*one dim per atom of groups[0], prod(groups[1]), prod(groups[2])]``.

    groups = (batch atoms, row atoms, column atoms). Batch atoms the tensor lacks become
    size-1 dims (they broadcast); every atom of the last two groups must be present."""
    batch, rows, cols = (list(sizes.expand(tuple(g))) for g in groups)
    axes = sizes.expand_axes(axes)
    where = {}
    for d, axis in enumerate(axes):
        for a in axis:
            where[a] = d
    for a in [*rows, *cols]:
        if not broadcast_ok and a not in where and sizes.sizes.get(a, 1) != 1:
            raise NoMatch(f"{what} lacks its {a} axis")
    order: list[int] = []
    for group in (batch, rows, cols):
        for a in group:
            d = where.get(a)
            if d is not None and d not in order:
                order.append(d)
    # The atoms of each kept dim must be in canonical order and not mix groups.
    flat = [a for d in order for a in axes[d]]
    expected = [a for a in [*batch, *rows, *cols] if a in where]
    if flat != expected:
        raise NoMatch(f"{what} mixes logical axes within one dim")
    dropped = [d for d in range(len(axes)) if d not in order]
    if any(sizes.of(axes[d]) != 1 for d in dropped):
        raise NoMatch(f"{what} has an axis that is not part of attention")
    perm = order + dropped
    shape = [sizes.sizes[a] if a in where else 1 for a in batch]
    shape.append(math.prod(sizes.sizes[a] for a in rows if a in where) if rows else 1)
    shape.append(math.prod(sizes.sizes[a] for a in cols if a in where) if cols else 1)
    if not any(a in where for a in rows):
        shape[-2] = 1
    if not any(a in where for a in cols):
        shape[-1] = 1
    if broadcast_ok and any(a not in where for a in [*rows, *cols]) and not (
            all(a in where for a in rows) or not any(a in where for a in rows)):
        raise NoMatch(f"{what} covers part of the query axes")
    return perm, shape
