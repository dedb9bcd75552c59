"""The verbs users meet: ``compile`` (also a decorator) and ``inspect``."""

from __future__ import annotations

import functools
import inspect as _pyinspect

import torch
from torch._dynamo.utils import counters as dynamo_counters

from .backend import make_backend
from .module_wrapper import compile_module
from .options import Options
from .report import Report


def _compile_callable(fn, options: Options, report: Report | None):
    # Torch's default dynamism: a second length gives one dynamic graph, rewritten per size
    # (rewrite/specialise.py), not a recompile per length.
    if isinstance(fn, torch.nn.Module):  # its methods (generate) run the rewritten forward too
        return compile_module(fn, make_backend(options, report))
    return torch.compile(fn, backend=make_backend(options, report))


def compile(fn=None, *, backend: str = "auto", verify: bool = False):  # noqa: A001 - the product's verb
    """Rewrite every attention in ``fn`` (a function, an nn.Module instance or class) to
    the fastest kernel proven equivalent.

    ``backend``: "auto" (SDPA-backed torch code where exact, Triton where it pays on a GPU),
    "torch" (never Triton), "triton" (Triton kernels; needs a GPU or TRITON_INTERPRET=1).
    ``verify``: on each graph's first call, run the original too and raise
    `RewriteMismatch` naming the site if they differ.

    Works as ``rewrite.compile(model)``, ``@rewrite.compile`` and ``@rewrite.compile(backend=...)``.
    """
    options = Options(backend=backend, verify=verify)
    if fn is None:
        return functools.partial(compile, backend=backend, verify=verify)
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

    Nothing about the model changes; the call runs under ``torch.no_grad``."""
    options = Options(backend=backend)
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
