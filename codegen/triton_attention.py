"""Fused softmax-attention forward in Triton (1-pass online softmax, FlashAttention-2 form).

Public entry point: :func:`triton_attention`. It computes, per batch ``b`` and query head ``h``,

    S = scale · q kᵀ + bias          (masked entries, causal or boolean, are −inf)
    O = softmax(S, dim=-1) @ v       (float32 arithmetic, result cast to q.dtype)

exactly as eager PyTorch does in float32, including its corner cases: a row whose scores are all
−inf gives NaN (eager's softmax gives 0/0 there), a row whose scores are all ``finfo.min`` gives the
uniform average of v. GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``.

Inputs keep their strides: q/k/v/bias/mask are never copied; strides go to the kernel (0 for
broadcast dims of bias and mask).

The kernel runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (the test suite's mode;
the variable must be set before this module is imported, because ``triton.jit`` decides at
decoration time whether it builds an interpreted function).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_tiles import LOG2E, attn_tile, load_tile, store_rows
from .score_mod_gen import leaf_args

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer path only
    TensorDescriptor = None

__all__ = ["AttentionConfig", "choose_config", "triton_attention"]

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Bias, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_mb, stride_mh, stride_mn, stride_mm,
    stride_ob, stride_oh, stride_on, stride_od,
    HQ, GROUP, N, M, D, DV, qk_scale, causal_offset, num_m_blocks, mod_args,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, FOLD_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr, SCORE_MOD: tl.constexpr, NATURAL: tl.constexpr,
):
    # Q, K, V, Out are pointers, or with USE_TMA host-built 4-D TMA descriptors over the same
    # strided tensors (Hopper's bulk tensor copy engine: fewer address instructions, async copies).
    # 1-D grid, query blocks of one (b, h) adjacent so that they share K/V in L2. Causal: the
    # last query block (the most key tiles) starts first, which shortens the tail of the launch.
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    if CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m
    b32 = bh // HQ
    h32 = bh % HQ
    hk32 = h32 // GROUP  # GQA / MQA
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    hk = hk32.to(tl.int64)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    if USE_TMA:
        q = Q.load([b32, h32, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        k_base = K
        v_base = V
    else:
        q = load_tile(Q + b * stride_qb + h * stride_qh
                       + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                       offs_m, offs_d, N, D, not EVEN_N, PAD_D)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
    out_dtype = q.dtype
    if UPCAST_DOT:
        q = q.to(tl.float32)
    bias_base = Bias + b * stride_bb + h * stride_bh
    mask_base = Mask + b * stride_mb + h * stride_mh

    rm = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    rd = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Key tiles: [0, lo) need no predicate at all (in range, and below the diagonal for every row
    # of the block); [lo, hi) are the tiles the causal diagonal or the end of M crosses; tiles
    # from hi on lie entirely above the diagonal and are never visited.
    full_end = (M // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), M)
        # tile [n, n+BLOCK_N) is visible to every row iff n + BLOCK_N − 1 ≤ start_m + causal_offset
        lo = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        lo = tl.minimum(tl.minimum(lo, hi), full_end)
    else:
        hi = M
        lo = full_end

    for start_n in range(0, lo, BLOCK_N):
        acc, rd, rm = attn_tile(
            acc, rd, rm, q, k_base, v_base, bias_base, mask_base,
            start_n, offs_m, offs_n, offs_d, offs_dv, N, M, D, DV, qk_scale, causal_offset,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_bm, stride_mn, stride_mm,
            HAS_BIAS, HAS_MASK, False, False, not EVEN_N, PAD_D, PAD_DV, DOT_PRECISION, UPCAST_DOT,
            FOLD_SCALE, b32, hk32, USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV,
            SCORE_MOD=SCORE_MOD, mod_args=mod_args, mod_b=b, mod_h=h,
        )
    for start_n in range(lo, hi, BLOCK_N):
        acc, rd, rm = attn_tile(
            acc, rd, rm, q, k_base, v_base, bias_base, mask_base,
            start_n, offs_m, offs_n, offs_d, offs_dv, N, M, D, DV, qk_scale, causal_offset,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_bm, stride_mn, stride_mm,
            HAS_BIAS, HAS_MASK, CAUSAL, not EVEN_M, not EVEN_N, PAD_D, PAD_DV, DOT_PRECISION, UPCAST_DOT,
            FOLD_SCALE, b32, hk32, USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV,
            SCORE_MOD=SCORE_MOD, mod_args=mod_args, mod_b=b, mod_h=h,
        )

    # AV = RNV ÷ RD: 0 ÷ 0 = NaN for rows that never saw a finite score, as in eager.
    out = (acc / rd[:, None]).to(out_dtype)
    if USE_TMA:
        Out.store([b32, h32, start_m, 0], out.reshape(1, 1, BLOCK_M, BLOCK_DV))  # clipped at N, DV
        o_ptrs = Lse  # unused: the copy engine stored the rows
    else:
        o_ptrs = (Out + b * stride_ob + h * stride_oh
                  + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od)
    store_rows(out, rm, rd, o_ptrs, Lse + bh.to(tl.int64) * N + offs_m, offs_m, offs_dv, N, DV,
                not USE_TMA, NATURAL, RETURN_LSE, EVEN_N, PAD_DV)


# --------------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of one kernel instance."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # q/k/v/out through Hopper TMA descriptors (where strides allow). Off by default: on an H100
    # (triton 3.6) it measured 2-6% slower than the pointer loads at every size of the benchmark.
    tma: bool = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_config(d: int, dv: int, dtype: torch.dtype, device: torch.device,
                  causal: bool = False, has_bias_or_mask: bool = False) -> AttentionConfig:
    """Heuristic table (no autotuning: one compile per shape family, fast interpreter tests).

    GPU values were measured on an H100 (benchmarks/bench_triton_attention.py --sweep); the
    shared-memory budget per program is about 227 KB on Hopper, 100-164 KB on Ampere/Ada, so the
    wide head dims and float32 drop to smaller tiles.
    """
    if device.type != "cuda":
        # Interpreter: small tiles keep numpy fast and make the small test sizes span several
        # query blocks and key tiles (BLOCK_M > BLOCK_N also exercises several diagonal tiles).
        return AttentionConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    dmax = max(d, dv)
    wide = dtype == torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        if has_bias_or_mask and dmax <= 128 and not wide:
            # the software pipeline also stages the [BLOCK_M, BLOCK_N] bias/mask tiles in shared
            # memory: keep BLOCK_N at 64 and 3 stages so they fit beside K and V
            return AttentionConfig(128, 64, 8 if dmax > 64 else 4, 3)
        if dmax <= 64 and not wide:
            return AttentionConfig(128, 64, 4, 4 if causal else 3)
        if dmax <= 128 and not wide:
            # 128x128 tiles, 3 stages: ~224 KB of shared memory, just under Hopper's 227 KB
            return AttentionConfig(128, 128, 8, 3)
        if dmax <= 128:
            return AttentionConfig(64, 32, 4, 2)
        return AttentionConfig(64, 32, 4, 2) if not wide else AttentionConfig(32, 32, 4, 1)
    # pre-Hopper: conservative tiles that fit 100 KB of shared memory
    if dmax <= 64 and not wide:
        return AttentionConfig(128, 64, 4, 2)
    if dmax <= 128 and not wide:
        return AttentionConfig(64, 64, 4, 2)
    return AttentionConfig(32, 32, 4, 1)


# --------------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------------


def modifier_args(leaves, tables: frozenset[int], shape4: tuple[int, int, int, int]) -> tuple:
    """The generated modifier's ``args``: each leaf viewed as [B, Hq, N, M] (a table leaf as [B, Hq, 1, T])."""
    b, hq = shape4[:2]
    return leaf_args([broadcast_4d(t, (b, hq, 1, t.shape[-1]) if i in tables else shape4, "score modifier tensor")
                      for i, t in enumerate(leaves)])


