"""Block-sparse softmax attention forward in Triton: the key-tile loop reads a block map.

Public entry point: :func:`block_sparse_attention`. Per batch ``b`` and query head ``h`` it
computes eager PyTorch's

    S = scale · q kᵀ + bias,  −inf where the pair is not kept
    O = softmax(S, dim=-1) @ v

where the kept pairs are those of the block map (codegen/block_map.py): full tiles entirely,
partial tiles where the map's element mask (and/or the ``mask`` argument) keeps them, empty tiles
not at all. The math is the online-softmax tile body ``attn_tile`` of codegen/triton_attention.py
(the FuseMax names are in that file's header); this kernel only changes which key tiles a query
tile visits:

    for each listed full tile:     attn_tile(...)                   no mask evaluated
    for each listed partial tile:  attn_tile(..., HAS_MASK=True)    element (or block) mask

Full tiles come first, then partial ones (each list ascending); the order does not change the
result beyond float rounding (online softmax is order-free). A row that keeps no key gives NaN,
as eager's softmax over all −inf does, and its log-sum-exp (``return_lse``) is −inf.

GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``. Inputs keep their strides. Head dims
1..256 (padded to a power of two ≥ 16 inside the kernel), fp16/bf16/fp32, any N, M.

Block sizes (``block_sizes``): the kernel's query tile ``BLOCK_M`` and key tile ``BLOCK_N`` must
divide the map's ``block_m`` / ``block_n`` (a map tile of 128 keys runs as 2 kernel tiles of 64,
say); maps built by :func:`block_sizes`' tiles match one to one. H100 table and measurements:
benchmarks/results/block_sparse_*.md.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .attention_tiles import LOG2E, attn_tile, load_tile, store_rows
from .block_map import BlockMap, block_map_from_mask, cached_block_map
from .triton_attention import AttentionConfig, allocate_rows, broadcast_4d, check_operands, prepare_bias_mask

__all__ = ["block_sizes", "choose_block_sparse_config", "block_sparse_attention", "dense_block_map"]


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Bias, Mask, Out, Lse,
    FullCnt, FullIdx, PartCnt, PartIdx,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_mb, stride_mh, stride_mn, stride_mm,
    stride_ob, stride_oh, stride_on, stride_od,
    s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ik,
    HQ, GROUP, N, M, D, DV, qk_scale, num_m_blocks, TK,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, RETURN_LSE: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    Q_PER_MAP: tl.constexpr, K_PER_MAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, FOLD_SCALE: tl.constexpr,
    MASK_DIV_N: tl.constexpr, MASK_DIV_M: tl.constexpr, PARTIAL_STAGES: tl.constexpr, MASK_FULL: tl.constexpr,
):
    # 1-D grid, query tiles of one (b, h) adjacent (they share K/V in L2), as in triton_attention.
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
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

    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   offs_m, offs_d, N, D, not EVEN_N, PAD_D)
    out_dtype = q.dtype
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = Bias + b * stride_bb + h * stride_bh
    mask_base = Mask + b * stride_mb + h * stride_mh

    rm = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    rd = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # This query tile's row of the map (s_cb / s_ib are 0 when the map broadcasts over batch, etc.)
    qt = (pid_m // Q_PER_MAP).to(tl.int64)
    MAP_BN: tl.constexpr = BLOCK_N * K_PER_MAP
    full_idx = FullIdx + b * s_ib + h * s_ih + qt * s_iq
    part_idx = PartIdx + b * s_ib + h * s_ih + qt * s_iq
    fc = tl.load(FullCnt + b * s_cb + h * s_ch + qt * s_cq)
    pc = tl.load(PartCnt + b * s_cb + h * s_ch + qt * s_cq)

    # Full tiles: no mask (unless MASK_FULL: a mask argument the map does not describe), no
    # bounds. The ragged last tile (M not a multiple of the map's tile),
    # when full, is the last one listed: it runs alone afterwards with the key bound.
    n_main = fc
    if not EVEN_M:
        last = tl.load(full_idx + (fc - 1) * s_ik, mask=fc > 0, other=0)
        n_main = tl.where((fc > 0) & (last == TK - 1), fc - 1, fc)
    for i in range(0, n_main):
        j = tl.load(full_idx + i * s_ik)
        for s in tl.static_range(K_PER_MAP):
            acc, rd, rm = attn_tile(
                acc, rd, rm, q, k_base, v_base, bias_base, mask_base,
                j * MAP_BN + s * BLOCK_N, offs_m, offs_n, offs_d, offs_dv, N, M, D, DV, qk_scale, 0,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_bm, stride_mn, stride_mm,
                HAS_BIAS, MASK_FULL, False, False, not EVEN_N, PAD_D, PAD_DV, DOT_PRECISION, UPCAST_DOT,
                FOLD_SCALE, b32, hk32, False, BLOCK_N, BLOCK_D, BLOCK_DV, MASK_DIV_N, MASK_DIV_M,
            )
    if not EVEN_M:
        if n_main < fc:
            for s in tl.static_range(K_PER_MAP):
                acc, rd, rm = attn_tile(
                    acc, rd, rm, q, k_base, v_base, bias_base, mask_base,
                    (TK - 1) * MAP_BN + s * BLOCK_N, offs_m, offs_n, offs_d, offs_dv, N, M, D, DV, qk_scale, 0,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_bm, stride_mn, stride_mm,
                    HAS_BIAS, MASK_FULL, False, True, not EVEN_N, PAD_D, PAD_DV, DOT_PRECISION, UPCAST_DOT,
                    FOLD_SCALE, b32, hk32, False, BLOCK_N, BLOCK_D, BLOCK_DV, MASK_DIV_N, MASK_DIV_M,
                )
    # Partial tiles: the element (or block-level) mask is evaluated.
    for i in tl.range(0, pc, num_stages=PARTIAL_STAGES):
        j = tl.load(part_idx + i * s_ik)
        for s in tl.static_range(K_PER_MAP):
            acc, rd, rm = attn_tile(
                acc, rd, rm, q, k_base, v_base, bias_base, mask_base,
                j * MAP_BN + s * BLOCK_N, offs_m, offs_n, offs_d, offs_dv, N, M, D, DV, qk_scale, 0,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_bm, stride_mn, stride_mm,
                HAS_BIAS, HAS_MASK, False, not EVEN_M, not EVEN_N, PAD_D, PAD_DV, DOT_PRECISION, UPCAST_DOT,
                FOLD_SCALE, b32, hk32, False, BLOCK_N, BLOCK_D, BLOCK_DV, MASK_DIV_N, MASK_DIV_M,
            )

    # AV = RNV ÷ RD: 0 ÷ 0 = NaN for rows that never saw a finite score, as in eager.
    out = (acc / rd[:, None]).to(out_dtype)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
    store_rows(out, rm, rd, o_ptrs, Lse + bh.to(tl.int64) * N + offs_m, offs_m, offs_dv, N, DV,
                True, HAS_BIAS, RETURN_LSE, EVEN_N, PAD_DV)


# --------------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------------


def choose_block_sparse_config(d: int, dv: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    """Launch table (no autotuning). Measured on an H100 (triton 3.6), bf16, 10 %-dense random
    128 x 128 block layouts at 64k (benchmarks/results/block_sparse_NVIDIA_H100_80GB_HBM3_2026-11-28.md):
    128 x 128 tiles for D ≤ 128 (one kernel tile per map tile), D=64 4 warps 3 stages (8.87 ms;
    8 warps 10.64 ms; 128 x 64 tiles 8.68 ms, within noise), D=128 8 warps 3 stages (15.86 ms;
    2 stages 15.83 ms; 128 x 64 tiles 16.59 ms). The partial-tile loop runs at most 2 stages (its
    mask tiles also take shared memory). Wider heads and fp32: smaller tiles, not measured."""
    if device.type != "cuda":
        return AttentionConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    dmax = max(d, dv)
    wide = dtype == torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        if dmax <= 64 and not wide:
            return AttentionConfig(128, 128, 4, 3)
        if dmax <= 128 and not wide:
            return AttentionConfig(128, 128, 8, 3)
        if not wide:
            return AttentionConfig(64, 64, 4, 2)
        return AttentionConfig(64, 32, 4, 2) if dmax <= 128 else AttentionConfig(32, 32, 4, 1)
    if dmax <= 64 and not wide:
        return AttentionConfig(128, 64, 4, 2)
    if dmax <= 128 and not wide:
        return AttentionConfig(64, 64, 4, 2)
    return AttentionConfig(32, 32, 4, 1)


def block_sizes(d: int, dv: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(block_m, block_n) to build block maps with for this head dim / dtype / device."""
    cfg = choose_block_sparse_config(d, dv, dtype, device)
    return cfg.block_m, cfg.block_n


