"""Suite-wide setup, kept minimal.

1. Triton on the CPU. Without a CUDA GPU the Triton kernels run through Triton's interpreter,
   which ``TRITON_INTERPRET=1`` switches on. ``triton.jit`` reads the variable when it decorates a
   kernel, i.e. when a module such as ``rewrite.codegen.triton_attention`` is first imported, so it
   must be set before any test module is collected: pytest imports this conftest first.
   ``setdefault`` lets an explicit ``TRITON_INTERPRET=0/1`` from the caller win.
2. The ``gpu`` marker (declared in pyproject.toml): such tests are skipped without CUDA.
3. One intra-op thread: the suite's tensors are small, and on a 2-core CI machine thread
   hand-offs cost more than they save (the spelling suite runs ~2x faster).
4. Hypothesis profiles: "ci" (the default) derandomises, so a run tests the examples the last run
   tested (same Hypothesis version and test code) and a red CI is a real change, not a new draw;
   ``HYPOTHESIS_PROFILE=explore`` draws fresh examples every run, for looking for bugs. Loaded here,
   before the test modules build their own ``settings`` (which inherit the profile's fields).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo_no_grad():
    """A fresh Dynamo before and after the test, which runs under no_grad (real-model tests)."""
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()
