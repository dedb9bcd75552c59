"""Inductor around the rewrite: the rewritten graph's other ops compiled by Inductor.

The rewritten graph is a functional pre-dispatch ATen graph whose attention sites are
``rewrite::`` custom ops (each with a fake kernel and an autograd formula). Handed to
``compile_fx``, AOTAutograd traces it again (its own forward and backward) and Inductor fuses
everything around the custom ops, which it calls as opaque kernels: their run-time checks and the
per-site counters run on every call as they do without Inductor.

Inductor compiles C++ on a CPU (seconds a graph), so ``inductor="auto"`` compiles only graphs whose
inputs are on a GPU, or when a mode or Inductor config asks for Inductor. Every graph gets one note
in the report saying which way it went.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, get_origin

import torch
from torch.fx import GraphModule

if TYPE_CHECKING:
    from .options import Options
    from .report import Report

log = logging.getLogger("rewrite")
INDUCTOR_CHOICES = (True, False, "auto")
HOT_CALLS = 3  # auto: a size of a graph rewritten per size goes to Inductor on its third call


def mode_config(mode: str | None) -> dict[str, Any]:
    """Inductor's config patches for a ``torch.compile`` mode (torch's own table); a mode torch
    does not know is an error that lists the ones it does."""
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode not in modes:
        raise ValueError(f"rewrite: unknown mode {mode!r}; Inductor takes {', '.join(map(repr, modes))}")
    return dict(modes[mode])


def inductor_config_names() -> dict[str, Any]:
    from torch._inductor import config

    return config.get_config_copy()


def check_inductor_config(patches: Mapping[str, Any]) -> dict[str, Any]:
    """``patches`` with ``-`` read as ``_``, each a name of ``torch._inductor.config`` holding a
    value of its type (as torch.compile checks its own ``options``)."""
    if not patches:
        return {}
    from torch._inductor import config

    known = inductor_config_names()
    checked = {}
    for key, value in patches.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"rewrite: {key!r} is not an Inductor config name (torch._inductor.config)")
        kind = config.get_type(name)
        if get_origin(kind) is None and isinstance(kind, type) and not isinstance(value, kind):
            raise TypeError(f"rewrite: Inductor config {key!r} takes a {type(known[name]).__name__}, "
                            f"got {value!r}")
        checked[name] = value
    return checked


def inductor_on(options: Options, args: Sequence, per_size: bool = False,
                gm: GraphModule | None = None, hot: bool = False) -> tuple[bool, str]:
    """Whether this graph goes to Inductor, and the report's note saying why. ``per_size``: one size
    of a graph rewritten per size signature; ``hot``: that size has run ``HOT_CALLS`` times."""
    if options.inductor is False:
        return False, "Inductor off (inductor=False): the rewritten graph runs as an fx graph"
    if options.inductor is True:
        return True, "Inductor compiled the rest of the graph (inductor=True); the rewrite:: ops stay opaque custom ops"
    asked = [f"mode={options.mode!r}"] if options.mode not in (None, "default") else []
    asked += ["Inductor config"] if options.inductor_config else []
    if asked:
        verb = "asks" if len(asked) == 1 else "ask"
        return True, (f"Inductor compiled the rest of the graph ({' and '.join(asked)} {verb} for it); "
                      "the rewrite:: ops stay opaque custom ops")
    if gm is not None and nothing_to_fuse(gm):
        return False, ("Inductor off (auto: the rewritten graph is only the attention call and views, nothing "
                       "to fuse; its compiled wrapper would only add host time); pass inductor=True to compile it")
    on_gpu = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
    if per_size and not (hot and on_gpu):
        # A graph rewritten per size signature (a dynamic graph: each decode step's cache length) would
        # pay one Inductor compile per size: auto compiles only a size that recurs (on a GPU).
        return False, (f"Inductor off for a graph rewritten per size until a size has run {HOT_CALLS} times on a "
                       "GPU (auto: a one-off size, such as each decode step's cache length, would be one Inductor "
                       "compile each); pass inductor=True to compile every size")
    if per_size:
        return True, (f"Inductor compiled a size of a graph rewritten per size on its call {HOT_CALLS} (auto: a "
                      "size that recurs, inputs on a GPU); the rewrite:: ops stay opaque custom ops")
    if on_gpu:
        return True, ("Inductor compiled the rest of the graph (auto: inputs on a GPU); the rewrite:: ops stay "
                      "opaque custom ops")
    return False, ("Inductor off on CPU (auto: a C++ compile costs seconds a graph); pass inductor=True to "
                   "compile the rest with Inductor")


# Ops Inductor has nothing to fuse in: views, and the attention calls the rewrite emits.
_NOTHING_TO_FUSE = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.permute.default,
                    torch.ops.aten.transpose.int, torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default,
                    torch.ops.aten.squeeze.dim, torch.ops.aten.scaled_dot_product_attention.default}


def nothing_to_fuse(gm: GraphModule) -> bool:
    """Is the rewritten graph only attention calls and views? Inductor's compiled wrapper would then
    add host time to every call and fuse nothing."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op != "call_function":
            return False
        target = node.target
        if target in _NOTHING_TO_FUSE or (isinstance(target, torch._ops.OpOverload) and target.namespace == "rewrite"):
            continue
        return False
    return True


