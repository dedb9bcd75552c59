"""What a chain of slice assignments computes, in one canonical form: the pieces the result shows.

The capture is functional, so ``o[:, :, a:b] = x`` written once per chunk reaches the recognisers as

    o1 = slice_scatter(o0, copy(slice(o0, d, a0, b0), x0), d, a0, b0)
    o2 = slice_scatter(o1, copy(slice(o1, d, a1, b1), x1), d, a1, b1)   …

where ``copy(dst, x)`` is x cast to dst's dtype and broadcast to dst's shape (dst's values are not read).
`slice_writes` reads such a chain along one dim back to its base as the writes in program order.
Position t along d of the last node then holds the value of the *last* write whose range covers t, or the
base's value where no write does. `tiling` turns that into pieces: when every write that is seen at all is
seen whole and together they cover [0, size), the result is exactly ``cat(pieces, d)`` in position order
and the base's values are never read. Otherwise it says what the graph computes instead: a write partly
overwritten by a later one (chunks that overlap), or positions no write covers (a gap, which keeps the
base's values). A write that later writes overwrite entirely never reaches the result and is dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import Node

from .axes import dtype_of, shape_of
from .linear_readers import is_call, norm_dim

aten = torch.ops.aten


@dataclass(frozen=True)
class Write:
    start: int
    end: int
    value: Node  # what was written, before the cast/broadcast of the copy
    exact: bool  # written as it is (same dtype and shape as the slice it lands in)


@dataclass
class SliceWrites:
    base: Node
    dim: int
    size: int
    writes: list[Write]  # program order
    nodes: list[Node]  # the scatters, the copies and the slices they copy into


def _scatter(node) -> tuple[Node, Node, int, int, int] | None:
    """``slice_scatter(base, src, d, a, b)`` with step 1: (base, src, d, a, b), 0 ≤ a ≤ b ≤ size."""
    if not is_call(node, aten.slice_scatter.default):
        return None
    base, src = node.args[:2]
    shape = shape_of(base)
    if shape is None or not isinstance(src, Node):
        return None
    get = (lambda i, k, default: node.args[i] if len(node.args) > i else node.kwargs.get(k, default))
    if get(5, "step", 1) != 1:
        return None
    d = norm_dim(get(2, "dim", 0), len(shape))
    size = shape[d]

    def norm(i, default):
        if i is None:
            return default
        i = i + size if i < 0 else i
        return min(max(i, 0), size)

    a, b = norm(get(3, "start", None), 0), norm(get(4, "end", None), size)
    return base, src, d, a, max(a, b)


def continues(node: Node) -> bool:
    """Is ``node`` the base of a further slice write along the same dim (not the last of its chain)?"""
    here = _scatter(node)
    return here is not None and any((s := _scatter(u)) is not None and s[0] is node and s[2] == here[2]
                                    for u in node.users)


def slice_writes(node) -> SliceWrites | None:
    """The chain of slice writes along one dim that ends at ``node``, read back to its base."""
    first = _scatter(node)
    if first is None:
        return None
    d = first[2]
    writes: list[Write] = []
    nodes: list[Node] = []
    cur = node
    while (s := _scatter(cur)) is not None and s[2] == d:
        base, src, _, a, b = s
        nodes.append(cur)
        value, exact = src, dtype_of(src) == dtype_of(base)
        if is_call(src, aten.copy.default) and isinstance(src.args[1], Node):
            dst, value = src.args[:2]
            nodes.extend([src, dst])
            exact = dtype_of(value) == dtype_of(src) and shape_of(value) == shape_of(src)
        writes.append(Write(a, b, value, exact))
        cur = base
    return SliceWrites(cur, d, shape_of(cur)[d], list(reversed(writes)), nodes)


@dataclass
class Tiling:
    pieces: list[Write]  # the writes the result shows, in position order
    problem: str | None  # why the result is not cat(pieces): None when it is


def _runs(owner: list[int], who: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for t, o in enumerate([*owner, None]):
        if o == who and start is None:
            start = t
        elif o != who and start is not None:
            runs.append((start, t))
            start = None
    return runs


def tiling(sw: SliceWrites) -> Tiling:
    """Which write each position shows (the last one covering it), as pieces, and whether that is a cat."""
    owner = [-1] * sw.size
    for i, w in enumerate(sw.writes):
        owner[w.start:w.end] = [i] * (w.end - w.start)
    seen = {i: c for i, c in Counter(owner).items() if i >= 0}
    pieces = sorted((w for i, w in enumerate(sw.writes) if i in seen), key=lambda w: w.start)
    problem = None
    partial = [i for i in sorted(seen) if seen[i] != sw.writes[i].end - sw.writes[i].start]
    gaps = _runs(owner, -1)
    if partial:
        w = sw.writes[partial[0]]
        t = next(t for t in range(w.start, w.end) if owner[t] != partial[0])
        u = next((u for u in range(t, w.end) if owner[u] != owner[t]), w.end)
        later = sw.writes[owner[t]]
        problem = (f"the chunks overlap: the write of [{later.start}, {later.end}) overwrites positions "
                   f"[{t}, {u}) of the earlier write of [{w.start}, {w.end})")
    elif gaps:
        a, b = gaps[0]
        problem = (f"the chunks leave a gap: no chunk is written to positions [{a}, {b}), which keep the "
                   "buffer's initial values")
    elif not all(w.exact for w in pieces):
        problem = "a chunk is written into the output buffer with a cast or a broadcast"
    return Tiling(pieces, problem)
