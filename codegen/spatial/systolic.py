"""Cycles of a contraction on a rows × cols systolic array, per dataflow.

The structure follows SCALE-Sim: the output (or the stationary operand) is cut into
``folds`` of the array's size; each fold streams ``T`` operand vectors through the array
and pays the skew of filling and draining it. With C[M,N] = A[M,K]·B[K,N]:

==========  ==========  ==========  ===  ===========================
dataflow     rows (Sr)  cols (Sc)    T   fill + drain per fold
==========  ==========  ==========  ===  ===========================
os (output)      M          N        K   rows + cols − 2
ws (weight)      K          N        M   2·rows + cols − 2 (B loaded first)
is (input)       K          M        N   2·rows + cols − 2 (A loaded first)
==========  ==========  ==========  ===  ===========================

Unpipelined (a GEMM kernel on its own, as SCALE-Sim runs it) every fold pays its fill and
drain. Pipelined (inside a fused cascade) the next fold enters the skewed wavefront behind
the previous one, so the fill and drain are paid once per stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rewrite.ir.cascade import Einsum

from .work import MappingError, Sizes

DATAFLOWS = ("os", "ws", "is")


@dataclass(frozen=True)
class GemmShape:
    """A contraction seen as a batch of GEMMs C[M,N] = A[M,K]·B[K,N] (roles of its ranks)."""

    batch: int
    M: int
    N: int
    K: int

    @property
    def macs(self) -> int:
        return self.batch * self.M * self.N * self.K


def gemm_shape(e: Einsum, sizes: Sizes, walked: tuple[str, ...]) -> GemmShape:
    """Ranks only in the first input and the output are M, only in the second input and the
    output are N, summed ranks are K, ranks everywhere are batch."""
    a, b = (set(i.ranks) for i in e.inputs)
    out = set(e.output.ranks)
    roles = {"batch": 1, "M": 1, "N": 1, "K": 1}
    for r in walked:
        if r not in out:
            roles["K"] *= sizes[r]
        elif r in a and r in b:
            roles["batch"] *= sizes[r]
        elif r in a:
            roles["M"] *= sizes[r]
        elif r in b:
            roles["N"] *= sizes[r]
        else:
            raise MappingError(f"Einsum {e.name}: output rank {r} comes from no input")
    return GemmShape(**roles)


@dataclass(frozen=True)
class SystolicCost:
    cycles: float
    folds: int
    fold_cycles: float       # compute cycles of one fold (T)
    fill_drain: float        # cycles paid to fill and drain, in total
    mapping_efficiency: float  # fraction of PEs a fold keeps busy
    buffer_reads: float      # operand words read from the global buffer
    buffer_writes: float     # output words written to it


def systolic_cycles(shape: GemmShape, rows: int, cols: int, dataflow: str = "os",
                    pipelined: bool = False) -> SystolicCost:
    if dataflow not in DATAFLOWS:
        raise MappingError(f"unknown dataflow {dataflow!r}; use one of {DATAFLOWS}")
    M, N, K = shape.M, shape.N, shape.K
    if dataflow == "os":
        sr, sc, t, skew = M, N, K, rows + cols - 2
    elif dataflow == "ws":
        sr, sc, t, skew = K, N, M, 2 * rows + cols - 2
    else:
        sr, sc, t, skew = K, M, N, 2 * rows + cols - 2
    folds = math.ceil(sr / rows) * math.ceil(sc / cols) * shape.batch
    fill = skew if pipelined else skew * folds
    cycles = folds * t + fill
    eff = (sr * sc) / (math.ceil(sr / rows) * rows * math.ceil(sc / cols) * cols)
    # Each fold streams one operand along the rows and one along the columns, T deep, and
    # (unless it is the stationary one) writes its rows × cols outputs once.
    reads = folds * t * (rows + cols) * eff
    writes = shape.batch * M * N
    return SystolicCost(cycles=float(cycles), folds=folds, fold_cycles=float(t), fill_drain=float(fill),
                        mapping_efficiency=eff, buffer_reads=float(reads), buffer_writes=float(writes))


def best_dataflow(shape: GemmShape, rows: int, cols: int, pipelined: bool,
                  allowed: tuple[str, ...] = DATAFLOWS) -> tuple[str, SystolicCost]:
    """The dataflow with the fewest cycles (ties keep the order of ``allowed``)."""
    costs = [(df, systolic_cycles(shape, rows, cols, df, pipelined)) for df in allowed]
    return min(costs, key=lambda dc: dc[1].cycles)