def _kernel_tile(want: int, map_block: int, what: str) -> int:
    """Largest power of two ≤ want that divides the map's tile (at least 16: tl.dot's minimum)."""
    t = want
    while t >= 16 and map_block % t:
        t //= 2
    if t < 16:
        raise ValueError(f"block map {what} = {map_block} has no power-of-2 divisor in 16..{want}: build the map "
                         f"with block_sizes(...) tiles")
    return t


def dense_block_map(b: int, h: int, n: int, m: int, block_m: int, block_n: int, device) -> BlockMap:
    """Every tile full (dense attention in block-map form): Bm = Hm = 1."""
    tq, tk = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    fc = torch.full((1, 1, tq), tk, dtype=torch.int32, device=device)
    fi = torch.arange(tk, dtype=torch.int32, device=device).expand(1, 1, tq, tk).contiguous()
    z = torch.zeros((1, 1, tq), dtype=torch.int32, device=device)
    return BlockMap(block_m, block_n, n, m, fc, fi, z, torch.zeros_like(fi))


# --------------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------------


def _same_mask(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> bool:
    if a is b:
        return True
    try:
        ea, eb = a.expand(shape), b.expand(shape)
    except RuntimeError:
        return False
    return (ea.data_ptr() == eb.data_ptr() and ea.stride() == eb.stride() and ea.dtype == eb.dtype)


def _element_mask(bmap: BlockMap, shape4: tuple[int, int, int, int]) -> torch.Tensor:
    """The map's mask at token granularity (materialised only when AND'ing it with another)."""
    mk = bmap.mask
    if bmap.mask_block_q > 1 or bmap.mask_block_k > 1:
        mk = mk.repeat_interleave(bmap.mask_block_q, -2)[..., :bmap.n, :]
        mk = mk.repeat_interleave(bmap.mask_block_k, -1)[..., :bmap.m]
    return mk.expand(shape4)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap | None = None,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
    config: AttentionConfig | None = None,
    cache: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q kᵀ + bias, not-kept pairs −inf) @ v over the block map's tiles.

    q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv], Hq % Hkv == 0, any strides.
    block_map: [Bm ∈ {1, B}, Hm ∈ {1, Hq}] over N × M; its tiles must be multiples of the
    kernel's (maps built with ``block_sizes(...)`` tiles are). None: built here from ``mask``
    (``cached_block_map`` unless ``cache=False``), or every tile full when mask is None too.
    mask: bool, broadcastable to [B, Hq, N, M], True = keep; the kept pairs are the map's AND the
    mask's. A map built from this very mask (same tensor: ``cached_block_map(mask, ...)``)
    evaluates it in partial tiles only; otherwise the mask is evaluated in every visited tile
    (and a map with its own, different mask has the AND materialised as one element mask).
    Partial tiles of a map without any mask are visited as full. bias: float, broadcastable.
    Returns out [B, Hq, N, Dv] in q.dtype and, with ``return_lse``, the float32 row
    log-sum-exp [B, Hq, N] (−inf for rows that keep no key; their out is NaN).
    """
    B, HQ, N, D, HKV, M, DV = check_operands(q, k, v, "block_sparse_attention", _block_sparse_fwd_kernel)

    shape4 = (B, HQ, N, M)
    cfg = config or choose_block_sparse_config(D, DV, q.dtype, q.device)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = keep); got {mask.dtype}")
    if mask is not None:
        broadcast_4d(mask, shape4, "mask")
    if block_map is None:
        if mask is not None:
            build = cached_block_map if cache else block_map_from_mask
            block_map = build(mask, cfg.block_m, cfg.block_n)
        else:
            block_map = dense_block_map(B, HQ, N, M, cfg.block_m, cfg.block_n, q.device)
    bmap = block_map
    bm_, hm = bmap.full_count.shape[0], bmap.full_count.shape[1]
    if bmap.n != N or bmap.m != M or bm_ not in (1, B) or hm not in (1, HQ):
        raise ValueError(f"block map over [{bm_}, {hm}, {bmap.n}, {bmap.m}] does not fit [B, Hq, N, M] = "
                         f"{list(shape4)}")
    if bmap.full_count.device != q.device:
        raise ValueError(f"block map on {bmap.full_count.device}, q on {q.device}")
    block_m = _kernel_tile(cfg.block_m, bmap.block_m, "block_m")
    block_n = _kernel_tile(cfg.block_n, bmap.block_n, "block_n")

    # The mask partial tiles evaluate: the map's (element or block level) and/or the argument.
    pmask, div_n, div_m = bmap.mask, bmap.mask_block_q, bmap.mask_block_k
    mask_full = False  # evaluate the mask in full tiles too (a mask the map does not describe)
    if mask is not None:
        if pmask is None:
            pmask, div_n, div_m, mask_full = mask, 1, 1, True
        elif div_n == div_m == 1 and _same_mask(pmask, mask, shape4):
            pass
        else:
            pmask, div_n, div_m, mask_full = _element_mask(bmap, shape4) & mask, 1, 1, True
    if pmask is not None:
        rows = triton.cdiv(N, div_n)
        cols = triton.cdiv(M, div_m)
        pmask = broadcast_4d(pmask, (B, HQ, rows, cols), "block map mask").view(torch.uint8)
    bias, _ = prepare_bias_mask(bias, None, shape4)
    out, lse, done = allocate_rows(q, shape4, DV, return_lse)
    if done:
        return (out, lse) if return_lse else out

    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    num_m_blocks = triton.cdiv(N, block_m)
    has_bias, has_mask = bias is not None, pmask is not None
    bs = bias.stride() if has_bias else (0, 0, 0, 0)
    ms = pmask.stride() if has_mask else (0, 0, 0, 0)
    fc, fi, pc, pi = bmap.full_count, bmap.full_index, bmap.partial_count, bmap.partial_index
    if pc.stride() != fc.stride() or pi.stride() != fi.stride():  # one set of strides for both lists
        fc, fi, pc, pi = (t.contiguous() for t in (fc, fi, pc, pi))
    cs = [fc.stride(0) if bm_ > 1 else 0, fc.stride(1) if hm > 1 else 0, fc.stride(2)]
    iss = [fi.stride(0) if bm_ > 1 else 0, fi.stride(1) if hm > 1 else 0, fi.stride(2), fi.stride(3)]
    qk_scale = float(scale) if has_bias else float(scale) * LOG2E
    stages = cfg.num_stages
    while True:
        try:
            _launch(q, k, v, bias, pmask, out, lse, fc, fi, pc, pi, bs, ms, cs, iss, HQ // HKV, N, M, D, DV,
                    qk_scale, num_m_blocks, bmap, has_bias, has_mask, return_lse, block_m, block_n, block_d,
                    block_dv, scale, div_n, div_m, mask_full, cfg.num_warps, stages)
            break
        except triton.runtime.errors.OutOfResources:
            # shared memory: a map tile of several kernel tiles, or a mask beside K and V. Fewer stages.
            if stages <= 1:
                raise
            stages -= 1
    return (out, lse) if return_lse else out


def _launch(q, k, v, bias, pmask, out, lse, fc, fi, pc, pi, bs, ms, cs, iss, group, N, M, D, DV, qk_scale,
            num_m_blocks, bmap, has_bias, has_mask, return_lse, block_m, block_n, block_d, block_dv, scale,
            div_n, div_m, mask_full, num_warps, num_stages):
    B, HQ = q.shape[0], q.shape[1]
    with torch.cuda.device(q.device) if q.device.type == "cuda" else nullcontext():
        _block_sparse_fwd_kernel[(num_m_blocks * B * HQ,)](
            q, k, v, bias if has_bias else q, pmask if has_mask else q, out, lse,
            fc, fi, pc, pi,
            *q.stride(), *k.stride(), *v.stride(), *bs, *ms, *out.stride(), *cs, *iss,
            HQ, group, N, M, D, DV, qk_scale, num_m_blocks, bmap.tiles_k,
            HAS_BIAS=has_bias, HAS_MASK=has_mask, RETURN_LSE=return_lse,
            EVEN_N=N % block_m == 0, EVEN_M=M % bmap.block_n == 0,
            PAD_D=block_d != D, PAD_DV=block_dv != DV,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            Q_PER_MAP=bmap.block_m // block_m, K_PER_MAP=bmap.block_n // block_n,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # the interpreter multiplies bf16 dot operands wrongly (see triton_attention): upcast there
            UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
            FOLD_SCALE=not has_bias and scale > 0,
            MASK_DIV_N=div_n, MASK_DIV_M=div_m, PARTIAL_STAGES=max(1, min(num_stages, 2)), MASK_FULL=mask_full,
            num_warps=num_warps, num_stages=num_stages,
        )
