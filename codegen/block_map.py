"""Block maps: for each query tile, which key tiles a sparse kernel visits.

A ``BlockMap`` is FlexAttention's BlockMask in our terms. Query tile ``i`` covers rows
``[i·block_m, (i+1)·block_m)``, key tile ``j`` covers keys ``[j·block_n, (j+1)·block_n)``.
A key tile is *empty* (every pair masked: never visited), *full* (every pair kept: visited
without evaluating the mask) or *partial* (visited, mask evaluated element by element).
"Every pair" counts the pairs inside [0, N) × [0, M) only: the last, ragged tiles of a size
that is not a multiple of the tile can be full (kernels bound-check them anyway).

Compressed form, per (batch, head, query tile), ascending tile indices:

    full_count    int32 [Bm, Hm, Tq]        number of full key tiles
    full_index    int32 [Bm, Hm, Tq, Tk]    their indices (first full_count entries valid, rest 0)
    partial_count int32 [Bm, Hm, Tq]
    partial_index int32 [Bm, Hm, Tq, Tk]

Bm / Hm are 1 when the mask broadcasts over batch / heads. ``mask`` (bool, broadcastable to
[B, H, N, M], True = keep) is the element mask a kernel evaluates in partial tiles; None when
the partial tiles' predicate is known to the kernel in closed form (a MaskSpec). A mask given
per block (``mask_block_q``, ``mask_block_k`` > 1) keeps token pair (p, m) iff
``mask[..., p // mask_block_q, m // mask_block_k]``.

Builders (each on CUDA a Triton kernel, on the CPU torch; ``impl`` picks one explicitly):

* :func:`block_map_from_mask` — an element mask [B?, H?, N, M]: reads the mask once.
* :func:`block_map_from_block_keep` — a mask given per block (MoBA / BiFormer routing,
  BigBird layouts): only the small block grid is read; when the blocks are multiples of the
  tiles no tile is partial.
* :func:`block_map_from_key_blocks` — per-token query routing (MoBA): keep[B?, H?, N, Mb].
* :func:`cached_block_map` — the above, cached by tensor identity for constant masks.

The Triton kernels these builders launch are in codegen/block_map_kernels.py.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from .block_map_kernels import block_keep_kernel, classify_mask_kernel, compress_kernel
from .identity_cache import IdentityCache

__all__ = ["BlockMap", "block_map_from_mask", "block_map_from_block_keep", "block_map_from_key_blocks",
           "cached_block_map", "clear_block_map_cache"]


@dataclass
class BlockMap:
    block_m: int
    block_n: int
    n: int
    m: int
    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    mask: torch.Tensor | None = None
    mask_block_q: int = 1  # granularity of ``mask`` (1, 1: an element mask)
    mask_block_k: int = 1

    @property
    def tiles_q(self) -> int:
        return self.full_count.shape[-1]

    @property
    def tiles_k(self) -> int:
        return self.full_index.shape[-1]

    def visited_fraction(self) -> float:
        """Visited key tiles over all tiles: the kernel's work relative to dense."""
        total = self.full_count.numel() * self.tiles_k
        return float((self.full_count.sum() + self.partial_count.sum()).item()) / max(1, total)

    def classes(self) -> torch.Tensor:
        """The uncompressed map: int8 [Bm, Hm, Tq, Tk], 0 empty, 1 partial, 2 full (tests, debugging)."""
        tk = self.tiles_k
        out = torch.zeros((*self.full_index.shape[:-1], tk + 1), dtype=torch.int8, device=self.full_index.device)
        ar = torch.arange(tk, device=out.device)
        for cnt, idx, val in ((self.partial_count, self.partial_index, 1), (self.full_count, self.full_index, 2)):
            pos = torch.where(ar < cnt[..., None], idx.long(), tk)  # unused entries land in column tk
            out.scatter_(-1, pos, val)
        return out[..., :tk]


