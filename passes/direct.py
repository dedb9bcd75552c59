"""Which plans run as a direct ``aten.scaled_dot_product_attention`` call in the graph.

A dense or causal site whose plan is one plain SDPA call (no bias, no mask tensor, no modifier, no
rows to settle, no inputs the op would check) needs none of ``rewrite::attention``'s run-time work:
that op would do exactly this call (codegen/ops.py, its first fast path). Emitting the aten call
itself removes the custom op's dispatch, the Python op body and the per-call counters from every
call: a decode step is all host time. The site's report says so (its calls are not counted).

Decided once, here, from the plan and the first call's values; the fx rewrite (passes/apply.py)
emits what this says.
"""

from __future__ import annotations

import torch

from rewrite.codegen.eager import Spelling
from rewrite.ir.plan import Plan


def _size(v) -> int | None:
    """A concrete size, or None for a symbolic one (Dynamo specialises sizes 0 and 1, so a symbolic
    size is at least 2)."""
    return v if isinstance(v, int) else None


def direct_sdpa(plan: Plan, device: torch.device | None) -> bool:
    """Does ``plan`` run as the plain SDPA call it would make on every call? (Module docstring.)"""
    site = plan.site
    if (plan.kernel != "sdpa" or plan.sparse or site.score_mod is not None or plan.biases or plan.keeps
            or plan.constant_mask is not None or plan.mask_causal_hint is not None or plan.recheck):
        return False
    if plan.causal and plan.causal_offset != 0:
        return False
    sem = Spelling.of(plan.masked_row, plan.fill if plan.fill != float("-inf") else None, plan.additive,
                      site.out_dtype)
    if plan.causal and sem.finite:
        return False  # rows eager's finite fill may not round away: the op settles them
    # On a CPU the op checks that the inputs are finite for an eager spelling (codegen/eager.py, tame);
    # an SDPA call given no mask is SDPA's own semantics everywhere.
    if not (sem.sdpa and not sem.sdpa_masked) and (device is None or device.type != "cuda"):
        return False
    vals = [t.node.meta.get("val") for t in (site.q, site.k, site.v)]
    if any(v is None for v in vals) or len({v.dtype for v in vals}) != 1 or vals[0].dtype != site.out_dtype:
        return False
    shapes = [list(t.shape) for t in (site.q, site.k, site.v)]
    if any(len(s) > 4 for s in shapes):
        return False
    q, k, v = ([1] * (4 - len(s)) + s for s in shapes)
    if not (q[0] == k[0] == v[0] and k[1] == v[1] and k[2] == v[2] and q[3] == k[3]):
        return False  # a broadcast batch, or shapes the op folds
    hq, hk, m = _size(q[1]), _size(k[1]), _size(k[2])
    if hq is None or hk is None or hq % hk or m == 0:
        return False
    return True


def direct_note() -> str:
    return ("runs as a direct aten.scaled_dot_product_attention call in the graph: nothing to check per call, "
            "so the calls are not counted (report.ran stays empty)")
