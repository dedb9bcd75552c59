"""Mappings of a cascade onto an architecture, generated from the cascade's structure.

Four kinds, none written per model:

* ``unfused``: every Einsum its own kernel; intermediates go through DRAM; contractions
  run on the 2-D array as stand-alone GEMMs (each fold pays its fill and drain).
* ``flat``: one fused kernel, the cascade's own passes over m (3 for softmax), tiled by
  rows of queries (P1); tensors that live across a pass boundary must fit on chip for a
  P1 tile, or the part that does not fit spills to DRAM (written once, read once per
  later pass). Contractions on the 2-D array, everything else on the 1-D array.
* ``fusemax``: the 1-pass form of the cascade (online softmax), contractions and the
  score-sized Einsums on the 2-D array, the per-tile recurrences on the 1-D array, the
  two arrays pipelined; a tile of P0 queries stays on chip while K and V stream past.
* ``sparse``: ``fusemax`` that skips masked-out [m0, p] tiles (kept fraction = density).

Linear and flow cascades go through the same rules: they have no [m,p] tensor, so their
passes over m re-stream K and V instead of spilling scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from rewrite.ir.cascade import Cascade, Einsum, rank_family

from .arch import Architecture
from .systolic import DATAFLOWS
from .work import (
    MappingError,
    Sizes,
    is_contraction,
    iteration_ranks,
    op_cycles,
    producers,
    resolve_sizes,
    score_shaped,
    subtractions_feeding_exp,
    tile_density,
    walks_score_tile,
)

MAPPING_KINDS = ("unfused", "flat", "fusemax", "sparse")


@dataclass(frozen=True)
class Placement:
    """Where one Einsum runs and what one of its iteration points costs there."""

    einsum: str
    array: str                  # "2d" or "1d"
    kernel: int
    pass_index: int             # pass over m inside its kernel (0: outside any pass)
    cycles_per_point: float     # PE cycles per iteration point on that array
    points: int                 # walked iteration points (dense)
    contraction: bool
    dataflow: str | None = None  # fixed dataflow for a contraction; None = best


@dataclass(frozen=True)
class Mapping:
    kind: str
    cascade: Cascade            # what is mapped (fusemax: the 1-pass form)
    arch: Architecture
    sizes: Sizes
    placements: tuple[Placement, ...]
    kernels: int
    passes: int                 # passes over m of the fused kernel (1 for unfused kernels)
    tile_p: int                 # queries kept on chip per tile (P1 for flat, P0 for fusemax)
    skip_masked: bool
    density: float
    pipelined: bool             # arrays overlap and systolic folds stream back to back
    live_words: int             # words that must stay on chip across a pass boundary, per tile
    resident_words: int         # per-tile words held for the whole stream (Q tile, states)
    spill_fraction: float       # fraction of the cross-pass words that did not fit
    notes: tuple[str, ...] = field(default_factory=tuple)

    def placement(self, name: str) -> Placement:
        return next(pl for pl in self.placements if pl.einsum == name)


# ---- the 1-pass form -------------------------------------------------------------------------
def one_pass_form(cascade: Cascade) -> Cascade:
    """The online-softmax (1-pass) cascade equivalent to a 3-pass softmax cascade; any other
    cascade is returned as it is. Recognised by structure: a max over m whose result feeds
    an exp, a sum over m of that exp, and a contraction over m."""
    if cascade.pass_count("m") <= 1:
        return cascade
    ein = cascade.einsums
    has_max = any(e.reduce_op == "max" and any(rank_family(r) == "m" for r in e.reduced_ranks)
                  for e in ein)
    has_exp = any(e.map_op == "exp" and score_shaped(e, cascade) for e in ein)
    contractions = [e for e in ein if is_contraction(e)]
    over_m = [e for e in contractions if any(rank_family(r) == "m" for r in e.reduced_ranks)]
    if not (has_max and has_exp and contractions and over_m):
        return cascade
    scores = contractions[0]
    batch = "".join(r for r in scores.output.ranks if rank_family(r) not in ("m", "p"))
    online = Cascade.online_softmax_attention(mask=scores.mask, batch=batch)
    return online.with_sizes(**cascade.rank_sizes)


# ---- binding ---------------------------------------------------------------------------------
def _bind(e: Einsum, cascade: Cascade, arch: Architecture, kind: str, fused_sub: bool,
          reduces: bool) -> tuple[str, float]:
    c2 = op_cycles(e, arch.array_2d, fused_sub=fused_sub, reduces=reduces)
    c1 = op_cycles(e, arch.array_1d, fused_sub=fused_sub, reduces=reduces)
    # Contractions and running multiply-accumulates (a state += outer product) are MACs.
    if (is_contraction(e) or e.map_op == "fma") and c2 is not None:
        return "2d", c2
    want_2d = kind in ("fusemax", "sparse") and walks_score_tile(e, cascade)
    if want_2d and c2 is not None:
        return "2d", c2
    if c1 is not None:
        return "1d", c1
    if c2 is not None:
        return "2d", c2
    raise MappingError(
        f"cannot place Einsum {e.name} ({e.map_op}"
        f"{', reduce ' + e.reduce_op if e.reduce_op else ''}) on {arch.name}: the 2-D array does "
        f"{list(arch.array_2d.ops)}{' and exp' if arch.array_2d.exp_cycles else ''}, the 1-D array "
        f"{list(arch.array_1d.ops)}{' and exp' if arch.array_1d.exp_cycles else ''}")


def _balance(cascade: Cascade, arch: Architecture, placements: list[Placement],
             fold_sub: set[str]) -> list[Placement]:
    """Pipelined arrays finish when the busier one does: Einsums tied to neither the score
    tile nor a recurrence (feature maps, per-row normalisers) go, largest first, to the
    array that leaves the smaller maximum load. FuseMax's own bindings are untouched."""
    width = {"2d": arch.array_2d.pes, "1d": arch.array_1d.lanes}
    unit = {"2d": arch.array_2d, "1d": arch.array_1d}
    by_name = {e.name: e for e in cascade.einsums}
    flexible, load = [], {"2d": 0.0, "1d": 0.0}
    for pl in placements:
        e = by_name[pl.einsum]
        tied = (is_contraction(e) or e.map_op == "fma" or score_shaped(e, cascade)
                or walks_score_tile(e, cascade))
        costs = {a: op_cycles(e, unit[a], fused_sub=e.name in fold_sub) for a in width}
        if tied or None in costs.values():
            load[pl.array] += pl.points * pl.cycles_per_point / width[pl.array]
        else:
            flexible.append((pl, costs))
    flexible.sort(key=lambda pc: -pc[0].points * min(pc[1].values()))
    moved = {}
    for pl, costs in flexible:
        after = {a: load[a] + pl.points * costs[a] / width[a] for a in width}
        best = min(after, key=lambda a: max(after[a], load["1d" if a == "2d" else "2d"]))
        load[best] = after[best]
        moved[pl.einsum] = replace(pl, array=best, cycles_per_point=costs[best])
    return [moved.get(pl.einsum, pl) for pl in placements]


