"""Classify a lifted keep predicate into a structured ``MaskSpec``, and prove it.

Families (REFERENCES.md, "Mask families"), over a token grid of 1, 2 or 3 axes flattened
row-major (coordinate a of flat index x is ``(x // stride_a) % size_a``); every axis has
its own rule and a position is kept when every axis keeps it:

- ``window``: t = q + offset − k (offset only in 1-D, where N may differ from M);
  kept when t ≡ 0 (mod dilation) and |t| ≤ window, or 0 ≤ t ≤ window when causal.
  ``window`` is a half-width *in positions* (so NATTEN causal kernel k, dilation d is
  window (k − 1)·d).
- ``clamped`` (NATTEN): ``window`` is the kernel size k. Positions split by residue
  r = q mod d; inside the group, with L_r members, index i = q // d, the leader is
  min((i // s)·s + (s − 1)//2, L_r − 1) (GNA stride s: the queries of a stride group
  share one window; s = 1 is plain NATTEN) and start = min(max(leader − k//2, 0), L_r − k);
  keys k ≡ r (mod d) with start ≤ k // d < start + k are kept. Needs L_r ≥ k.
- ``blocked`` (HaloNet): block B, halo h: B·⌊q/B⌋ − h ≤ k ≤ B·⌊q/B⌋ + B − 1 + h.

Nothing is guessed. Parameters are read off the predicate's values, then a classification
is accepted only when (a) where feasible (1-D translation-invariant bands), a symbolic
proof over all integers, and (b) always when sizes are given, an exhaustive vectorised
comparison of the spec's canonical predicate with the lifted one on the full N×M grid.
Above ``EXHAUSTIVE_LIMIT`` entries the comparison covers every row near an axis edge plus a
seeded random sample of rows, and ``proof`` says "sampled".
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import reduce

import numpy as np
import sympy

from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM
from rewrite.ir.mask import Axis, MaskSpec, axes_of, axis_keep, coords, kept_count, spec_keep

EXHAUSTIVE_LIMIT = 10**8  # N·M above this: sampled rows (stated in MaskSpec.proof)
_CHUNK = 1 << 21  # entries evaluated at once, so intermediates stay small


def band_of_tensor(keep) -> MaskSpec | None:
    """The 1-D window a bool mask tensor ``keep`` [.., N, N] holds, read from its values (the same
    for every batch and head): row i keeps exactly the keys i − a … i + b clipped to [0, N), with
    a, b ≥ 0. As a spec: |i + offset − j| ≤ w with w = (a + b) / 2, offset = (b − a) / 2 (a + b
    even), or the causal window a when b = 0. None when it is not such a band. A value seen once,
    not a proof: the op re-checks each new tensor (codegen/sparse_ops.py, ``mask_within_spec``)."""
    import torch

    n, m = keep.shape[-2:]
    if n != m or n < 2 or keep.dtype != torch.bool:
        return None
    k2 = keep.reshape(-1, n, m)
    k = k2[0]
    if k2.shape[0] > 1 and not bool((k2 == k).all()):
        return None
    counts = k.sum(-1)
    if not bool((counts > 0).all()):
        return None
    k8 = k.to(torch.uint8)
    first = k8.argmax(-1)
    last = (m - 1) - k8.flip(-1).argmax(-1)
    if not bool((last - first + 1 == counts).all()):
        return None  # a hole inside some row
    i = torch.arange(n, device=k.device)
    a, b = int((i - first).max()), int((last - i).max())
    if a < 0 or b < 0 or (b > 0 and (a + b) % 2):
        return None
    if not (torch.equal(first, (i - a).clamp(min=0)) and torch.equal(last, (i + b).clamp(max=m - 1))):
        return None
    causal = b == 0
    w, off = (a, 0) if causal else ((a + b) // 2, (b - a) // 2)
    spec = MaskSpec("neighborhood", predicate=f"run-time tensor: {-a} <= m - p <= {b} on the first call",
                    offset=off, runtime=True, grid=(n,), window=(w,), dilation=(1,), causal=(causal,),
                    clamped=(False,), stride=(1,), proof="first-call value, re-checked per tensor")
    return replace(spec, density=kept_count(spec, n, m) / (n * m))


# ---------------------------------------------------------------- evaluating the lifted predicate

_FDIV = sympy.Function("_fdiv")


def _integer_floors(expr: sympy.Basic) -> sympy.Basic:
    """floor(p/W) → _fdiv(p, W): lambdify would compute floor((1/W)·p) in floating point,
    and 49·(1/49) < 1 — an exact integer division is required for a proof."""
    reps = {}
    for f in expr.atoms(sympy.floor):
        num, den = sympy.fraction(sympy.together(f.args[0]))
        reps[f] = _FDIV(_integer_floors(num), den)
    return expr.xreplace(reps)


def evaluator(pred: sympy.Basic):
    """A numpy function keep(p, m) of the predicate (p, m broadcast integer arrays)."""
    fn = sympy.lambdify((P_SYM, M_SYM), _integer_floors(pred),
                        modules=[{"_fdiv": np.floor_divide}, "numpy"])

    def keep(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        p, m = np.broadcast_arrays(p, m)
        return np.broadcast_to(np.asarray(fn(p, m), dtype=bool), p.shape)
    return keep


def _rows_to_check(n: int, m: int, grid: tuple[int, ...] | None) -> tuple[np.ndarray, str]:
    if n * m <= EXHAUSTIVE_LIMIT:
        return np.arange(n), "exhaustive"
    # Edges are where windows clamp and blocks end: every row within 2 of an axis edge,
    # plus a seeded random sample (the check is then sampled, and says so).
    rows = {0, n - 1}
    rng = np.random.default_rng(0)
    rows.update(rng.integers(0, n, size=max(1, EXHAUSTIVE_LIMIT // (8 * m))).tolist())
    if grid:
        x = np.arange(n)
        for c, g in zip(coords(x, grid), grid):
            near = (c < 2) | (c >= g - 2)
            rows.update(rng.choice(x[near], size=min(int(near.sum()), 256), replace=False).tolist())
    return np.array(sorted(rows)), "sampled"


def _interval(expr: sympy.Basic, ranges: dict) -> tuple[int, int] | None:
    """Integer bounds of a linear expression in the coordinate symbols, or None."""
    expr = sympy.expand(expr)
    lo = hi = 0
    for term, coeff in expr.as_coefficients_dict().items():
        if not coeff.is_Integer:
            return None
        c = int(coeff)
        if term == 1:
            lo, hi = lo + c, hi + c
        elif term in ranges:
            a, b = ranges[term]
            lo, hi = lo + min(c * a, c * b), hi + max(c * a, c * b)
        else:
            return None
    return lo, hi


def _split_div(expr: sympy.Basic, w: int, ranges: dict):
    """expr = w·A + R with A an integer combination of the coordinates and R's bounds known:
    (A, R, bounds of R), or None."""
    expr = sympy.expand(expr)
    whole, rest = sympy.Integer(0), sympy.Integer(0)
    for term, coeff in expr.as_coefficients_dict().items():
        if not coeff.is_Integer:
            return None
        q, r = divmod(int(coeff), w)
        whole += q * term
        rest += r * term
    bounds = _interval(rest, ranges)
    return None if bounds is None else (whole, rest, bounds)


def _reduce_coordinates(expr: sympy.Basic, ranges: dict) -> sympy.Basic:
    """Simplify floor(x / w) and Mod(x, w) of linear x over bounded integer coordinates:
    floor((w·A + R)/w) = A + floor(R/w), exactly A + f when R's whole range lies in one
    w-interval [w·f, w·f + w); Mod(w·A + R, w) = R − w·f likewise. Innermost first."""
    if not expr.args:
        return expr
    expr = expr.func(*[_reduce_coordinates(a, ranges) for a in expr.args])
    if isinstance(expr, sympy.floor):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        if den.is_Integer and int(den) > 0:
            split = _split_div(num, int(den), ranges)
            if split is not None:
                whole, _, (lo, hi) = split
                if lo // int(den) == hi // int(den):
                    return whole + lo // int(den)
    if isinstance(expr, sympy.Mod) and expr.args[1].is_Integer and int(expr.args[1]) > 0:
        w = int(expr.args[1])
        split = _split_div(expr.args[0], w, ranges)
        if split is not None:
            _, rest, (lo, hi) = split
            if lo // w == hi // w:
                return rest - w * (lo // w)
    return expr


def prove_per_axis(pred: sympy.Basic, spec: MaskSpec) -> bool:
    """Prove ``pred == spec`` on the whole N×N grid without N² work: substitute the row-major
    coordinates (p = Σ c_a·S_a, 0 ≤ c_a < G_a, likewise m), reduce every floor/Mod exactly over
    those bounds, and require a conjunction whose factors each read one axis's (query, key)
    coordinate pair; then compare each axis's factors with the spec's rule exhaustively on
    G_a × G_a. False means "not proven this way" (the caller falls back to evaluation)."""
    grid = spec.grid
    if len(grid) < 2 or any(g is None for g in grid):
        return False
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    cq = [sympy.Symbol(f"cq{a}", integer=True) for a in range(len(grid))]
    ck = [sympy.Symbol(f"ck{a}", integer=True) for a in range(len(grid))]
    ranges = {s: (0, g - 1) for syms in (cq, ck) for s, g in zip(syms, grid)}
    flat_q = sum(s * c for s, c in zip(strides, cq))
    flat_k = sum(s * c for s, c in zip(strides, ck))
    try:
        reduced = _reduce_coordinates(pred.xreplace({P_SYM: flat_q, M_SYM: flat_k}), ranges)
    except (TypeError, ValueError):
        return False
    factors = list(reduced.args) if isinstance(reduced, sympy.And) else [reduced]
    per_axis: list[list] = [[] for _ in grid]
    for f in factors:
        if f is sympy.true:
            continue
        axes = {a for a in range(len(grid)) if {cq[a], ck[a]} & f.free_symbols}
        if len(axes) != 1 or f.free_symbols - {cq[a] for a in axes} - {ck[a] for a in axes}:
            return False
        per_axis[axes.pop()].append(f)
    for a, (ax, g) in enumerate(zip(axes_of(spec), grid)):
        c = np.arange(g)
        want = axis_keep(ax, c[:, None], c[None, :], g, g)
        if per_axis[a]:
            fn = sympy.lambdify((cq[a], ck[a]), _integer_floors(sympy.And(*per_axis[a])),
                                modules=[{"_fdiv": np.floor_divide}, "numpy"])
            got = np.broadcast_to(np.asarray(fn(c[:, None], c[None, :]), dtype=bool), want.shape)
        else:
            got = np.ones_like(want)
        if not np.array_equal(got, want):
            return False
    return True


def agrees(keep_a, keep_b, n: int, m: int, grid: tuple[int, ...] | None = None) -> str | None:
    """Compare two keep functions on the (p, m) grid in row chunks; the proof level or None."""
    rows, level = _rows_to_check(n, m, grid)
    cols = np.arange(m)[None, :]
    step = max(1, _CHUNK // max(m, 1))
    for s in range(0, len(rows), step):
        r = rows[s:s + step, None]
        if not np.array_equal(keep_a(r, cols), keep_b(r, cols)):
            return None
    return level


# ---------------------------------------------------------------- symbolic proof for 1-D bands

_T = sympy.Symbol("t", integer=True)


def band_function(pred: sympy.Basic) -> tuple[list[int], int] | None:
    """Prove ``pred(p, m) == f(p − m)`` for every integer p, m, and give f's kept set.

    After p := m + t the predicate must lose m (sympy cancels m + t − m). If what remains
    uses only linear relations, |·| and Mod by constants of t, f is periodic beyond its
    largest threshold with period lcm(moduli): checking one period past the thresholds on
    both sides decides f everywhere. Returns (kept t values, lcm) when f is eventually false
    both ways (a finite band), else None."""
    f = pred.xreplace({P_SYM: M_SYM + _T})
    # m <= m + t does not cancel by itself; lhs − rhs (an Add) does.
    f = f.xreplace({r: type(r)(sympy.expand(r.lhs - r.rhs), 0)
                    for r in f.atoms(sympy.core.relational.Relational)})
    if M_SYM in f.free_symbols or f.free_symbols - {_T}:
        return None
    mods, bound = [], 0
    for atom in sympy.preorder_traversal(f):
        # Sound only for integer-linear pieces: thresholds then lie within the constants.
        if isinstance(atom, (sympy.floor, sympy.ceiling, sympy.Min, sympy.Max, sympy.Piecewise,
                             sympy.Pow, sympy.core.function.AppliedUndef)):
            return None
        if isinstance(atom, sympy.Number) and not atom.is_Integer:
            return None
        if isinstance(atom, sympy.Mul) and sum(not x.is_Number for x in atom.args) > 1:
            return None
        if isinstance(atom, sympy.Mod):
            if not atom.args[1].is_Integer:
                return None
            mods.append(abs(int(atom.args[1])))
        if isinstance(atom, sympy.Number):
            bound = max(bound, abs(int(atom)))
    period = reduce(math.lcm, mods, 1)
    span = bound + 1 + period
    fn = sympy.lambdify(_T, f, "numpy")
    ts = np.arange(-span - period, span + period + 1)
    vals = np.broadcast_to(np.asarray(fn(ts), dtype=bool), ts.shape)
    tail = np.abs(ts) > bound
    if vals[tail].any():
        return None  # not a finite band (e.g. an anti-causal half plane)
    return ts[vals].tolist(), period


def _band_axis(kept: list[int]) -> tuple[Axis, int] | None:
    """A window axis (and 1-D offset) whose kept t set is exactly ``kept``: a centred
    window when one fits, else a causal window shifted by the offset."""
    if not kept:
        return None
    lo, hi = min(kept), max(kept)
    tries = [(Axis("window", hi), 0)] if lo == -hi else []
    tries.append((Axis("window", hi - lo, causal=True), -lo))
    for ax, off in tries:
        d = reduce(math.gcd, [abs(t + off) for t in kept if t + off], 0) or 1
        if [t for t in range(lo, hi + 1) if (t + off) % d == 0] == sorted(kept):
            return replace(ax, dilation=d), off
    return None


# ---------------------------------------------------------------- fitting on concrete sizes

def _fit_axis(rows: np.ndarray, keep: np.ndarray, size: int, keys: int, offset_ok: bool
              ) -> list[tuple[Axis, int]]:
    """Every rule (window, blocked, clamped: in that preference) read off one axis's
    (rows × keys) keep matrix that reproduces it exactly. Several can: a clamped kernel of 3
    on 4 positions is also blocks of 2 with a halo of 1; the caller picks consistently."""
    def check(ax: Axis, off: int = 0) -> bool:
        if ax.kind == "clamped":
            d = ax.dilation
            if d < 1 or ax.window < 1 or size // d < ax.window:  # NATTEN needs L_r ≥ k
                return False
        cols = np.arange(keys)[None, :]
        # A few rows first: most candidates fail there, before the whole matrix is evaluated.
        head = slice(0, min(8, len(rows)))
        if not np.array_equal(axis_keep(ax, rows[head, None], cols, size, keys, off), keep[head]):
            return False
        return np.array_equal(axis_keep(ax, rows[:, None], cols, size, keys, off), keep)

    if not keep.any():
        return []
    found = []
    r_idx, k_idx = np.nonzero(keep)
    band = _band_axis(sorted(set((rows[r_idx] - k_idx).tolist())))
    if band is not None and (band[1] == 0 or offset_ok) and check(*band):
        found.append(band)
    first = np.nonzero(keep[0])[0]
    if rows[0] == 0 and len(first):
        changed = np.nonzero((keep != keep[0]).any(axis=1))[0]
        block = int(rows[changed[0]]) if len(changed) else size
        # The halo read off the first row is clipped where the first block's keys run past M;
        # the second block's first kept key (block − halo) is not clipped.
        halos = [int(first[-1]) - (block - 1)]
        if len(changed) and keep[changed[0]].any():
            halos.append(block - int(np.nonzero(keep[changed[0]])[0][0]))
        for halo in dict.fromkeys(halos):
            blocked = Axis("blocked", block=block, halo=halo)
            if halo >= 0 and check(blocked):
                found.append((blocked, 0))
                break
        k = len(first)
        d = int(first[1] - first[0]) if k > 1 else 1
        for s in range(1, k + 1):
            clamped = Axis("clamped", k, d, stride=s)
            if check(clamped):
                found.append((clamped, 0))
                break
    return found


def _choose(fits: list[list[tuple[Axis, int]]], clamp_written: bool = False) -> tuple[str, list[Axis], int] | None:
    """One kind for all axes: blocked when every axis prefers blocks, else neighborhood
    from each axis's first non-blocked rule (mixed block/window grids: block-sparse path).
    Where a clamped window and blocks both fit exactly (a kernel of 5 on 6 positions is also
    blocks of 3 with a halo of 2), the name follows the spelling: a predicate written with
    clamp/min/max is NATTEN's window (``clamp_written``)."""
    if not all(fits):
        return None
    if clamp_written and all(any(x[0].kind == "clamped" for x in f) for f in fits):
        fits = [[x for x in f if x[0].kind != "blocked"] for f in fits]
    if all(f[0][0].kind == "blocked" for f in fits):
        return "blocked", [f[0][0] for f in fits], fits[0][0][1]
    plain = [[x for x in f if x[0].kind != "blocked"] for f in fits]
    if not all(plain):
        return None
    return "neighborhood", [p[0][0] for p in plain], plain[0][0][1]


