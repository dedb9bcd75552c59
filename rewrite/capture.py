"""Capture: a Dynamo graph (or any callable) → one functional, pre-dispatch ATen graph.

Recognisers and proofs read the graph this returns, so it must show everything that decides
what attention computes. Two properties matter:

- **Functional.** In-place edits (``keep[:, 0] = True`` after ``tril``, ``scores /= √d``,
  ``s.masked_fill_(…)``, ``buf.copy_(…)``) become ordinary ops (``select_scatter``, ``div``,
  ``masked_fill``), so a mask edited after it is built is read as edited, never as built.
  Writes to graph inputs (a KV cache updated in place) are kept as one ``copy_`` per input at
  the end of the graph, after every read, exactly where their effect was due.
- **Pre-dispatch.** Composite ops stay whole (``matmul``, ``softmax``,
  ``scaled_dot_product_attention``), so the graph stays differentiable and a site is one
  recognisable op, not its decomposition.

Torch's own pre-dispatch functionalisation (the one ``torch.export`` is built on) does both.
Where it fails on a graph, the plain pre-dispatch trace is used only if that graph mutates
nothing; a graph with a mutation that could not be made functional is left alone (the caller
reports why), since an edit the recognisers cannot see could make a proof wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx

from .concretise import concretised

log = logging.getLogger("rewrite")
aten = torch.ops.aten
_METADATA_CHECKS = {aten._assert_tensor_metadata.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default}


class CaptureError(Exception):
    """The graph could not be lowered to a functional ATen graph; it runs as it was."""


class _TupleOut(torch.nn.Module):
    """Runs the graph node by node (so every ATen node keeps its source line and module path)
    and returns a tuple, as ``aot_export_module`` wants."""

    def __init__(self, gm: torch.nn.Module):
        super().__init__()
        self.inner = gm
        self.returned_tuple = True

    def forward(self, *args):
        if isinstance(self.inner, GraphModule):
            out = torch.fx.Interpreter(self.inner).run(*args)
        else:
            out = self.inner(*args)
        self.returned_tuple = isinstance(out, (tuple, list))
        return tuple(out) if self.returned_tuple else (out,)


def is_mutating(node: Node) -> bool:
    """Does ``node`` write into one of its inputs (an in-place or out= op)?"""
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return getattr(node.target, "__name__", "").endswith("_") and not node.target.__name__.startswith("_")
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _functional(fn: torch.nn.Module, args: Sequence) -> GraphModule:
    from torch._functorch.aot_autograd import aot_export_module

    wrapper = _TupleOut(fn)
    with torch.fx.traceback.preserve_node_meta():
        gm, sig = aot_export_module(wrapper, tuple(args), trace_joint=False, pre_dispatch=True)
    if sig.parameters or sig.buffers or sig.buffers_to_mutate or sig.parameters_to_mutate:
        raise CaptureError("the callable holds parameters or buffers; pass a Dynamo graph (their values arrive "
                           "as inputs) or a function of tensors")
    graph = gm.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in phs}
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    n_mut = len(sig.user_inputs_to_mutate)
    mutated, user_outs = outs[:n_mut], outs[n_mut:]
    with graph.inserting_before(out_node):
        for new_val, name in zip(mutated, sig.user_inputs_to_mutate.values()):
            # The input's new value is written back after the graph's last read, as eager did.
            graph.call_function(aten.copy_.default, (by_name[name], new_val))
    out_node.args = (tuple(user_outs) if wrapper.returned_tuple else user_outs[0],)
    return _normalised(gm)


def _normalised(gm: GraphModule) -> GraphModule:
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in _METADATA_CHECKS:
            graph.erase_node(n)  # export's checks of `.to()` results: no values, only extra users
        elif n.op == "call_function" and n.target in _VIEWS:
            # In a functional graph nothing writes through an alias, so a view and a reshape are the same
            # values; a reshape stays valid when a rewritten op hands back other strides than the trace saw.
            n.target = aten.reshape.default
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _plain(fn, args: Sequence) -> GraphModule:
    run = torch.fx.Interpreter(fn).run if isinstance(fn, GraphModule) else fn
    with torch.fx.traceback.preserve_node_meta():
        return make_fx(run, tracing_mode="fake", pre_dispatch=True)(*args)


def to_aten(fn, args: Sequence) -> GraphModule:
    """The functional pre-dispatch ATen graph of ``fn(*args)`` (a Dynamo ``GraphModule`` or a
    function of tensors). Its placeholders are ``args`` in order; it returns what ``fn`` returns.
    Raises `CaptureError` with the reason when no such graph can be made."""
    module = fn if isinstance(fn, torch.nn.Module) else _FunctionModule(fn)
    try:
        return _functional(module, args)
    except Exception as exc:  # torch's functionalisation rejects a few graphs: try the plain trace
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    log.info("functional capture failed (%s); trying the plain pre-dispatch trace", first)
    try:
        gm = _plain(fn, args)
    except Exception as exc:
        raise CaptureError(f"could not lower to ATen ({type(exc).__name__}: {str(exc)[:160]})") from exc
    writes = [n for n in gm.graph.nodes if is_mutating(n)]
    if writes:
        raise CaptureError(f"in-place op {writes[0].target} could not be made functional ({first}); "
                           "an edit the recognisers cannot see could change a mask, so the graph is left alone")
    return gm


def to_symbolic_aten(gm: GraphModule) -> GraphModule | None:
    """The functional ATen graph of a Dynamo graph with symbolic sizes, traced once on the fake
    inputs Dynamo traced it with (its sizes stay symbols). None when that trace fails or had to
    assume anything about a size: a guard added now would not be checked by Dynamo, so the
    graph would be wrong at sizes where the assumption fails."""
    fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    modes = {t.fake_mode for t in fakes if isinstance(t, torch._subclasses.FakeTensor)}
    if len(modes) != 1 or None in fakes:
        return None
    shape_env = next(iter(modes)).shape_env
    if shape_env is None:
        return None
    before = (len(shape_env.guards), len(shape_env.replacements), len(shape_env.deferred_runtime_asserts))
    try:
        aten_gm = to_aten(gm, fakes)
    except CaptureError as exc:
        log.info("symbolic capture failed (%s); each size is lowered on its own", exc)
        return None
    after = (len(shape_env.guards), len(shape_env.replacements), len(shape_env.deferred_runtime_asserts))
    if after != before:
        log.info("symbolic capture assumed something about a size (guards %s → %s); each size is lowered "
                 "on its own", before, after)
        return None
    return aten_gm


def specialised(symbolic_gm: GraphModule, args: Sequence) -> GraphModule:
    """``symbolic_gm`` (from `to_symbolic_aten`) at concrete inputs' sizes: the same functional graph
    as ``to_aten`` of the Dynamo graph at these sizes, without functionalising it again. Its nodes
    evaluated at these sizes (rewrite/concretise.py), or, where that does not apply, traced again."""
    try:
        return _normalised(concretised(symbolic_gm, args))
    except Exception as exc:  # noqa: BLE001 - a node it cannot evaluate: the trace decides
        log.info("concretising the symbolic graph failed (%s: %s); traced at these sizes instead",
                  type(exc).__name__, str(exc)[:160])
    return traced_at(symbolic_gm, args)


def traced_at(symbolic_gm: GraphModule, args: Sequence) -> GraphModule:
    """``symbolic_gm`` traced again with ``make_fx`` on concrete inputs (what `specialised` falls back to)."""
    return _normalised(_plain(symbolic_gm, args))


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
