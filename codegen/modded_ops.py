"""``rewrite::modded_attention``: softmax attention with a score modifier (a site's `ScoreMod`).

The canonical layout and eager semantics of ``rewrite::attention`` (codegen/ops.py), with the
modifier applied to the raw products before the scale, the bias and the masks:

    S   = scale · mod(q kᵀ, leaves) + bias
    S   = fill where mask is False or (causal and m > p + causal_offset)
    out = softmax(S, -1) @ v

``program`` is the `ScoreMod` as JSON; ``leaves`` its tensors, broadcastable to [*batch, N, M].
Kernels: "triton", the fused softmax-attention kernel with the generated modifier in its tiles
(masks as −inf, causal tiles skipped; rows a finite fill would change are settled to eager's
spelling by recomputation), and "torch", eager's math by row blocks with the same modifier
(an SDPA call, and where a CPU input check finds values a kernel that skips keys cannot take).
The backward recomputes through the torch path under autograd (gradients for q, k, v, the bias
and every leaf: a learned logit scale trains).
"""

from __future__ import annotations

import functools
import math

import torch

from rewrite.ir.mask import MaskSpec
from rewrite.ir.score_mod import ScoreMod

from . import counters
from .backward import one_per_passed_input, recompute_grads
from .eager import Removed, checks_inputs, coarse_rows, eager_attention, lse_floor, score_bound, settle, tame, underflow
from .ops import as_bhnd, out_shape, spelling_of
from .score_mod_gen import apply_torch, position_grid
from .sparse_ops import parse_spec

KERNELS = ("torch", "triton")


def _four(q, k, v, t):
    return as_bhnd(q, k, v, t, None)[0][3]


