"""What the passes decide for one site, once: the `Plan` codegen and the fx rewrite carry out.

A plan names the variant (what the attention is), the kernel (what runs it), the proven mask
specification, which operand tensors the kernel still applies, and every run-time check that
may change the kernel (a run-time mask that was causal or a band on the first call is re-checked
per tensor; a block map too dense for tiles runs the dense kernel). Kernels never re-decide what
is here; they report which kernel really ran (codegen/counters.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy
import torch

from .cascade import Cascade
from .cascade import m as M_SYM
from .cascade import p as P_SYM
from .mask import MaskSpec
from .site import Site, TensorPlan

VARIANTS = ("dense", "causal", "neighborhood", "block_sparse", "linear", "flow")
KERNELS = ("sdpa", "triton", "torch", "reference")


@dataclass
class Plan:
    site: Site  # or a linear/flow site of patterns/ (same role: facts read off the graph, bindings)
    variant: str  # one of VARIANTS
    kernel: str  # one of KERNELS
    mask: MaskSpec
    causal: bool = False
    causal_offset: int = 0
    biases: list[TensorPlan] = field(default_factory=list)
    keeps: list[TensorPlan] = field(default_factory=list)
    masked_row: str = "nan"
    fill: float = float("-inf")  # what eager gives the scores the op removes (its mask, causal rule, structure)
    additive: bool = False  # that fill is added to the score (a where-built bias), not written over it
    notes: list[str] = field(default_factory=list)
    mask_causal_hint: int | None = None  # a run-time mask that was causal on the first call (re-checked per call)
    predicate: sympy.Basic | None = None  # the proven positional predicate (for the cascade)
    constant_mask: torch.Tensor | None = None  # a position-only mask folded to a constant
    kept_fraction: float | None = None  # measured on the mask tensor (block-sparse sites)
    implied: bool = False  # the structure is implied by the mask tensors kept (nothing was dropped)
    mask_blocks: tuple[int, int] | None = None  # the one mask is a block table: keep[⌊p/bq⌋, ⌊m/bk⌋]
    recheck: bool = False  # the structure was read off a run-time mask's first value: the op re-checks it
    proof: list[str] = field(default_factory=list)  # the linear-time families: the steps of the reassociation proof
    direct: bool = False  # runs as a direct aten SDPA call in the graph (passes/direct.py)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Plan: unknown variant {self.variant!r}; use one of {VARIANTS}")
        if self.kernel not in KERNELS:
            raise ValueError(f"Plan: unknown kernel {self.kernel!r}; use one of {KERNELS}")

    @property
    def sparse(self) -> bool:
        """Runs through ``rewrite::sparse_attention`` (a structure or a block map)."""
        return self.variant in ("neighborhood", "block_sparse")

    @property
    def cascade(self) -> Cascade:
        pred = None
        if self.mask.kind == "causal":
            pred = sympy.Le(M_SYM, P_SYM + self.mask.offset)
        elif self.predicate is not None and self.mask.kind != "dense":
            pred = self.predicate
        elif self.mask.kind != "dense":
            pred = sympy.Symbol("mask(p,m)")
        s = self.site
        lead = s.batch_sizes or [1]
        sizes = dict(p=s.n, m=s.m, e=s.e, f=s.f, b=math.prod(lead[:-1]), h=lead[-1])
        mod = str(s.score_mod) if getattr(s, "score_mod", None) is not None else ""
        return Cascade.softmax_attention(mask=pred, batch="bh", score_mod=mod).with_sizes(**sizes)

    @property
    def density(self) -> float:
        if self.kept_fraction is not None:
            return self.kept_fraction
        if self.mask.kind == "dense":
            return 1.0
        return self.mask.density

    @property
    def flops(self) -> int:
        s = self.site
        b = math.prod(s.batch_sizes) if s.batch_sizes else 1
        if self.variant in ("linear", "flow"):  # φK·V and φQ·state over every position: no N×M term
            return int(2 * b * (s.m + s.n) * s.e * s.f)
        return int(2 * b * s.n * s.m * (s.e + s.f) * self.density)
