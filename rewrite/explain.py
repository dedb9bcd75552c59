"""``rewrite.explain``: ``inspect`` plus where Dynamo broke the graphs and why it recompiled."""

from __future__ import annotations

import re

from torch._dynamo.utils import counters as dynamo_counters

from .api import inspect
from .report import Report

_RESUME = re.compile(r"torch_dynamo_resume_in_(?P<fn>.+)_at_(?P<line>\d+)$")


def explain(model_or_fn, *args, backend: str = "auto", **kwargs) -> Report:
    """Run ``model_or_fn(*args, **kwargs)`` once through the rewriter (as ``inspect``) and return the
    report with Dynamo's graph breaks, where each broke (function and line), its recompiles, every
    site found or left alone with its reason and what ran how often. ``print`` it, or
    ``.details()`` for every site."""
    for key in ("resumes", "recompiles"):
        dynamo_counters[key].clear()
    report = inspect(model_or_fn, *args, backend=backend, **kwargs)
    report.break_points = [f"{m['fn']}, line {m['line']}" if (m := _RESUME.match(name)) else name
                           for name in dynamo_counters["resumes"]]
    report.recompiles = [f"{why.splitlines()[0][:200]} (×{n})" for why, n in dynamo_counters["recompiles"].items()]
    return report
