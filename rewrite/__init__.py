"""rewrite: a compiler-style graph rewriter for attention in PyTorch.

    import rewrite
    fast = rewrite.compile(model)                # also @rewrite.compile
    report = rewrite.inspect(model, *inputs)     # what was found, what it proves, what runs
    ep = rewrite.export(model, args)             # a torch.export program calling the rewrite:: ops
"""

from __future__ import annotations

from . import logs
from .api import clear_caches, compile, inspect  # noqa: A004
from .errors import RewriteError, RewriteMismatch
from .explain import explain
from .export_program import export, rewritten_graphs
from .ir.cascade import Cascade, Einsum
from .report import Report, SiteReport

__all__ = ["clear_caches", "compile", "explain", "export", "inspect", "rewritten_graphs", "simulate", "Cascade",
           "Einsum", "Report", "SiteReport", "RewriteError", "RewriteMismatch"]

logs.register()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rewrite")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.1.0"


__version__ = _version()


def __getattr__(name):
    if name == "simulate":
        from .simulation import simulate

        return simulate
    raise AttributeError(f"module 'rewrite' has no attribute {name!r}")
