"""Draw fuzz programs with Hypothesis, run them (in worker processes), summarise.

Hypothesis only draws: every program is collected first (derandomised under the "ci"
profile, so CI tests the same programs every run), then run by `run_all`, in
``FUZZ_WORKERS`` spawned worker processes (default: 2, or 1 on a one-core machine; 1 runs in
this process). A mismatch does not stop the run: every outcome is kept, so one run reports
every mismatch class with the rewrite rate per mask family. ``FUZZ_RECORD=path.jsonl``
appends every outcome (with the program source of each failing one) to a file.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from fuzz_harness import Outcome, run_case
from fuzz_programs import Program, base_family
from hypothesis import HealthCheck, Phase, given, settings

CI_TOTAL = 2000  # cases the CI profile draws over all fuzz tests; FUZZ_EXAMPLES scales every test
SCALE = int(os.environ.get("FUZZ_EXAMPLES", CI_TOTAL)) / CI_TOTAL
WORKERS = int(os.environ.get("FUZZ_WORKERS", min(2, os.cpu_count() or 1)))
CASE_TIMEOUT_S = int(os.environ.get("FUZZ_CASE_TIMEOUT", "120"))

_POOL: list[ProcessPoolExecutor] = []


def examples(ci_count: int) -> int:
    return max(1, round(ci_count * SCALE))


def draw_programs(strategy, n: int) -> list[Program]:
    progs: list[Program] = []

    @settings(max_examples=n, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(strategy)
    def collect(prog):
        progs.append(prog)

    collect()
    return progs


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    import rewrite  # noqa: F401 - import once, before the first case


def _on_alarm(signum, frame):
    raise TimeoutError(f"case ran over {CASE_TIMEOUT_S} s")


def _work(item: tuple[Program, str, str]) -> Outcome:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        return run_case(*item)
    except TimeoutError as exc:
        out = Outcome(item[0], item[1], item[2], status="crash")
        out.problems.append(f"timeout: {exc}")
        return out
    finally:
        signal.alarm(0)


def _pool() -> ProcessPoolExecutor:
    if not _POOL:
        _POOL.append(ProcessPoolExecutor(WORKERS, mp_context=get_context("spawn"), initializer=_init_worker))
    return _POOL[0]


def close_pool() -> None:
    while _POOL:
        _POOL.pop().shutdown(cancel_futures=True)


def run_all(items: list[tuple[Program, str, str]]) -> list[Outcome]:
    """Run (program, backend, path) items; outcomes in the same order."""
    if WORKERS <= 1 or len(items) < 4:
        return [_work(it) for it in items]
    return list(_pool().map(_work, items, chunksize=2))


class Stats:
    """Every outcome of one fuzz test; `summary` prints rewrite rates and mismatch classes."""

    def __init__(self, name: str):
        self.name = name
        self.outcomes: list[Outcome] = []
        self.record = os.environ.get("FUZZ_RECORD")

    def add_all(self, outcomes: list[Outcome]) -> None:
        self.outcomes += outcomes
        if self.record:
            with open(self.record, "a") as fh:
                for o in outcomes:
                    fh.write(json.dumps({"test": self.name, **o.to_dict()}) + "\n")

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("mismatch", "crash")]

    def classes(self) -> dict[str, list[Outcome]]:
        out: dict[str, list[Outcome]] = defaultdict(list)
        for o in self.failures:
            out[o.klass()].append(o)
        return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))

    def summary(self, max_classes: int = 25) -> str:
        fams: dict[str, Counter] = defaultdict(Counter)
        for o in self.outcomes:
            c = fams[base_family(o.program.family)]
            c["drawn"] += 1
            c[o.status] += 1
            if o.rewritten:
                c["rewritten"] += 1
                c[f"v:{o.variant}"] += 1
        total_rw = sum(o.rewritten for o in self.outcomes)
        lines = [f"== fuzz {self.name}: {len(self.outcomes)} cases, {total_rw} rewritten, "
                 f"{len(self.failures)} failing, {sum(o.rescued for o in self.outcomes)} within the conditioning "
                 "allowance only, "
                 f"{sum(o.seconds for o in self.outcomes):.1f} s in cases "
                 f"({sum(o.cpu_seconds for o in self.outcomes):.1f} s CPU)"]
        for fam in sorted(fams):
            c = fams[fam]
            valid = c["drawn"] - c["invalid"]
            variants = ", ".join(f"{k[2:]} {v}" for k, v in sorted(c.items()) if k.startswith("v:"))
            lines.append(f"  {fam:28s} drawn {c['drawn']:4d} valid {valid:4d} rewritten {c['rewritten']:4d} "
                         f"({100 * c['rewritten'] / max(valid, 1):3.0f}%) failing {c['mismatch'] + c['crash']:3d} "
                         f"uncaptured {c['uncaptured']:3d} [{variants}]")
        for i, (k, group) in enumerate(self.classes().items()):
            if i >= max_classes:
                lines.append(f"-- ... {len(self.classes()) - max_classes} more classes")
                break
            ex = group[0]
            lines.append(f"-- {len(group)} x {k}\n   {ex.program.describe()}\n   problems: {ex.problems[:3]}\n"
                         f"   notes: {ex.notes}\n" + "".join(f"   | {ln}\n" for ln in ex.program.source.splitlines()))
        return "\n".join(lines)
