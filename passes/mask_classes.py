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

Nothing is guessed, nothing is sampled. Parameters are read off the predicate's values, then a
classification is accepted only with a proof, and ``MaskSpec.proof`` says which:

- "symbolic": 1-D translation-invariant bands (``band_function``), for every integer p, m;
- "per-axis": a grid whose predicate separates into one factor per axis after the row-major
  coordinates are substituted, each factor compared with the axis rule on its G_a × G_a pairs
  (``prove_per_axis``): exact for every pair at G_a² cost;
- "exhaustive": every (p, m) pair compared, vectorised and chunked, within the work limit of
  passes/mask_proofs.py (N·M ≤ 2^24 pairs, fewer for a large predicate: about 1.5 s at most).

Without one of these the mask is not classified (None: passes/masks.py calls it "arbitrary" and
the plan applies it as given, or as its folded constant, through the exact block-map path).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import sympy

from rewrite.ir.mask import Axis, MaskSpec, axis_keep, kept_count, spec_keep

from . import mask_proofs
from .mask_proofs import band_axis, band_function, evaluator, exhaustive_ok, keep_matrix, matches, prove_per_axis

__all__ = ["band_function", "band_of_tensor", "classify_structured", "evaluator", "prove_per_axis"]


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
    band = band_axis(sorted(set((rows[r_idx] - k_idx).tolist())))
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
    rows = np.arange(g)
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
    """A proven neighborhood/blocked spec for a position-only predicate, or None (not proven)."""
    band = band_function(pred)
    found = band_axis(band[0]) if band else None
    if found is not None:  # proven for every integer p, m: at every size
        ax, off = found
        spec = replace(_spec("neighborhood", (n,) if n is not None else (None,), [ax], off, pred, runtime),
                       proof="symbolic")
        return spec if n is None or m is None else replace(spec, density=kept_count(spec, n, m) / (n * m))
    if n is None or m is None:
        return None  # without sizes only a symbolic proof counts
    keep = evaluator(pred)
    full = keep_matrix(keep, n, m) if exhaustive_ok(pred, n, m) else None  # every pair, or None: too much work
    clamped = bool(pred.atoms(sympy.Min, sympy.Max))
    for grid in _grid_candidates(pred, n):
        if len(grid) > 1 and n != m:
            continue  # a flattened grid is self-attention over one token layout
        if len(grid) == 1:
            if full is None:
                continue  # no symbolic proof and too many pairs to check: not proven
            chosen = _choose([_fit_axis(np.arange(n), full, n, m, True)], clamped)
        elif max(grid) ** 2 > mask_proofs.EXHAUSTIVE_LIMIT:
            continue
        else:
            chosen = _choose([_fit_axis(*_axis_matrix(keep, grid, a), grid[a], grid[a], offset_ok=False)
                              for a in range(len(grid))], clamped)
        if chosen is None:
            continue
        kind, axes, off = chosen
        spec = _spec(kind, grid, axes, off, pred, runtime)
        if len(grid) > 1 and prove_per_axis(pred, spec):
            proof = "per-axis"  # exact for every pair, G_a² work per axis
        elif full is not None and matches(full, lambda p, k, s=spec: spec_keep(s, p, k, n, m)):
            proof = "exhaustive"
        else:
            continue
        return replace(spec, proof=proof, density=kept_count(spec, n, m) / (n * m))
    return None
