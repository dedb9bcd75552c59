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

Rows with no kept key hold what the original spelling gave (``masked_row``, as in ops.py): the
sparse kernels return NaN there and their row log-sum-exp is −inf, which locates the rows
without materialising the N×M mask.

Backward recomputes the forward through the torch path's kept tiles under autograd (memory for
the kept scores only); with a bias, a row that keeps no key, or a mask too dense for tiles to pay,
through SDPA or the eager reference on the materialised mask (ops.dense_grads).
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import torch

from rewrite.ir.mask import MaskSpec, keep_matrix, keep_rows

from .identity_cache import IdentityCache
from .ops import _sdpa, as_bhnd, attention_reference, concrete, dense_grads, recompute_grads

SPARSE_KERNELS = ("triton", "torch", "sdpa", "reference")
# A run-time ("arbitrary") mask goes through the block-sparse kernels only when its block map
# visits at most this fraction of the key tiles; denser masks run SDPA with the mask.
BLOCK_SPARSE_MAX_VISITED = 0.5


@lru_cache(maxsize=16)
def _spec_keep_cpu(spec_json: str, n: int, m: int) -> torch.Tensor:
    return keep_matrix(MaskSpec.from_json(spec_json), n, m)


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


def spec_keep_tensor(spec: MaskSpec, n: int, m: int, device) -> torch.Tensor:
    """The [n, m] bool keep mask of a spec (materialised: reference and SDPA paths only)."""
    return _spec_keep_cpu(spec.to_json(), n, m).to(device)


# A row whose every visited score carries a fill of this size (finfo.min, −1e30: finite "masked"
# values of an additive mask) is a fully masked row written with a finite fill. Eager's softmax
# then spreads over every key the fill reaches, some of which the kernel skipped.
_SWAMPED = -1e29


