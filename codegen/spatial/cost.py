"""The analytic cost model: cycles, utilisation, traffic, energy and buffer size of a Mapping.

Every number is a closed form in the rank sizes, so a 1M-token point costs microseconds.
A fused kernel runs its arrays and its memory transfers concurrently, so its latency is
the largest of: 2-D array cycles, 1-D array cycles, DRAM transfer cycles and global-buffer
transfer cycles (FuseMax's "max of memory and the pipelined critical path"). An unfused
mapping runs its kernels one after another, each bound the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rewrite.ir.cascade import Einsum, rank_family

from .mapper import Mapping, Placement, cross_pass_tensors, query_tiles
from .systolic import best_dataflow, gemm_shape, systolic_cycles
from .work import iteration_ranks, producers, score_shaped


@dataclass(frozen=True)
class EinsumCost:
    einsum: str
    array: str
    kernel: int
    pass_index: int
    points: float            # iteration points actually computed (after skipped tiles)
    ops: float               # PE cycles of work (MACs on the 2-D array, operations on 1-D)
    cycles: float            # cycles on its array, fill and drain included
    fill_drain: float
    dataflow: str | None
    buffer_reads: float = 0.0  # operand words a contraction streams from the global buffer
    bound: str = ""          # what bounds the kernel the Einsum runs in


@dataclass(frozen=True)
class Cost:
    mapping: str
    arch: str
    cycles: float
    seconds: float
    bound: str               # "2-D array", "1-D array", "DRAM" or "buffer" (the largest term)
    stage_cycles: dict[str, float]   # busy cycles of each pipeline stage (summed over kernels)
    util_2d: float
    util_1d: float
    dram_bytes: float
    buffer_bytes: float
    energy_pj: float
    energy_breakdown_pj: dict[str, float]
    buffer_required_bytes: float
    passes: int
    tile_p: int
    spill_fraction: float
    compute_floor_cycles: float
    bandwidth_floor_cycles: float
    einsums: tuple[EinsumCost, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def _kept(mapping: Mapping, e: Einsum) -> float:
    return mapping.density if (mapping.skip_masked and score_shaped(e, mapping.cascade)) else 1.0


def _einsum_cost(mapping: Mapping, pl: Placement, e: Einsum) -> EinsumCost:
    arch = mapping.arch
    kept = _kept(mapping, e)
    points = pl.points * kept
    ops = points * pl.cycles_per_point
    fill, dataflow, reads = 0.0, None, 0.0
    if pl.contraction:
        shape = gemm_shape(e, mapping.sizes, iteration_ranks(e, producers(mapping.cascade)))
        rows, cols = arch.array_2d.rows, arch.array_2d.cols
        if pl.dataflow:
            dataflow, sc = pl.dataflow, systolic_cycles(shape, rows, cols, pl.dataflow, mapping.pipelined)
        else:
            dataflow, sc = best_dataflow(shape, rows, cols, mapping.pipelined)
        cycles = sc.cycles * kept
        fill = sc.fill_drain * kept
        reads = sc.buffer_reads * kept
    else:
        width = arch.array_2d.pes if pl.array == "2d" else arch.array_1d.lanes
        cycles = ops / width
    return EinsumCost(einsum=e.name, array=pl.array, kernel=pl.kernel, pass_index=pl.pass_index,
                      points=points, ops=ops, cycles=cycles, fill_drain=fill, dataflow=dataflow,
                      buffer_reads=reads)


def _tensor_words(mapping: Mapping, ranks, drop: str | None = None) -> float:
    return float(math.prod(mapping.sizes[r] for r in ranks if r != drop))


def _read_words(mapping: Mapping, reader: Einsum, ref) -> float:
    """Words ``reader`` reads of ``ref``: a final-state read drops the scan rank; a
    skipped tile is not read."""
    prod = producers(mapping.cascade)
    src = prod.get(ref.name)
    drop = src.scan if (src is not None and src is not reader and src.scan
                        and src.scan not in iteration_ranks(reader, prod)) else None
    words = _tensor_words(mapping, ref.ranks, drop)
    fams = {rank_family(r) for r in ref.ranks}
    if mapping.skip_masked and "p" in fams and "m" in fams:
        words *= mapping.density
    return words


def _traffic(mapping: Mapping, costs: dict[str, EinsumCost]) -> tuple[list[float], list[float], float]:
    """DRAM and buffer words per kernel, and the compulsory DRAM words (inputs and outputs once)."""
    c = mapping.cascade
    prod = producers(c)
    n_k = mapping.kernels
    dram = [0.0] * n_k
    buf = [0.0] * n_k
    ext_inputs = {i.name: i for e in c.einsums for i in e.inputs if i.name not in prod}
    compulsory = sum(_tensor_words(mapping, i.ranks) for i in ext_inputs.values())
    compulsory += sum(_tensor_words(mapping, prod[o].output.ranks) for o in c.outputs)
    place = {pl.einsum: pl for pl in mapping.placements}
    if mapping.kind == "unfused":
        for e in c.einsums:
            k = place[e.name].kernel
            for i in e.inputs:
                if i.name != e.name:
                    dram[k] += _read_words(mapping, e, i)
            dram[k] += _tensor_words(mapping, e.output.ranks)
            buf[k] += dram[k]
    else:
        tiles = query_tiles(mapping)
        for name, ref in ext_inputs.items():
            fams = {rank_family(r) for r in ref.ranks}
            words = _tensor_words(mapping, ref.ranks)
            if "m" in fams and "p" not in fams:
                readers = [e for e in c.einsums if any(i.name == name for i in e.inputs)]
                m_passes = {place[e.name].pass_index for e in readers}
                # Re-streamed for every query tile only when read next to the queries.
                per_tile = tiles if any(score_shaped(e, c) for e in readers) else 1
                dens = mapping.density if mapping.skip_masked else 1.0
                words *= max(1.0, per_tile * max(1, len(m_passes)) * dens)
            dram[0] += words
        dram[0] += sum(_tensor_words(mapping, prod[o].output.ranks) for o in c.outputs)
        for e, later in cross_pass_tensors(c, {pl.einsum: pl.pass_index for pl in mapping.placements}):
            words = _tensor_words(mapping, e.output.ranks, e.scan)
            dram[0] += mapping.spill_fraction * words * (1 + len(later))
        buf[0] += dram[0]
    # In a fused kernel, a tensor that leaves its array or its pass goes through the buffer:
    # written once, read once by each such reader (a contraction's reads are its operand streams).
    for e in c.einsums:
        pe = place[e.name]
        if mapping.kind != "unfused":
            away = [r for r in c.einsums if r is not e and any(i.name == e.name for i in r.inputs)
                    and (place[r.name].array != pe.array or place[r.name].pass_index != pe.pass_index)]
            if away:
                buf[pe.kernel] += _tensor_words(mapping, e.output.ranks, e.scan) * _kept(mapping, e)
                buf[pe.kernel] += sum(_read_words(mapping, r, e.output) for r in away
                                      if not place[r.name].contraction)
        buf[pe.kernel] += costs[e.name].buffer_reads
    return dram, buf, compulsory


def evaluate(mapping: Mapping) -> Cost:
    arch = mapping.arch
    c = mapping.cascade
    by_name = {e.name: e for e in c.einsums}
    costs = {pl.einsum: _einsum_cost(mapping, pl, by_name[pl.einsum]) for pl in mapping.placements}
    dram, buf, compulsory = _traffic(mapping, costs)
    dram_cyc_per_word = arch.word_bytes / arch.dram_bytes_per_cycle
    buf_cyc_per_word = 1.0 / arch.buffer.bandwidth_words_per_cycle
    stage = {"2-D array": 0.0, "1-D array": 0.0, "DRAM": 0.0, "buffer": 0.0}
    total = 0.0
    bound_count: dict[str, float] = {}
    kernel_bound: dict[int, str] = {}
    for k in range(mapping.kernels):
        terms = {
            "2-D array": sum(ec.cycles for ec in costs.values() if ec.kernel == k and ec.array == "2d"),
            "1-D array": sum(ec.cycles for ec in costs.values() if ec.kernel == k and ec.array == "1d"),
            "DRAM": dram[k] * dram_cyc_per_word,
            "buffer": buf[k] * buf_cyc_per_word,
        }
        for name, v in terms.items():
            stage[name] += v
        bound = max(terms, key=terms.get)
        kernel_bound[k] = bound
        total += terms[bound]
        bound_count[bound] = bound_count.get(bound, 0.0) + terms[bound]
    einsums = tuple(EinsumCost(**{**asdict(ec), "bound": kernel_bound[ec.kernel]}) for ec in costs.values())
    ops_2d = sum(ec.ops for ec in costs.values() if ec.array == "2d")
    ops_1d = sum(ec.ops for ec in costs.values() if ec.array == "1d")
    dram_words, buf_words = sum(dram), sum(buf)
    en = arch.energy
    breakdown = {"2-D array": ops_2d * en.mac_pj, "1-D array": ops_1d * en.vector_op_pj,
                 "buffer": buf_words * en.buffer_access_pj, "DRAM": dram_words * en.dram_access_pj}
    word = arch.word_bytes
    required = (mapping.live_words + mapping.resident_words) * word
    return Cost(
        mapping=mapping.kind, arch=arch.name, cycles=total, seconds=total / arch.clock_hz,
        bound=max(bound_count, key=bound_count.get) if bound_count else "2-D array",
        stage_cycles=stage,
        util_2d=ops_2d / (arch.array_2d.pes * total) if total else 0.0,
        util_1d=ops_1d / (arch.array_1d.lanes * total) if total else 0.0,
        dram_bytes=dram_words * word, buffer_bytes=buf_words * word,
        energy_pj=sum(breakdown.values()), energy_breakdown_pj=breakdown,
        buffer_required_bytes=float(required), passes=mapping.passes, tile_p=mapping.tile_p,
        spill_fraction=mapping.spill_fraction,
        compute_floor_cycles=max(ops_2d / arch.array_2d.pes, ops_1d / arch.array_1d.lanes),
        bandwidth_floor_cycles=compulsory * dram_cyc_per_word,
        einsums=einsums, notes=mapping.notes)