# --------------------------------------------------------------------------------------------------
# Shapes and helpers
# --------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def as_4d(t: torch.Tensor, what: str) -> torch.Tensor:
    """[B?, H?, R, C] -> 4-D view; batch/head dims of stride 0 (expanded) collapse to size 1."""
    if t.dtype != torch.bool:
        raise ValueError(f"{what} must be a bool tensor (True = keep); got {t.dtype}")
    if not 2 <= t.dim() <= 4:
        raise ValueError(f"{what} must be [B?, H?, rows, cols]; got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    for d in (0, 1):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def _check_block(name: str, b: int) -> None:
    if not isinstance(b, int) or b < 1:
        raise ValueError(f"{name} must be a positive int; got {b!r}")


def _pick_impl(impl: str | None, device: torch.device) -> str:
    if impl is None:
        return "triton" if device.type == "cuda" else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton', 'torch' or None; got {impl!r}")
    if impl == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton block-map kernels need CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    return impl


def _compress_torch(flag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., Tk] -> (count int32 [...], ascending indices int32 [..., Tk], tail 0)."""
    tk = flag.shape[-1]
    ar = torch.arange(tk, device=flag.device)
    count = flag.sum(-1, dtype=torch.int32)
    idx = torch.where(flag, ar, ar + tk).sort(-1).values
    idx = torch.where(ar < count[..., None], idx, 0).to(torch.int32)
    return count.contiguous(), idx.contiguous()


def _from_classes_torch(full: torch.Tensor, part: torch.Tensor, block_m: int, block_n: int, n: int, m: int,
                        mask: torch.Tensor | None, mbq: int = 1, mbk: int = 1) -> BlockMap:
    fc, fi = _compress_torch(full)
    pc, pi = _compress_torch(part & ~full)
    return BlockMap(block_m, block_n, n, m, fc, fi, pc, pi, mask, mbq, mbk)


def _empty_lists(bm_: int, hm: int, tq: int, tk: int, device) -> tuple[torch.Tensor, ...]:
    return (torch.empty((bm_, hm, tq), dtype=torch.int32, device=device),
            torch.empty((bm_, hm, tq, tk), dtype=torch.int32, device=device),
            torch.empty((bm_, hm, tq), dtype=torch.int32, device=device),
            torch.empty((bm_, hm, tq, tk), dtype=torch.int32, device=device))


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------

# Word width (bytes) and mask bytes per program of the element-mask kernel (overridable: the
# benchmark sweeps them). H100, a dense 64k x 64k mask (4 GiB): 4- or 8-byte words 1.41 ms
# (3.0 TB/s, the bandwidth floor), single bytes 3.3 ms; 32 or 64 KiB per program alike.
MASK_WORD_BYTES = 4
MASK_PROGRAM_BYTES = 32768  # mask bytes one program reads (KT key tiles of block_m x block_n)
_WORD_DTYPE = {1: torch.uint8, 4: torch.int32, 8: torch.int64}
_ALL_WORD = {1: 1, 4: 0x01010101, 8: 0x0101010101010101}


def _word_view(mask4: torch.Tensor, block_n: int, word: int) -> tuple[torch.Tensor, int]:
    """The mask's bytes as words of ``word`` bytes where the layout allows, else bytes."""
    if word > 1 and block_n % word == 0 and mask4.shape[-1] % word == 0 and mask4.stride(-1) == 1:
        try:
            return mask4.view(_WORD_DTYPE[word]), word
        except RuntimeError:  # a stride or the offset is not a multiple of the word
            pass
    return mask4.view(torch.uint8), 1


def block_map_from_mask(mask: torch.Tensor, block_m: int, block_n: int, *, impl: str | None = None) -> BlockMap:
    """Block map of an element mask (bool, [B?, H?, N, M], True = keep; size-1, absent or
    stride-0 batch/head dims stay Bm = 1 / Hm = 1). The map keeps ``mask`` for partial tiles."""
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    mask4 = as_4d(mask, "mask")
    bm_, hm, n, m = mask4.shape
    tq, tk = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    if _pick_impl(impl, mask4.device) == "torch" or n == 0 or m == 0 or bm_ * hm == 0:
        pad_n, pad_m = tq * block_m - n, tk * block_n - m
        t = mask4.reshape(bm_ * hm, n, m)
        a = torch.nn.functional.pad(t, (0, pad_m, 0, pad_n), value=False)
        z = torch.nn.functional.pad(t, (0, pad_m, 0, pad_n), value=True)
        shp = (bm_, hm, tq, block_m, tk, block_n)
        full = z.reshape(shp).all(5).all(3)
        part = a.reshape(shp).any(5).any(3)
        return _from_classes_torch(full, part, block_m, block_n, n, m, mask4)
    if triton.next_power_of_2(block_m) != block_m or triton.next_power_of_2(block_n) != block_n:
        raise ValueError(f"the Triton block-map kernel needs power-of-2 tiles; got {block_m} x {block_n}")
    words, w = _word_view(mask4, block_n, MASK_WORD_BYTES)
    tile_w = block_n // w
    kt = triton.next_power_of_2(max(1, MASK_PROGRAM_BYTES // (block_m * block_n)))
    kt = min(kt, triton.next_power_of_2(tk))
    cls = torch.empty((bm_, hm, tq, tk), dtype=torch.int8, device=mask4.device)
    rows = bm_ * hm * tq
    with torch.cuda.device(mask4.device) if mask4.device.type == "cuda" else _null():
        classify_mask_kernel[(rows, triton.cdiv(tk, kt))](
            words, cls, hm, tq, tk, n, m // w, *words.stride(),
            ALL=_ALL_WORD[w], BLOCK_M=block_m, TILE_W=tile_w, KT=kt,
            CHECK_N=n % block_m != 0, CHECK_M=m % block_n != 0 or kt * tile_w * triton.cdiv(tk, kt) != m // w,
            num_warps=4,
        )
        fc, fi, pc, pi = _empty_lists(bm_, hm, tq, tk, mask4.device)
        compress_kernel[(rows,)](cls, fc, fi, pc, pi, tk, CK=min(1024, triton.next_power_of_2(tk)), num_warps=4)
    return BlockMap(block_m, block_n, n, m, fc, fi, pc, pi, mask4)


def _spans(lo_block: int, block: int, size: int) -> int:
    """Most blocks of ``block`` that a tile of ``lo_block`` elements can overlap."""
    if block % lo_block == 0:
        return 1
    if lo_block % block == 0:
        return lo_block // block
    return (lo_block - 1) // block + 2


def block_map_from_block_keep(keep_blocks: torch.Tensor, block_q: int, block_k: int, n: int, m: int,
                              block_m: int, block_n: int, *, impl: str | None = None) -> BlockMap:
    """Block map of a mask given per block: token pair (p, m) is kept iff
    ``keep_blocks[..., p // block_q, m // block_k]``; keep_blocks bool
    [B?, H?, ceil(n / block_q), ceil(m / block_k)]. When block_q, block_k are multiples of
    block_m, block_n every visited tile is full; otherwise partial tiles evaluate the block
    mask (the map's ``mask`` is keep_blocks itself, with mask_block_q/k set)."""
    for name, b in (("block_q", block_q), ("block_k", block_k), ("block_m", block_m), ("block_n", block_n)):
        _check_block(name, b)
    keep4 = as_4d(keep_blocks, "keep_blocks")
    bm_, hm, nb, mb = keep4.shape
    if nb != triton.cdiv(n, block_q) or mb != triton.cdiv(m, block_k):
        raise ValueError(f"keep_blocks of shape {tuple(keep_blocks.shape)} does not tile n={n}, m={m} in "
                         f"blocks of {block_q} x {block_k} (need [..., {triton.cdiv(n, block_q)}, "
                         f"{triton.cdiv(m, block_k)}])")
    tq, tk = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    lq = min(_spans(block_m, block_q, n), max(nb, 1))
    lk = min(_spans(block_n, block_k, m), max(mb, 1))
    if _pick_impl(impl, keep4.device) == "torch" or n == 0 or m == 0 or bm_ * hm == 0:
        full, part = _block_keep_classes_torch(keep4, block_q, block_k, n, m, block_m, block_n, lq, lk)
        return _from_classes_torch(full, part, block_m, block_n, n, m, keep4, block_q, block_k)
    if triton.next_power_of_2(block_m) != block_m or triton.next_power_of_2(block_n) != block_n:
        raise ValueError(f"the Triton block-map kernel needs power-of-2 tiles; got {block_m} x {block_n}")
    kb = keep4.view(torch.uint8)
    fc, fi, pc, pi = _empty_lists(bm_, hm, tq, tk, keep4.device)
    with torch.cuda.device(keep4.device) if keep4.device.type == "cuda" else _null():
        block_keep_kernel[(bm_ * hm * tq,)](
            kb, fc, fi, pc, pi, hm, tq, tk, n, m, block_q, block_k, *kb.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, LQ=triton.next_power_of_2(lq), LK=lk,
            CK=min(256 if lq <= 8 else 64, triton.next_power_of_2(tk)), num_warps=4,
        )
    return BlockMap(block_m, block_n, n, m, fc, fi, pc, pi, keep4, block_q, block_k)


def _block_keep_classes_torch(keep4, bq, bk, n, m, block_m, block_n, lq, lk):
    dev = keep4.device

    def span_idx(tiles, tile, block, size, lmax):
        lo = torch.arange(tiles, device=dev) * tile
        b0 = lo // block
        b1 = (torch.clamp(lo + tile, max=size) - 1) // block
        idx = b0[:, None] + torch.arange(lmax, device=dev)[None, :]
        return torch.minimum(idx, b1[:, None])  # repeats the last block: harmless for any/all

    qi = span_idx(triton.cdiv(n, block_m), block_m, bq, n, lq)  # [Tq, LQ]
    ki = span_idx(triton.cdiv(m, block_n), block_n, bk, m, lk)  # [Tk, LK]
    g = keep4[:, :, qi]  # [Bm, Hm, Tq, LQ, Mb]
    a_q, z_q = g.any(3), g.all(3)  # [Bm, Hm, Tq, Mb]
    full = z_q[..., ki].all(-1)  # [Bm, Hm, Tq, Tk]
    part = a_q[..., ki].any(-1)
    return full, part


def block_map_from_key_blocks(keep: torch.Tensor, block_k: int, m: int, block_m: int, block_n: int, *,
                              impl: str | None = None) -> BlockMap:
    """Per-token query routing (MoBA): query p keeps key block kb iff keep[..., p, kb];
    keep bool [B?, H?, N, ceil(m / block_k)]. A tile is full where every query row of the tile
    keeps every key block the tile touches."""
    return block_map_from_block_keep(keep, 1, block_k, keep.shape[-2], m, block_m, block_n, impl=impl)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------
# Cache for constant masks (registered buffers)
# --------------------------------------------------------------------------------------------------

CACHE_MAX_ENTRIES = 32
CACHE_MAX_BYTES = 1 << 30  # index lists held, all entries together
_CACHE = IdentityCache(CACHE_MAX_ENTRIES, CACHE_MAX_BYTES)


def clear_block_map_cache() -> None:
    _CACHE.clear()


def cached_block_map(mask: torch.Tensor, block_m: int, block_n: int, *, block_q: int = 1, block_k: int = 1,
                     n: int | None = None, m: int | None = None, impl: str | None = None) -> BlockMap:
    """``block_map_from_mask(mask, block_m, block_n)`` (or, with block_q / block_k > 1,
    ``block_map_from_block_keep``), cached by tensor identity: storage, offset, version counter,
    shape, strides, device and block sizes. A registered buffer is analysed on its first call
    only; an in-place change bumps its version and rebuilds. The cache holds a weak reference to
    the storage (a freed mask whose memory is reused is never mistaken for the old one) and never
    keeps the mask alive; it is bounded (CACHE_MAX_ENTRIES, CACHE_MAX_BYTES, least recently used
    out first)."""
    extra = (block_m, block_n, block_q, block_k, n, m, impl)
    hit = _CACHE.get(mask, extra)
    if hit is not None:
        return dataclasses.replace(hit, mask=as_4d(mask, "mask"))
    if block_q == 1 and block_k == 1 and n is None and m is None:
        bmap = block_map_from_mask(mask, block_m, block_n, impl=impl)
    else:
        nn = n if n is not None else mask.shape[-2] * block_q
        mm = m if m is not None else mask.shape[-1] * block_k
        bmap = block_map_from_block_keep(mask, block_q, block_k, nn, mm, block_m, block_n, impl=impl)
    size = sum(t.numel() * t.element_size() for t in (bmap.full_count, bmap.full_index, bmap.partial_count,
                                                        bmap.partial_index))
    _CACHE.put(mask, extra, dataclasses.replace(bmap, mask=None), size)
    return bmap