# ---- on-chip footprint -----------------------------------------------------------------------
def _tile_words(ranks, sizes: Sizes, tile_p: int, drop: str | None = None) -> int:
    """Words of one head's tensor with the p ranks cut to a tile of ``tile_p`` queries."""
    words = 1
    for r in ranks:
        if r == drop or r in ("b", "h"):
            continue
        fam = rank_family(r)
        words *= min(tile_p, sizes[r]) if fam == "p" else sizes[r]
    return words


def cross_pass_tensors(cascade: Cascade, levels: dict[str, int]) -> list[tuple[Einsum, list[int]]]:
    """Tensors produced in one pass and read in a later one, with the passes that read them."""
    readers: dict[str, set[int]] = {}
    for e in cascade.einsums:
        for i in e.inputs:
            if i.name != e.name:
                readers.setdefault(i.name, set()).add(levels[e.name])
    out = []
    for e in cascade.einsums:
        later = sorted(lv for lv in readers.get(e.name, ()) if lv > max(levels[e.name], 1))
        if later:
            out.append((e, later))
    return out


def _live_words(cascade, levels, sizes, tile_p) -> int:
    """The largest set of cross-pass tensors alive at one pass boundary, for one tile."""
    crossing = cross_pass_tensors(cascade, levels)
    best = 0
    for boundary in range(1, max(levels.values(), default=0)):
        alive = sum(_tile_words(e.output.ranks, sizes, tile_p, e.scan) for e, later in crossing
                    if max(levels[e.name], 1) <= boundary < later[-1])
        best = max(best, alive)
    return best


