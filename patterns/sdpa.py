"""Calls that already are attention: ``F.scaled_dot_product_attention``.

They are sites too: the report names them, and the plan may still swap the kernel
(a Triton kernel for a bottom-right causal mask, or on request)."""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from rewrite.ir.site import Site, TensorPlan

from .axes import NoMatch, dtype_of, shape_of
from .softmax_attention import location_of

aten = torch.ops.aten
SDPA_OPS = {aten.scaled_dot_product_attention.default}


def _arg(node: Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _identity(node: Node, rows_dim=None, cols_dim=None) -> TensorPlan:
    shape = list(shape_of(node))
    return TensorPlan(node, list(range(len(shape))), shape, rows_dim=rows_dim, cols_dim=cols_dim)


def match_sdpa(node: Node) -> Site:
    if node.op != "call_function" or node.target not in SDPA_OPS:
        raise NoMatch("not an SDPA call")
    q, k, v = node.args[:3]
    attn_mask = _arg(node, 3, "attn_mask", None)
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    is_causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale", None)
    enable_gqa = _arg(node, 7, "enable_gqa", False)
    if dropout_p:
        raise NoMatch("dropout_p > 0 (its random mask is not reproduced)")
    sq, sk, sv = shape_of(q), shape_of(k), shape_of(v)
    if sq is None or sk is None or sv is None or len(sq) < 2:
        raise NoMatch("shapes unknown")
    if attn_mask is not None and is_causal:
        raise NoMatch("attn_mask together with is_causal (SDPA itself rejects it)")
    if sk[-3:-2] != sq[-3:-2] and not enable_gqa and len(sq) >= 3 and sk[-3] != 1:
        raise NoMatch("key heads differ from query heads without enable_gqa")
    e = sq[-1]
    site = Site(
        spelling="F.scaled_dot_product_attention", location=location_of(node),
        q=_identity(q), k=_identity(k), v=_identity(v), out_node=node, out_perm=[],
        out_shape=list(shape_of(node)), out_dtype=dtype_of(node),
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(e), nodes=[node],
        batch_sizes=list(sq[:-2]), n=sq[-2], m=sk[-2], e=e, f=sv[-1],
        causal=bool(is_causal), kept_as_is=True,
        gqa_groups=(sq[-3] // sk[-3]) if len(sq) >= 3 and len(sk) >= 3 and sk[-3] < sq[-3] else 1,
    )
    if attn_mask is not None:
        r = len(shape_of(attn_mask))
        tp = _identity(attn_mask, rows_dim=r - 2 if r >= 2 else None, cols_dim=r - 1)
        if dtype_of(attn_mask) == torch.bool:
            site.keeps.append(tp)
        else:
            site.biases.append(tp)
    return site
