"""Random softmax-attention programs, drawn from parts and rendered as Python source.

A `Program` is the source of one function ``attn(q, k, v, *extra)`` plus the argument
specifications its inputs are made from. Parts combine freely: layouts ([B,H,N,D], [B,N,H,D],
[B*H,N,D], k pre-transposed), GQA expansions, scale placements, contraction spellings (``@``,
matmul, bmm, baddbmm, einsum with drawn letters), a mask family (``fuzz_masks``) with
near-misses, how the mask is applied, and how the softmax is written; or one SDPA call.
The source is kept so a mismatch prints a program that can be pasted into a reproducer.
"""

from __future__ import annotations

import linecache
import math
from dataclasses import dataclass, field

import fuzz_masks as fm
import torch
import torch.nn.functional as F
from fuzz_draw import chooser
from fuzz_masks import ArgSpec, MaskBuild
from fuzz_render import render_manual, render_sdpa
from hypothesis import strategies as st

DTYPES = [torch.float32] * 5 + [torch.bfloat16] * 2 + [torch.float16] * 2 + [torch.float64]
SEQ = [1, 2, 3, 5, 7, 16, 17, 31, 33, 48, 63, 65]
HEAD_DIMS = [16, 16, 16, 16, 24, 32, 32, 40, 64, 80, 128, 256]
FAMILIES = ["none", "none", "causal", "causal", "causal_br", "window", "causal_window", "dilated", "grid2d",
            "blocked", "lifter", "lifter", "broadcast1", "padding", "padding", "runtime", "runtime"]
LARGE_SEQ = [8193, 8193, 8200]
LARGE_FAMILIES = ["lifter"]
NM_FAMILIES = {"causal", "causal_br", "window", "causal_window", "dilated", "grid2d", "blocked", "lifter"}


@dataclass(frozen=True)
class Sizes:
    B: int
    H: int
    Hkv: int
    N: int
    M: int
    D: int
    Dv: int


@dataclass
class Program:
    source: str
    args: list[ArgSpec]
    dtype: torch.dtype
    seed: int
    family: str
    sizes: Sizes
    tags: dict[str, str] = field(default_factory=dict)
    grad: bool = False
    second: str | None = None  # "new" | "edit": a second call with the run-time mask changed
    ref_dtype: torch.dtype = torch.float64  # float32 for the ~8k x 8k programs (memory, time)
    _fn: object = None
    _fn64: object = None

    def __getstate__(self):  # sent to worker processes without the exec'd functions
        return {**self.__dict__, "_fn": None, "_fn64": None}

    @property
    def fn(self):
        if self._fn is None:
            self._fn = compile_source(self.source)
        return self._fn

    @property
    def source64(self) -> str:
        return self.source.replace("torch.float32", "torch.float64").replace(".float()", ".double()")

    @property
    def fn64(self):
        """The program with its float32 casts made float64: the reference computes every
        value in float64 (mask positions keep their dtype: they are part of what is computed)."""
        if self._fn64 is None:
            self._fn64 = compile_source(self.source64)
        return self._fn64

    @property
    def reference_is_eager(self) -> bool:
        """The reference would recompute eager exactly (same dtype, no cast to widen)."""
        return self.ref_dtype == self.dtype and (self.dtype != torch.float64 or self.source64 == self.source)

    def describe(self) -> str:
        s = self.sizes
        return (f"family={self.family} dtype={str(self.dtype).removeprefix('torch.')} B={s.B} H={s.H} Hkv={s.Hkv} "
                f"N={s.N} M={s.M} D={s.D} Dv={s.Dv} seed={self.seed} grad={self.grad} second={self.second} "
                f"tags={self.tags}")


_COUNTER = [0]


def compile_source(source: str):
    """exec the program; its source is registered with linecache so tracebacks and the
    recognisers' stack traces show real lines."""
    _COUNTER[0] += 1
    filename = f"<fuzz-program-{_COUNTER[0]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"torch": torch, "F": F, "math": math}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the fuzzer's own generated code
    return namespace["attn"]


def _sizes(draw, family: str, layout: str, api: str, small: bool,
           large: bool = False) -> tuple[Sizes, tuple[int, int] | None]:
    if large:  # above the planner's concrete-check size (N·M > 2**26): only the proof stands
        n, m = sorted((draw.pick(LARGE_SEQ), draw.pick(LARGE_SEQ))) if family == "causal_br" else \
            (draw.pick(LARGE_SEQ), draw.pick(LARGE_SEQ))
        return Sizes(1, 1, 1, n, m, 16, 16), None
    seq = [s for s in SEQ if s <= 17] if small else SEQ
    b = draw.pick([1, 1, 2, 2, 3])
    h = draw.pick([1, 2, 2, 3, 4])
    hkv = h
    if layout != "flat" and h > 1 and draw.int(0, 3) == 0:
        hkv = draw.pick([d for d in range(1, h) if h % d == 0])
    n, m = draw.pick(seq), draw.pick(seq)
    grid = None
    if family == "grid2d":
        grid = (draw.int(1, 4 if small else 7), draw.int(1, 4 if small else 7))
        n = m = grid[0] * grid[1]
    elif family == "causal_br" and n > m:
        n, m = m, n
    elif family == "lifter" and not small and draw.int(0, 4) == 0:
        b, h, hkv = 1, 1, 1  # long enough that float16 / bfloat16 positions stop being exact
        n, m = draw.pick([255, 257, 300, 513]), draw.pick([255, 256, 257, 300, 513])
    d = draw.pick([16, 32] if small else HEAD_DIMS)
    if max(n, m) > 65:
        d = 16
    elif d >= 128 and max(n, m) > 33:
        d = 64
    dv = d if api == "sdpa" or draw.int(0, 4) else draw.pick([8, 16, 48])
    return Sizes(b, h, hkv, n, m, d, dv), grid


