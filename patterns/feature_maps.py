"""Feature maps of linear attention: which elementwise map produced φ(Q) or φ(K), and whether it
is provably non-negative (what the normaliser's proof needs: passes/linearize.py)."""

from __future__ import annotations

import torch
from torch.fx import Node

from .axes import is_layout_op
from .softmax_chain import scalar_value

aten = torch.ops.aten


def feature_map(node) -> tuple[str, bool]:
    """(name, provably non-negative) of the elementwise map that produced ``node``."""
    cur = node
    for _ in range(12):
        if isinstance(cur, Node) and cur.op == "call_function" and is_layout_op(cur):
            cur = cur.args[0]
        else:
            break
    if not isinstance(cur, Node) or cur.op != "call_function":
        return "identity", False
    t = cur.target
    if t in (aten.relu.default,):
        return "relu", True
    if t in (aten.exp.default,):
        return "exp", True
    if t in (aten.sigmoid.default,):
        return "sigmoid", True
    if t in (aten._softmax.default, aten.softmax.int):
        return "softmax over features", True
    if t in (aten.abs.default, aten.square.default):
        return str(t).split(".")[-2], True
    if t == aten.pow.Tensor_Scalar and isinstance(cur.args[1], int) and cur.args[1] % 2 == 0:
        return f"x^{cur.args[1]}", True
    if t == aten.softplus.default:
        return "softplus", True
    if t in (aten.add.Tensor, aten.add.Scalar):
        a, b = cur.args[:2]
        c = scalar_value(b)
        inner = a
        if c is None:
            c, inner = scalar_value(a), b
        if c is not None and isinstance(inner, Node) and inner.target == aten.elu.default:
            alpha = float(inner.args[1]) if len(inner.args) > 1 else 1.0
            scale = float(inner.args[2]) if len(inner.args) > 2 else 1.0
            return f"elu+{c:g}", alpha >= 0 and scale > 0 and c >= alpha * scale  # elu ≥ −alpha·scale
        if c is not None and c >= 0:
            name, nonneg = feature_map(inner)
            return f"{name}+{c:g}", nonneg
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        a, b = cur.args[:2]
        c = scalar_value(b)
        inner = a
        if c is None:
            c, inner = scalar_value(a), b
        if c is not None and c > 0:
            name, nonneg = feature_map(inner)
            return f"{c:g}·{name}", nonneg
    name = str(t).replace("aten.", "").split(".")[0]
    return name, False
