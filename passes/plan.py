"""From a matched Site to a Plan: prove what its mask is, pick the kernel, cost it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import sympy
import torch
from torch.fx import Node

from rewrite.cascade import Cascade
from rewrite.cascade import m as M_SYM
from rewrite.cascade import p as P_SYM
from rewrite.patterns.site import Site, TensorPlan

from . import masks
from .constants import constant_value


@dataclass
class Plan:
    site: Site
    variant: str  # "dense" | "causal" | "neighborhood" | "block_sparse"
    kernel: str  # "sdpa" | "triton" | "torch" | "reference"
    mask: masks.MaskSpec
    causal: bool = False
    causal_offset: int = 0
    biases: list[TensorPlan] = field(default_factory=list)
    keeps: list[TensorPlan] = field(default_factory=list)
    masked_row: str = "nan"
    notes: list[str] = field(default_factory=list)
    mask_causal_hint: int | None = None  # a run-time mask that was causal on the first call
    predicate: sympy.Basic | None = None  # the proven positional predicate (for the cascade)
    constant_mask: torch.Tensor | None = None  # a position-only mask folded to a constant
    kept_fraction: float | None = None  # measured on the mask tensor (block-sparse sites)
    implied: bool = False  # the structure is implied by the mask tensors kept (MaskFacts.implied)
    mask_blocks: tuple[int, int] | None = None  # the one mask is a block table: keep[⌊p/bq⌋, ⌊m/bk⌋]
    recheck: bool = False  # the structure was read off a run-time mask's first value: the op re-checks it

    @property
    def sparse(self) -> bool:
        """Runs through ``rewrite::sparse_attention`` (a structure or a block map)."""
        return self.variant in ("neighborhood", "block_sparse")

    @property
    def cascade(self) -> Cascade:
        pred = None
        if self.mask.kind == "causal":
            pred = sympy.Le(M_SYM, P_SYM + self.mask.offset)
        elif self.predicate is not None and self.mask.kind != "dense":
            pred = self.predicate
        elif self.mask.kind != "dense":
            pred = sympy.Symbol("mask(p,m)")
        s = self.site
        lead = s.batch_sizes or [1]
        sizes = dict(p=s.n, m=s.m, e=s.e, f=s.f, b=math.prod(lead[:-1]), h=lead[-1])
        return Cascade.softmax_attention(mask=pred, batch="bh").with_sizes(**sizes)

    @property
    def density(self) -> float:
        if self.kept_fraction is not None:
            return self.kept_fraction
        if self.mask.kind == "dense":
            return 1.0
        return self.mask.density

    @property
    def flops(self) -> int:
        s = self.site
        b = math.prod(s.batch_sizes) if s.batch_sizes else 1
        return int(2 * b * s.n * s.m * (s.e + s.f) * self.density)


# Position-only masks up to this many entries are also checked against the tensor the graph
# computes (belt and braces over the symbolic/grid proof); above it the proof stands alone.
CONCRETE_CHECK_LIMIT = 1 << 26


@dataclass
class MaskFacts:
    spec: masks.MaskSpec  # the site's positional structure; runtime: tensors remain
    keeps: list[TensorPlan]  # tensors the kernel still applies
    biases: list[TensorPlan]
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


def analyse_mask(site: Site) -> MaskFacts:
    """Normalise every mask and where-built bias of a site to one positional predicate, classify
    it with the site's sizes (passes/masks.py, passes/mask_classes.py), and drop the tensors
    the proven structure replaces. Tensors that read run-time values stay, applied by the kernel."""
    from . import mask_classes

    n, m = site.n, site.m
    notes: list[str] = []
    keeps, biases = [], []
    droppable: list[tuple[sympy.Basic, TensorPlan, bool, float]] = []  # (pred, tensor, is_bias, fill)
    hints: list = []  # position-only factors of tensors that also read run-time values
    for kp in site.keeps:
        pred = _pred_for(kp, invert=kp.invert)
        pos, rt = _split(pred) if pred is not None else ([], [True])
        if rt:
            keeps.append(kp)
            hints += pos
        else:
            droppable.append((pred, kp, False, float("-inf")))
    for bp in site.biases:
        res = _bias_pred_for(bp)
        if res is None:
            biases.append(bp)
            continue
        pred, fill = res
        pos, rt = _split(pred)
        exact_fill = (fill == float("-inf") or fill <= -1e30) and bp.factor > 0
        if rt or not exact_fill or pred is sympy.true:
            biases.append(bp)  # run-time values, or values the softmax still sees
            hints += pos if exact_fill else []
        else:
            droppable.append((pred, bp, True, fill))

    def restore():
        return keeps + [t for _, t, b, _ in droppable if not b], biases + [t for _, t, b, _ in droppable if b]

    spec = masks.classify(sympy.And(*[d[0] for d in droppable]), n, m) if droppable else masks.MaskSpec("dense")
    constant = None
    if droppable and spec.kind != "arbitrary":
        ok, constant = _concrete_check(droppable, spec, n, m)
        # A finite fill (finfo.min) is not −inf: rows it masks entirely average v in eager, over
        # keys the structure would skip. Drop such tensors only where that cannot happen.
        finite_fill = any(math.isfinite(f) for *_, f in droppable)
        if not ok or (finite_fill and (biases or mask_classes.has_empty_rows(spec, n, m))):
            notes.append("mask structure not confirmed on the tensor the graph computes; mask applied as given")
            keeps, biases = restore()
            spec = masks.MaskSpec("dense", runtime=True)
            droppable = []
    if spec.kind == "arbitrary":
        if constant is None and n * m <= CONCRETE_CHECK_LIMIT:
            constant = _constant_keep(droppable)
        if constant is None:
            keeps, biases = restore()  # applied as the graph computes them
        # else: the position-only tensors are replaced by their folded constant (Plan.constant_mask)
        pred = sympy.And(*[d[0] for d in droppable])
        return MaskFacts(replace(spec, runtime=True), keeps, biases, False, 0, pred, notes, constant)
    remaining = bool(keeps or biases)
    if spec.kind == "causal":
        if remaining:
            # Causal proven but run-time tensors remain: drop nothing, the kernel applies them.
            notes.append("causal structure proven; run-time mask tensors applied as given")
            keeps, biases = restore()
            return MaskFacts(replace(spec, runtime=True), keeps, biases, False, spec.offset, None, notes)
        return MaskFacts(spec, [], [], True, spec.offset, None, notes)
    if spec.kind in ("neighborhood", "blocked") and spec.density == 1.0:
        spec = masks.MaskSpec("dense")  # a window that covers every key (proven, counted exactly)
    if spec.kind in ("neighborhood", "blocked"):
        # The kernel's tiles come from the dropped tensors' structure; run-time tensors left are
        # applied inside the visited tiles.
        pred = sympy.And(*[d[0] for d in droppable])
        return MaskFacts(replace(spec, runtime=remaining), keeps, biases, False, 0, pred, notes)
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
    return MaskFacts(masks.MaskSpec("dense", runtime=remaining), keeps, biases, False, 0, None, notes)


def _constant_keep(droppable) -> torch.Tensor | None:
    """The AND of the position-only masks as the graph computes them ([N, M] bool), or None."""
    out = None
    for _, tp, is_bias, _ in droppable:
        val = _canonical_value(tp)
        if val is None:
            return None
        if is_bias:
            val = -val if tp.negate else val
            keep = val == 0
        else:
            keep = ~val if tp.invert else val.to(torch.bool)
        keep = keep.reshape(-1, *keep.shape[-2:]).all(0) if keep.dim() > 2 else keep
        out = keep if out is None else out & keep
    return out


def _concrete_check(droppable, spec: masks.MaskSpec, n: int, m: int) -> tuple[bool, torch.Tensor | None]:
    """Compare the proven spec with the concrete tensors, where that is cheap."""
    if n * m > CONCRETE_CHECK_LIMIT:
        return True, None
    keep = _constant_keep(droppable)
    if keep is None:
        return False, None
    from rewrite.codegen.sparse_ops import spec_keep_tensor

    want = spec_keep_tensor(spec, n, m, keep.device) if spec.kind != "dense" else torch.ones_like(keep)
    for _, tp, is_bias, _ in droppable:
        if is_bias:  # the masked scores must be exactly the −inf (or ≤ −1e30) fill
            val = _canonical_value(tp)
            val = -val if tp.negate else val
            if not bool((val[val != 0] <= -1e30).all()):
                return False, keep
    return bool(torch.equal(keep.expand(n, m), want)), keep


def _pred_for(kp: TensorPlan, invert: bool):
    rows, cols = kp.rows_dim, kp.cols_dim
    try:
        return masks.keep_predicate(kp.node, invert, rows, cols)
    except masks.Opaque:
        return None


def _bias_pred_for(bp: TensorPlan):
    rows, cols = bp.rows_dim, bp.cols_dim
    try:
        res = masks.bias_predicate(bp.node, rows, cols)
    except masks.Opaque:
        return None
    if res is None:
        return None
    pred, fill = res
    if bp.negate:
        fill = -fill
    return pred, fill * bp.factor


def _canonical_value(tp: TensorPlan) -> torch.Tensor | None:
    val = constant_value(tp.node)
    if val is None:
        return None
    return val.permute(tp.perm).reshape(tp.shape)


def _runtime_causal_hint(site: Site, keeps: list[TensorPlan], inputs) -> int | None:
    """A single run-time bool mask (a registered tril buffer) that is causal on the first
    call: the op re-checks it per tensor identity, so it is never assumed."""
    if len(keeps) != 1 or inputs is None:
        return None
    kp = keeps[0]
    val = constant_value(kp.node, inputs=inputs)
    if val is None or val.dtype != torch.bool:
        return None
    val = val.permute(kp.perm).reshape(kp.shape)
    keep = ~val if kp.invert else val
    offset = int(keep[..., 0, :].reshape(-1, keep.shape[-1])[0].sum().item()) - 1
    return offset if offset >= 0 and masks.check_causal(keep, offset) else None


def plan_site(site: Site, backend: str, device: torch.device | None, inputs=None) -> Plan:
    facts = analyse_mask(site)
    spec, keeps, biases, notes = facts.spec, facts.keeps, facts.biases, facts.notes
    causal, offset = facts.causal, facts.offset
    hint = None
    if spec.kind == "dense" and spec.runtime and not biases:
        hint = _runtime_causal_hint(site, keeps, inputs)
        if hint is not None:
            spec = masks.MaskSpec("causal", predicate=f"m <= p + {hint}", offset=hint, runtime=True)
            notes.append("run-time mask tensor was causal on the first call; re-checked per tensor identity")
    fill = site.fill
    masked_row = "zero" if site.kept_as_is else ("mean" if fill is not None and math.isfinite(fill) else "nan")
    if site.causal:  # an SDPA call with is_causal=True
        causal, offset = True, site.causal_offset
        spec = masks.MaskSpec("causal", predicate="m <= p", offset=offset, runtime=bool(keeps or biases))
    variant = {"causal": "causal", "neighborhood": "neighborhood", "blocked": "neighborhood"}.get(spec.kind, "dense")
    kept_fraction = None
    constant = None
    mask_blocks = None
    recheck, implied = False, facts.implied
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
        val = _first_call_keep(keeps, inputs)
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
                             "the band runs block-sparse")
            elif kept_fraction <= 0.5:
                variant = "block_sparse"
                spec = masks.MaskSpec("arbitrary", predicate=f"run-time tensor, {kept_fraction:.3g} kept on the "
                                      "first call", runtime=True, density=kept_fraction)
                notes.append(f"run-time mask {kept_fraction:.1%} kept on the first call: block map built per "
                             "call, block-sparse kernel while at most half the tiles are visited")
                granular = _block_granular(keeps[0]) if len(keeps) == 1 else None
                if granular is not None:
                    # The mask is a block table read at ⌊p/bq⌋, ⌊m/bk⌋ (MoBA/BiFormer routing, BigBird
                    # layouts): pass the table itself; the token-level mask is never built.
                    keeps, mask_blocks = [granular[0]], granular[1:]
                    notes.append(f"the mask reads a run-time table per {mask_blocks[0]}×{mask_blocks[1]} block: "
                                 "the kernel takes the table, the token-level mask is not materialised")
    on_gpu = device is not None and device.type == "cuda"
    if variant in ("neighborhood", "block_sparse"):
        kernel = "triton" if backend == "triton" or (backend == "auto" and on_gpu) else "torch"
    else:
        kernel = "sdpa"
        if backend == "triton":
            kernel = "triton"
        elif backend == "auto" and on_gpu and causal and offset != 0:
            kernel = "triton"  # SDPA has no bottom-right causal without a materialised mask
    return Plan(site, variant, kernel, spec, causal, offset, biases, keeps, masked_row, notes + site.notes,
                mask_causal_hint=hint, predicate=facts.predicate, constant_mask=constant,
                kept_fraction=kept_fraction, implied=implied, mask_blocks=mask_blocks, recheck=recheck)


def _block_granular(kp: TensorPlan) -> tuple[TensorPlan, int, int] | None:
    """A run-time bool mask that is a table read per block, ``T[.., ⌊p/bq⌋, ⌊m/bk⌋]``
    (repeat_interleave, expand+reshape): (a plan giving T as [*batch, ⌈N/bq⌉, ⌈M/bk⌉], bq, bk)."""
    try:
        pred, v = masks.keep_predicate_and_axes(kp.node, kp.invert, kp.rows_dim, kp.cols_dim)
    except masks.Opaque:
        return None
    if not isinstance(pred, sympy.core.function.AppliedUndef):
        return None
    name = type(pred).__name__[2:]  # R_<node name>
    src = next((n for n in kp.node.graph.nodes if n.name == name), None)
    shape = list(src.meta["val"].shape) if src is not None and "val" in src.meta else None
    if shape is None or src.meta["val"].dtype != torch.bool:
        return None
    canon = {ax: kp.perm.index(d) for d, ax in enumerate(v.axes) if ax is not None}  # symbol → canonical dim
    rank = len(kp.shape)
    src_dims = [d for d, sz in enumerate(shape) if sz != 1]
    if len(src_dims) != len(pred.args):
        return None
    target = [1] * rank
    order: list[tuple[int, int]] = []  # (canonical dim, source dim)
    bq = bk = None
    for d, arg in zip(src_dims, pred.args):
        if arg in (P_SYM, M_SYM):
            blk, sym = 1, arg
        elif isinstance(arg, sympy.floor) and len(arg.args[0].free_symbols) == 1:
            sym = next(iter(arg.args[0].free_symbols))
            blk = sympy.simplify(sym / arg.args[0])
            if not blk.is_Integer or int(blk) < 1:
                return None
            blk = int(blk)
        elif arg in canon and arg not in (P_SYM, M_SYM):
            c = canon[arg]
            if c >= rank - 2 or kp.shape[c] != shape[d]:
                return None
            target[c] = shape[d]
            order.append((c, d))
            continue
        else:
            return None
        if sym == P_SYM and bq is None:
            bq, c = blk, rank - 2
        elif sym == M_SYM and bk is None:
            bk, c = blk, rank - 1
        else:
            return None
        target[c] = shape[d]
        order.append((c, d))
    n, m = kp.shape[-2], kp.shape[-1]
    bq = bq if bq is not None else n  # no query index: one block of all rows
    if bk is None or bk == 1 and bq == 1 or target[-2] != -(-n // bq) or target[-1] != -(-m // bk):
        return None
    perm = [d for _, d in sorted(order)] + [d for d in range(len(shape)) if d not in {d for _, d in order}]
    return TensorPlan(src, perm, target), bq, bk


def _first_call_keep(keeps: list[TensorPlan], inputs) -> torch.Tensor | None:
    """The AND of run-time bool masks on the first call's inputs (for the report and the
    block-sparse decision; the op decides again on every call)."""
    if inputs is None:
        return None
    out = None
    for kp in keeps:
        val = constant_value(kp.node, inputs=inputs)
        if val is None or val.dtype != torch.bool:
            return None
        val = val.permute(kp.perm).reshape(kp.shape)
        val = ~val if kp.invert else val
        out = val if out is None else out & val
    return out


def node_device(node: Node) -> torch.device | None:
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None
