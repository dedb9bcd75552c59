"""The rewrite's options, validated once for every entry point.

``rewrite.compile(fn, backend=..., verify=...)``, ``rewrite.inspect`` and
``torch.compile(fn, backend="rewrite", options={...})`` all build one `Options`; an unknown
name or a bad value is an error that says what is accepted, never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Options:
    """``backend``: "auto" (SDPA-backed torch code where exact, Triton where it pays on a GPU),
    "torch" (never Triton), "triton" (always Triton: a GPU, or TRITON_INTERPRET=1 on a CPU).
    ``verify``: on each graph's first call, also run the original graph and raise
    `RewriteMismatch` naming the site if the two differ."""

    backend: str = "auto"
    verify: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"rewrite: unknown backend {self.backend!r}; choose one of "
                             f"{', '.join(repr(b) for b in BACKENDS)}")
        if not isinstance(self.verify, bool):
            raise TypeError(f"rewrite: verify must be True or False, got {self.verify!r}")
        if (self.backend == "triton" and not torch.cuda.is_available()
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise RuntimeError("rewrite: backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the "
                               "Triton kernels on the CPU (slowly); use backend='torch' or 'auto' here")

    @classmethod
    def from_mapping(cls, options: Mapping | None, where: str) -> Options:
        """Options from ``torch.compile(..., options=...)``: every key must be one of ours."""
        options = dict(options or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"the rewrite backend takes {', '.join(map(repr, names))}")
        return cls(**options)
