"""A symbolic ATen graph at concrete sizes, without tracing it again.

A dynamic graph is rewritten per size signature (rewrite/specialise.py) from one graph whose sizes are
symbols (capture.to_symbolic_aten). Tracing that graph again with ``make_fx`` at each new size costs a
proxy and a fake dispatch per node; most of a new size's cost. The graph is already functional ATen,
so the concrete graph is the same nodes with every size value replaced by its number: each node is
evaluated once on fake tensors of the concrete inputs, a node whose value is a number (``sym_size``,
size arithmetic) is inlined into its users, and every other node is copied with its value as
``meta["val"]`` and the source metadata the recognisers read (``stack_trace``, ``nn_module_stack``).

Anything this does not know (a node kind other than placeholders, ATen calls, constants and the
output, or an op fake tensors cannot run) raises, and the caller traces instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_map

_KEPT_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr", "original_aten", "from_node",
              "torch_fn")


def concretised(symbolic_gm: GraphModule, args: Sequence) -> GraphModule:
    """``symbolic_gm`` with its placeholders bound to ``args``' sizes: the graph ``make_fx`` of it on
    ``args`` would record (same ops, same arguments), built by one fake evaluation per node."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    graph = Graph()
    new: dict[Node, object] = {}  # symbolic node → its node in the new graph, or its number
    vals: dict[Node, object] = {}  # symbolic node → its value at these sizes (fake tensor or number)
    inputs = iter(args)

    def arg(a):
        return new[a] if isinstance(a, Node) else a

    def val(a):
        return vals[a] if isinstance(a, Node) else a

    with mode:
        for node in symbolic_gm.graph.nodes:
            if node.op == "placeholder":
                given = next(inputs)
                value = mode.from_tensor(given) if isinstance(given, torch.Tensor) else given
                ph = graph.placeholder(node.name)
                ph.meta = {**node.meta, "val": value}
                new[node], vals[node] = (ph if isinstance(given, torch.Tensor) else given), value
            elif node.op == "get_attr":
                const = getattr(symbolic_gm, node.target)
                copy = graph.get_attr(node.target)
                copy.meta = {**node.meta,
                             "val": mode.from_tensor(const) if isinstance(const, torch.Tensor) else const}
                new[node], vals[node] = copy, copy.meta["val"]
            elif node.op == "call_function":
                value = node.target(*tree_map(val, node.args), **tree_map(val, node.kwargs))
                if isinstance(value, (int, float, bool)):  # a size, or arithmetic on sizes: inlined
                    new[node], vals[node] = value, value
                    continue
                copy = graph.call_function(node.target, tree_map(arg, node.args), tree_map(arg, node.kwargs))
                copy.meta = {k: v for k, v in node.meta.items() if k in _KEPT_META}
                copy.meta["val"] = value
                new[node], vals[node] = copy, value
            elif node.op == "output":
                graph.output(tree_map(arg, node.args[0]))
            else:
                raise ValueError(f"concretise: a {node.op} node ({node.target}) in an ATen graph")
    if next(inputs, None) is not None:
        raise ValueError("concretise: more inputs than placeholders")
    return GraphModule(symbolic_gm, graph)
