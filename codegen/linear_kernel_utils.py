"""Helpers shared by the linear-time kernels (codegen/triton_linear.py, triton_decay.py, triton_flow.py):
the dot product the kernel families use, the masked row-tile load, host-side integer helpers (plain
Python: Triton's constexpr functions cost ~10 µs a call on the host), the segment split, and the tuner that times each
candidate configuration once per shape and caches the fastest."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST for Triton's CPU interpreter, which multiplies bfloat16 dot operands as their
    uint16 bit patterns (triton 3.8, also noted in triton_attention.py): bf16 → fp32 is exact."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def load_rows(P, base, rows, stride_n, cols, rmask, width):
    """The tile P[base + rows · stride_n + cols] of a [bh, N, width] operand, zero outside the valid
    rows (``rmask``) and past ``width`` columns (a head dim padded to a power of two)."""
    return tl.load(P + base + rows[:, None] * stride_n + cols[None, :],
                   mask=rmask[:, None] & (cols[None, :] < width), other=0.0)


def upcast_dots(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(state products, low-precision products): IEEE for fp32 inputs, tf32 / the input dtype otherwise.
    (The precision argument only matters for fp32 operands; bf16/fp16 dots run in their dtype.)"""
    return ("ieee", "ieee") if dtype == torch.float32 else ("tf32", "tf32")


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division: triton.cdiv is a constexpr function in newer Triton, ~10 µs a call."""
    return -(-a // b)


def pow2(x: int) -> int:
    """Host-side next power of two (≥ 1), without triton.next_power_of_2's call overhead."""
    return 1 << max(0, x - 1).bit_length()


def pad_dim(d: int) -> int:
    """A head dim padded for tl.arange/tl.dot: a power of two, at least 16."""
    return max(16, pow2(d))


def segments(bh: int, n: int, block: int, target: int = 528) -> tuple[int, int]:
    """(segments, segment length): enough (bh, segment) programs to fill the GPU, each a
    whole number of blocks long."""
    blocks = cdiv(n, block)
    nseg = max(1, min(blocks, cdiv(target, bh)))
    seg_len = cdiv(blocks, nseg) * block
    return cdiv(n, seg_len), seg_len


TUNED: dict = {}
TIMINGS: dict = {}  # key → [(configuration, median ms)] of every candidate the tuner timed


def tuned(key, candidates: list[dict], run) -> dict:
    """The fastest of ``candidates`` for ``key`` on this GPU (timed once, then cached)."""
    if key not in TUNED and len(candidates) == 1:
        TUNED[key] = candidates[0]
    if key not in TUNED:
        from triton.testing import do_bench

        times = []
        for cfg in candidates:
            try:
                times.append(do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median"))
            except Exception:  # a configuration that does not fit this GPU (shared memory)
                times.append(float("inf"))
        TIMINGS[key] = list(zip(candidates, times))
        TUNED[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return TUNED[key]


def rows3d(t: torch.Tensor) -> torch.Tensor:
    """[..., N, D] → [B·H, N, D] with unit stride along D."""
    t = t.reshape(-1, *t.shape[-2:])
    return t if t.stride(-1) == 1 else t.contiguous()
