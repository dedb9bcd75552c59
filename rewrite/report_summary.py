"""The report's first lines: sites grouped by what they are and what runs them
("4 causal sites, all on sdpa"), and the width the report is printed at."""

from __future__ import annotations

import shutil
from collections import Counter


def terminal_width() -> int:
    """The terminal's width (COLUMNS wins), at least 80; 120 when there is no terminal."""
    return max(80, shutil.get_terminal_size((120, 24)).columns)


def summary_lines(report) -> list[str]:
    sites = report.sites
    head = (f"rewrite: {len(sites)} attention site(s) in {report.graphs} graph(s), "
            f"{len(report.rewritten)} rewritten, {len(sites) - len(report.rewritten)} left alone")
    if report.graph_breaks:
        head += f"; {len(report.graph_breaks)} graph break reason(s)"
    lines = [head]
    groups: dict[str, Counter] = {}
    for s in sites:
        if s.rewritten:
            groups.setdefault(s.variant if s.mask_text == "none" or s.mask_text.startswith(s.variant)
                              else f"{s.variant} ({s.mask_text})",
                              Counter())[s.kernel] += 1
    for what, kernels in groups.items():
        n = sum(kernels.values())
        on = f"all on {next(iter(kernels))}" if len(kernels) == 1 else ", ".join(
            f"{c} on {k}" for k, c in kernels.items())
        lines.append(f"  {n} {what} site{'s' if n > 1 else ''}, {on}")
    reasons = Counter(s.reason for s in sites if not s.rewritten)
    for why, n in reasons.items():
        lines.append(f"  {n} site{'s' if n > 1 else ''} left alone: {why}")
    return lines