def _resident_words_per_query(cascade: Cascade, sizes: Sizes) -> int:
    """Per query, what stays on chip while keys stream: p-indexed inputs (Q), recurrence
    states (one step of RM, RD, RNV) and the output."""
    prod = producers(cascade)
    words = 0
    seen = set()
    refs = [i for e in cascade.einsums for i in e.inputs if i.name not in prod]
    refs += [e.output for e in cascade.einsums if e.scan]
    for ref in refs:
        fams = {rank_family(r) for r in ref.ranks}
        if ref.name in seen or "p" not in fams:
            continue
        seen.add(ref.name)
        scan = prod[ref.name].scan if ref.name in prod else None
        words += _tile_words([r for r in ref.ranks if r != scan and rank_family(r) != "p"], sizes, 1)
    outputs = [prod[n] for n in cascade.outputs]
    if not any(e.scan for e in cascade.einsums):  # with recurrences, the output reuses the state
        words += sum(_tile_words([r for r in e.output.ranks if rank_family(r) != "p"], sizes, 1)
                     for e in outputs)
    return max(words, 1)


def _staging_words(cascade: Cascade, sizes: Sizes, arch: Architecture) -> int:
    """Double-buffered m0-tiles of the streamed (m-indexed) inputs, K and V."""
    prod = producers(cascade)
    tile = arch.array_2d.cols
    words = 0
    for ref in {i.name: i for e in cascade.einsums for i in e.inputs if i.name not in prod}.values():
        if "m" in {rank_family(r) for r in ref.ranks}:
            words += 2 * _tile_words([r for r in ref.ranks if rank_family(r) != "m"], sizes, 1) * tile
    return words


