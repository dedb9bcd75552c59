"""Evaluate the parts of a graph that depend on no input (masks built from arange/tril)."""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.fx.node import map_arg


def constant_value(node: Node, limit: int = 2000, inputs: dict[Node, object] | None = None) -> torch.Tensor | None:
    """The value of ``node`` when it depends on no placeholder, else None.

    The graph is specialised to static shapes, so such a value is the same on every call.
    With ``inputs`` (placeholder → the first call's value) it is the first call's value."""
    order: list[Node] = []
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and inputs is not None and n in inputs:
            continue
        if n.op == "placeholder" or len(seen) > limit:
            return None
        if n.op not in ("call_function", "get_attr"):
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
    env: dict[Node, object] = dict(inputs or {})
    for n in sorted(order, key=_position(node)):
        if n.op == "get_attr":
            obj = n.graph.owning_module
            for part in n.target.split("."):
                obj = getattr(obj, part)
            env[n] = obj
        else:
            args = map_arg(n.args, lambda a: env[a])
            kwargs = map_arg(n.kwargs, lambda a: env[a])
            with torch.no_grad():
                env[n] = n.target(*args, **kwargs)
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None


def _position(node: Node):
    index = {n: i for i, n in enumerate(node.graph.nodes)}
    return lambda n: index[n]
