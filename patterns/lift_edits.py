"""Lifter rules for indexing and for in-place edits, which the functional capture
(rewrite/capture.py) turns into scatters: ``keep[:, 0] = True`` is ``select_scatter``,
``keep[2:4] = …`` ``slice_scatter``, ``keep.fill_diagonal_(…)`` ``as_strided_scatter`` of a fill,
``keep.diagonal().fill_(…)`` ``diagonal_scatter``, ``keep[idx] = …`` ``index_put``, ``dst.copy_(src)``
``copy``. Each is modelled exactly as a Piecewise over the written coordinates
(``select_scatter(base, src, dim, i) = Piecewise((src, Eq(c_dim, i)), (base, True))``), or raises
`Opaque`."""

from __future__ import annotations

import math

import sympy
import torch

from .constants import constant_value
from .lift_arith import select
from .lift_core import (
    RULES,
    Opaque,
    SymVal,
    arg,
    aten,
    broadcast,
    dtype_of,
    fold_piecewise,
    fresh,
    has_runtime,
    make,
    meta,
    runtime,
    shape_of,
    value,
)
from .lift_exact import convert, integer_bounds
from .lift_layout import slice_bounds

_INDEX_DTYPES = (torch.int64, torch.int32)
MAX_INDEX_PUT = 256  # written positions enumerated one by one


def _what(node) -> str:
    return f"{node.name} ({node.target})"


def _dim(d: int, rank: int) -> int:
    if not -rank <= d < max(rank, 1):
        raise Opaque(f"dim {d} out of range for rank {rank}")
    return d % max(rank, 1)


def _coords(shape) -> list:
    return [fresh() if s > 1 else sympy.Integer(0) for s in shape]


def _axes(coords, shape) -> tuple:
    return tuple(c if s > 1 else None for c, s in zip(coords, shape))


def _read(v: SymVal, coords) -> sympy.Basic:
    """v's expression at the given coordinate expressions (one per dim)."""
    return v.expr.xreplace({ax: c for ax, c in zip(v.axes, coords) if ax is not None})


def _piecewise(written, cond, base, dt) -> sympy.Basic:
    e = sympy.Piecewise((written, cond), (base, True))
    return fold_piecewise(e) if dt == torch.bool else e


def _src(node, env, i, dt) -> SymVal:
    v = value(node.args[i], env)
    return convert(v, dt, _what(node)) if v.dtype != dt else v


# ---------------------------------------------------------------- reads

def _contiguous_strides(node) -> list[int]:
    val = meta(node)
    if val is None or not val.is_contiguous() or val.storage_offset() != 0:
        raise Opaque(f"{getattr(node, 'name', node)}: as_strided of a tensor that is not contiguous from offset 0")
    shape = list(val.shape)
    return [math.prod(shape[d + 1:]) for d in range(len(shape))]


def _flat_to_coords(flat, shape, strides) -> list:
    return [sympy.floor(flat / st) if d == 0 else sympy.Mod(sympy.floor(flat / st), sz)
            for d, (sz, st) in enumerate(zip(shape, strides))]


def _as_strided(node, env):
    a = value(node.args[0], env)
    size, stride = list(node.args[1]), list(node.args[2])
    off = int(arg(node, 3, "storage_offset", 0) or 0)
    strides = _contiguous_strides(node.args[0])
    if any(s < 0 for s in stride) or off + sum((n - 1) * s for n, s in zip(size, stride)) >= math.prod(a.shape):
        raise Opaque(f"{_what(node)}: a view outside its base")
    k = _coords(size)
    flat = off + sum(c * s for c, s in zip(k, stride))
    return make(_read(a, _flat_to_coords(flat, a.shape, strides)), _axes(k, size), size, a.dtype)


def _diag_dims(node, rank, first):
    off = int(arg(node, first, "offset", 0))
    d1, d2 = _dim(arg(node, first + 1, "dim1", 0), rank), _dim(arg(node, first + 2, "dim2", 1), rank)
    if d1 == d2:
        raise Opaque("a diagonal of one dim")
    return off, d1, d2


def _diagonal(node, env):
    a = value(node.args[0], env)
    off, d1, d2 = _diag_dims(node, len(a.shape), 1)
    shape = shape_of(node)
    k = _coords(shape)
    rest = [d for d in range(len(a.shape)) if d not in (d1, d2)]
    coords = [None] * len(a.shape)
    for d, c in zip(rest, k[:-1]):
        coords[d] = c
    coords[d1], coords[d2] = k[-1] + max(-off, 0), k[-1] + max(off, 0)
    return make(_read(a, coords), _axes(k, shape), shape, a.dtype)


