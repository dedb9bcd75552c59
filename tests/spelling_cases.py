"""The types and runners of the spelling catalogue (tests/spellings.py), and the shapes it is drawn on.

``Shape`` is one draw of sizes, ``Case`` one runnable example with its float64 expected output,
``Spelling`` one catalogue entry (its callable, layout, expected mask variant, input builder and
the constraints on the shapes it accepts). ``case_for`` / ``run_eager_float64`` / ``first_output``
run an entry; ``shape_strategy`` (Hypothesis) and ``fixed_shapes`` (deterministic self-checks)
draw the shapes. The input builders are in tests/spelling_inputs.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Case", "Shape", "Spelling", "as_float64", "case_for", "first_output", "fixed_shapes",
           "run_eager_float64", "shape_strategy"]


# ----------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Shape:
    """One draw of sizes. k/v carry Hkv heads; Dv is the value (output) head size."""

    B: int
    H: int
    Hkv: int
    N: int
    M: int
    D: int
    Dv: int
    dtype: torch.dtype
    seed: int


@dataclass
class Case:
    """What one example runs: ``fn(*args)``, expected to equal ``expected`` (float64)."""

    fn: Callable[..., Any]
    args: tuple
    expected: torch.Tensor


@dataclass(frozen=True)
class Spelling:
    name: str
    fn: Callable[..., Any] | None  # None: built per case (needs sizes), see Case.fn
    layout: str
    expected_variant: str  # "dense" | "causal"
    make_inputs: Callable[[Shape], Case]
    kv_heads: str = "same"  # "same" (Hkv == H) | "group" (GQA, Hkv < H divides H) | "one" (MQA)
    square: bool = False  # mask built for N == M only
    same_dv: bool = False  # value head size must equal D
    empty_rows: str | None = None  # None | "nan" | "zero": fully-masked rows fed, and what eager gives
    tags: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:  # short ids in pytest output
        return f"Spelling({self.name})"


# ----------------------------------------------------------------------------- runners


def as_float64(obj: Any) -> Any:
    """Floating tensors to float64, modules deep-copied to float64; the rest unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj).to(torch.float64)
    if isinstance(obj, tuple):
        return tuple(as_float64(o) for o in obj)
    return obj


def case_for(spelling: Spelling, shape: Shape) -> Case:
    """Build a case; the callable is the spelling's fn unless the builder made one."""
    case = spelling.make_inputs(shape)
    if case.fn is None:
        case.fn = spelling.fn
    return case


def run_eager_float64(case: Case) -> torch.Tensor:
    return as_float64(case.fn)(*as_float64(case.args))


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


# -------------------------------------------------------------------------- shape draws

# Hypothesis's first example is built from each list's first element, and every spelling
# gets it: lead with an ordinary size so that the degenerate ones (1) are drawn, not forced.
HEAD_DIMS = (64, 16, 24, 32, 80, 128)
ODD_SIZES = (17, *(n for n in range(1, 68, 2) if n != 17))


def shape_strategy(spelling: Spelling, dtypes: tuple[torch.dtype, ...]):
    """Hypothesis strategy of `Shape`s a spelling accepts."""
    from hypothesis import strategies as st

    @st.composite
    def draw(d):
        if spelling.kv_heads == "same":
            h = d(st.sampled_from((2, 1, 4)))
            hkv = h
        elif spelling.kv_heads == "one":
            h, hkv = d(st.sampled_from((2, 4))), 1
        else:
            h = d(st.sampled_from((2, 4)))
            hkv = d(st.sampled_from([x for x in (1, 2) if x < h]))
        n = d(st.sampled_from(ODD_SIZES))
        m = n if spelling.square else d(st.sampled_from(ODD_SIZES))
        head = d(st.sampled_from(HEAD_DIMS))
        dv = head if spelling.same_dv else d(st.sampled_from(HEAD_DIMS))
        return Shape(
            B=d(st.sampled_from((1, 2))),
            H=h,
            Hkv=hkv,
            N=n,
            M=m,
            D=head,
            Dv=dv,
            dtype=d(st.sampled_from(dtypes)),
            seed=d(st.integers(0, 2**31 - 1)),
        )

    return draw()


def fixed_shapes(spelling: Spelling, dtype: torch.dtype) -> list[Shape]:
    """A few deterministic shapes (odd, N != M where allowed, GQA where asked) for self-checks."""
    out = []
    for i, (b, n, m, d, dv) in enumerate(
        [(2, 17, 33, 64, 32), (1, 1, 5, 16, 16), (1, 67, 67, 128, 80), (1, 9, 1, 24, 24)]
    ):
        if spelling.square:
            m = n
        if spelling.same_dv:
            dv = d
        h, hkv = {"same": (4, 4), "group": (4, 2), "one": (4, 1)}[spelling.kv_heads]
        if spelling.kv_heads == "same" and i == 1:
            h = hkv = 1
        out.append(Shape(B=b, H=h, Hkv=hkv, N=n, M=m, D=d, Dv=dv, dtype=dtype, seed=1000 + i))
    return out
