"""What a mask keeps: the mask specification and the one keep predicate.

A ``MaskSpec`` names a mask's positional structure; ``spec_keep`` is the one definition of
which (query p, key m) pairs it keeps. Proofs (passes/mask_classes.py) compare lifted
predicates with it, the CPU tiles and the Triton launch planners visit what it keeps
(``axis_interval``), the run-time re-checks test tensors against it, and tests use it as the
reference for every kernel. It works on NumPy arrays and on torch tensors alike.

Families (REFERENCES.md, "Mask families"), over a token grid of 1, 2 or 3 axes flattened
row-major (coordinate a of flat index x is ``(x // stride_a) % size_a``); a pair is kept when
every axis keeps its coordinates. Per axis, the keys a query coordinate q keeps form one
arithmetic progression ``{lo(q), lo(q) + step, …, hi(q)}`` (empty when lo > hi), already
clipped to the key range [0, keys):

- ``window`` (half-width w *in positions*, dilation d, 1-D ``offset``): c = q + offset, keys
  ≡ c (mod d) in [c − w, c + w], or [c − w, c] when causal. NATTEN's causal kernel k with
  dilation d is the window (k − 1)·d.
- ``clamped`` (NATTEN kernel k, dilation d, GNA stride s): r = q mod d, i = q // d,
  L_r = ⌈(size − r) / d⌉, leader = min((i // s)·s + (s − 1)//2, L_r − 1),
  start = min(max(leader − k//2, 0), L_r − k): keys r + d·j for max(start, 0) ≤ j ≤
  min(start + k, L_r) − 1. Needs L_r ≥ k (the classifier checks it).
- ``blocked`` (HaloNet, block B, halo h): [B·⌊q/B⌋ − h, B·⌊q/B⌋ + B − 1 + h].
- ``causal``: m ≤ p + offset; ``dense``: everything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("dense", "causal", "neighborhood", "blocked", "arbitrary")


@dataclass(frozen=True)
class MaskSpec:
    """What a mask is. kind: "dense" (nothing masked), "causal" (m <= p + offset),
    "neighborhood" / "blocked" (per-axis rules over ``grid``, a token grid flattened row-major),
    "arbitrary" (anything else: the block-sparse path). ``runtime`` marks a run-time tensor factor
    (padding) that the kernel still applies.

    Per-axis tuples (one entry per grid axis): ``window`` is a half-width in positions for a
    sliding axis and NATTEN's kernel size for a ``clamped`` axis; ``dilation``, ``causal``,
    ``clamped``, ``stride`` (GNA), ``block`` and ``halo`` (HaloNet, in key positions). In 1-D
    ``offset`` shifts the window: t = p + offset − m. ``density``: the exact kept fraction for the
    sizes classified with; ``proof``: how the class was established ("symbolic", "per-axis",
    "exhaustive", "first-call value, re-checked per tensor")."""

    kind: str
    predicate: str = "True"
    offset: int = 0
    runtime: bool = False
    density: float = 1.0
    grid: tuple | None = None
    window: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    causal: tuple[bool, ...] = ()
    clamped: tuple[bool, ...] = ()
    stride: tuple[int, ...] = ()
    block: tuple[int, ...] = ()
    halo: tuple[int, ...] = ()
    proof: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MaskSpec: unknown kind {self.kind!r}; use one of {KINDS}")

    def describe(self) -> str:
        rt = " & run-time tensor" if self.runtime else ""
        if self.kind == "dense":
            return "none" if not self.runtime else "run-time tensor"
        if self.kind == "causal":
            return "causal m <= p" + (f" + {self.offset}" if self.offset else "") + rt
        if self.kind in ("neighborhood", "blocked"):
            fields = ["grid", "window", "dilation", "causal", "clamped", "stride", "block", "halo"]
            # Only what differs from the plain default (dilation and stride 1, no flags).
            shown = {f: getattr(self, f) for f in fields
                     if any(v not in (None, 0, 1, False) or (f not in ("dilation", "stride") and v == 1)
                            for v in getattr(self, f) or ())}
            if self.offset:
                shown["offset"] = self.offset
            args = ", ".join(f"{k}={v}" for k, v in shown.items())
            dens = f" density={self.density:.4g}" if self.grid and self.grid[0] is not None else ""
            return f"{self.kind}({args}){dens}{rt}"
        return f"arbitrary: {self.predicate}"

    # The structural fields travel through the custom op as one string (ops take no objects).
    STRUCTURE = ("kind", "offset", "grid", "window", "dilation", "causal", "clamped", "stride", "block", "halo")

    def to_json(self) -> str:
        return json.dumps({f: getattr(self, f) for f in self.STRUCTURE})

    @classmethod
    def from_json(cls, text: str) -> MaskSpec:
        d = json.loads(text)
        return cls(**{f: tuple(v) if isinstance(v, list) else v for f, v in d.items()})

    @property
    def ideal_speedup(self) -> float:
        """GNA's speed-of-light model: dense time × kept fraction, as a speedup over dense."""
        return 1.0 / self.density if self.density > 0 else float("inf")