def _normalised_index(e, size: int, rng: dict):
    b = integer_bounds(e, rng) if e.is_integer else None
    if b is None or b[0] < -size or b[1] >= size:
        raise Opaque(f"an index {e} that may be out of range")
    if b[0] >= 0:
        return e
    if b[1] < 0:
        return e + size
    return sympy.Piecewise((e + size, e < 0), (e, True))


def _index(node, env):
    """``x[i0, i1, ...]`` with integer index tensors (numpy's advanced indexing: adjacent index
    dims stay in place, separated ones go first); negative indices count from the end."""
    src = value(node.args[0], env)
    indices = list(node.args[1])
    pos = [d for d, x in enumerate(indices) if x is not None]
    vals = [value(indices[d], env) for d in pos]
    if not pos or any(v.dtype not in _INDEX_DTYPES for v in vals):
        raise Opaque(f"{_what(node)}: an index that is not integer tensors")
    if any(has_runtime(v.expr) for v in vals):
        return runtime(node)  # a gather by run-time indices: the node's own values
    exprs, baxes, bshape = broadcast(*vals)
    rng = {ax: (0, s - 1) for ax, s in zip(baxes, bshape) if ax is not None}
    rank = len(src.shape)
    rest = [d for d in range(rank) if d not in pos]
    block = pos == list(range(pos[0], pos[-1] + 1))
    before = [d for d in rest if block and d < pos[0]]
    after = [d for d in rest if d not in before]
    shape = [src.shape[d] for d in before] + list(bshape) + [src.shape[d] for d in after]
    if tuple(shape) != shape_of(node):
        raise Opaque(f"{_what(node)}: index result shape {shape} is not {shape_of(node)}")
    kb, ka = _coords([src.shape[d] for d in before]), _coords([src.shape[d] for d in after])
    coords = [None] * rank
    for d, c in zip(before + after, kb + ka):
        coords[d] = c
    for d, e in zip(pos, exprs):
        coords[d] = _normalised_index(e, src.shape[d], rng)
    axes = _axes(kb, [src.shape[d] for d in before]) + baxes + _axes(ka, [src.shape[d] for d in after])
    return make(_read(src, coords), axes, shape, src.dtype)


# ---------------------------------------------------------------- scatters (in-place edits)

def _select_scatter(node, env):
    base = value(node.args[0], env)
    dt, shape = base.dtype, base.shape
    src = _src(node, env, 1, dt)
    dim = _dim(node.args[2], len(shape))
    idx = int(node.args[3])
    idx = idx + shape[dim] if idx < 0 else idx
    if not 0 <= idx < shape[dim]:
        raise Opaque(f"{_what(node)}: index out of range")
    c = _coords(shape)
    cond = sympy.Eq(c[dim], idx)
    written = _read(src, c[:dim] + c[dim + 1:])
    return make(_piecewise(written, cond, _read(base, c), dt), _axes(c, shape), shape, dt)


def _slice_scatter(node, env):
    base = value(node.args[0], env)
    dt, shape = base.dtype, base.shape
    src = _src(node, env, 1, dt)
    dim = _dim(arg(node, 2, "dim", 0), len(shape))
    start, end, step = slice_bounds(shape[dim], arg(node, 3, "start"), arg(node, 4, "end"), arg(node, 5, "step", 1))
    if src.shape[dim] != len(range(start, end, step)):
        raise Opaque(f"{_what(node)}: source length does not match the slice")
    c = _coords(shape)
    t = c[dim]
    cond = sympy.And(t >= start, t < end)
    k = t - start
    if step > 1:
        cond = sympy.And(cond, sympy.Eq(sympy.Mod(t - start, step), 0))
        k = sympy.floor((t - start) / step)
    written = _read(src, c[:dim] + [k] + c[dim + 1:])
    return make(_piecewise(written, cond, _read(base, c), dt), _axes(c, shape), shape, dt)


def _diagonal_scatter(node, env):
    base = value(node.args[0], env)
    dt, shape = base.dtype, base.shape
    src = _src(node, env, 1, dt)
    off, d1, d2 = _diag_dims(node, len(shape), 2)
    c = _coords(shape)
    rest = [c[d] for d in range(len(shape)) if d not in (d1, d2)]
    cond = sympy.Eq(c[d2] - c[d1], off)
    written = _read(src, rest + [c[d1] - max(-off, 0)])
    return make(_piecewise(written, cond, _read(base, c), dt), _axes(c, shape), shape, dt)