def _recompute_swamped(out, lse, q, k, v, bias, mask, spec: MaskSpec, implied: bool, scale: float):
    """Rows whose kernel LSE is finite but below ``_SWAMPED``: recompute them over every key, as
    eager does (the spec applied as −inf only when it replaced −inf tensors, i.e. not ``implied``
    by the remaining ones). Such rows are padding rows: few, so this is cheap."""
    if bias is None:
        return out
    bad = torch.isfinite(lse) & (lse < _SWAMPED)
    if not bool(bad.any()):
        return out
    b, h, r = bad.nonzero(as_tuple=True)
    g = q.shape[1] // k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("rd,rmd->rm", q[b, h, r].to(dt), k[b, h // g].to(dt)) * scale
    s = s + bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])[b, h, r].to(dt)
    if mask is not None:
        s = s.masked_fill(~mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])[b, h, r], float("-inf"))
    if not implied and spec.kind not in ("dense", "arbitrary"):
        keep = spec_keep_tensor(spec, q.shape[2], k.shape[2], q.device)[r]
        s = s.masked_fill(~keep, float("-inf"))
    rows = torch.einsum("rm,rmf->rf", s.softmax(-1), v[b, h // g].to(dt))
    out = out.clone()
    out[b, h, r] = rows.to(out.dtype)
    return out


def _fix_rows(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, masked_row: str) -> torch.Tensor:
    """Rows that kept no key (LSE −inf): eager's value for the spelling."""
    if masked_row == "nan":
        return out
    empty = (lse == float("-inf")).unsqueeze(-1)
    if masked_row == "mean":
        fill = v.float().mean(-2, keepdim=True)
        if fill.shape[-3] != out.shape[-3]:  # GQA: each query head reads its kv head
            fill = fill.repeat_interleave(out.shape[-3] // fill.shape[-3], dim=-3)
        return torch.where(empty, fill.to(out.dtype), out)
    return out.masked_fill(empty, 0.0)


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


@torch.library.custom_op("rewrite::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     mask: torch.Tensor | None, scale: float, spec: str, masked_row: str, kernel: str,
                     out_dtype: torch.dtype) -> torch.Tensor:
    mspec, implied, blocks, recheck = parse_spec(spec)
    n, m = q.shape[-2], k.shape[-2]
    if recheck and mask is not None and not mask_within_spec(mask, mspec, q.shape[-2], k.shape[-2]):
        # This tensor keeps keys outside the band read off the first one: it is all there is.
        mspec, implied = MaskSpec("arbitrary", runtime=True), False
    if kernel not in SPARSE_KERNELS:
        raise ValueError(f"rewrite::sparse_attention: unknown kernel {kernel!r}; choose from {SPARSE_KERNELS}")
    if kernel in ("triton", "torch"):
        if bias is None and mask is None and q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0]:
            (q4, k4, v4, b4, m4), batch = (q, k, v, None, None), q.shape[:2]  # the common case, no bookkeeping
        else:
            (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, bias, mask)
        # The row log-sum-exp is only needed to find rows to fix.
        want_lse = bias is not None or masked_row != "nan"
        res = None
        if mspec.kind == "arbitrary":
            if m4 is not None:
                res = _block_sparse(q4, k4, v4, b4, m4, scale, kernel == "triton", blocks)
        elif kernel == "triton":
            from .triton_neighborhood import neighborhood_attention

            res = neighborhood_attention(q4, k4, v4, mspec, scale=scale, bias=b4, mask=m4, return_lse=want_lse)
        else:
            from .sparse_torch import sparse_attention_torch

            res = sparse_attention_torch(q4, k4, v4, mspec, scale=scale, bias=b4, mask=m4, return_lse=want_lse)
        if res is not None:
            if want_lse:
                out, lse = res
                out = _recompute_swamped(out, lse, q4, k4, v4, b4, token_mask(m4, blocks, n, m), mspec, implied,
                                         scale)
                out = _fix_rows(out, lse, v4, masked_row)
            else:
                out = res[0] if isinstance(res, tuple) else res
            return out.reshape(*batch, *out.shape[-2:]).to(out_dtype).contiguous()
        kernel = "sdpa"  # a dense run-time mask: sparsity would not pay
    mask = token_mask(mask, blocks, n, m)
    keep = None if mspec.kind in ("dense", "arbitrary") else spec_keep_tensor(mspec, n, m, q.device)
    if mask is not None:
        keep = mask if keep is None else mask & keep
    if kernel == "sdpa":
        out = _sdpa(q, k, v, bias, keep, scale, False, 0, masked_row)
    else:
        out = attention_reference(q, k, v, bias, keep, scale, False, 0, masked_row)
    return out.to(out_dtype).contiguous()


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, bias, mask, scale, spec, masked_row, kernel, out_dtype):
    from .ops import _out_shape

    return q.new_empty(_out_shape(q, k, v, bias, mask), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, spec, masked_row, _kernel, _dtype = inputs
    ctx.save_for_backward(q, k, v, bias, mask)
    ctx.args = (scale, spec, masked_row)


def _tiled_forward(mask, scale: float, spec: MaskSpec, blocks):
    """The op's forward as the CPU path computes it (sparse_torch.py: only the kept tiles, in
    differentiable torch), for recomputation under autograd: the backward then keeps the kept tiles'
    scores, never N×M. Returns None where it does not apply: a row keeps no key (eager's NaN
    gradient is reproduced by the reference instead), or the map visits too much to pay."""
    from .sparse_torch import sparse_attention_torch

    def forward(q, k, v, _bias):
        (q4, k4, v4, _, m4), batch = as_bhnd(q, k, v, None, mask)
        if spec.kind == "arbitrary":
            res = _block_sparse(q4, k4, v4, None, m4, scale, False, blocks) if m4 is not None else None
        else:
            res = sparse_attention_torch(q4, k4, v4, spec, scale=scale, mask=m4, return_lse=True)
        if res is None or bool((res[1] == float("-inf")).any()):
            return None
        return res[0].reshape(*batch, *res[0].shape[-2:])

    return forward


def _backward(ctx, grad):
    # Recompute through the tiled CPU path (memory for kept tiles only); with a bias, or where
    # that path does not apply, through SDPA / the eager reference on the materialised mask.
    q, k, v, bias, mask = ctx.saved_tensors
    scale, spec, masked_row = ctx.args
    mspec, _, blocks, recheck = parse_spec(spec)
    if recheck and mask is not None and not mask_within_spec(mask, mspec, q.shape[-2], k.shape[-2]):
        mspec = MaskSpec("arbitrary", runtime=True)
    needs = ctx.needs_input_grad
    grads = None
    if bias is None and concrete(q, k, v, mask):  # the tiled path plans from values (not traceable)
        grads = recompute_grads(_tiled_forward(mask, scale, mspec, blocks), (q, k, v, None), needs, grad)
    if grads is None:
        mask = token_mask(mask, blocks, q.shape[-2], k.shape[-2])
        keep = None if mspec.kind in ("dense", "arbitrary") else spec_keep_tensor(mspec, q.shape[-2], k.shape[-2],
                                                                                     q.device)
        if mask is not None:
            keep = mask if keep is None else mask & keep
        grads = dense_grads(q, k, v, bias, keep, needs, grad, scale, False, 0, masked_row)
    return (*grads, None, None, None, None, None, None)


sparse_attention.register_autograd(_backward, setup_context=_setup_context)
