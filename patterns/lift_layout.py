"""Lifter rules for tensors made from sizes (arange, full, eye) and for layout ops (views,
slices with Python's index normalisation, select, reshape, repeat, flip, cat, gather by index
tensors, as_strided on a contiguous base) and casts. Each op maps output coordinates to input
coordinates exactly; a case that is not modelled raises `Opaque`."""

from __future__ import annotations

import math

import sympy
import torch

from .lift_core import (
    RULES,
    Opaque,
    SymVal,
    arg,
    aten,
    constant,
    dtype_of,
    fold_piecewise,
    fresh,
    has_runtime,
    make,
    runtime,
    shape_of,
    value,
)
from .lift_exact import check, convert, stored


def _what(node) -> str:
    return f"{node.name} ({node.target})"


# ---------------------------------------------------------------- made from sizes

def _arange(node, env):
    if node.target == aten.arange.default:
        start, step = 0, 1
    else:
        start, step = arg(node, 0, "start", 0), arg(node, 2, "step", 1) if node.target == aten.arange.start_step else 1
    dt, (n,) = dtype_of(node), shape_of(node)
    i = fresh() if n > 1 else sympy.Integer(0)
    s0, st = constant(start).expr, constant(step).expr
    axes = (i if n > 1 else None,)
    if dt.is_floating_point:  # every term exact in dt: then torch's accumulation is exact too
        check(make(st * i, axes, (n,), dt), _what(node))
        check(make(s0, (), (), dt), _what(node))
    elif not (s0.is_integer and st.is_integer):
        raise Opaque(f"{_what(node)}: an integer arange with float arguments")
    return check(make(s0 + st * i, axes, (n,), dt), _what(node))


def _filled(node, env):
    t = node.target
    if t in (aten.full.default, aten.full_like.default):
        v = node.args[1]
    elif t == aten.new_full.default:
        v = node.args[2]
    elif t == aten.scalar_tensor.default:
        v = node.args[0]
    elif t in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.zero.default):
        v = 0
    else:
        v = 1
    return full(node, value(v, env), shape_of(node), dtype_of(node))


def full(node, v: SymVal, shape, dt) -> SymVal:
    """A tensor of one value (a scalar or a 0-dim tensor), as stored in ``dt``."""
    if v.shape and math.prod(v.shape) != 1:
        raise Opaque(f"{_what(node)}: a fill value that is not one element")
    if dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) and not v.expr.is_integer and \
            not (v.dtype == torch.bool or isinstance(v.scalar, bool)):
        raise Opaque(f"{_what(node)}: a non-integer value written into a {dt} tensor")
    if has_runtime(v.expr) and v.dtype != dt:
        return runtime(node)
    c = convert(stored(make(v.expr, (), (), v.dtype, v.scalar), dt), dt, _what(node))
    return make(c.expr, (None,) * len(shape), shape, dt)


def _fill(node, env):
    """fill.Scalar / fill.Tensor (the functional form of ``x.fill_(v)``): the input's values are
    not read."""
    return full(node, value(node.args[1], env), shape_of(node), dtype_of(node))


def _eye(node, env):
    n, m = shape_of(node)
    i, j = (fresh() if n > 1 else sympy.Integer(0)), (fresh() if m > 1 else sympy.Integer(0))
    e = sympy.Eq(i, j)
    dt = dtype_of(node)
    e = e if dt == torch.bool else sympy.Piecewise((sympy.Integer(1), e), (sympy.Integer(0), True))
    return make(e, (i if n > 1 else None, j if m > 1 else None), (n, m), dt)


def _lift_fresh_copy(node, env):
    """A constant the trace captured (``keep[:, 0] = True`` stores ``True`` as ``_tensor_constant0``):
    a one-element constant is its value; a larger one is a run-time tensor."""
    src = node.args[0]
    if isinstance(src, torch.fx.Node) and src.op == "get_attr":
        obj = src.graph.owning_module
        for part in src.target.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor) and obj.numel() == 1 and obj.dim() == 0:
            c = constant(obj.item())
            return convert(make(c.expr, (), (), obj.dtype if not obj.dtype.is_complex else None, c.scalar),
                           dtype_of(node), _what(node))
        return runtime(node)
    return _cast(node, env)


# ---------------------------------------------------------------- casts and aliases

def _cast(node, env):
    a = value(node.args[0], env)
    dt = dtype_of(node)
    if a.shape != shape_of(node):
        raise Opaque(f"{_what(node)}: a copy that changes the shape")
    if a.dtype == dt:
        return a
    try:
        return convert(a, dt, _what(node))
    except Opaque:
        if has_runtime(a.expr):
            return runtime(node)
        raise


# ---------------------------------------------------------------- views

def _dim(d: int, rank: int) -> int:
    if not -rank <= d < max(rank, 1):
        raise Opaque(f"dim {d} out of range for rank {rank}")
    return d % rank if rank else 0


