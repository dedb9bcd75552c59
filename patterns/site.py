"""What a recogniser hands to the passes: a matched attention site and its bindings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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
