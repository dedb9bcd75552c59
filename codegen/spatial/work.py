"""What each Einsum of a cascade costs, independent of where it runs.

Iteration spaces, operations per point on either array, tensor sizes, the kept fraction
of a mask, and passes over a sequence rank. All arithmetic is on plain ints and floats
(never sympy in the hot path) so a 1M-token sweep stays far below a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import sympy

from rewrite.ir.cascade import Cascade, Einsum, m, p, rank_family

from .arch import Array1D, Array2D

UNARY_FUNCTIONS = ("exp", "sigmoid")  # evaluated with the array's exp datapath
BINARY = ("×", "+", "−", "÷", "max")


class MappingError(ValueError):
    """The mapper cannot place an Einsum; the message names it and says why."""


@dataclass(frozen=True)
class Sizes:
    """Integer rank sizes with the key rank split into tiles of ``tile`` (m1 × m0)."""

    values: Mapping[str, int]

    def __getitem__(self, rank: str) -> int:
        if rank in self.values:
            return self.values[rank]
        fam = rank_family(rank)
        if fam in self.values:
            return self.values[fam]
        raise MappingError(f"rank {rank!r} has no size; give it in rank_sizes or seq_lens")

    def space(self, ranks) -> int:
        return math.prod(self[r] for r in ranks)


def resolve_sizes(cascade: Cascade, tile: int) -> Sizes:
    """Ints for every rank of the cascade; ``m0`` = ``tile``, ``m1`` = ⌈M / tile⌉."""
    vals: dict[str, int] = {}
    for key, v in cascade.rank_sizes.items():
        try:
            vals[key] = int(v)
        except (TypeError, ValueError) as err:
            raise MappingError(f"cascade {cascade.name}: rank {key} has a symbolic size {v}; "
                               "give integer sizes (seq_lens=...)") from err
    if "m" in vals:
        vals.setdefault("m0", min(tile, vals["m"]))
        vals.setdefault("m1", math.ceil(vals["m"] / vals["m0"]))
    return Sizes(vals)


def is_contraction(e: Einsum) -> bool:
    """A product of two tensors summed over a rank they share: a job for the 2-D array."""
    if e.map_op != "×" or e.reduce_op != "+" or len(e.inputs) != 2 or e.scan:
        return False
    a, b = (set(i.ranks) for i in e.inputs)
    return any(r in a and r in b for r in e.reduced_ranks)


def producers(cascade: Cascade) -> dict[str, Einsum]:
    return {e.name: e for e in cascade.einsums}


def iteration_ranks(e: Einsum, prod: Mapping[str, Einsum]) -> tuple[str, ...]:
    """The ranks the Einsum really walks. A reduction over a rank that its inputs carry only
    as the *scan* rank of a recurrence reads just the final (or the masked-in) state, so that
    rank is not walked: FuseMax's ``AV = RNV[M1] ÷ RD[M1]``."""
    walked = []
    for r in e.iteration_ranks:
        if r in e.reduced_ranks:
            carriers = [i for i in e.inputs if r in i.ranks]
            if carriers and all(prod.get(i.name) is not None and prod[i.name].scan == r
                                and prod[i.name] is not e for i in carriers):
                continue
        walked.append(r)
    return tuple(walked)


def op_cycles(e: Einsum, array: Array2D | Array1D, *, fused_sub: bool = False,
              reduces: bool = True) -> float | None:
    """PE cycles per iteration point of ``e`` on ``array``; None when the array cannot do it.

    A 2-D PE does a whole MAC per cycle, a 1-D PE one operation. exp(x − y) costs the
    array's ``exp_cycles`` (FuseMax: 6 MACs + 1 add = 7), the subtraction included.
    ``reduces=False``: the reduced ranks are read as a final state, nothing is summed."""
    two_d = isinstance(array, Array2D)
    op = e.map_op
    n_in = len(e.inputs)
    reduce = 1 if (e.reduce_op and e.reduced_ranks and reduces) else 0
    if reduce and e.reduce_op not in array.ops:
        return None
    if op in UNARY_FUNCTIONS:
        if array.exp_cycles is None:
            return None
        # sigmoid = 1 ÷ (1 + exp(−x)): exp plus an add and a divide (the divide needs ÷).
        extra = 0 if op == "exp" else 2
        if op == "sigmoid" and "÷" not in array.ops:
            return None
        return array.exp_cycles + extra + reduce
    if op == "φ":  # elu + 1 and friends: a compare and an add per point
        return 2 + reduce
    if op in ("id", "cast"):
        return float(reduce)
    if op == "fma":
        if "×" not in array.ops or "+" not in array.ops:
            return None
        return 1.0 if two_d else 2.0
    if op in ("where", "select"):
        return 1.0 + reduce
    unit = "+" if op == "−" else op  # an adder subtracts
    if op not in BINARY or unit not in array.ops:
        return None
    if op == "−" and fused_sub:
        return float(reduce)  # folded into the exp that consumes it
    binary_ops = max(1, n_in - 1)
    if two_d and op == "×" and reduce and e.reduce_op == "+":
        return float(binary_ops)  # multiply-accumulate: one cycle on a 2-D PE
    return float(binary_ops + reduce)