def _index_norm(i: int, size: int) -> int:
    """Python's normalisation of a single index (an error in eager when out of range)."""
    j = i + size if i < 0 else i
    if not 0 <= j < size:
        raise Opaque(f"index {i} out of range for size {size}")
    return j


def slice_bounds(size: int, start, end, step) -> tuple[int, int, int]:
    """Python's slice normalisation (what torch's slice does): negative bounds count from the
    end, then both are clamped to [0, size]; an empty slice when end ≤ start."""
    step = 1 if step is None else int(step)
    if step < 1:
        raise Opaque(f"a slice step {step}")
    start = 0 if start is None else int(start)
    end = size if end is None else int(end)
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    return start, max(end, start), step


def _substitute(a: SymVal, dim: int, coord) -> sympy.Basic:
    ax = a.axes[dim]
    return a.expr if ax is None else a.expr.xreplace({ax: coord})


def _slice(node, env):
    a = value(node.args[0], env)
    dim = _dim(arg(node, 1, "dim", 0), len(a.shape))
    start, end, step = slice_bounds(a.shape[dim], arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1))
    shape = shape_of(node)
    if shape[dim] != len(range(start, end, step)):
        raise Opaque(f"{_what(node)}: slice length {shape[dim]} is not {len(range(start, end, step))}")
    new = fresh() if shape[dim] > 1 else sympy.Integer(0)
    axes = list(a.axes)
    axes[dim] = new if shape[dim] > 1 else None
    return make(_substitute(a, dim, start + step * new), axes, shape, a.dtype)


def _narrow(node, env):
    a = value(node.args[0], env)
    dim = _dim(node.args[1], len(a.shape))
    size, length = a.shape[dim], int(node.args[3])
    start = int(node.args[2])
    start = start + size if start < 0 else start
    if not (0 <= start and start + length <= size):
        raise Opaque(f"{_what(node)}: narrow out of range")
    new = fresh() if length > 1 else sympy.Integer(0)
    axes = list(a.axes)
    axes[dim] = new if length > 1 else None
    return make(_substitute(a, dim, start + new), axes, shape_of(node), a.dtype)


def _select(node, env):
    a = value(node.args[0], env)
    dim = _dim(node.args[1], len(a.shape))
    idx = _index_norm(int(node.args[2]), a.shape[dim])
    expr = _substitute(a, dim, sympy.Integer(idx))
    return make(expr, a.axes[:dim] + a.axes[dim + 1:], a.shape[:dim] + a.shape[dim + 1:], a.dtype)


def _unsqueeze(node, env):
    a = value(node.args[0], env)
    d = node.args[1]
    d = d + len(a.axes) + 1 if d < 0 else d
    return make(a.expr, (*a.axes[:d], None, *a.axes[d:]), shape_of(node), a.dtype)


def _expand(node, env):
    a = value(node.args[0], env)
    shape = shape_of(node)
    lead = len(shape) - len(a.axes)
    return make(a.expr, (None,) * lead + a.axes, shape, a.dtype)


def _permute(node, env):
    a = value(node.args[0], env)
    rank = len(a.axes)
    t = node.target
    if t == aten.permute.default:
        order = [_dim(d, rank) for d in node.args[1]]
    else:
        order = list(range(rank))
        d0, d1 = node.args[1:3] if t == aten.transpose.int else (0, 1)
        if rank >= 2 or t == aten.transpose.int:
            d0, d1 = _dim(d0, rank), _dim(d1, rank)
            order[d0], order[d1] = order[d1], order[d0]
    return make(a.expr, tuple(a.axes[d] for d in order), tuple(a.shape[d] for d in order), a.dtype)


def _reshape_rule(node, env):
    return reshape(value(node.args[0], env), shape_of(node))


def reshape(a: SymVal, shape: tuple[int, ...]) -> SymVal:
    """A row-major reshape: dims are grouped into runs of equal extent; inside a run the flat
    index F = Σ new_j · stride_j gives each old coordinate as ⌊F / stride_i⌋ mod size_i."""
    old = [(ax, sz) for ax, sz in zip(a.axes, a.shape) if sz != 1]
    new_sizes = [sz for sz in shape if sz != 1]
    if math.prod(sz for _, sz in old) != math.prod(new_sizes) or 0 in a.shape:
        raise Opaque("a reshape of another size (or of an empty tensor)")
    subs, new_axes, i, j = {}, [], 0, 0
    while i < len(old) or j < len(new_sizes):
        oi, nj = i + 1, j + 1
        po, pn = old[i][1] if i < len(old) else 1, new_sizes[j] if j < len(new_sizes) else 1
        while po != pn:  # grow the smaller side until both runs cover the same extent
            if po < pn:
                po *= old[oi][1]
                oi += 1
            else:
                pn *= new_sizes[nj]
                nj += 1
        syms = [fresh() for _ in range(j, nj)]
        flat = sum(sym * math.prod(new_sizes[t + 1:nj]) for sym, t in zip(syms, range(j, nj)))
        for t in range(i, oi):
            ax, sz = old[t]
            if ax is not None:
                stride = math.prod(o[1] for o in old[t + 1:oi])
                coord = sympy.floor(flat / stride) if stride > 1 else flat
                subs[ax] = coord if t == i else sympy.Mod(coord, sz)
        new_axes += syms
        i, j = oi, nj
    it = iter(new_axes)
    axes = tuple(next(it) if sz != 1 else None for sz in shape)
    return make(a.expr.xreplace(subs), axes, tuple(shape), a.dtype)