@dataclass(frozen=True)
class Axis:
    """One grid axis's rule (see the module docstring)."""

    kind: str  # "window" | "clamped" | "blocked"
    window: int = 0  # half-width (window), kernel size (clamped), unused (blocked)
    dilation: int = 1
    causal: bool = False
    stride: int = 1
    block: int = 0
    halo: int = 0


def axes_of(spec: MaskSpec) -> list[Axis]:
    kinds = ["blocked" if spec.block and spec.block[a] else "clamped" if spec.clamped[a] else "window"
             for a in range(len(spec.grid))]
    return [Axis(kd, spec.window[a], spec.dilation[a], spec.causal[a], spec.stride[a],
                 spec.block[a] if spec.block else 0, spec.halo[a] if spec.halo else 0)
            for a, kd in enumerate(kinds)]


# ---- array helpers that work on NumPy arrays and torch tensors alike ------------------------
def _at_least(x, lo):
    return x.clamp(min=lo) if isinstance(x, torch.Tensor) else np.maximum(x, lo)


def _at_most(x, hi):
    return x.clamp(max=hi) if isinstance(x, torch.Tensor) else np.minimum(x, hi)


def _smaller(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        a, b = torch.broadcast_tensors(a, b)
        return torch.minimum(a, b)
    return np.minimum(a, b)


def _where(c, a, b):
    return torch.where(c, a, b) if isinstance(c, torch.Tensor) else np.where(c, a, b)


def axis_interval(ax: Axis, q, size: int, keys: int, offset: int = 0):
    """(lo, hi, step) of the keys that query coordinates ``q`` (int64 array or tensor) keep on one
    axis. ``size``: the axis length (NATTEN's L_r comes from it), ``keys``: the number of key
    coordinates (differs from size only in 1-D), ``offset``: the 1-D window shift."""
    if ax.kind == "window":
        d = ax.dilation
        c = q + offset
        lo = _at_least(c - ax.window, 0)
        hi = _at_most(c if ax.causal else c + ax.window, keys - 1)
        lo = lo + (c - lo) % d  # first key ≥ lo on c's residue class
        hi = hi - (hi - c) % d  # last key ≤ hi on it
        return lo, hi, d
    if ax.kind == "blocked":
        first = (q // ax.block) * ax.block
        return _at_least(first - ax.halo, 0), _at_most(first + ax.block - 1 + ax.halo, keys - 1), 1
    if ax.kind != "clamped":
        raise ValueError(f"unknown axis kind {ax.kind!r}")
    d, k = ax.dilation, ax.window
    r, i = q % d, q // d
    length = (size - r + d - 1) // d
    leader = _smaller((i // ax.stride) * ax.stride + (ax.stride - 1) // 2, length - 1)
    start = _smaller(_at_least(leader - k // 2, 0), length - k)
    lo = _at_least(start, 0) * d + r
    hi = (_smaller(start + k, length) - 1) * d + r
    top = keys - 1
    hi = _where(hi > top, top - (top - r) % d, hi)  # M < size (1-D only): last key < M
    return lo, hi, d


def in_interval(lo, hi, step: int, key):
    """key ∈ {lo, lo + step, …, hi} (broadcast)."""
    kept = (key >= lo) & (key <= hi)
    return kept if step == 1 else kept & ((key - lo) % step == 0)


def axis_keep(ax: Axis, q, key, size: int, keys: int, offset: int = 0):
    """The axis rule on coordinate arrays (broadcast)."""
    lo, hi, step = axis_interval(ax, q, size, keys, offset)
    return in_interval(lo, hi, step, key)


def grid_of(spec: MaskSpec, n: int, m: int) -> tuple[int, ...]:
    """The spec's token grid for n queries and m keys (a 1-D grid of unknown length is n)."""
    grid = tuple(spec.grid or (None,))
    if len(grid) == 1:
        if grid[0] not in (None, n):
            raise ValueError(f"mask spec {spec.describe()} is for {grid[0]} queries, got {n}")
        return (n,)
    if math.prod(grid) != n or n != m:
        raise ValueError(f"mask spec {spec.describe()} is for a grid {grid} ({math.prod(grid)} tokens), "
                         f"got {n} queries and {m} keys")
    return grid


def coords(x, grid: tuple[int, ...]) -> list:
    """Row-major grid coordinates of flat positions."""
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    return [(x // s) % g if a else x // s for a, (s, g) in enumerate(zip(strides, grid))]


def spec_keep(spec: MaskSpec, p, k, n: int, m: int):
    """THE keep predicate: is key position ``k`` kept for query position ``p`` (broadcast int64
    arrays or tensors, 0 ≤ p < n, 0 ≤ k < m)? "arbitrary" has no closed form (its mask is a tensor)."""
    if spec.kind == "dense":
        shape = np.broadcast_shapes(tuple(p.shape), tuple(k.shape))
        return (torch.ones(shape, dtype=torch.bool, device=p.device) if isinstance(p, torch.Tensor)
                else np.ones(shape, dtype=bool))
    if spec.kind == "causal":
        return k <= p + spec.offset
    if spec.kind not in ("neighborhood", "blocked"):
        raise ValueError(f"no closed-form keep predicate for a {spec.kind!r} mask spec")
    grid = grid_of(spec, n, m)
    axes = axes_of(spec)
    if len(grid) == 1:
        return axis_keep(axes[0], p, k, n, m, spec.offset)
    out = None
    for ax, g, qc, kc in zip(axes, grid, coords(p, grid), coords(k, grid)):
        cur = axis_keep(ax, qc, kc, g, g)
        out = cur if out is None else out & cur
    return out


def keep_rows(spec: MaskSpec, r0: int, r1: int, n: int, m: int, device=None) -> torch.Tensor:
    """Rows r0:r1 of the [n, m] bool keep mask of a spec."""
    p = torch.arange(r0, r1, dtype=torch.int64, device=device)[:, None]
    k = torch.arange(m, dtype=torch.int64, device=device)[None, :]
    if spec.kind == "arbitrary":
        raise ValueError("an arbitrary mask is its tensor: it has no rows of its own")
    return spec_keep(spec, p, k, n, m).expand(r1 - r0, m)


def keep_matrix(spec: MaskSpec, n: int, m: int, device=None) -> torch.Tensor:
    """The whole [n, m] bool keep mask (references and materialising paths only)."""
    return keep_rows(spec, 0, n, n, m, device)


# ---- closed-form counts (no N×M work) ----------------------------------------------------------
def _axis_row_counts(ax: Axis, rows: int, keys: int, size: int, offset: int) -> np.ndarray:
    """Kept keys per query row of one axis."""
    lo, hi, step = axis_interval(ax, np.arange(rows, dtype=np.int64), size, keys, offset)
    return np.where(hi >= lo, (hi - lo) // step + 1, 0)


def row_counts(spec: MaskSpec, n: int, m: int) -> np.ndarray | None:
    """Kept keys of every query row (1-D and causal specs; None for grids, see ``kept_count``)."""
    if spec.kind == "dense":
        return np.full(n, m, dtype=np.int64)
    if spec.kind == "causal":
        return np.clip(np.arange(n, dtype=np.int64) + spec.offset + 1, 0, m)
    grid = grid_of(spec, n, m)
    if len(grid) != 1:
        return None
    return _axis_row_counts(axes_of(spec)[0], n, m, n, spec.offset)


def kept_count(spec: MaskSpec, n: int, m: int) -> int:
    """Exact number of kept (p, m) pairs; the axes of a grid multiply."""
    counts = row_counts(spec, n, m)
    if counts is not None:
        return int(counts.sum())
    grid = grid_of(spec, n, m)
    return math.prod(int(_axis_row_counts(ax, g, g, g, 0).sum()) for ax, g in zip(axes_of(spec), grid))


def has_empty_rows(spec: MaskSpec, n: int, m: int) -> bool:
    """Does some query keep no key at all? (Eager gives such a row NaN with a −inf fill but the
    average of v with a finite one.)"""
    if n == 0:
        return False
    if m == 0:
        return True
    if spec.kind == "arbitrary":
        raise ValueError("an arbitrary mask's rows are known from its tensor only")
    counts = row_counts(spec, n, m)
    if counts is not None:
        return bool((counts == 0).any())
    return any(bool((_axis_row_counts(ax, g, g, g, 0) == 0).any())
               for ax, g in zip(axes_of(spec), grid_of(spec, n, m)))


def check_causal(mask: torch.Tensor, offset: int) -> bool:
    """Does the bool tensor ``mask`` [.., N, M] (True = kept) keep exactly m <= p + offset?"""
    n, m = mask.shape[-2], mask.shape[-1]
    want = keep_matrix(MaskSpec("causal", offset=offset), n, m, mask.device)
    return bool(torch.equal(mask.to(torch.bool), want.expand_as(mask)))
