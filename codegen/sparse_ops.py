"""`rewrite::sparse_attention`: softmax attention whose positional mask is a proven structure.

Same semantics as `rewrite::attention` (codegen/ops.py), with the kept pairs

    keep(p, m) = spec(p, m) ∧ mask[..., p, m]        (mask optional, bias optional)

where ``spec`` is a ``MaskSpec`` (rewrite/ir/mask.py) sent as JSON: "causal", "neighborhood"
(1-D/2-D/3-D grids, window, dilation, NATTEN clamp, GNA stride), "blocked" (HaloNet), or
"arbitrary" (no positional structure known: the mask tensor is everything, and the kernels
visit the tiles of its block map, codegen/block_map.py).

Kernels: "triton" (codegen/triton_neighborhood.py for the structured kinds, analytic tile
ranges; codegen/triton_block_sparse.py for "arbitrary"), "torch" (codegen/sparse_torch.py,
the CPU default: only kept tiles are computed), "sdpa" (the spec materialised as a bool mask,
for sizes where that is cheap), "reference" (eager math on the materialised mask).

Semantics (``masked_row``, ``fill``, ``additive``) are those of ops.py; codegen/eager.py settles the
fast kernels' rows from their row log-sum-exp (rows with no kept key, finite fills whose weight eager
does not round to zero) without materialising the N×M mask, and runs the eager spelling where the
inputs are not ones the kernels take exactly (on the CPU).

Backward recomputes the forward through the torch path's kept tiles under autograd (memory for
the kept scores only); with a bias, a row the forward had to settle, or a mask too dense for tiles to
pay, through SDPA or the eager spelling (codegen/backward.py).
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import torch

from rewrite.ir.mask import MaskSpec, keep_rows

from . import counters
from .backward import concrete, grad_forward, one_per_passed_input, recompute_grads
from .eager import (
    NEG_INF,
    Removed,
    checks_inputs,
    coarse_rows,
    eager_attention,
    excess_of,
    lse_floor,
    settle,
    tame,
    unsettled,
)
from .identity_cache import IdentityCache
from .ops import as_bhnd, dense_forward, out_shape, spelling_of

SPARSE_KERNELS = ("triton", "torch", "sdpa", "reference")
# A run-time ("arbitrary") mask goes through the block-sparse kernels only when its block map
# visits at most this fraction of the key tiles; denser masks run SDPA with the mask.
BLOCK_SPARSE_MAX_VISITED = 0.5


def op_spec(spec: MaskSpec, implied: bool, mask_blocks: tuple[int, int] | None = None, recheck: bool = False) -> str:
    """The op's ``spec`` argument. ``implied``: the remaining mask/bias tensors already imply the
    structure (a Hugging Face 4-D mask whose position-only part was proven); otherwise the
    structure replaced position-only tensors the graph no longer computes. ``mask_blocks``
    (bq, bk): the mask operand is a block table, token (p, m) kept iff mask[.., p // bq, m // bk].
    ``recheck``: the structure was read off the mask's value on the first call (a band buffer),
    so every new mask tensor is checked to keep nothing outside it (``mask_within_spec``)."""
    d = json.loads(spec.to_json())
    d["implied"] = implied
    if mask_blocks is not None:
        d["mask_blocks"] = list(mask_blocks)
    if recheck:
        d["recheck"] = True
    return json.dumps(d)


@lru_cache(maxsize=256)
def parse_spec(text: str) -> tuple[MaskSpec, bool, tuple[int, int] | None, bool]:
    """(spec, implied, mask_blocks, recheck) of an ``op_spec`` string."""
    d = json.loads(text)
    implied = bool(d.pop("implied", False))
    blocks = d.pop("mask_blocks", None)
    recheck = bool(d.pop("recheck", False))
    return MaskSpec.from_json(json.dumps(d)), implied, tuple(blocks) if blocks else None, recheck


_WITHIN = IdentityCache(256)
_CHECK_ROWS = 4096  # rows of the spec's keep mask materialised at a time


def mask_within_spec(mask: torch.Tensor, spec: MaskSpec, n: int, m: int) -> bool:
    """Does the bool ``mask`` [.., N, M] keep nothing outside ``spec``? Once per tensor identity
    (codegen/identity_cache.py: a buffer is checked on its first call, and again after an in-place
    change), by blocks of rows so that the spec's mask is never built whole."""
    key = (spec.to_json(), n, m)
    hit = _WITHIN.get(mask, key)
    if hit is None:
        full = mask.expand(*mask.shape[:-2], n, m)  # a broadcast row is every query's row
        hit = True
        for r0 in range(0, n, _CHECK_ROWS):
            r1 = min(r0 + _CHECK_ROWS, n)
            keep = keep_rows(spec, r0, r1, n, m, mask.device)
            if bool((full[..., r0:r1, :] & ~keep).any()):
                hit = False
                break
        _WITHIN.put(mask, key, hit)
    return hit


def token_mask(mask: torch.Tensor | None, blocks: tuple[int, int] | None, n: int, m: int) -> torch.Tensor | None:
    """A block-table mask expanded to tokens (the paths that need it element by element)."""
    if mask is None or blocks is None:
        return mask
    bq, bk = blocks
    return mask.repeat_interleave(bq, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :m]


def _block_sparse(q4, k4, v4, b4, m4, scale, on_gpu: bool, blocks: tuple[int, int] | None):
    """The "arbitrary" kind: the mask tensor alone says what is kept; visit its block map's
    tiles. None when the map visits too much for sparsity to pay (the caller runs dense)."""
    from .block_map import cached_block_map

    n, m = q4.shape[-2], k4.shape[-2]
    if on_gpu:
        from .triton_block_sparse import block_sizes, block_sparse_attention

        bm, bn = block_sizes(q4.shape[-1], v4.shape[-1], q4.dtype, q4.device)
    else:
        bm, bn = 64, 64
    if blocks is None:
        m4 = m4.expand(*m4.shape[:2], n, m)  # a view: broadcast rows get stride 0
        bmap = cached_block_map(m4, bm, bn)
    else:  # a block table: the map (and, on the GPU, the kernel) read it per block
        bmap = cached_block_map(m4, bm, bn, block_q=blocks[0], block_k=blocks[1], n=n, m=m)
    if bmap.visited_fraction() > BLOCK_SPARSE_MAX_VISITED:
        return None
    if on_gpu:
        mask = m4 if blocks is None else None  # None: the map carries the table
        return block_sparse_attention(q4, k4, v4, bmap, scale=scale, bias=b4, mask=mask, return_lse=True)
    from .sparse_torch import sparse_attention_torch

    if blocks is not None:  # the CPU path evaluates element masks: expand the table
        m4 = token_mask(m4, blocks, n, m)
        bmap = dataclasses.replace(bmap, mask=None, mask_block_q=1, mask_block_k=1)
    return sparse_attention_torch(q4, k4, v4, None, scale=scale, bias=b4, mask=m4, block_map=bmap,
                                  return_lse=True)


def _removed(mask, blocks, spec: MaskSpec, implied: bool, n: int, m: int) -> Removed:
    """What the op removes, row by row: the mask (a block table read per block), and the structure
    unless the remaining tensors already imply it (then it replaced nothing)."""
    structure = None if implied or spec.kind in ("dense", "arbitrary") else spec
    return Removed(n, m, mask, None, structure, blocks)


def _fast(q4, k4, v4, b4, m4, scale, mspec: MaskSpec, kernel: str, blocks, want_lse: bool):
    """The sparse kernels' (out, lse) or out, or None where the block map visits too much to pay."""
    if mspec.kind == "arbitrary":
        return _block_sparse(q4, k4, v4, b4, m4, scale, kernel == "triton", blocks) if m4 is not None else None
    if kernel == "triton":
        from .triton_neighborhood import neighborhood_attention

        return neighborhood_attention(q4, k4, v4, mspec, scale=scale, bias=b4, mask=m4, return_lse=want_lse)
    from .sparse_torch import sparse_attention_torch

    return sparse_attention_torch(q4, k4, v4, mspec, scale=scale, bias=b4, mask=m4, return_lse=want_lse)


@torch.library.custom_op("rewrite::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     mask: torch.Tensor | None, scale: float, spec: str, masked_row: str, kernel: str,
                     out_dtype: torch.dtype, fill: float | None = None, additive: bool = False,
                     site: str = "") -> torch.Tensor:
    with counters.running(site):
        return _sparse_attention(q, k, v, bias, mask, scale, spec, masked_row, kernel, out_dtype, fill, additive)


def _sparse_attention(q, k, v, bias, mask, scale, spec, masked_row, kernel, out_dtype, fill, additive):
    mspec, implied, blocks, recheck = parse_spec(spec)
    sem = spelling_of(q, k, masked_row, fill, additive)
    n, m = q.shape[-2], k.shape[-2]
    if recheck and mask is not None and not mask_within_spec(mask, mspec, q.shape[-2], k.shape[-2]):
        # This tensor keeps keys outside the band read off the first one: it is all there is.
        mspec, implied = MaskSpec("arbitrary", runtime=True), False
        counters.ran("new mask outside the first call's band: block-sparse")
    if kernel not in SPARSE_KERNELS:
        raise ValueError(f"rewrite::sparse_attention: unknown kernel {kernel!r}; choose from {SPARSE_KERNELS}")
    if bias is None and mask is None and q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0]:
        (q4, k4, v4, b4, m4), batch = (q, k, v, None, None), q.shape[:2]  # the common case, no bookkeeping
    else:
        (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, bias, mask)
    removed = _removed(m4, blocks, mspec, implied, n, m)
    if kernel in ("triton", "torch"):
        fast, kernel = kernel, "sdpa"  # unless the sparse kernels run: a dense run-time mask would not pay
        if n and m and not (checks_inputs(q4) and not tame(q4, k4, v4, scale, not sem.sdpa, sem.additive)):
            coarse = None if sem.sdpa or b4 is None else coarse_rows(q4, k4, b4, removed.rows(0, n, q4.device), sem)
            want_lse = sem.sdpa or sem.finite or coarse is not None  # the row LSE only serves to settle rows
            res = _fast(q4, k4, v4, b4, m4, scale, mspec, fast, blocks, want_lse)
            if res is not None:
                counters.ran(fast)
                if want_lse:
                    def recompute(out, rows):
                        return eager_attention(q4, k4, v4, b4, removed, scale, sem, rows, out)

                    out = settle(res[0], lse_floor(res[1], m), sem, q4.dtype, recompute,
                                 excess_of(q4, k4, scale, sem, b4), coarse)
                else:
                    out = res[0] if isinstance(res, tuple) else res
                return out.reshape(*batch, *out.shape[-2:]).to(out_dtype).contiguous()
            counters.ran("dense (the block map visits too many tiles for sparsity to pay)")
    out = dense_forward(q4, k4, v4, b4, removed, scale, sem, kernel)
    return out.reshape(*batch, *out.shape[-2:]).to(out_dtype).contiguous()


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, bias, mask, scale, spec, masked_row, kernel, out_dtype, fill=None,
                           additive=False, site=""):
    return q.new_empty(out_shape(q, k, v, bias, mask), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, spec, masked_row, _kernel, _dtype, fill, additive, site = inputs
    ctx.save_for_backward(q, k, v, bias, mask)
    ctx.args = (scale, spec, spelling_of(q, k, masked_row, fill, additive), site)


def _tiled_forward(mask, scale: float, spec: MaskSpec, blocks, sem):
    """The op's forward as the CPU path computes it (sparse_torch.py: only the kept tiles, in
    differentiable torch), for recomputation under autograd: the backward then keeps the kept tiles'
    scores, never N×M. Returns None where its gradient may not be eager's (inputs not tame, a row the
    forward settles: one that keeps no key, a finite fill eager does not round away) or the map
    visits too much to pay."""
    from .sparse_torch import sparse_attention_torch

    def forward(q, k, v, _bias):
        (q4, k4, v4, _, m4), batch = as_bhnd(q, k, v, None, mask)
        m = k4.shape[2]
        if q4.shape[2] == 0 or m == 0 or (checks_inputs(q4) and not tame(q4, k4, v4, scale)):
            return None
        if spec.kind == "arbitrary":
            res = _block_sparse(q4, k4, v4, None, m4, scale, False, blocks) if m4 is not None else None
        else:
            res = sparse_attention_torch(q4, k4, v4, spec, scale=scale, mask=m4, return_lse=True)
        if res is None:
            return None
        floor = lse_floor(res[1], m)
        if bool((floor == NEG_INF).any()):
            return None
        if sem.finite and bool(unsettled(floor, sem, q4.dtype, excess_of(q4, k4, scale, sem)).any()):
            return None
        return res[0].reshape(*batch, *res[0].shape[-2:])

    return forward


def dense_grads(q, k, v, bias, mask, needs, grad, scale: float, spec: MaskSpec, implied: bool, blocks, sem):
    """Gradients where the tiles do not apply: SDPA or the eager spelling (codegen/backward.py)."""
    def forward(q, k, v, b):
        (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, b, mask)
        removed = _removed(m4, blocks, spec, implied, q4.shape[2], k4.shape[2])
        out = grad_forward(q4, k4, v4, b4, removed, scale, sem)
        return out.reshape(*batch, *out.shape[-2:])

    return recompute_grads(forward, (q, k, v, bias), needs, grad)


def _backward(ctx, grad):
    # Recompute through the tiled CPU path (memory for kept tiles only); with a bias, or where
    # that path does not apply, through SDPA / the eager spelling.
    q, k, v, bias, mask = ctx.saved_tensors
    scale, spec, sem, site = ctx.args
    mspec, implied, blocks, recheck = parse_spec(spec)
    if recheck and mask is not None and not mask_within_spec(mask, mspec, q.shape[-2], k.shape[-2]):
        mspec, implied = MaskSpec("arbitrary", runtime=True), False
    needs = ctx.needs_input_grad
    grads = None
    with counters.running(site):
        if bias is None and concrete(q, k, v, mask):  # the tiled path plans from values (not traceable)
            grads = recompute_grads(_tiled_forward(mask, scale, mspec, blocks, sem), (q, k, v, None), needs, grad)
            if grads is not None:
                counters.ran("backward: torch tiles")
        if grads is None:
            grads = dense_grads(q, k, v, bias, mask, needs, grad, scale, mspec, implied, blocks, sem)
    return one_per_passed_input(ctx, *grads)


sparse_attention.register_autograd(_backward, setup_context=_setup_context)
