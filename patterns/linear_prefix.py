"""The exclusive prefix over chunks, Σ_{c' < c} x[c'], in the spellings chunked linear attention uses:
a cumsum shifted by one chunk with zeros (cat, pad + slice, pad(…, (1, -1)), either side of the cumsum) or the
cumsum minus the per-chunk state. An inclusive prefix (a bare cumsum) is refused with its reason: it counts
each chunk's own keys twice, once in the state and once inside the chunk."""

from __future__ import annotations

import torch
from torch.fx import Node

from .axes import NoMatch, shape_of
from .linear_readers import cumsum_of, is_call, is_zero, norm_dim, slice_range

aten = torch.ops.aten

PAD_OPS = {aten.pad.default, aten.constant_pad_nd.default}


def _pad_at(node) -> tuple[Node, int, int, int] | None:
    """A zero pad along one dim: (x, dim, before, after); None for any other pad."""
    if not is_call(node, *PAD_OPS):
        return None
    x, pad = node.args[:2]
    if node.target == aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if mode != "constant" or (value is not None and value != 0):
            return None
    else:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        if value != 0:
            return None
    shape = shape_of(x)
    if shape is None or len(pad) % 2 or any(not isinstance(p, int) for p in pad):
        return None
    padded = [(len(shape) - 1 - i // 2, pad[i], pad[i + 1]) for i in range(0, len(pad), 2) if pad[i] or pad[i + 1]]
    if len(padded) != 1:
        return None
    return x, *padded[0]


def _shift_of(node) -> tuple[Node, int, list[Node]] | None:
    """``node`` = y shifted by one step along d, zeros first (y[0 : L-1] after one zero slab):
    (y, d, the nodes that do it). Spelled cat([zeros, y[:-1]]), cat([zeros, y])[:L], pad(y)[:L],
    pad(y[:-1]) or pad(y, (1, -1))."""
    shape = shape_of(node)
    if shape is None:
        return None
    if is_call(node, aten.cat.default):
        parts = node.args[0]
        d = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape))
        if len(parts) == 2 and is_zero(parts[0]) and shape_of(parts[0])[d] == 1:
            sl = slice_range(parts[1])
            if sl is not None and sl[1] == d and sl[2] == 0 and sl[3] == shape_of(sl[0])[d] - 1:
                return sl[0], d, [node, parts[1]]
        return None
    sl = slice_range(node)
    if sl is not None:  # cat([zeros, y])[:L] or pad(y, before=1)[:L]
        inner, d, start, end = sl
        if start != 0 or end != shape[d] or end != shape_of(inner)[d] - 1:
            return None
        if is_call(inner, aten.cat.default):
            parts = inner.args[0]
            cd = norm_dim(inner.args[1] if len(inner.args) > 1 else inner.kwargs.get("dim", 0), len(shape))
            if cd == d and len(parts) == 2 and is_zero(parts[0]) and shape_of(parts[0])[d] == 1:
                return parts[1], d, [node, inner]
            return None
        pd = _pad_at(inner)
        if pd is not None and pd[1:] == (d, 1, 0):
            return pd[0], d, [node, inner]
        return None
    pd = _pad_at(node)
    if pd is not None:
        x, d, before, after = pd
        if (before, after) == (1, -1):
            return x, d, [node]
        sl = slice_range(x)
        if (before, after) == (1, 0) and sl is not None and sl[1] == d and sl[2] == 0 and \
                sl[3] == shape_of(sl[0])[d] - 1:
            return sl[0], d, [node, x]
    return None


def _shift_name(nodes: list[Node]) -> str:
    if any(is_call(n, aten.cat.default) for n in nodes):
        return "cat with zeros"
    return "pad + slice" if any(is_call(n, aten.slice.Tensor) for n in nodes) else "pad"


def exclusive_prefix(node) -> tuple[Node, int, list[Node], str]:
    """``node`` = Σ_{c' < c} x[c'] along a dim d: (x, d, the nodes that compute it, how it is spelled),
    or NoMatch with what it is instead (an inclusive prefix counts the chunk's own keys twice)."""
    if is_call(node, aten.sub.Tensor) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        cs = cumsum_of(node.args[0])
        if cs is not None and cs[0] is node.args[1]:
            return cs[0], cs[1], [node, node.args[0]], "cumsum − per-chunk state"
        raise NoMatch("the state the queries read is a difference, but not cumsum(x) − x")
    sh = _shift_of(node)
    if sh is not None:
        cs = cumsum_of(sh[0])
        if cs is not None and cs[1] == sh[1]:
            how = _shift_name(sh[2])
            return cs[0], cs[1], [*sh[2], sh[0]], f"cumsum shifted by one chunk ({how})"
        raise NoMatch("the state the queries read is shifted by one chunk, but is not a cumsum along that axis")
    cs = cumsum_of(node)
    if cs is not None:
        sh = _shift_of(cs[0])
        if sh is not None and sh[1] == cs[1]:
            how = _shift_name(sh[2])
            return sh[0], cs[1], [node, *sh[2]], f"cumsum of the states shifted by one chunk ({how})"
        raise NoMatch("the prefix over chunks is inclusive: each chunk's own keys are counted twice, once in "
                      "the state and once inside the chunk (an exclusive prefix is cat/pad-shifted or cumsum − x)")
    raise NoMatch("the state the queries read is not an exclusive prefix (cumsum) over the chunk axis")
