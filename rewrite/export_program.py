"""``rewrite.export``: a ``torch.export.ExportedProgram`` whose graph calls the ``rewrite::`` ops, and
``rewrite.rewritten_graphs``: the rewritten fx graph of each graph ``rewrite.compile`` captures.

Export runs in two steps. ``torch.export.export`` gives the model's lifted ATen graph (parameters,
buffers and constants are its leading inputs); that graph goes through the same capture
(``capture.to_aten``) and pass pipeline as ``rewrite.compile``'s, with the example inputs and the
model's own tensors as the values that run-time masks are checked on. The rewritten graph is then
exported again inside a module that holds the model's parameters and buffers under their own names,
so the program keeps them as parameters and buffers (``ep.graph_signature``), not as constants.

The plan is proven for the example's sizes: a graph with rewritten sites is exported static, and
asking for dynamic sizes then raises (the sizes the plan was checked for may not hold for others).

Importing ``rewrite`` registers every ``rewrite::`` op, which ``torch.export.load`` needs.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

import rewrite.codegen.decay_ops  # noqa: F401  (the ops a rewritten graph calls: torch.export.load needs
import rewrite.codegen.linear_ops  # noqa: F401   them registered, so `import rewrite` registers all)
import rewrite.codegen.modded_ops  # noqa: F401
import rewrite.codegen.ops  # noqa: F401
import rewrite.codegen.sparse_ops  # noqa: F401

from .capture import CaptureError, to_aten
from .errors import RewriteError
from .options import Options
from .report import Report

log = logging.getLogger("rewrite")


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes=None, *,
           backend: str = "auto", strict: bool = False) -> ExportedProgram:
    """Export ``model(*args, **kwargs)`` with every proven attention replaced by its ``rewrite::`` op.

    Returns a ``torch.export.ExportedProgram`` (``strict`` is passed to ``torch.export.export``;
    non-strict suits Hugging Face models); its ``rewrite_report`` attribute is the `Report` of the
    sites found (an attribute of this object only: ``torch.export.save`` does not keep it).
    Parameters and buffers stay parameters and buffers of the program. ``dynamic_shapes`` is passed
    through when no site is rewritten; a rewrite is planned for the example's sizes, so a dynamic
    size with a rewritten site raises `RewriteError` (export without ``dynamic_shapes``, once per
    size you serve, or use ``rewrite.compile``, which plans each size it meets).
    ``torch.export.load`` of the saved program needs ``import rewrite`` first (it registers the ops).
    A graph that cannot be rewritten (see ``rewrite_report.skipped_graphs``) is exported unchanged.
    """
    options = Options(backend=backend)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"rewrite.export: argument 'model' must be an nn.Module instance, got {type(model).__name__}")
    args, kwargs = tuple(args), dict(kwargs or {})
    first = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    report = Report(graphs=1)
    flat = lifted_inputs(first, args, kwargs)
    rewritten = rewrite_lowered(first.graph_module, flat, options, report)
    if rewritten is None or not report.rewritten:
        first.rewrite_report = report
        return first
    if _has_symbolic_inputs(first):
        where = ", ".join(s.location for s in report.rewritten)
        raise RewriteError(
            f"rewrite.export: dynamic_shapes asks for sizes other than the example's, but the rewrite of the "
            f"site(s) at {where} is planned and checked for the example's sizes only. Export without "
            "dynamic_shapes (once per size you serve), or use rewrite.compile, which plans each size it meets.")
    program = torch.export.export(_LiftedCall(model, first, rewritten), args, kwargs, strict=False)
    program.rewrite_report = report
    return program


def rewrite_lowered(gm: GraphModule, inputs: list, options: Options, report: Report) -> GraphModule | None:
    """``gm`` (a graph of tensors: Dynamo's, or an exported program's lifted graph) lowered as
    ``rewrite.compile`` lowers it and rewritten for ``inputs``; None (with the reason in ``report``)
    when it is left as it was."""
    from rewrite.passes.pipeline import rewrite_graph

    try:
        aten_gm = to_aten(gm, inputs)
    except CaptureError as exc:
        report.skipped_graphs.append(str(exc))
        return None
    try:
        new_gm, sites = rewrite_graph(aten_gm, options.backend, inputs, count_calls=options.count_calls)
    except Exception as exc:  # as in rewrite.compile: a bug of ours leaves the graph as it was
        log.warning("rewrite: graph left alone after an internal error: %r", exc)
        report.skipped_graphs.append(f"internal error while rewriting ({type(exc).__name__}: {str(exc)[:160]}); "
                                     "the graph is left unchanged. Please report this model.")
        return None
    for site in sites:
        site.graph = report.graphs - 1
    report.sites.extend(sites)
    return new_gm


def lifted_inputs(program: ExportedProgram, args: tuple, kwargs: dict) -> list:
    """The values of ``program.graph_module``'s inputs, in order: its parameters, buffers and
    constants, then the flattened user inputs."""
    users = iter(pytree.tree_leaves((args, kwargs)))
    values = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            values.append(next(users))
        elif spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
            values.append(program.state_dict[spec.target])
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            values.append(program.constants[spec.target])
        else:
            raise RewriteError(f"rewrite.export: the exported graph has an input of kind {spec.kind.name} "
                               f"({spec.arg.name}), which the rewrite does not handle")
    return values


def _has_symbolic_inputs(program: ExportedProgram) -> bool:
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.SymInt) or (
                isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape)):
            return True
    return False


def _install(root: torch.nn.Module, fqn: str, tensor: torch.Tensor, kind: InputKind, persistent: bool) -> None:
    *path, name = fqn.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if kind == InputKind.PARAMETER:
        owner.register_parameter(name, tensor)
    else:
        owner.register_buffer(name, tensor, persistent=persistent)


class _LiftedCall(torch.nn.Module):
    """Calls a rewritten lifted graph with the model's parameters and buffers, held under the
    model's own names, and writes back the buffers and inputs the graph mutates, as
    ``ExportedProgram.module()`` does; exporting it keeps them parameters and buffers."""

    def __init__(self, model: torch.nn.Module, first: ExportedProgram, graph: GraphModule):
        super().__init__()
        self.input_specs = list(first.graph_signature.input_specs)
        self.output_specs = list(first.graph_signature.output_specs)
        self.out_spec = first.call_spec.out_spec
        self.constants = dict(first.constants)
        for spec in self.input_specs:
            if spec.kind == InputKind.PARAMETER:
                _install(self, spec.target, model.get_parameter(spec.target), spec.kind, True)
            elif spec.kind == InputKind.BUFFER:
                _install(self, spec.target, model.get_buffer(spec.target), spec.kind, spec.persistent)
        # Not a submodule: the rewrite's folded constants (a position mask) become the program's
        # constants, and its state dict keeps exactly the model's names.
        self.__dict__["rewritten"] = graph
        try:  # the program's inputs keep the model's argument names
            signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return

        def forward(*args, **kwargs):
            return self.call(*args, **kwargs)

        forward.__signature__ = signature
        self.forward = forward

    def forward(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def call(self, *args, **kwargs):
        users = pytree.tree_leaves((args, kwargs))
        user_names = [s.arg.name for s in self.input_specs if s.kind == InputKind.USER_INPUT]
        next_user = iter(users)
        values = []
        for spec in self.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                values.append(next(next_user))
            elif spec.kind == InputKind.PARAMETER:
                values.append(self.get_parameter(spec.target))
            elif spec.kind == InputKind.BUFFER:
                values.append(self.get_buffer(spec.target))
            else:
                values.append(self.constants[spec.target])
        with torch.fx.traceback.preserve_node_meta():  # the program's nodes keep the user's source lines
            outs = torch.fx.Interpreter(self.rewritten).run(*values)
        results = []
        for spec, val in zip(self.output_specs, outs):
            if spec.kind == OutputKind.BUFFER_MUTATION:
                self.get_buffer(spec.target).copy_(val)
            elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                users[user_names.index(spec.target)].copy_(val)
            elif spec.kind == OutputKind.USER_OUTPUT:
                results.append(val)
            else:
                raise RewriteError(f"rewrite.export: the exported graph has an output of kind {spec.kind.name}, "
                                   "which the rewrite does not handle")
        return pytree.tree_unflatten(results, self.out_spec)


def rewritten_graphs(fn, *args, backend: str = "auto", **kwargs) -> list[GraphModule]:
    """The rewritten fx graphs of ``fn(*args, **kwargs)``: one per graph Dynamo captures (graph
    breaks make several), in capture order, each calling the ``rewrite::`` op of every rewritten
    site (``print(gm.code)``); ``rewrite.compile`` runs these (as fx, or handed to Inductor). A graph
    left alone is returned as captured; ``rewrite.inspect`` says why. Runs ``fn`` once, under
    ``torch.no_grad``."""
    options = Options(backend=backend)
    if not callable(fn) or isinstance(fn, type):
        raise TypeError(f"rewrite.rewritten_graphs: argument 'fn' must be a function or an nn.Module "
                        f"instance, got {type(fn).__name__}")
    captured: list[GraphModule] = []
    report = Report()

    def compiler(gm: GraphModule, example_inputs):
        report.graphs += 1
        built: list[GraphModule] = []

        def run(*args):
            if not built:  # rewritten on its first call, with real inputs (run-time masks are read)
                built.append(rewrite_lowered(gm, list(args), options, report) or gm)
                captured.append(built[0])
            return built[0](*args)

        return run

    torch._dynamo.reset()  # a fresh capture, so every graph reaches the backend
    try:
        with torch.no_grad():
            torch.compile(fn, backend=compiler, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return captured
