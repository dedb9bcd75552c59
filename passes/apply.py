"""The fx rewrite: replace a planned site by one call of ``torch.ops.rewrite.attention`` (or its sparse or
score-modified form)."""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, Node

import rewrite.codegen.modded_ops  # noqa: F401  (registers torch.ops.rewrite.modded_attention)
import rewrite.codegen.ops  # noqa: F401  (registers torch.ops.rewrite.*)
from rewrite.codegen.sparse_ops import op_spec
from rewrite.ir.site import TensorPlan

from .plan import Plan

aten = torch.ops.aten


def permuted_source(node: Node, perm: list[int]) -> tuple[Node, list[int]]:
    """``permute(node, perm)`` as a permutation of what ``node`` itself permutes (a transpose or
    permute of another value): a key written ``k.transpose(2, 3)`` and permuted back is ``k`` itself,
    with no op left on the per-call path."""
    while node.op == "call_function" and node.target in (aten.transpose.int, aten.permute.default):
        rank = len(perm)
        if node.target is aten.transpose.int:
            a, b = (d % rank for d in node.args[1:3])
            inner = list(range(rank))
            inner[a], inner[b] = inner[b], inner[a]
        else:
            inner = [d % rank for d in node.args[1]]
        if len(inner) != rank:
            break
        node, perm = node.args[0], [inner[d] for d in perm]
    return node, perm


def canonical_operand(graph: Graph, tp: TensorPlan) -> Node:
    node, perm = permuted_source(tp.node, tp.perm)
    if perm != list(range(len(perm))):
        node = graph.call_function(aten.permute.default, (node, perm))
    shape = tuple(tp.node.meta["val"].shape)
    # Fused kernels want [B, H, N, E]: pad missing batch dims with size 1.
    target = [1] * max(0, 4 - len(tp.shape)) + list(tp.shape)
    if tuple(target) != tuple(shape[d] for d in tp.perm):
        node = graph.call_function(aten.reshape.default, (node, target))
    if tp.negate:
        node = graph.call_function(aten.neg.default, (node,))
    if tp.factor != 1.0:
        node = graph.call_function(aten.mul.Tensor, (node, tp.factor))
    if tp.invert:
        node = graph.call_function(aten.logical_not.default, (node,))
    if tp.dtype is not None and tp.node.meta["val"].dtype != tp.dtype:
        # The op adds a bias in its own dtype (codegen/eager.py: the rounding of eager's sum).
        node = graph.call_function(aten._to_copy.default, (node,), {"dtype": tp.dtype})
    return node


def constant_buffer(graph: Graph, value: torch.Tensor) -> Node:
    """A folded constant (a position-only mask, a log decay) as a buffer of the graph's module: the same
    tensor on every call, so the kernels' block map is built once and cached by tensor identity."""
    gm = graph.owning_module
    i = 0
    while hasattr(gm, f"_rewrite_const_{i}"):
        i += 1
    gm.register_buffer(f"_rewrite_const_{i}", value.contiguous())
    node = graph.get_attr(f"_rewrite_const_{i}")
    node.meta["val"] = value
    return node


def _combine(graph: Graph, nodes: list[Node], op) -> Node | None:
    if not nodes:
        return None
    out = nodes[0]
    for n in nodes[1:]:
        out = graph.call_function(op, (out, n))
    return out


def _heads(shape) -> int:
    """The head count of a canonical operand (padded to [B, H, N, E], as ``canonical_operand``)."""
    return ([1] * max(0, 4 - len(shape)) + list(shape))[-3]


def _fill_args(plan: Plan) -> tuple:
    """The ops' ``fill`` (None for −inf, which a schema default cannot spell) and ``additive``."""
    return (float(plan.fill) if math.isfinite(plan.fill) else None, bool(plan.additive))


def op_output_shape(site) -> list[int] | None:
    """The op's output shape ``[B, Hq, N, Ev]`` where it is plain to read (q, k and v of one batch
    and no permutation of the output), else None."""
    if site.out_perm and site.out_perm != list(range(len(site.out_perm))):
        return None
    q, k, v = ([1] * max(0, 4 - len(t.shape)) + list(t.shape) for t in (site.q, site.k, site.v))
    if len(q) != 4 or len(v) != 4 or not q[0] == k[0] == v[0]:
        return None
    return [q[0], q[1], q[2], v[3]]


def apply_plan(graph: Graph, plan: Plan, site_id: str = "") -> Node:
    """Insert the fused call before the site's output and reroute its users; ``site_id`` names the
    site in the run-time kernel counters (codegen/counters.py)."""
    site = plan.site
    with graph.inserting_before(site.out_node):
        q = canonical_operand(graph, site.q)
        k = canonical_operand(graph, site.k)
        v = canonical_operand(graph, site.v)
        bias = _combine(graph, [canonical_operand(graph, b) for b in plan.biases], aten.add.Tensor)
        keeps = [canonical_operand(graph, m) for m in plan.keeps]
        if plan.constant_mask is not None:
            keeps.append(constant_buffer(graph, plan.constant_mask))
        keep = _combine(graph, keeps, aten.logical_and.default)
        if plan.direct:  # passes/direct.py: the op would make exactly this call
            gqa = _heads(site.q.shape) != _heads(site.k.shape)
            out = graph.call_function(aten.scaled_dot_product_attention.default,
                                      (q, k, v, None, 0.0, bool(plan.causal)),
                                      {"scale": float(site.scale), "enable_gqa": gqa})
        elif site.score_mod is not None:
            leaves = [canonical_operand(graph, t) for t in site.mod_leaves]
            out = graph.call_function(torch.ops.rewrite.modded_attention.default, (
                q, k, v, leaves, bias, keep, float(site.scale), bool(plan.causal), int(plan.causal_offset),
                plan.masked_row, plan.kernel, site.out_dtype, site.score_mod.to_json(), *_fill_args(plan), site_id,
                op_spec(plan.mask, plan.implied) if plan.variant == "neighborhood" else ""))
        elif plan.sparse:
            out = graph.call_function(torch.ops.rewrite.sparse_attention.default, (
                q, k, v, bias, keep, float(site.scale),
                op_spec(plan.mask, plan.implied, plan.mask_blocks, plan.recheck),
                plan.masked_row, plan.kernel, site.out_dtype, *_fill_args(plan), site_id))
        else:
            out = graph.call_function(torch.ops.rewrite.attention.default, (
                q, k, v, bias, keep, float(site.scale), bool(plan.causal), int(plan.causal_offset),
                plan.masked_row, plan.kernel, site.out_dtype, plan.mask_causal_hint, *_fill_args(plan),
                site_id))
        atoms = getattr(site, "out_atoms_sizes", None)
        permuted = atoms is not None and site.out_perm != list(range(len(site.out_perm)))
        if permuted:
            out = graph.call_function(aten.reshape.default, (out, atoms))
            out = graph.call_function(aten.permute.default, (out, site.out_perm))
        if permuted or op_output_shape(site) != list(site.out_shape):
            out = graph.call_function(aten.reshape.default, (out, site.out_shape))
    out.meta["rewrite_site"] = site.location
    site.out_node.replace_all_uses_with(out)
    return out