def _grid_candidates(pred: sympy.Basic, n: int) -> list[tuple[int, ...]]:
    """Flattened grids suggested by the divisors and moduli the predicate uses."""
    consts: set[int] = set()
    for f in pred.atoms(sympy.floor):
        den = sympy.fraction(sympy.together(f.args[0]))[1]
        if den.is_Integer:
            consts.add(int(den))
    for md in pred.atoms(sympy.Mod):
        if md.args[1].is_Integer:
            consts.add(int(md.args[1]))
    consts = {c for c in consts if 1 < c < n}
    grids: list[tuple[int, ...]] = [(n,)]
    grids += [(n // w, w) for w in sorted(consts) if n % w == 0]
    for w in sorted(consts):
        for hw in sorted(consts):
            if hw % w == 0 and hw > w and n % hw == 0 and n > hw:
                grids.append((n // hw, hw // w, w))
        for h in sorted(consts):
            if n % (h * w) == 0 and n > h * w and (n // (h * w), h, w) not in grids:
                grids.append((n // (h * w), h, w))
    return grids


def _axis_matrix(keep, grid: tuple[int, ...], a: int) -> tuple[np.ndarray, np.ndarray]:
    """Axis a's keep matrix with the other coordinates of query and key held at those of a
    position that keeps itself (under a GNA stride not every query does): since a kept
    pair keeps every axis, this isolates axis a."""
    n = math.prod(grid)
    strides = [math.prod(grid[b + 1:]) for b in range(len(grid))]
    diag = np.arange(n)
    own = np.nonzero(keep(diag, diag))[0]
    x0 = int(own[len(own) // 2]) if len(own) else 0
    base = x0 - ((x0 // strides[a]) % grid[a]) * strides[a]  # x0 with coordinate a set to 0
    g = grid[a]
    rows = np.arange(g) if g <= 4096 else np.unique(np.r_[np.arange(64), np.arange(g - 64, g),
                                                         np.linspace(0, g - 1, 256).astype(int)])
    coord = np.arange(g) * strides[a] + base
    return rows, keep((rows * strides[a] + base)[:, None], coord[None, :])


def _spec(kind: str, grid, axes: list[Axis], offset: int, pred, runtime: bool) -> MaskSpec:
    return MaskSpec(kind, predicate=str(pred), offset=offset, runtime=runtime, grid=tuple(grid),
                    window=tuple(a.window for a in axes), dilation=tuple(a.dilation for a in axes),
                    causal=tuple(a.causal for a in axes), clamped=tuple(a.kind == "clamped" for a in axes),
                    stride=tuple(a.stride for a in axes), block=tuple(a.block for a in axes),
                    halo=tuple(a.halo for a in axes))


def classify_structured(pred: sympy.Basic, runtime: bool, n: int | None = None, m: int | None = None
                        ) -> MaskSpec | None:
    """A proven neighborhood/blocked spec for a position-only predicate, or None."""
    band = band_function(pred)
    band_axis = _band_axis(band[0]) if band else None
    if n is None or m is None:
        if band_axis is None:
            return None  # without sizes only a symbolic proof counts
        ax, off = band_axis  # grid (None,): the length is not known, the rule holds for all
        return replace(_spec("neighborhood", (None,), [ax], off, pred, runtime), proof="symbolic")
    keep = evaluator(pred)
    clamped = bool(pred.atoms(sympy.Min, sympy.Max))
    for grid in _grid_candidates(pred, n):
        if len(grid) > 1 and n != m:
            continue  # a flattened grid is self-attention over one token layout
        if len(grid) == 1 and band_axis is not None:
            chosen = ("neighborhood", [band_axis[0]], band_axis[1])  # proven for every size
        elif len(grid) == 1:
            rows = np.arange(n) if n <= 4096 else _axis_matrix(keep, (n,), 0)[0]
            chosen = _choose([_fit_axis(rows, keep(rows[:, None], np.arange(m)[None, :]), n, m, True)], clamped)
        else:
            chosen = _choose([_fit_axis(*_axis_matrix(keep, grid, a), grid[a], grid[a], offset_ok=False)
                              for a in range(len(grid))], clamped)
        if chosen is None:
            continue
        kind, axes, off = chosen
        spec = _spec(kind, grid, axes, off, pred, runtime)
        if n * m > EXHAUSTIVE_LIMIT and prove_per_axis(pred, spec):
            level = "per-axis"  # exact for every pair, G_a² work per axis
        else:
            level = agrees(keep, lambda p, k, s=spec: spec_keep(s, p, k, n, m), n, m, grid)
        if level is None:
            continue
        symbolic = band_axis is not None and len(grid) == 1 and band_axis == (axes[0], off)
        proof = ("symbolic+" if symbolic else "") + level
        return replace(spec, proof=proof, density=kept_count(spec, n, m) / (n * m))
    return None
