"""From a matched Site to a Plan: prove what its mask is, pick the kernel, cost it.

Reads only the site's facts (its `MaskTerm`s: lifted predicates, fills, value thunks), never the
graph; the decision is made here once and carried by the `Plan` (rewrite/ir/plan.py)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import sympy
import torch

from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM
from rewrite.ir.mask import MaskSpec, check_causal, has_empty_rows, keep_matrix
from rewrite.ir.plan import Plan
from rewrite.ir.site import MaskTerm, Site

from . import masks
from .direct import direct_note, direct_sdpa
from .kernels import choose_kernel

# What every verdict read off a run-time mask's values rests on (codegen/identity_cache.py).
RUNTIME_MASK_CONTRACT = ("re-derived when the tensor's identity or version counter changes; writes that bypass the "
                         "version counter (.data, a NumPy view) are not seen: call rewrite.clear_caches() after them")

# Position-only masks up to this many entries are also checked against the tensor the graph
# computes: a second line of defence behind the proof (passes/mask_classes.py), which is sound on
# its own at every size. ``CONCRETE_CHECK = False`` (or REWRITE_CONCRETE_CHECK=0 in the
# environment) switches the check off, so tests can show the proofs stand alone.
CONCRETE_CHECK_LIMIT = 1 << 26
CONCRETE_CHECK = os.environ.get("REWRITE_CONCRETE_CHECK", "1") != "0"


@dataclass
class MaskFacts:
    spec: MaskSpec  # the site's positional structure; runtime: tensors remain
    keeps: list[MaskTerm]  # mask tensors the kernel still applies
    biases: list[MaskTerm]
    causal: bool  # causal and nothing else: the kernels' causal flag
    offset: int
    predicate: sympy.Basic | None
    notes: list[str]
    constant_keep: torch.Tensor | None = None  # the AND of the position-only masks, when evaluated
    implied: bool = False  # the structure is implied by the tensors that remain (none was dropped)


def _split(pred: sympy.Basic) -> tuple[list, list]:
    """Position-only and run-time factors of a keep predicate."""
    factors = list(pred.args) if isinstance(pred, sympy.And) else [pred]
    runtime = [f for f in factors if f.atoms(sympy.core.function.AppliedUndef) or (f.free_symbols - {P_SYM, M_SYM})]
    return [f for f in factors if f not in runtime], runtime


def _exact_fill(fill: float | None) -> bool:
    """A fill that provably removes a score: −inf, or ≤ −1e30 (no kept score is that small)."""
    return fill is not None and (fill == float("-inf") or fill <= -1e30)


def analyse_mask(site: Site) -> MaskFacts:
    """Normalise every mask and where-built bias of a site to one positional predicate, classify
    it with the site's sizes (passes/masks.py, passes/mask_classes.py), and drop the tensors
    the proven structure replaces. Tensors that read run-time values stay, applied by the kernel."""
    n, m = site.n, site.m
    notes: list[str] = []
    keeps: list[MaskTerm] = []
    biases: list[MaskTerm] = []
    droppable: list[MaskTerm] = []  # position-only terms the proven structure may replace
    hints: list = []  # position-only factors of tensors that also read run-time values
    for t in site.terms:
        if t.lift_failure:
            notes.append(f"{'bias' if t.is_bias else 'mask'} {t.binding.node.name}: {t.lift_failure}")
        if t.predicate is None:
            (biases if t.is_bias else keeps).append(t)
            continue
        pos, rt = _split(t.predicate)
        if not t.is_bias:
            if rt:
                keeps.append(t)
                hints += pos
            else:
                droppable.append(t)
            continue
        exact = _exact_fill(t.fill)
        if rt or not exact or t.predicate is sympy.true or site.fill_biased:
            biases.append(t)  # run-time values, values the softmax still sees, or added over the fill
            hints += pos if exact else []
        else:
            droppable.append(t)

    def restore():
        return keeps + [t for t in droppable if not t.is_bias], biases + [t for t in droppable if t.is_bias]

    dropped_pred = sympy.And(*[t.predicate for t in droppable])
    spec = masks.classify(dropped_pred, n, m) if droppable else MaskSpec("dense")
    constant = None
    if droppable and spec.kind != "arbitrary":
        ok, constant = _concrete_check(droppable, spec, n, m)
        # A finite fill (finfo.min) is not −inf: rows it masks entirely average v in eager, over
        # keys the structure would skip. Drop such tensors only where that cannot happen.
        finite_fill = any(t.is_bias and math.isfinite(t.fill) for t in droppable)
        if not ok or (finite_fill and (biases or has_empty_rows(spec, n, m))):
            notes.append("mask structure not confirmed on the tensor the graph computes; mask applied as given")
            keeps, biases = restore()
            spec = MaskSpec("dense", runtime=True)
            droppable = []
    if spec.kind == "arbitrary":
        if constant is None and n * m <= CONCRETE_CHECK_LIMIT:
            constant = _constant_keep(droppable)
        if constant is None:
            keeps, biases = restore()  # applied as the graph computes them
        # else: the position-only tensors are replaced by their folded constant (Plan.constant_mask)
        return MaskFacts(replace(spec, runtime=True), keeps, biases, False, 0, dropped_pred, notes, constant)
    remaining = bool(keeps or biases)
    if spec.kind == "causal":
        if remaining:
            # Causal proven but run-time tensors remain: drop nothing, the kernel applies them.
            notes.append("causal structure proven; run-time mask tensors applied as given")
            keeps, biases = restore()
            return MaskFacts(replace(spec, runtime=True), keeps, biases, False, spec.offset, None, notes)
        return MaskFacts(spec, [], [], True, spec.offset, None, notes, constant)
    if spec.kind in ("neighborhood", "blocked") and spec.density == 1.0:
        spec = MaskSpec("dense", proof=spec.proof)  # a window that covers every key (proven, counted exactly)
    if spec.kind in ("neighborhood", "blocked"):
        # The kernel's tiles come from the dropped tensors' structure; run-time tensors left are
        # applied inside the visited tiles.
        return MaskFacts(replace(spec, runtime=remaining), keeps, biases, False, 0, dropped_pred, notes)
    # dense: the position-only masks keep everything. A run-time tensor's own position-only
    # factors (a Hugging Face 4-D mask: window & padding in one tensor) still give the tiles;
    # the tensor is applied as given, so the structure is implied, not replacing anything.
    if hints:
        hinted = masks.classify(sympy.And(*hints), n, m)
        if hinted.kind == "causal":
            notes.append("causal structure proven; run-time mask tensors applied as given")
            return MaskFacts(replace(hinted, runtime=True), keeps, biases, False, hinted.offset, None, notes)
        if hinted.kind in ("neighborhood", "blocked"):
            notes.append(f"{hinted.kind} structure proven on the position-only part of a run-time mask; "
                         "the tensor is applied inside the visited tiles")
            return MaskFacts(replace(hinted, runtime=True), keeps, biases, False, 0, sympy.And(*hints), notes,
                             implied=True)
    return MaskFacts(MaskSpec("dense", runtime=remaining), keeps, biases, False, 0, None, notes)


def _constant_keep(droppable: list[MaskTerm]) -> torch.Tensor | None:
    """The AND of the position-only masks as the graph computes them ([N, M] bool), or None."""
    out = None
    for t in droppable:
        val = t.constant()
        if val is None:
            return None
        keep = (val == 0) if t.is_bias else val
        keep = keep.reshape(-1, *keep.shape[-2:]).all(0) if keep.dim() > 2 else keep
        out = keep if out is None else out & keep
    return out


def _concrete_check(droppable: list[MaskTerm], spec: MaskSpec, n: int, m: int) -> tuple[bool, torch.Tensor | None]:
    """Compare the proven spec with the concrete tensors, where that is cheap (and switched on)."""
    if not CONCRETE_CHECK or n * m > CONCRETE_CHECK_LIMIT:
        return True, None
    keep = _constant_keep(droppable)
    if keep is None:
        return False, None
    want = keep_matrix(spec, n, m, keep.device) if spec.kind != "dense" else torch.ones_like(keep)
    for t in droppable:
        if t.is_bias:  # the masked scores must be exactly the −inf (or ≤ −1e30) fill
            val = t.constant()
            if not bool((val[val != 0] <= -1e30).all()):
                return False, keep
    return bool(torch.equal(keep.expand(n, m), want)), keep


def _runtime_causal_hint(site: Site, keeps: list[MaskTerm]) -> int | None:
    """A single run-time bool mask (a registered tril buffer) that is causal on the first call,
    over the site's whole [N, M] (a mask broadcast along the queries is causal only when N = 1):
    the op re-checks it per tensor identity, so it is never assumed."""
    if len(keeps) != 1:
        return None
    keep = keeps[0].first_value()
    if keep is None or keep.dtype != torch.bool or keep.dim() < 2:
        return None
    keep = keep.expand(*keep.shape[:-2], site.n, site.m)
    offset = int(keep[..., 0, :].reshape(-1, keep.shape[-1])[0].sum().item()) - 1
    return offset if offset >= 0 and check_causal(keep, offset) else None


def plan_site(site: Site, backend: str, device: torch.device | None, direct: bool = True) -> Plan:
    facts = analyse_mask(site)
    spec, keeps, biases, notes = facts.spec, facts.keeps, facts.biases, facts.notes
    causal, offset = facts.causal, facts.offset
    hint = None
    if spec.kind == "dense" and spec.runtime and not biases:
        hint = _runtime_causal_hint(site, keeps)
        if hint is not None:
            spec = MaskSpec("causal", predicate=f"m <= p + {hint}", offset=hint, runtime=True,
                            proof="first-call value, re-checked per tensor")
            notes.append(f"run-time mask tensor was causal on the first call; {RUNTIME_MASK_CONTRACT}")
    fill, additive = _removed_fill(site, facts)
    masked_row = ("zero_masked" if site.keeps or site.biases else "zero") if site.kept_as_is else (
        ("biased_fill" if site.fill_biased else "mean") if math.isfinite(fill) else "nan")
    sdpa_mask = site.kept_as_is and causal and not site.causal  # an SDPA call's own mask, proven causal
    if site.causal:  # an SDPA call with is_causal=True
        causal, offset = True, site.causal_offset
        spec = MaskSpec("causal", predicate="m <= p", offset=offset, runtime=bool(keeps or biases),
                        proof="given (is_causal)")
    variant = {"causal": "causal", "neighborhood": "neighborhood", "blocked": "neighborhood"}.get(spec.kind, "dense")
    kept_fraction = None
    constant = None
    mask_blocks = None
    recheck, implied = False, facts.implied
    table = None  # a block table that replaces the one run-time mask
    if spec.kind == "arbitrary" and facts.constant_keep is not None:
        constant = facts.constant_keep
        kept_fraction = float(constant.float().mean())
        if kept_fraction <= 0.5:
            variant = "block_sparse"
            notes.append("position-only mask of no known family: folded to a constant, block map cached")
        else:
            spec = replace(spec, kind="dense")
            notes.append(f"position-only mask of no known family keeps {kept_fraction:.1%}: folded to a "
                         "constant, dense kernel with the mask")
    elif spec.kind in ("dense", "arbitrary") and keeps and not site.causal:
        val = _first_call_keep(keeps)
        # Only masks that vary along queries and keys (routing, layouts): a key-padding mask
        # [B, 1, 1, M] is a dense site with a run-time mask.
        if val is not None and val.shape[-2] > 1 and val.shape[-1] > 1:
            kept_fraction = float(val.float().mean())
            from .mask_classes import band_of_tensor

            band = band_of_tensor(val) if kept_fraction <= 0.5 and not biases else None
            if band is not None:
                # A band buffer (a sliding window built once, passed in): its tiles come from the band,
                # the tensor is still applied inside them, and the op re-checks every new tensor.
                variant, spec, recheck, implied = "neighborhood", band, True, True
                notes.append(f"run-time mask was a 1-D band on the first call ({band.describe()}): analytic "
                             "tiles, the tensor applied inside them; each new tensor re-checked, one outside "
                             f"the band runs block-sparse; {RUNTIME_MASK_CONTRACT}")
            elif kept_fraction <= 0.5:
                variant = "block_sparse"
                spec = MaskSpec("arbitrary", predicate=f"run-time tensor, {kept_fraction:.3g} kept on the "
                                      "first call", runtime=True, density=kept_fraction)
                notes.append(f"run-time mask {kept_fraction:.1%} kept on the first call: block map built per "
                             f"call, block-sparse kernel while at most half the tiles are visited; the map is "
                             f"{RUNTIME_MASK_CONTRACT}")
                granular = keeps[0].block_table if len(keeps) == 1 else None
                if granular is not None:
                    # The mask is a block table read at ⌊p/bq⌋, ⌊m/bk⌋ (MoBA/BiFormer routing, BigBird
                    # layouts): pass the table itself; the token-level mask is never built.
                    table, mask_blocks = granular[0], granular[1:]
                    notes.append(f"the mask reads a run-time table per {mask_blocks[0]}×{mask_blocks[1]} block: "
                                 "the kernel takes the table, the token-level mask is not materialised")
            elif band is None:
                notes.append(f"run-time mask keeps {kept_fraction:.1%} on the first call: dense kernel with the "
                             "mask (the block-sparse kernel is chosen at most 50% kept)")
    elif spec.kind in ("dense", "arbitrary") and biases and not keeps and not site.causal:
        notes += _bias_density_note(biases)
    elif spec.kind == "causal" and spec.runtime and keeps and not site.causal and not site.kept_as_is:
        band = _causal_band_buffer(keeps, spec)
        if band is not None:
            # GPT-Neo's local layers: a causal window buffer beside a causal 4-D mask. The tiles come
            # from the window; both tensors are applied inside them; each new buffer is re-checked.
            variant, spec, recheck, implied = "neighborhood", band, True, True
            notes.append(f"run-time mask was a causal window inside the proven causal structure on the first call "
                         f"({band.describe()}, {band.density:.1%} kept): analytic tiles, the tensors applied inside "
                         f"them; each new tensor re-checked, one outside the window runs block-sparse; "
                         f"{RUNTIME_MASK_CONTRACT}")
    if sdpa_mask:
        # SDPA adds its mask as −inf, so a NaN/inf key the mask removes reaches the row (is_causal would
        # hide it): the op keeps the mask and re-checks it (mask_causal_hint), running the causal kernels
        # where the inputs are finite and the call's own form where not (codegen/ops.py).
        constant, keeps, biases, hint, causal = _sdpa_causal_mask(site, facts) + (offset, False)
        if biases:
            hint = None
    modified = site.score_mod is not None
    if (modified and variant == "neighborhood" and spec.kind in ("neighborhood", "blocked")
            and not recheck and table is None and mask_blocks is None):
        notes.append("score modifier with the window: the neighborhood kernel's tiles (only the window's tiles run; "
                     "the modifier generated into them)")
    elif modified and variant not in ("dense", "causal"):
        if constant is None and not implied and not (variant == "block_sparse" and keeps):
            constant = _structure_as_constant(spec, site.n, site.m)
            if constant is None:
                raise ValueError(f"a score modifier with a {spec.kind} mask of {site.n}×{site.m}: only analytic "
                                 f"windows take a modifier in their tiles, and its dense mask would exceed "
                                 f"{MODDED_MASK_LIMIT} entries (the site runs as written)")
        notes.append(f"score modifier with a {variant} mask read at run time (a block map, or a window re-checked per "
                     "tensor): only analytic windows take a modifier in their tiles; the dense kernel applies the "
                     "mask (no tile is skipped)")
        variant, spec, kept_fraction, table, mask_blocks = "dense", replace(spec, kind="dense"), None, None, None
    on_gpu = device is not None and device.type == "cuda"
    kernel, why = choose_kernel(variant, backend, on_gpu, bottom_right=(causal or sdpa_mask) and offset != 0,
                                 dtype=site.dtype, modified=modified)
    notes.append(f"kernel {kernel}: {why}")
    if on_gpu and not site.kept_as_is and (keeps or causal or spec.kind != "dense" or constant is not None):
        notes.append("on a GPU NaN/inf inputs are not checked (it costs a host sync per call): a NaN/inf key or "
                     "value that the mask removes may reach the output otherwise than in eager (README, Semantics)")
    keep_bindings = [table] if table is not None else [t.binding for t in keeps]
    plan = Plan(site, variant, kernel, spec, causal, offset, [t.binding for t in biases], keep_bindings,
                masked_row, fill, additive, notes + site.notes,
                mask_causal_hint=hint, predicate=facts.predicate, constant_mask=constant,
                kept_fraction=kept_fraction, implied=implied, mask_blocks=mask_blocks, recheck=recheck)
    if direct and direct_sdpa(plan, device):
        plan.direct = True
        plan.notes.append(direct_note())
    return plan


MODDED_MASK_LIMIT = 1 << 28  # entries of a proven structure built as a bool mask for a modified site (256 MiB)


def _structure_as_constant(spec: MaskSpec, n: int, m: int) -> torch.Tensor | None:
    """The proven structure's [N, M] keep mask (the IR's one predicate), for a kernel that takes a mask
    but not the structure; None above MODDED_MASK_LIMIT entries."""
    return keep_matrix(spec, n, m) if n * m <= MODDED_MASK_LIMIT else None


def _sdpa_causal_mask(site: Site, facts: MaskFacts) -> tuple[torch.Tensor | None, list, list]:
    """(constant mask, keeps, biases) that give the op an SDPA call's own causal mask back: the folded
    [N, M] constant where the proof evaluated it (one tensor: checked once), else the call's mask."""
    if facts.constant_keep is not None:
        return facts.constant_keep.expand(site.n, site.m).contiguous(), [], []
    return None, [t for t in site.terms if not t.is_bias], [t for t in site.terms if t.is_bias]