def subtractions_feeding_exp(cascade: Cascade) -> set[str]:
    """``−`` Einsums whose only consumer is an exp of the same shape (exp(x − y))."""
    consumers: dict[str, list[Einsum]] = {}
    for e in cascade.einsums:
        for i in e.inputs:
            consumers.setdefault(i.name, []).append(e)
    out = set()
    for e in cascade.einsums:
        users = consumers.get(e.name, [])
        if (e.map_op == "−" and len(users) == 1 and users[0].map_op in UNARY_FUNCTIONS
                and set(users[0].output.ranks) == set(e.output.ranks)):
            out.add(e.name)
    return out


def score_shaped(e: Einsum, cascade: Cascade) -> bool:
    """Walks both query and key positions: the O(P·M) part a sparse mapping can skip. A read
    of a recurrence's state at one position (``where m = p``) does not walk the keys."""
    fams = {rank_family(r) for r in iteration_ranks(e, producers(cascade))}
    return "p" in fams and "m" in fams


def walks_score_tile(e: Einsum, cascade: Cascade) -> bool:
    """Walks every query and every key *position* of a tile (not just the tile index of a
    recurrence): the Einsums FuseMax binds to the 2-D array next to the contraction."""
    scan_ranks = {x.scan for x in cascade.einsums if x.scan}
    fams = {rank_family(r) for r in e.iteration_ranks}
    keys = [r for r in e.iteration_ranks if rank_family(r) == "m" and r not in scan_ranks]
    return "p" in fams and bool(keys)


# ---- masks -----------------------------------------------------------------------------------
def tile_density(mask: sympy.Basic | None, P: int, M: int, tile_p: int, tile_m: int,
                 max_rows: int = 96, max_cols: int = 512) -> float:
    """Fraction of [tile_p × tile_m] tiles holding at least one kept entry: what a mapping
    that skips whole tiles computes. Up to ``max_rows`` tile rows (evenly spaced) are probed
    against every tile column, or ``max_cols`` of them drawn at random (fixed seed) so a band
    along the diagonal is not over-sampled. Each tile is probed at a 5 × 5 grid and along its
    anti-diagonal, which crosses every value of p − m the tile spans."""
    if mask is None or mask is sympy.true:
        return 1.0
    fn = sympy.lambdify((p, m), mask, modules="numpy")
    n_p, n_m = math.ceil(P / tile_p), math.ceil(M / tile_m)
    rows = np.unique(np.linspace(0, n_p - 1, min(n_p, max_rows)).round().astype(np.int64))
    if n_m <= max_cols:
        cols = np.broadcast_to(np.arange(n_m), (len(rows), n_m))
    else:
        cols = np.random.default_rng(0).integers(0, n_m, size=(len(rows), max_cols))
    grid = np.linspace(0.0, 1.0, 5)
    diag = np.linspace(0.0, 1.0, min(max(tile_p, tile_m), 64))
    u = np.concatenate([np.repeat(grid, 5), diag])   # offsets inside a tile, in [0, 1]
    v = np.concatenate([np.tile(grid, 5), 1.0 - diag])
    p0 = rows[:, None, None] * tile_p
    m0 = cols[:, :, None] * tile_m
    ps = p0 + np.round(u * (np.minimum(tile_p, P - p0) - 1)).astype(np.int64)
    ms = m0 + np.round(v * (np.minimum(tile_m, M - m0) - 1)).astype(np.int64)
    shape = np.broadcast_shapes(ps.shape, ms.shape)
    kept = np.broadcast_to(np.asarray(fn(ps, ms), dtype=bool), shape).any(axis=2)
    return float(kept.mean())
