"""From a matched Site to a Plan: prove what its mask is, pick the kernel, cost it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    variant: str  # "dense" | "causal"
    kernel: str  # "sdpa" | "triton" | "reference"
    mask: masks.MaskSpec
    causal: bool = False
    causal_offset: int = 0
    biases: list[TensorPlan] = field(default_factory=list)
    keeps: list[TensorPlan] = field(default_factory=list)
    masked_row: str = "nan"
    notes: list[str] = field(default_factory=list)
    mask_causal_hint: int | None = None  # a run-time mask that was causal on the first call

    @property
    def cascade(self) -> Cascade:
        pred = None
        if self.mask.kind == "causal":
            pred = sympy.Le(M_SYM, P_SYM + self.mask.offset)
        elif self.mask.kind != "dense":
            pred = sympy.Symbol("mask(p,m)")
        s = self.site
        lead = s.batch_sizes or [1]
        sizes = dict(p=s.n, m=s.m, e=s.e, f=s.f, b=math.prod(lead[:-1]), h=lead[-1])
        return Cascade.softmax_attention(mask=pred, batch="bh").with_sizes(**sizes)

    @property
    def density(self) -> float:
        if self.mask.kind == "causal":
            n, m, c = self.site.n, self.site.m, self.mask.offset
            kept = sum(max(0, min(m, i + c + 1)) for i in range(n)) if n <= 1 << 16 else n * m / 2
            return kept / max(1, n * m)
        return 1.0

    @property
    def flops(self) -> int:
        s = self.site
        b = math.prod(s.batch_sizes) if s.batch_sizes else 1
        return int(2 * b * s.n * s.m * (s.e + s.f) * self.density)


def analyse_mask(site: Site) -> tuple[masks.MaskSpec, list[TensorPlan], list[TensorPlan], bool, int, list[str]]:
    """Classify every mask and where-built bias of a site; drop the ones proven causal."""
    notes: list[str] = []
    keeps, biases = list(site.keeps), list(site.biases)
    found_causal: int | None = None
    runtime = False
    arbitrary = []
    drop_keeps, drop_biases = [], []

    def absorb(spec: masks.MaskSpec, proven: bool) -> bool:
        """Fold one mask's class into the site's; True when the tensor can be dropped."""
        nonlocal found_causal, runtime
        if spec.kind == "causal":
            # Several causal masks keep their intersection: the smallest offset.
            found_causal = spec.offset if found_causal is None else min(found_causal, spec.offset)
            if proven and not spec.runtime:
                return True
            runtime = True
        elif spec.kind == "arbitrary":
            arbitrary.append(spec.predicate)
        else:
            runtime = runtime or spec.runtime
        return False

    for kp in keeps:
        pred = _pred_for(kp, invert=kp.invert)
        if pred is None:
            runtime = True
            continue
        spec = masks.classify(pred)
        if absorb(spec, spec.kind == "causal" and _concrete_ok(kp, spec.offset)):
            drop_keeps.append(kp)
    for bp in biases:
        res = _bias_pred_for(bp)
        if res is None:
            runtime = True
            continue
        pred, fill = res
        spec = masks.classify(pred)
        exact_fill = fill == float("-inf") or fill <= -1e30
        proven = (spec.kind == "causal" and spec.offset >= 0 and exact_fill and bp.factor > 0
                  and _concrete_bias_ok(bp, spec.offset))
        if spec.kind == "dense" and not spec.runtime:
            runtime = True  # a where-built bias that keeps everything still adds its values
        if absorb(spec, proven):
            drop_biases.append(bp)
    keeps = [k for k in keeps if k not in drop_keeps]
    biases = [b for b in biases if b not in drop_biases]
    causal_flag = found_causal is not None and not keeps and not biases and not arbitrary and not runtime
    if causal_flag or (found_causal is not None and not arbitrary):
        spec = masks.MaskSpec("causal", predicate=f"m <= p + {found_causal}", offset=found_causal,
                              runtime=runtime or bool(keeps) or bool(biases))
    elif arbitrary:
        spec = masks.MaskSpec("arbitrary", predicate=" & ".join(arbitrary), runtime=runtime)
    else:
        spec = masks.MaskSpec("dense", runtime=runtime or bool(keeps) or bool(biases))
    if found_causal is not None and not causal_flag:
        # Causal proven but other masks remain: drop nothing, the kernel applies the tensors.
        keeps, biases = list(site.keeps), list(site.biases)
        notes.append("causal structure proven; run-time mask tensors applied as given")
    return spec, keeps, biases, causal_flag, found_causal or 0, notes


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


def _concrete_ok(kp: TensorPlan, offset: int) -> bool:
    val = _canonical_value(kp)
    if val is None:
        return False
    keep = ~val if kp.invert else val
    return masks.check_causal(keep, offset)


def _concrete_bias_ok(bp: TensorPlan, offset: int) -> bool:
    val = _canonical_value(bp)
    if val is None:
        return False
    val = -val if bp.negate else val
    keep_ok = masks.check_causal(val == 0, offset)
    masked = val[val != 0]
    return keep_ok and bool((masked <= -1e30).all())


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
    spec, keeps, biases, causal, offset, notes = analyse_mask(site)
    hint = None
    if spec.kind == "dense" and spec.runtime and not biases:
        hint = _runtime_causal_hint(site, keeps, inputs)
        if hint is not None:
            spec = masks.MaskSpec("causal", predicate=f"m <= p + {hint}", offset=hint, runtime=True)
            notes.append("run-time mask tensor was causal on the first call; re-checked per tensor identity")
    variant = "causal" if spec.kind == "causal" else "dense"
    fill = site.fill
    masked_row = "zero" if site.kept_as_is else ("mean" if fill is not None and math.isfinite(fill) else "nan")
    if site.causal:  # an SDPA call with is_causal=True
        causal, offset, variant = True, site.causal_offset, "causal"
        spec = masks.MaskSpec("causal", predicate="m <= p", offset=offset, runtime=bool(keeps or biases))
    kernel = "sdpa"
    if backend == "triton":
        kernel = "triton"
    elif backend == "auto" and device is not None and device.type == "cuda" and causal and offset != 0:
        kernel = "triton"  # SDPA has no bottom-right causal without a materialised mask
    return Plan(site, variant, kernel, spec, causal, offset, biases, keeps, masked_row, notes + site.notes,
                mask_causal_hint=hint)


def node_device(node: Node) -> torch.device | None:
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None
