"""Differential fuzzer: random attention programs, eager vs rewritten.

Programs are drawn from parts (``tests/fuzz_programs.py``, ``fuzz_render.py``, ``fuzz_masks.py``):
contraction spellings, scale placements, layouts, GQA expansions, mask families built from
positions (causal top-left / bottom-right, windows, dilation, 2-D neighborhoods, blocks, key
padding, run-time tensors) with deliberate near-misses, mask applications, softmax spellings,
four dtypes, odd sizes, injected NaN/±inf, and gradients. Each runs eagerly (own dtype and
float64) and rewritten (``tests/fuzz_harness.py``: ``rewrite_program`` is the one place that
knows how); the rewrite must be about as accurate as eager and put NaN/±inf where eager does
(unless its report notes say otherwise). A mismatch does not stop a test: every case runs, and
the failure message lists the rewrite rate per family and every mismatch class with one
program's source.

The CI profile (the default, derandomised) draws 2,000 cases over the tests below: ~220 s of CPU
time, run in ``FUZZ_WORKERS`` spawned worker processes (default 2), so ~2 minutes on an idle
2-core machine (most of a case is ``to_aten``'s capture, ~70 ms). A longer run with fresh draws,
recording every outcome::

    HYPOTHESIS_PROFILE=explore FUZZ_EXAMPLES=10000 FUZZ_RECORD=/tmp/fuzz.jsonl \\
        python -m pytest tests/test_fuzz.py -s

``FUZZ_EXAMPLES`` is the total over all tests (each test's count scales with it). Through
``rewrite.compile`` (Dynamo, ~1 s a case) CI runs ~35 cases (test 4 and a tenth of test 2);
``FUZZ_REAL_EVERY=10`` sends a tenth of test 1 that way too. ``FUZZ_WORKERS=1`` runs in-process.
Failing cases are best read from ``FUZZ_RECORD`` (each failing program's source, inputs, notes).
"""

from __future__ import annotations

import os

import pytest
from fuzz_programs import programs
from fuzz_runner import Stats, close_pool, draw_programs, examples, run_all

REAL_EVERY = int(os.environ.get("FUZZ_REAL_EVERY", "0"))  # e.g. 10: a tenth of test 1 through rewrite.compile


@pytest.fixture(scope="module", autouse=True)
def _worker_pool():
    yield
    close_pool()


def _run(name: str, items) -> None:
    stats = Stats(name)
    stats.add_all(run_all(items))
    print("\n" + stats.summary())
    assert not stats.failures, stats.summary(max_classes=12)


def test_fuzz_softmax_sites():
    """Every part combined, the fast harness (ATen capture + graph rewrite); backend "torch",
    every sixth case "auto"; every ``FUZZ_REAL_EVERY``-th case (default: none) through Dynamo."""
    progs = draw_programs(programs(), examples(1602))
    _run("softmax_sites", [(p, "auto" if i % 6 == 5 else "torch",
                            "real" if REAL_EVERY and i % REAL_EVERY == REAL_EVERY - 1 else "fast")
                           for i, p in enumerate(progs)])


def test_fuzz_runtime_mask_changes():
    """A mask that arrives at run time (keep / bias / padding / lengths), changed before a
    second call of the same rewritten function: a fresh tensor, or the same one edited in place."""
    progs = draw_programs(programs(second=True), examples(200))
    _run("runtime_mask_changes", [(p, "torch", "real" if i % 10 == 9 else "fast") for i, p in enumerate(progs)])


def test_fuzz_gradients():
    """Backward of ``out.sum()`` or ``(out * g).sum()``: gradients of q, k, v, NaN patterns included."""
    progs = draw_programs(programs(grad=True), examples(150))
    _run("gradients", [(p, "torch", "fast") for p in progs])


def test_fuzz_real_path():
    """Through ``rewrite.compile`` (Dynamo) and ``rewrite.inspect``, as users run it."""
    progs = draw_programs(programs(), examples(15))
    _run("real_path", [(p, "auto" if i % 2 else "torch", "real") for i, p in enumerate(progs)])


def test_fuzz_large_position_masks():
    """N, M just above 8k, so N·M passes the planner's concrete-check limit (2**26) and only the
    symbolic proof stands: masks built from positions (pos·c, trunc division, negative slices,
    low-precision positions, windows, blocks). One head, D = 16, float32 / bfloat16."""
    traps = ("pos_mul", "trunc_div", "neg_slice", "lowprec")  # one of each in CI, then more as FUZZ_EXAMPLES grows
    progs = [p for t in traps for p in draw_programs(programs(large=True, near_misses=False, trap=t), examples(1))]
    _run("large_position_masks", [(p, "torch", "fast") for p in progs])


def test_fuzz_triton():
    """The Triton kernels (TRITON_INTERPRET=1 on the CPU) at small sizes."""
    progs = draw_programs(programs(small=True), examples(29))
    _run("triton", [(p, "triton", "fast") for p in progs])