def _removed_fill(site: Site, facts: MaskFacts) -> tuple[float, bool]:
    """What eager gives the scores the op removes, and whether the spelling adds it to the score (a
    where-built bias the structure replaced, or implies where the kernels skip its tiles) rather than
    writing it (masked_fill / where on the scores: ``site.fill``). The op holds its kernels to it
    (codegen/eager.py). Both kinds in one site: the written fill is taken."""
    if site.fill is not None:
        return site.fill, False
    applied = {id(t) for t in facts.keeps + facts.biases}
    fills = [t.fill for t in site.terms if t.is_bias and t.predicate is not None and t.fill is not None
             and (id(t) not in applied or facts.implied)]
    return (max(fills), True) if fills else (float("-inf"), False)


def _bias_density_note(biases: list[MaskTerm]) -> list[str]:
    """Why a run-time additive bias that removes keys (a −inf block layout expanded into a bias) runs
    dense: its share of −inf entries on the first call, and the decision."""
    vals = [t.first_value() for t in biases]
    vals = [v for v in vals if v is not None and v.is_floating_point() and v.dim() >= 2 and v.shape[-2] > 1]
    if not vals:
        return []
    removed = max(float((v == float("-inf")).float().mean()) for v in vals)
    if removed == 0.0:
        return []
    return [f"run-time bias removes {removed:.1%} of the scores (−inf) on the first call, keeping "
            f"{1 - removed:.1%}: dense kernel with the bias (the block-sparse kernels skip tiles of a bool mask or "
            "a block table, not of an additive bias; pass the layout as a bool mask to have them skipped)"]


def _causal_band_buffer(keeps: list[MaskTerm], causal: MaskSpec) -> MaskSpec | None:
    """The causal window (m ≤ p, p − m ≤ w) that the run-time bool masks hold on the first call, where it is
    narrower than the proven causal structure (offset 0) and keeps at most half of the pairs."""
    if causal.offset != 0:
        return None
    val = _first_call_keep(keeps)
    if val is None or val.dim() < 2 or val.shape[-2] < 2 or val.shape[-2] != val.shape[-1]:
        return None
    from .mask_classes import band_of_tensor

    band = band_of_tensor(val)
    if band is None or band.causal != (True,) or band.offset != 0 or band.density > 0.5:
        return None
    return band


def _first_call_keep(keeps: list[MaskTerm]) -> torch.Tensor | None:
    """The AND of run-time bool masks on the first call's inputs (for the report and the
    block-sparse decision; the op decides again on every call)."""
    out = None
    for t in keeps:
        val = t.first_value()
        if val is None or val.dtype != torch.bool:
            return None
        out = val if out is None else out & val
    return out
