"""Which kernel each rewritten site really ran: per-site counters the ops bump at run time.

The plan names a kernel once (passes/kernels.py); a run-time check may still change what runs for
one call (a run-time mask that is causal runs the causal kernel, one the sparse kernels would not
pay for runs dense, inputs with NaN/inf run the eager spelling, rows eager's fill does not round
away are recomputed). Each op call runs inside ``running(site)``; the code that takes a path says
so with ``ran(what)``; the call's paths, joined, are counted under the site's id. The report
(rewrite/report.py, ``SiteReport.ran``) reads the counts, and the first call of each site that
runs otherwise than planned is logged (logger "rewrite", INFO).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from contextlib import contextmanager

log = logging.getLogger("rewrite")
_COUNTS: dict[str, Counter] = {}
_PLANNED: dict[str, str] = {}
_LOGGED: set[tuple[str, str]] = set()
_ALIASES: dict[str, str] = {}  # a site id → the id its calls count under (one site of a dynamic graph, many sizes)
_STATE = threading.local()


def register(location: str, planned: str) -> str:
    """A site the fx rewrite just planned, with the kernel the plan chose: its id (unique: the same
    source line rewritten in every layer of a model is one site per captured graph and call)."""
    site = f"#{len(_PLANNED)} {location}"
    _PLANNED[site] = planned
    _COUNTS.setdefault(site, Counter())
    return site


@contextmanager
def running(site: str):
    """One op call of ``site`` (nested calls count under the outermost)."""
    outer = getattr(_STATE, "paths", None)
    if outer is not None or not site:
        yield
        return
    site = _ALIASES.get(site, site)
    _STATE.paths = []
    try:
        yield
    finally:
        paths, _STATE.paths = _STATE.paths, None
        path = " + ".join(dict.fromkeys(paths)) or "?"
        _COUNTS.setdefault(site, Counter())[path] += 1
        planned = _PLANNED.get(site)
        if planned is not None and path != planned and (site, path) not in _LOGGED:
            _LOGGED.add((site, path))
            log.info("rewrite: site %s planned kernel %s ran %s", site, planned, path)


def alias(site: str, counted_as: str) -> None:
    """Count the calls of ``site`` under ``counted_as`` (the same source site and plan, rewritten again
    for another size of a dynamic graph: rewrite/specialise.py)."""
    _ALIASES[site] = _ALIASES.get(counted_as, counted_as)


def ran(what: str) -> None:
    """The current op call took this path (a kernel, a fallback, a recomputation)."""
    paths = getattr(_STATE, "paths", None)
    if paths is not None:
        paths.append(what)


def counts(site: str) -> dict[str, int]:
    """Calls of ``site`` so far, by the paths they ran."""
    return dict(_COUNTS.get(site, {}))


def reset() -> None:
    """Forget every count (the sites stay registered)."""
    for c in _COUNTS.values():
        c.clear()
    _LOGGED.clear()