def _mask(draw, family: str, sz: Sizes, grid, flat: bool, near_misses: bool, trap: str | None = None) -> MaskBuild:
    fm.use_sizes(sz.N, sz.M)
    if family == "none":
        return MaskBuild("none", [], "nm")
    if family == "padding":
        return fm.padding(draw, sz.B, sz.M, flat)
    if family == "runtime":
        return fm.runtime(draw, sz.B, sz.H, sz.N, sz.M, flat, bias_ok=True)
    mb = {"causal": fm.causal, "causal_br": fm.causal_br, "window": fm.window, "causal_window": fm.causal_window,
          "dilated": fm.dilated, "broadcast1": fm.broadcast_one}.get(family)
    if family == "lifter":
        mb = fm.lifter_traps(draw, trap)
    elif mb is not None:
        mb = mb(draw)
    elif family == "grid2d":
        mb = fm.grid2d(draw, *grid)
    else:
        mb = fm.blocked(draw, sz.N, sz.M)
    if near_misses and family in NM_FAMILIES and draw.int(0, 9) < 3:
        mb = fm.near_miss(draw, mb, sz.N, sz.M)
    return mb


def _qkv_specs(draw, sz: Sizes, layout: str, dtype: torch.dtype, nan_ok: bool, v_nan_ok: bool) -> list[ArgSpec]:
    b, h, hkv, n, m, d, dv = sz.B, sz.H, sz.Hkv, sz.N, sz.M, sz.D, sz.Dv
    shapes = {
        "bhnd": [(b, h, n, d), (b, hkv, m, d), (b, hkv, m, dv)],
        "kT": [(b, h, n, d), (b, hkv, d, m), (b, hkv, m, dv)],
        "bnhd": [(b, n, h, d), (b, m, hkv, d), (b, m, hkv, dv)],
        "flat": [(b * h, n, d), (b * h, m, d), (b * h, m, dv)],
    }[layout]
    big = draw.pick([1.0] * 8 + [3.0, 10.0, 30.0, 100.0])
    specs = []
    for name, shape in zip(("q", "kt" if layout == "kT" else "k", "v"), shapes):
        pat = {"std": big if name != "v" else 1.0,
               "noncontig": draw.pick([None] * 6 + ["transposed", "sliced"])}
        allowed = nan_ok if name != "v" else v_nan_ok
        if allowed and draw.int(0, 11) == 0:
            # v only NaN: +-inf in v meets weights that underflow to exactly 0 in one kernel and not in
            # another (0 * inf = NaN vs tiny * inf = inf), a rounding coin flip rather than semantics.
            values = [math.nan] if name == "v" else [math.nan, math.inf, -math.inf]
            pat["inject"] = [(draw.float(), draw.pick(values))]
        specs.append(ArgSpec(name, "x", shape, pat))
    return specs


@st.composite
def programs(hdraw, *, api: str | None = None, families: list[str] | None = None, small: bool = False,
             grad: bool | None = None, second: bool = False, near_misses: bool = True,
             dtypes: list[torch.dtype] | None = None, large: bool = False, trap: str | None = None) -> Program:
    """One random program. ``second``: the mask arrives at run time and a second call changes it.
    ``small``: sizes for the Triton interpreter; ``large``: N, M ~ 8k, position-only masks;
    ``trap``: the kind of `fuzz_masks.lifter_traps` mask (with ``families=["lifter"]``)."""
    draw = chooser(hdraw, salt=repr((api, families, small, grad, second, near_misses, dtypes, large, trap)))
    dtype = draw.pick(dtypes or ([torch.float32, torch.float32, torch.bfloat16] if large else DTYPES))
    api = api or draw.pick(["manual"] * 4 + ["sdpa"])
    layout = draw.pick(["bhnd", "bhnd", "bnhd", "flat"] + (["kT"] if api == "manual" else []))
    fams = families or (["runtime", "padding"] if second else LARGE_FAMILIES if large else FAMILIES)
    family = draw.pick(fams)
    if layout == "flat" and family == "padding":
        layout = "bhnd"
    sz, grid = _sizes(draw, family, layout, api, small, large)
    mask = _mask(draw, family, sz, grid, layout == "flat", near_misses, trap)
    if grad is None:
        grad = not second and not large and draw.int(0, 6) == 0
    # No NaN/inf injected where gradients are taken: eager's matmul backward spreads one NaN through
    # 0·NaN to every gradient entry, masked or not, which says nothing about the rewrite.
    specs = _qkv_specs(draw, sz, layout, dtype, nan_ok=not grad, v_nan_ok=not grad and not mask.present)
    specs += mask.args
    renderer = render_sdpa if api == "sdpa" else render_manual
    source, tags = renderer(draw, layout, sz, mask, dtype, [s.name for s in specs])
    tags = {"api": api, "layout": layout, **tags}
    return Program(source=source, args=specs, dtype=dtype, seed=draw.int(0, 2**31 - 1),
                   family=mask.family, sizes=sz, tags=tags, grad=grad,
                   second=draw.pick(["new", "edit"]) if second else None,
                   ref_dtype=torch.float32 if large else torch.float64)


def base_family(family: str) -> str:
    """The family without its near-miss suffix (for the summary)."""
    head, _, miss = family.partition("+")
    return f"{head}+near_miss" if miss and miss != "causal" else family