def rewrite_ops(gm: GraphModule) -> list[str]:
    """The ``rewrite::`` ops the graph calls, as ``namespace::name`` (Inductor's partition names)."""
    names = {n.target.overloadpacket._qualified_op_name for n in gm.graph.nodes
             if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
             and n.target.namespace == "rewrite"}
    return sorted(names)


def config_patches(options: Options, gm: GraphModule) -> tuple[dict[str, Any], list[str]]:
    """The config ``compile_fx`` runs under (the mode's, then the user's), and extra notes.

    Under CUDA graphs the ``rewrite::`` ops are partition points: they run between the captured
    graphs, since their run-time checks (a mask's verdict cache, a block map, finite inputs) and
    counters must see every call's tensors, which a replayed graph would not."""
    patches = {**mode_config(options.mode), **dict(options.inductor_config)}
    notes = []
    if patches.get("triton.cudagraphs"):
        ops = rewrite_ops(gm)
        if ops:
            patches["graph_partition"] = True
            patches["custom_should_partition_ops"] = [*patches.get("custom_should_partition_ops", []), *ops]
            notes.append(f"CUDA graphs around the rewrite:: ops ({', '.join(ops)} run between the captured "
                         "graphs: their run-time checks and counters see every call)")
    return patches, notes


def compile_rest(gm: GraphModule, args: Sequence, options: Options | None, report: Report | None,
                 graph_index: int, per_size: bool = False, hot: bool = False):
    """The callable that runs the rewritten graph ``gm``: Inductor's compilation of it where the
    options want Inductor (its notes in the report), else ``gm`` itself. An Inductor failure
    falls back to ``gm`` with the reason in the report and the log, never an error."""
    if options is None:
        return gm.forward
    use, why = inductor_on(options, args, per_size, gm, hot)
    notes = [why]
    run = gm.forward  # the generated forward itself: no nn.Module call path (hooks) on every call
    if use:
        from torch._inductor.compile_fx import compile_fx

        patches, extra = config_patches(options, gm)
        mode = f"mode={options.mode!r}"
        notes += extra + ([f"Inductor {mode}"] if options.mode not in (None, "default") and mode not in why else [])
        try:
            # compile_fx may edit the graph it is given: it gets a copy, the fallback keeps gm.
            run = compile_fx(GraphModule(gm, copy.deepcopy(gm.graph)), list(args), config_patches=patches)
        except Exception as exc:
            log.warning("rewrite: Inductor failed on graph %d (%r); it runs as an fx graph", graph_index, exc)
            notes = [f"Inductor failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                     "the rewritten graph runs as an fx graph"]
            run = gm.forward
    log.info("graph %d: %s", graph_index, "; ".join(notes))
    if report is not None:  # once per graph, not once per size
        report.notes.extend(n for n in (f"graph {graph_index}: {n}" for n in notes) if n not in report.notes)
    return run