def _repeat_interleave(node, env):
    """repeat_interleave(x, r, dim): out[.., j, ..] = x[.., ⌊j / r⌋, ..]."""
    a = value(node.args[0], env)
    reps, dim = node.args[1], arg(node, 2, "dim")
    if not isinstance(reps, int) or reps < 1:
        raise Opaque("repeat_interleave without a positive int count")
    if dim is None:
        if len(a.shape) != 1:
            raise Opaque("repeat_interleave of a flattened tensor")
        dim = 0
    dim = _dim(dim, len(a.shape))
    shape = shape_of(node)
    new = fresh() if shape[dim] > 1 else sympy.Integer(0)
    axes = list(a.axes)
    axes[dim] = new if shape[dim] > 1 else None
    return make(_substitute(a, dim, sympy.floor(new / reps)), axes, shape, a.dtype)


def _repeat(node, env):
    """repeat(x, reps): out[j] = x[j mod size] along each dim, new leading dims broadcast."""
    a = value(node.args[0], env)
    shape = shape_of(node)
    lead = len(shape) - len(a.shape)
    axes, subs = [None] * lead, {}
    for d, (ax, sz) in enumerate(zip(a.axes, a.shape)):
        new = fresh() if shape[lead + d] > 1 else None
        if ax is not None:
            subs[ax] = sympy.Mod(new, sz) if new is not None else sympy.Integer(0)
        axes.append(new if ax is not None else None)
    return make(a.expr.xreplace(subs), axes, shape, a.dtype)


def _flip(node, env):
    a = value(node.args[0], env)
    subs = {}
    for d in node.args[1]:
        d = _dim(d, len(a.shape))
        if a.axes[d] is not None:
            subs[a.axes[d]] = a.shape[d] - 1 - a.axes[d]
    return make(a.expr.xreplace(subs), a.axes, a.shape, a.dtype)


def _cat(node, env):
    """cat along dim: output coordinate t reads part k at t − offset_k where it falls in it."""
    shape, dt = shape_of(node), dtype_of(node)
    dim = _dim(arg(node, 1, "dim", 0), len(shape))
    parts = [value(x, env) for x in node.args[0]]
    parts = [convert(p, dt, _what(node)) for p in parts if math.prod(p.shape) > 0]
    if any(len(p.shape) != len(shape) for p in parts) or sum(p.shape[dim] for p in parts) != shape[dim]:
        raise Opaque(f"{_what(node)}: cat of tensors of other ranks or sizes")
    axes = [fresh() if sz > 1 else None for sz in shape]
    t = axes[dim] if axes[dim] is not None else sympy.Integer(0)
    pieces, offset = [], 0
    for p in parts:
        subs = {ax: (t - offset if d == dim else axes[d]) for d, ax in enumerate(p.axes) if ax is not None}
        offset += p.shape[dim]
        pieces.append((p.expr.xreplace(subs), sympy.Lt(t, offset)))
    expr = sympy.Piecewise(*pieces[:-1], (pieces[-1][0], True)) if len(pieces) > 1 else pieces[0][0]
    return make(fold_piecewise(expr) if dt == torch.bool else expr, axes, shape, dt)


for _op in (aten.arange.default, aten.arange.start, aten.arange.start_step):
    RULES[_op] = _arange
for _op in (aten.ones.default, aten.zeros.default, aten.full.default, aten.ones_like.default, aten.zeros_like.default,
            aten.full_like.default, aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
            aten.scalar_tensor.default, aten.zero.default):
    RULES[_op] = _filled
for _op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
            aten.squeeze.default, aten.squeeze.dims):
    RULES[_op] = _reshape_rule
for _op in (aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default, aten.to.dtype,
            aten.to.dtype_layout, aten.to.device, aten.detach.default, aten.type_as.default):
    RULES[_op] = _cast
RULES.update({
    aten.fill.Scalar: _fill, aten.fill.Tensor: _fill, aten.eye.default: _eye, aten.eye.m: _eye,
    aten.lift_fresh_copy.default: _lift_fresh_copy, aten.slice.Tensor: _slice, aten.narrow.default: _narrow,
    aten.select.int: _select, aten.unsqueeze.default: _unsqueeze, aten.expand.default: _expand,
    aten.permute.default: _permute, aten.transpose.int: _permute, aten.t.default: _permute,
    aten.repeat_interleave.self_int: _repeat_interleave, aten.repeat.default: _repeat, aten.flip.default: _flip,
    aten.cat.default: _cat,
})
