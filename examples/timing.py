"""The examples' timer: best of a few calls after a warm-up (on a shared machine the minimum is
the stable figure), synchronising the GPU when there is one."""

from __future__ import annotations

import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn, x, reps=5) -> float:
    """Milliseconds of ``fn(x)``, best of ``reps`` after one warm-up call, without autograd."""
    best = float("inf")
    with torch.no_grad():
        fn(x)
        for _ in range(reps):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best * 1e3