# ---- the mapper ------------------------------------------------------------------------------
def map_cascade(cascade: Cascade, arch: Architecture, kind: str = "fusemax", *,
                density: float | None = None, dataflow: str | None = None) -> Mapping:
    """Map ``cascade`` (with integer rank sizes) onto ``arch`` as a ``kind`` mapping.

    ``density``: kept fraction of [m, p] tiles for the sparse mapping; None derives it from
    the cascade's mask at the 2-D array's tile size (1.0 without a mask)."""
    if kind not in MAPPING_KINDS:
        raise MappingError(f"unknown mapping {kind!r}; use one of {MAPPING_KINDS}")
    if dataflow is not None and dataflow not in DATAFLOWS:
        raise MappingError(f"unknown dataflow {dataflow!r}; use one of {DATAFLOWS}")
    if density is not None and not 0.0 < density <= 1.0:
        raise MappingError(f"density must be in (0, 1], got {density}")
    notes: list[str] = []
    mapped = one_pass_form(cascade) if kind in ("fusemax", "sparse") else cascade
    if mapped is not cascade:
        notes.append("3-pass softmax rewritten to its 1-pass (online softmax) form")
    sizes = resolve_sizes(mapped, tile=arch.array_2d.cols)
    if kind == "sparse" and density is None:
        masks = [e.mask for e in mapped.einsums if e.mask is not None and score_shaped(e, mapped)]
        density = tile_density(masks[0], sizes["p"], sizes["m"], arch.array_2d.rows,
                               sizes["m0"]) if masks else 1.0
        notes.append(f"{density:.1%} of {arch.array_2d.rows}x{sizes['m0']} score tiles kept")
    prod = producers(mapped)
    fused = kind != "unfused"
    levels = mapped.pass_levels("m") if fused else {e.name: 1 for e in mapped.einsums}
    fold_sub = subtractions_feeding_exp(mapped) if fused else set()
    placements = []
    for k, e in enumerate(mapped.einsums):
        walked = iteration_ranks(e, prod)
        reduces = any(r in walked for r in e.reduced_ranks)
        array, cyc = _bind(e, mapped, arch, kind, e.name in fold_sub, reduces)
        placements.append(Placement(
            einsum=e.name, array=array, kernel=0 if fused else k, pass_index=levels[e.name],
            cycles_per_point=cyc, points=sizes.space(walked),
            contraction=is_contraction(e) and array == "2d", dataflow=dataflow))
    if kind in ("fusemax", "sparse"):
        placements = _balance(mapped, arch, placements, fold_sub)
    passes = max(levels.values(), default=1) if fused else 1

    word = arch.word_bytes
    capacity = arch.buffer.capacity_bytes // word
    P = sizes.values.get("p", 1)
    rows = arch.array_2d.rows
    staging = _staging_words(mapped, sizes, arch)
    per_query = _resident_words_per_query(mapped, sizes)
    live_at = lambda tp: _live_words(mapped, levels, sizes, tp)  # noqa: E731
    spill = 0.0
    if not fused:
        tile_p, live, resident = P, 0, staging  # each kernel stages tiles of its operands
    elif kind == "flat":
        # Largest power-of-two query tile (at least the array's rows) whose cross-pass
        # fibers, its Q/output rows and the K/V staging fit; else spill what does not fit.
        tile_p = min(P, rows)
        while tile_p * 2 <= P and live_at(tile_p * 2) + per_query * tile_p * 2 + staging <= capacity:
            tile_p *= 2
        live, resident = live_at(tile_p), per_query * tile_p
        notes.append("head granularity" if tile_p == P else f"row granularity, P1 = {tile_p}")
    elif not any(score_shaped(e, mapped) for e in mapped.einsums):
        # No [m, p] work (linear, flow): queries need not stay while keys stream; what must
        # stay is the cross-pass state of a whole head.
        tile_p, live, resident = P, live_at(P), 0
    else:
        # Q rows and running states of P0 queries stay on chip, double-buffered so the next
        # tile loads while this one computes; K and V stream through in m0 tiles. Cross-pass
        # tensors (none in a 1-pass cascade) get at most half the buffer.
        tile_p = min(P, (capacity - staging - min(live_at(1), capacity // 2)) // (2 * per_query))
        if tile_p < 1:
            raise MappingError(f"cascade {mapped.name}: one query's state ({per_query} words) does "
                               f"not fit the {arch.buffer.capacity_bytes} B buffer of {arch.name}")
        live, resident = live_at(tile_p), 2 * per_query * tile_p
        if passes > 1:
            notes.append(f"{passes} passes over m: K and V stream {passes} times per query tile")
    room = capacity - staging - resident
    if fused and live > room:
        # What does not fit is written after its pass and read back in each later one.
        spill = 1.0 - max(room, 0) / live
        notes.append(f"cross-pass tensors need {live * word / 2**20:.1f} MiB per tile of {tile_p} "
                     f"queries; {spill:.0%} spills to DRAM")
    return Mapping(kind=kind, cascade=mapped, arch=arch, sizes=sizes, placements=tuple(placements),
                   kernels=1 if fused else len(placements), passes=passes, tile_p=int(tile_p),
                   skip_masked=(kind == "sparse"), density=(density or 1.0) if kind == "sparse" else 1.0,
                   pipelined=fused, live_words=int(live), resident_words=int(resident),
                   spill_fraction=spill, notes=tuple(notes))


def query_tiles(mapping: Mapping) -> int:
    P = mapping.sizes.values.get("p", 1)
    return math.ceil(P / mapping.tile_p) if mapping.tile_p else 1
