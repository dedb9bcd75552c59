"""What a recogniser hands to the passes: a matched attention site and its bindings.

A `Site` is the normalised attention ``softmax(scale·mod(q kᵀ) + Σ bias, keep) @ v`` (``mod`` a
`ScoreMod`, the identity for most sites) plus the facts
the recogniser read off the graph: sizes, the scale, the fill of masked scores and one
`MaskTerm` per mask or bias operand (its keep predicate over the positions, lifted by
patterns/lift.py, and thunks that give its value). Passes decide from these alone; the
`TensorPlan` bindings (which graph value feeds which operand) are used only by the fx rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sympy
import torch

from .cascade import Cascade
from .score_mod import ScoreMod

if TYPE_CHECKING:
    from torch.fx import Node


@dataclass
class TensorPlan:
    """How to build a canonical operand from a graph value: permute, then reshape."""

    node: Node
    perm: list[int]
    shape: list[int]
    negate: bool = False  # a bias that was subtracted
    invert: bool = False  # a bool mask whose True means "masked"
    factor: float = 1.0  # a bias later multiplied by the scale
    rows_dim: int | None = None  # the dim of ``node`` that holds the query (or key, for k/v) rows
    cols_dim: int | None = None  # the dim that holds the key columns (masks and biases)
    dtype: torch.dtype | None = None  # a bias: the dtype eager adds it to the scores in


@dataclass
class MaskTerm:
    """One mask or bias operand of a softmax site, as the recogniser read it.

    ``predicate``: what it keeps, a sympy Boolean over the query/key positions ``p``, ``m`` in
    which run-time values appear as opaque ``R_<name>(…)`` factors; None when the recogniser could
    not lift it exactly (``lift_failure`` says which op). A bias is a mask only when it is
    ``where(keep, 0, fill)``: then ``fill`` is the value it adds where it does not keep (already
    negated and scaled as the scores are); any other bias has ``predicate`` None and is applied as
    it is. ``constant()``: its value in the canonical layout when it depends on no input, else
    None; ``first_value()``: its value on the first call's inputs, or None. ``block_table``: a
    run-time bool mask read per block, ``T[.., ⌊p/bq⌋, ⌊m/bk⌋]``, as (binding of T, bq, bk)."""

    binding: TensorPlan
    is_bias: bool
    predicate: sympy.Basic | None
    fill: float | None = None
    lift_failure: str = ""
    constant: Callable[[], torch.Tensor | None] = field(default=lambda: None, repr=False)
    first_value: Callable[[], torch.Tensor | None] = field(default=lambda: None, repr=False)
    block_table: tuple[TensorPlan, int, int] | None = None


@dataclass
class Site:
    """A softmax-attention sub-graph, normalised: out = softmax(scale·q kᵀ + Σbias, keep) @ v."""

    spelling: str
    location: str
    q: TensorPlan
    k: TensorPlan
    v: TensorPlan
    out_node: Node
    out_perm: list[int]
    out_shape: list[int]
    out_dtype: torch.dtype
    scale: float = 1.0
    biases: list[TensorPlan] = field(default_factory=list)
    keeps: list[TensorPlan] = field(default_factory=list)
    fill: float | None = None  # value written into masked scores (-inf or a finite minimum)
    fill_biased: bool = False  # a bias is added after a finite fill: removed scores are fill + bias (GPT-Neo)
    nodes: list[Node] = field(default_factory=list)  # every node the site replaces
    batch_sizes: list[int] = field(default_factory=list)
    n: int = 0
    m: int = 0
    e: int = 0
    f: int = 0
    notes: list[str] = field(default_factory=list)
    # Set by recognisers of calls that already are attention (F.scaled_dot_product_attention).
    causal: bool = False
    causal_offset: int = 0
    gqa_groups: int = 1
    kept_as_is: bool = False
    terms: list[MaskTerm] = field(default_factory=list)  # set by patterns/mask_terms.py, keeps first
    cascade: Cascade | None = None  # the softmax cascade with the terms' keep predicate on QK
    dtype: torch.dtype | None = None  # q, k, v promoted: what the kernel computes in
    score_mod: ScoreMod | None = None  # the pointwise program on the raw product, before scale and masks
    mod_leaves: list[TensorPlan] = field(default_factory=list)  # its tensors L0, L1, … ([*batch, N, M] broadcast)