def _as_strided_scatter(node, env):
    """A 1-D strided view written back (``fill_diagonal_``): base flat index F is written when
    F = offset + stride·k for some 0 ≤ k < size."""
    base = value(node.args[0], env)
    dt, shape = base.dtype, base.shape
    src = _src(node, env, 1, dt)
    size, stride = list(node.args[2]), list(node.args[3])
    off = int(arg(node, 4, "storage_offset", 0) or 0)
    strides = _contiguous_strides(node.args[0])
    if len(size) != 1 or stride[0] < 1 or off < 0 or off + (size[0] - 1) * stride[0] >= math.prod(shape):
        raise Opaque(f"{_what(node)}: a strided write that is not one non-overlapping run inside the base")
    c = _coords(shape)
    flat = sum(x * s for x, s in zip(c, strides))
    cond = sympy.And(flat >= off, flat <= off + (size[0] - 1) * stride[0])
    if stride[0] > 1:
        cond = sympy.And(cond, sympy.Eq(sympy.Mod(flat - off, stride[0]), 0))
    written = _read(src, [sympy.floor((flat - off) / stride[0])])
    return make(_piecewise(written, cond, _read(base, c), dt), _axes(c, shape), shape, dt)


def _index_put(node, env):
    base = value(node.args[0], env)
    dt, shape = base.dtype, base.shape
    indices, vals = list(node.args[1]), value(node.args[2], env)
    if arg(node, 3, "accumulate", False):
        raise Opaque(f"{_what(node)}: an accumulating index_put")
    if math.prod(vals.shape) != 1:
        raise Opaque(f"{_what(node)}: index_put of more than one value")
    v = make(vals.expr, (), (), vals.dtype, vals.scalar)
    if len(indices) == 1 and indices[0] is not None and dtype_of(indices[0]) == torch.bool:
        mask = value(indices[0], env)  # keep[bool_mask] = v: masked_fill over the leading dims
        if len(mask.shape) > len(shape) or mask.shape != shape[:len(mask.shape)]:
            raise Opaque(f"{_what(node)}: a bool index of another shape")
        m = make(mask.expr, mask.axes + (None,) * (len(shape) - len(mask.shape)), shape, mask.dtype)
        return select(node, env, m, v, base, dt)
    if any(i is None for i in indices) or len(indices) > len(shape):
        raise Opaque(f"{_what(node)}: index_put with slices")
    consts = [constant_value(i) for i in indices]
    if any(x is None or x.dtype not in _INDEX_DTYPES for x in consts):
        raise Opaque(f"{_what(node)}: index_put at positions that are not constant integers")
    consts = torch.broadcast_tensors(*consts)
    if consts[0].numel() > MAX_INDEX_PUT:
        raise Opaque(f"{_what(node)}: index_put at more than {MAX_INDEX_PUT} positions")
    c = _coords(shape)
    hits = set()
    for tup in zip(*[x.reshape(-1).tolist() for x in consts]):
        tup = tuple(i + shape[d] if i < 0 else i for d, i in enumerate(tup))
        if any(not 0 <= i < shape[d] for d, i in enumerate(tup)):
            raise Opaque(f"{_what(node)}: index out of range")
        hits.add(tup)
    cond = sympy.Or(*[sympy.And(*[sympy.Eq(c[d], i) for d, i in enumerate(tup)]) for tup in sorted(hits)])
    full_v = make(v.expr, (None,) * len(shape), shape, v.dtype, v.scalar)
    cm = make(cond, _axes(c, shape), shape, torch.bool)
    return select(node, env, cm, full_v, base, dt)


def _copy(node, env):
    """copy(dst, src): src broadcast to dst's shape, cast to dst's dtype (dst's values unread)."""
    dst = value(node.args[0], env)
    src = value(node.args[1], env)
    if src.dtype != dst.dtype:
        try:
            src = convert(src, dst.dtype, _what(node))
        except Opaque:
            if has_runtime(src.expr):
                return runtime(node)
            raise
    shape = dst.shape
    lead = len(shape) - len(src.shape)
    if lead < 0 or any(s not in (1, d) for s, d in zip(src.shape, shape[lead:])):
        raise Opaque(f"{_what(node)}: copy of shape {src.shape} into {shape}")
    return make(src.expr, (None,) * lead + src.axes, shape, dst.dtype)


RULES.update({
    aten.as_strided.default: _as_strided, aten.diagonal.default: _diagonal, aten.index.Tensor: _index,
    aten.select_scatter.default: _select_scatter, aten.slice_scatter.default: _slice_scatter,
    aten.diagonal_scatter.default: _diagonal_scatter, aten.as_strided_scatter.default: _as_strided_scatter,
    aten.index_put.default: _index_put, aten.copy.default: _copy,
})
