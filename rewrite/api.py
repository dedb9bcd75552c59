"""The verbs users meet: ``compile`` (also a decorator) and ``inspect``."""

from __future__ import annotations

import functools
import inspect as _pyinspect
import warnings

import torch
from torch._C._dynamo.eval_frame import get_eval_frame_callback
from torch._dynamo.utils import counters as dynamo_counters

from .backend import make_backend
from .module_wrapper import compile_module
from .options import Options
from .report import Report


def _compile_callable(fn, options: Options, report: Report | None):
    # Torch's default dynamism: a second length gives one dynamic graph, rewritten per size
    # (rewrite/specialise.py), not a recompile per length.
    if isinstance(fn, torch.nn.Module):  # its methods (generate) run the rewritten forward too
        compiled = compile_module(fn, make_backend(options, report))
    else:
        compiled = torch.compile(fn, backend=make_backend(options, report))
    return reachable_inside_torch_compile(compiled, fn, options)


def reachable_inside_torch_compile(compiled, fn, options: Options):
    """``compiled`` (``torch.compile(fn, backend=rewrite)``) as something an outer ``torch.compile``
    does not trace through. Dynamo inlines a compiled function or module it meets and ignores its
    backend, so ``torch.compile(rewrite.compile(fn))`` would never rewrite; here the outer compile
    stops at the call (a graph break, with a warning naming the one-graph spellings) and the
    rewrite runs with its own options."""
    warned = []

    def warn_nested() -> None:
        if warned:
            return
        warned.append(True)
        inductor = {True: "on", False: "off"}.get(options.inductor, "auto: on for GPU inputs")
        warnings.warn(
            f"rewrite.compile({getattr(fn, '__name__', type(fn).__name__)}) called inside torch.compile: the "
            f"outer compile stops at it (a graph break) and it runs as rewrite.compile set it up (Inductor "
            f"{inductor}). For one graph with Inductor around the rewrite use torch.compile(fn, "
            "backend='rewrite') or rewrite.compile(fn, inductor=True) alone.", stacklevel=3)

    if isinstance(compiled, torch.nn.Module):  # an OptimizedModule
        compiled_forward = compiled.forward

        def forward(*args, **kwargs):
            if get_eval_frame_callback() not in (None, False):  # an outer torch.compile is running
                warn_nested()
            return compiled_forward(*args, **kwargs)

        # Dynamo, meeting the module inside a model it traces, inlines the plain module unless its
        # forward is disabled; torch.compile(compiled) itself follows _torchdynamo_orig_callable.
        compiled.forward = torch._dynamo.disable(forward, recursive=False)
        compiled._torchdynamo_orig_callable = breaking_outer_compile(compiled_forward, warn_nested)
        return compiled
    return functools.wraps(fn)(breaking_outer_compile(compiled, warn_nested))


def breaking_outer_compile(compiled, warn_nested):
    """A function calling ``compiled`` that an outer torch.compile tracing it stops at (a graph
    break), so ``compiled`` runs with its own backend."""
    def run_rewritten(*args, **kwargs):
        warn_nested()
        return compiled(*args, **kwargs)

    run_outside_outer = torch._dynamo.disable(run_rewritten, recursive=False)

    def rewritten(*args, **kwargs):
        if torch.compiler.is_compiling():  # an outer torch.compile is tracing this call
            return run_outside_outer(*args, **kwargs)
        return compiled(*args, **kwargs)

    return rewritten


def compile(fn=None, *, backend: str = "auto", verify: bool = False,  # noqa: A001 - the product's verb
            inductor: bool | str = "auto", mode: str | None = None, inductor_config: dict | None = None,
            count_calls: bool = False):
    """Rewrite every attention in ``fn`` (a function, an nn.Module instance or class) to
    the fastest kernel proven equivalent.

    ``backend``: "auto" (SDPA-backed torch code where exact, Triton where it pays on a GPU),
    "torch" (never Triton), "triton" (Triton kernels; needs a GPU or TRITON_INTERPRET=1).
    ``verify``: on each graph's first call, run the original too and raise
    `RewriteMismatch` naming the site if they differ.
    ``inductor``: Inductor compiles the rest of each rewritten graph, the ``rewrite::`` ops staying
    opaque custom ops: True, False, or "auto" (on for GPU inputs or when ``mode``/``inductor_config``
    asks for it, off on a CPU where Inductor compiles C++). ``mode``: a torch.compile mode
    ("reduce-overhead" for CUDA graphs, "max-autotune", …); ``inductor_config``:
    ``torch._inductor.config`` patches. The report's notes say, per graph, whether Inductor ran.
    ``count_calls``: count every site's calls by the path they ran (``SiteReport.ran``); off, a site
    that is one plain SDPA call runs as that aten call, uncounted.

    Works as ``rewrite.compile(model)``, ``@rewrite.compile`` and ``@rewrite.compile(backend=...)``.
    """
    options = Options(backend=backend, verify=verify, inductor=inductor, mode=mode,
                      inductor_config=inductor_config or {}, count_calls=count_calls)
    if fn is None:
        return functools.partial(compile, backend=backend, verify=verify, inductor=inductor, mode=mode,
                                 inductor_config=inductor_config, count_calls=count_calls)
    return _wrap(fn, options, None)


def _wrap(fn, options: Options, report: Report | None):
    if isinstance(fn, type):
        if not issubclass(fn, torch.nn.Module):
            raise TypeError(f"rewrite.compile: a class argument must be an nn.Module subclass, got {fn.__name__}")
        forward = fn.forward
        compiled_forward = _compile_callable(forward, options, report)

        @functools.wraps(forward)
        def new_forward(self, *args, **kwargs):
            return compiled_forward(self, *args, **kwargs)

        fn.forward = new_forward
        return fn
    if not callable(fn):
        raise TypeError(f"rewrite.compile: argument 'fn' must be a function or an nn.Module, "
                        f"got {type(fn).__name__}")
    return _compile_callable(fn, options, report)


def inspect(model_or_fn, *args, backend: str = "auto", **kwargs) -> Report:
    """Run ``model_or_fn(*args, **kwargs)`` once through the rewriter and return what it found.

    Nothing about the model changes; the call runs under ``torch.no_grad``, without Inductor (it
    reports the rewrite's decisions; they do not depend on what compiles the rest)."""
    options = Options(backend=backend, inductor=False)
    if not callable(model_or_fn) or isinstance(model_or_fn, type):
        raise TypeError(f"rewrite.inspect: argument 'model_or_fn' must be a function or an nn.Module "
                        f"instance, got {type(model_or_fn).__name__}")
    report = Report()
    torch._dynamo.reset()  # a fresh capture, so every graph reaches the backend again
    breaks = dynamo_counters["graph_break"]
    breaks.clear()
    compiled = _wrap(model_or_fn, options, report)
    with torch.no_grad():
        compiled(*args, **kwargs)
    report.graph_breaks = [f"{why.splitlines()[0][:200]} (×{n})" for why, n in breaks.items()]
    torch._dynamo.reset()
    return report


def signature_of(fn) -> str:
    try:
        return str(_pyinspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def clear_caches() -> None:
    """Forget every verdict derived from a run-time mask tensor's values (is it causal, a band, its
    block map). Verdicts are re-derived whenever a tensor's identity or version counter changes;
    call this after writing into a mask in a way the version counter does not see (``.data``, a
    NumPy view, ``buf.data.copy_()``), or set ``REWRITE_MASK_CACHE=0`` to re-derive on every call."""
    from .codegen.identity_cache import clear_all

    clear_all()