def broadcast_4d(t: torch.Tensor, shape: tuple[int, int, int, int], what: str) -> torch.Tensor:
    try:
        torch.broadcast_shapes(tuple(t.shape), shape)
        return t.expand(shape)  # a view: broadcast dims get stride 0
    except RuntimeError as e:
        raise ValueError(f"{what} of shape {tuple(t.shape)} is not broadcastable to "
                         f"[B, Hq, N, M] = {list(shape)}") from e


def check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, kernel) -> tuple[int, ...]:
    """The checks every fused entry point makes (shapes, dtypes, head dims, devices, and that a
    CPU tensor can only run under the interpreter); returns B, Hq, N, D, Hkv, M, Dv."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, HQ, N, D = q.shape
    Bk, HKV, M, Dk = k.shape
    Bv, HKVv, Mv, DV = v.shape
    if Bk != B or Bv != B or HKVv != HKV or Mv != M or Dk != D or HKV == 0 or HQ % HKV != 0:
        raise ValueError(
            "shape mismatch: need q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] with "
            f"Hq % Hkv == 0; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (1 <= D <= 256 and 1 <= DV <= 256):
        raise ValueError(f"head dims must be in 1..256; got D={D}, Dv={DV}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type == "cpu":
        if not _interpreting() or not _is_interpreted(kernel):
            raise RuntimeError(
                f"{name} got CPU tensors: the Triton kernel runs on a CUDA GPU, or on the CPU only under "
                "TRITON_INTERPRET=1 set before rewrite.codegen is imported. Use the torch kernels on the CPU.")
    elif q.device.type != "cuda":
        raise RuntimeError(f"{name} needs CUDA tensors; got device {q.device}")
    return B, HQ, N, D, HKV, M, DV


def prepare_bias_mask(bias, mask, shape4: tuple[int, int, int, int]):
    """bias as a float view broadcast to [B, Hq, N, M]; mask as a uint8 view of the same bools
    (same-size reinterpretation, no copy: Triton loads bytes, the kernels test != 0)."""
    if bias is not None:
        if not bias.is_floating_point():
            raise ValueError(f"bias must be a float tensor; got {bias.dtype}")
        bias = broadcast_4d(bias, shape4, "bias")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = keep); got {mask.dtype}")
        mask = broadcast_4d(mask, shape4, "mask").view(torch.uint8)
    return bias, mask


def allocate_rows(q: torch.Tensor, shape4: tuple[int, int, int, int], dv: int, return_lse: bool):
    """out [B, Hq, N, Dv] and lse, and whether the launch can be skipped (the result is already
    eager's: nothing to compute, or no keys: an empty softmax row, an empty sum, LSE −inf)."""
    B, HQ, N, M = shape4
    out = torch.empty((B, HQ, N, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, N) if return_lse else (1,), dtype=torch.float32, device=q.device)
    if N == 0 or B == 0 or HQ == 0:
        return out, lse, True
    if M == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, True
    return out, lse, False


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    return_lse: bool = False,
    config: AttentionConfig | None = None,
    score_mod=None,
    mod_leaves: tuple[torch.Tensor, ...] = (),
    mod_tables: frozenset[int] = frozenset(),
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q kᵀ + bias, masked −inf) @ v, fused; see the module docstring.

    ``score_mod`` (optional): a generated Triton score modifier (codegen/score_mod_gen.py) applied
    to q kᵀ before the scale, with its leaf tensors ``mod_leaves`` (broadcastable to [B, Hq, N, M];
    those in ``mod_tables`` are tables [B | 1, Hq | 1, 1, T] the modifier gathers from).

    q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv], Hq % Hkv == 0, any strides.
    bias: float, broadcastable to [B, Hq, N, M]. mask: bool, broadcastable, True = keep.
    causal: keep key j for query i iff j <= i + causal_offset (M − N: bottom-right alignment).
    Returns out [B, Hq, N, Dv] in q.dtype, and with ``return_lse`` also the float32 row
    log-sum-exp [B, Hq, N] of the scores (−inf for fully masked rows).
    ``config`` overrides the block-size table (benchmarks, tests).
    """
    B, HQ, N, D, HKV, M, DV = check_operands(q, k, v, "triton_attention", _attn_fwd_kernel)

    shape4 = (B, HQ, N, M)
    bias, mask = prepare_bias_mask(bias, mask, shape4)
    out, lse, done = allocate_rows(q, shape4, DV, return_lse)
    if done:
        return (out, lse) if return_lse else out

    cfg = config or choose_config(D, DV, q.dtype, q.device, causal,
                                  bias is not None or mask is not None or score_mod is not None)
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    use_tma = use_tma_for(cfg, q.device, (q, k, v, out), (block_d, block_d, block_dv, block_dv))
    num_m_blocks = triton.cdiv(N, cfg.block_m)
    grid = (num_m_blocks * B * HQ,)
    has_bias, has_mask = bias is not None, mask is not None
    bias_arg = bias if has_bias else q  # dummy pointer, never read (constexpr HAS_BIAS=False)
    mask_arg = mask if has_mask else q
    bs = bias.stride() if has_bias else (0, 0, 0, 0)
    ms = mask.stride() if has_mask else (0, 0, 0, 0)
    natural = has_bias or score_mod is not None  # scores in natural units, not log2 (attention_tiles.py)
    qk_scale = float(scale) if natural else float(scale) * LOG2E
    mod_args = modifier_args(mod_leaves, mod_tables, shape4)

    with torch.cuda.device(q.device) if q.device.type == "cuda" else nullcontext():
        if use_tma:
            qa, ka, va, oa = (_descriptor(t, bm, bd) for t, bm, bd in (
                (q, cfg.block_m, block_d), (k, cfg.block_n, block_d), (v, cfg.block_n, block_dv),
                (out, cfg.block_m, block_dv)))
        else:
            qa, ka, va, oa = q, k, v, out
        _attn_fwd_kernel[grid](
            qa, ka, va, bias_arg, mask_arg, oa, lse,
            *q.stride(), *k.stride(), *v.stride(), *bs, *ms, *out.stride(),
            HQ, HQ // HKV, N, M, D, DV, qk_scale, int(causal_offset), num_m_blocks, mod_args,
            HAS_BIAS=has_bias, HAS_MASK=has_mask, CAUSAL=bool(causal), RETURN_LSE=return_lse,
            EVEN_N=N % cfg.block_m == 0, EVEN_M=M % cfg.block_n == 0,
            PAD_D=block_d != D, PAD_DV=block_dv != DV,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # Triton's interpreter multiplies bfloat16 dot operands as their uint16 bit patterns
            # (seen with triton 3.8): upcast them there. bf16 -> fp32 is exact and the products
            # are exact in fp32 either way, so the math is the tensor cores' (fp32 accumulate).
            UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
            FOLD_SCALE=not natural and scale > 0,
            USE_TMA=use_tma, SCORE_MOD=score_mod, NATURAL=natural,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return (out, lse) if return_lse else out


def _is_interpreted(fn: object) -> bool:
    # triton.jit returns an InterpretedFunction when TRITON_INTERPRET was set at import time
    return type(fn).__name__ == "InterpretedFunction"


def _tma_compatible(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, unit last stride and 16-byte multiples for the others."""
    es = t.element_size()
    if t.data_ptr() % 16 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    return all(st * es % 16 == 0 and st > 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def use_tma_for(cfg: AttentionConfig, device: torch.device, tensors: tuple[torch.Tensor, ...],
             inner_blocks: tuple[int, ...]) -> bool:
    if TensorDescriptor is None or not cfg.tma:
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return False  # TMA is Hopper's (sm_90+)
    return all(_tma_compatible(t) and bd * t.element_size() >= 16 for t, bd in zip(tensors, inner_blocks))


def _descriptor(t: torch.Tensor, block_rows: int, block_cols: int) -> object:
    # Size-1 dims are never indexed past 0: give them a legal stride whatever the view says.
    strides = [st if n > 1 else 16 for st, n in zip(t.stride(), t.shape)]
    strides[-1] = 1
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block_rows, block_cols])
