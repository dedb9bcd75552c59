"""The verbs users meet: ``compile`` (also a decorator) and ``inspect``."""

from __future__ import annotations

import functools
import inspect as _pyinspect
import os

import torch

from .backend import BACKENDS, make_backend
from .report import Report


def _check_backend(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"rewrite.compile: unknown backend {backend!r}; choose one of "
                         f"{', '.join(repr(b) for b in BACKENDS)}")
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("rewrite.compile(backend='triton') needs a CUDA GPU, or TRITON_INTERPRET=1 to run "
                           "the Triton kernels on the CPU (slowly); use backend='torch' or 'auto' here")


def _compile_callable(fn, backend: str, verify: bool, report: Report | None):
    compiled = torch.compile(fn, backend=make_backend(backend, verify, report), dynamic=False)
    return compiled


def compile(fn=None, *, backend: str = "auto", verify: bool = False):  # noqa: A001 - the product's verb
    """Rewrite every attention in ``fn`` (a function, an nn.Module instance or class) to
    the fastest kernel proven equivalent.

    ``backend``: "auto" (SDPA-backed torch code where exact, Triton where it pays on a GPU),
    "torch" (never Triton), "triton" (Triton kernels; needs a GPU or TRITON_INTERPRET=1).
    ``verify``: on each graph's first call, run the original too and raise
    `RewriteMismatch` naming the site if they differ.

    Works as ``rewrite.compile(model)``, ``@rewrite.compile`` and ``@rewrite.compile(backend=...)``.
    """
    _check_backend(backend)
    if fn is None:
        return functools.partial(compile, backend=backend, verify=verify)
    return _wrap(fn, backend, verify, None)


def _wrap(fn, backend, verify, report):
    if isinstance(fn, type):
        if not issubclass(fn, torch.nn.Module):
            raise TypeError(f"rewrite.compile: a class argument must be an nn.Module subclass, got {fn.__name__}")
        forward = fn.forward
        compiled_forward = _compile_callable(forward, backend, verify, report)

        @functools.wraps(forward)
        def new_forward(self, *args, **kwargs):
            return compiled_forward(self, *args, **kwargs)

        fn.forward = new_forward
        return fn
    if not callable(fn):
        raise TypeError(f"rewrite.compile: argument 'fn' must be a function or an nn.Module, "
                        f"got {type(fn).__name__}")
    return _compile_callable(fn, backend, verify, report)


def inspect(model_or_fn, *args, backend: str = "auto", **kwargs) -> Report:
    """Run ``model_or_fn(*args, **kwargs)`` once through the rewriter and return what it found.

    Nothing about the model changes; the call runs under ``torch.no_grad``."""
    _check_backend(backend)
    if not callable(model_or_fn) or isinstance(model_or_fn, type):
        raise TypeError(f"rewrite.inspect: argument 'model_or_fn' must be a function or an nn.Module "
                        f"instance, got {type(model_or_fn).__name__}")
    report = Report()
    torch._dynamo.reset()  # a fresh capture, so every graph reaches the backend again
    compiled = _wrap(model_or_fn, backend, False, report)
    with torch.no_grad():
        compiled(*args, **kwargs)
    torch._dynamo.reset()
    return report


def signature_of(fn) -> str:
    try:
        return str(_pyinspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"