def _rows_of(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return t[..., r0:r1, :] if t.shape[-2] > 1 else t


def _torch_path(q, k, v, leaves, bias, mask, scale, causal, causal_offset, sem, mod: ScoreMod, structure=None):
    (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, bias, mask)
    leaves4 = [_four(q, k, v, t) for t in leaves]
    removed = Removed(q.shape[-2], k.shape[-2], m4, causal_offset if causal else None, _removes(structure))
    if k.shape[-2] == 0:
        out = q4.new_zeros(*q4.shape[:3], v4.shape[-1])
    else:
        out = eager_attention(q4, k4, v4, b4, removed, scale, sem, score_mod=_modify(mod, leaves4, k.shape[-2]))
    return out.reshape(*batch, *out.shape[-2:])


def _modify(mod: ScoreMod, leaves4: list[torch.Tensor], m: int):
    def modify(s, r0, r1):
        positions = position_grid(r0, r1, m, s.device) if mod.positional else None
        return apply_torch(mod, s, [_rows_of(t, r0, r1) for t in leaves4], positions)
    return modify


def _triton_ok(q, k, v, leaves, scale, sem) -> bool:
    if sem.sdpa or k.shape[-2] == 0:
        return False
    if checks_inputs(q):  # the CPU (the interpreter): inputs the tiles' skipping would treat otherwise
        return (tame(q, k, v, scale, selecting=True, additive=sem.additive)
                and all(bool(torch.isfinite(t).all()) for t in leaves))
    return True


@functools.lru_cache(maxsize=256)
def _bound_over_all_scores(mod: ScoreMod, extent: tuple[int, int] | None) -> float:
    """max |mod(s)| over every real s, for a modifier without leaves (a property of the program and
    the positions' ranges: computed once, not per call)."""
    from .score_mod_gen import modified_bound

    return float(modified_bound(mod, torch.tensor(float("inf"), dtype=torch.float64), [], extent))


def fill_cannot_show(mod: ScoreMod, leaves4, bias, mask, causal: bool, causal_offset: int, scale: float,
                      sem, dtype, extent: tuple[int, int] | None = None) -> bool:
    """True when no row's result can depend on a finite fill, proven before the launch (no LSE, no
    row check, no host sync where the modifier has no leaves): every row keeps a key (no mask tensor,
    no bias, causal offset ≥ 0) and the modifier is bounded, |scale·mod(s)| ≤ B for every s
    (``modified_bound`` over s ∈ ℝ), so a removed score (≤ fill + B when added) sits at least
    −(fill + 2B) below its row's largest kept score, past exp's underflow. Gemma 2's soft-cap with a
    finfo.min causal mask is the case: B = cap·scale."""
    from .score_mod_gen import modified_bound

    if mask is not None or bias is not None or (causal and causal_offset < 0):
        return False
    top = torch.tensor(float("inf"), dtype=torch.float64)
    bound = abs(scale) * (_bound_over_all_scores(mod, extent) if not leaves4 else
                          float(modified_bound(mod, top, leaves4, extent)))
    if not math.isfinite(bound):
        return False
    gap = sem.fill + (2 * bound if sem.additive else bound)
    return gap + 4 * torch.finfo(torch.float32).eps * abs(sem.fill) < underflow(dtype)


def _triton_path(q, k, v, leaves, bias, mask, scale, causal, causal_offset, sem, mod: ScoreMod, structure=None):
    """The fused kernel with the generated modifier (masks as −inf), its rows then settled to eager's
    spelling as the plain op's are (codegen/eager.py ``settle``): with a finite fill, rows whose kept
    modified scores come near the fill are recomputed by the torch path. The removed score's excess
    over an added fill is bounded by interval arithmetic over the modifier (``modified_bound``).
    ``structure``: (a neighborhood ``MaskSpec`` whose tiles alone are visited by the neighborhood kernel,
    whether the remaining mask/bias tensors already imply it) or None."""
    from .score_mod_gen import modified_bound, triton_function
    from .triton_attention import triton_attention

    counters.ran("triton (generated score modifier)" if structure is None else
                 "triton neighborhood tiles (generated score modifier)")
    (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, bias, mask)
    dt = torch.promote_types(torch.promote_types(q4.dtype, k4.dtype), v4.dtype)
    q4, k4, v4 = q4.to(dt), k4.to(dt), v4.to(dt)
    leaves4 = [_four(q, k, v, t) for t in leaves]
    n, m = q4.shape[2], k4.shape[2]
    removed = Removed(n, m, m4, causal_offset if causal else None, _removes(structure))
    coarse = None if b4 is None else coarse_rows(q4, k4, b4, removed.rows(0, n, q4.device), sem)
    want = coarse is not None or (sem.finite and (structure is not None or not fill_cannot_show(
        mod, leaves4, b4, m4, causal, causal_offset, scale, sem, dt, (n, m))))
    if structure is None:
        res = triton_attention(q4, k4, v4, scale=scale, bias=b4, mask=m4, causal=causal, causal_offset=causal_offset,
                               score_mod=triton_function(mod), mod_leaves=tuple(leaves4), mod_tables=mod.tables,
                               return_lse=want)
    else:
        from .triton_neighborhood import neighborhood_attention

        res = neighborhood_attention(q4, k4, v4, structure[0], scale=scale, bias=b4, mask=m4, return_lse=want,
                                     score_mod=triton_function(mod), mod_leaves=tuple(leaves4),
                                     mod_tables=mod.tables)
    if want:
        excess = None
        if sem.additive and sem.finite:
            excess = modified_bound(mod, score_bound(q4, k4, 1.0), leaves4, (n, m)) * abs(scale)

        def recompute(out, rows):
            return eager_attention(q4, k4, v4, b4, removed, scale, sem, rows, out, score_mod=_modify(mod, leaves4, m))

        res = settle(res[0], lse_floor(res[1], m), sem, dt, recompute, excess, coarse)
    return res.reshape(*batch, *res.shape[-2:])


@torch.library.custom_op("rewrite::modded_attention", mutates_args=())
def modded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, leaves: list[torch.Tensor],
                     bias: torch.Tensor | None, mask: torch.Tensor | None, scale: float, causal: bool,
                     causal_offset: int, masked_row: str, kernel: str, out_dtype: torch.dtype, program: str,
                     fill: float | None = None, additive: bool = False, site: str = "",
                     structure: str = "") -> torch.Tensor:
    if kernel not in KERNELS:
        raise ValueError(f"rewrite::modded_attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    mod = ScoreMod.from_json(program)
    sem = spelling_of(q, k, masked_row, fill, additive)
    spec = _structure(structure)
    with counters.running(site):
        if kernel == "triton" and _triton_ok(q, k, v, leaves, scale, sem):
            out = _triton_path(q, k, v, leaves, bias, mask, scale, causal, causal_offset, sem, mod, spec)
        else:
            counters.ran("torch (eager math by row blocks, score modifier)" if kernel == "torch" else
                         "torch (score modifier; the Triton tiles do not take these inputs)")
            out = _torch_path(q, k, v, leaves, bias, mask, scale, causal, causal_offset, sem, mod, spec)
    return out.to(out_dtype).contiguous()


def _structure(text: str) -> tuple[MaskSpec, bool] | None:
    """The op's ``structure`` argument: "" (none) or a neighborhood spec as sparse_ops.op_spec writes it:
    its tiles are the only ones the Triton path visits; unless the remaining mask/bias tensors imply it
    (``implied``: a Hugging Face 4-D mask), it also removes the keys outside it."""
    if not text:
        return None
    spec, implied, blocks, recheck = parse_spec(text)
    if spec.kind not in ("neighborhood", "blocked") or blocks is not None or recheck:
        raise ValueError(f"rewrite::modded_attention: structure must be an analytic neighborhood spec, not {text!r}")
    return spec, implied


def _removes(structure: tuple[MaskSpec, bool] | None) -> MaskSpec | None:
    """The structure as keys the op removes (None when the tensors already remove them)."""
    return None if structure is None or structure[1] else structure[0]


@modded_attention.register_fake
def _fake(q, k, v, leaves, bias, mask, scale, causal, causal_offset, masked_row, kernel, out_dtype, program,
          fill=None, additive=False, site="", structure=""):
    return q.new_empty(out_shape(q, k, v, bias, mask), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    (q, k, v, leaves, bias, mask, scale, causal, causal_offset, masked_row, _kernel, _dt, program, fill, additive,
     site, structure) = inputs
    ctx.save_for_backward(q, k, v, bias, mask, *leaves)
    ctx.leaf_count = len(leaves)
    ctx.leaf_grad = [t.requires_grad and t.is_floating_point() for t in leaves]
    ctx.args = (scale, causal, causal_offset, spelling_of(q, k, masked_row, fill, additive),
                ScoreMod.from_json(program), site, _structure(structure))


def _backward(ctx, grad):
    q, k, v, bias, mask, *leaves = ctx.saved_tensors
    scale, causal, causal_offset, sem, mod, site, spec = ctx.args
    needs = ctx.needs_input_grad
    want = [bool(needs[0]), bool(needs[1]), bool(needs[2]), *ctx.leaf_grad, bool(needs[4]) and bias is not None]
    nl = len(leaves)

    def forward(q, k, v, *rest):
        return _torch_path(q, k, v, rest[:nl], rest[nl], mask, scale, causal, causal_offset, sem, mod, spec)

    with counters.running(site):
        counters.ran("backward: torch recompute (score modifier)")
        grads = recompute_grads(forward, (q, k, v, *leaves, bias), want, grad)
    gq, gk, gv = grads[:3]
    gleaves = grads[3:3 + nl]
    return one_per_passed_input(ctx, gq, gk, gv, gleaves, grads[-1])


modded_attention.register_autograd(_backward, setup_context=_setup_context)
