"""The rewrite's options, validated once for every entry point.

``rewrite.compile(fn, backend=..., verify=...)``, ``rewrite.inspect`` and
``torch.compile(fn, backend="rewrite", options={...})`` all build one `Options`; an unknown
name or a bad value is an error that says what is accepted, never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from .inductor import INDUCTOR_CHOICES, check_inductor_config, inductor_config_names, mode_config

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Options:
    """``backend``: "auto" (SDPA-backed torch code where exact, Triton where it pays on a GPU),
    "torch" (never Triton), "triton" (always Triton: a GPU, or TRITON_INTERPRET=1 on a CPU).
    ``verify``: on each graph's first call, also run the original graph and raise
    `RewriteMismatch` naming the site if the two differ.
    ``inductor``: compile the rest of each rewritten graph with Inductor (the ``rewrite::`` ops stay
    opaque custom ops): True, False, or "auto" (on for graphs whose inputs are on a GPU, or when
    ``mode`` or ``inductor_config`` asks for Inductor; off on a CPU, where it compiles C++).
    ``mode``: a torch.compile mode for Inductor ("reduce-overhead": CUDA graphs, "max-autotune", …).
    ``inductor_config``: ``torch._inductor.config`` patches, e.g. ``{"max_autotune": True}``
    (stored as sorted (name, value) pairs).
    ``count_calls``: count every call of every site in ``report.sites[i].ran``; by default a site whose
    plan is one plain SDPA call runs as that aten call in the graph, with nothing per call and no
    count (passes/direct.py)."""

    backend: str = "auto"
    verify: bool = False
    inductor: bool | str = "auto"
    mode: str | None = None
    inductor_config: Any = ()
    count_calls: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"rewrite: unknown backend {self.backend!r}; choose one of "
                             f"{', '.join(repr(b) for b in BACKENDS)}")
        if not isinstance(self.verify, bool):
            raise TypeError(f"rewrite: verify must be True or False, got {self.verify!r}")
        if not isinstance(self.count_calls, bool):
            raise TypeError(f"rewrite: count_calls must be True or False, got {self.count_calls!r}")
        if (self.backend == "triton" and not torch.cuda.is_available()
                and os.environ.get("TRITON_INTERPRET") != "1"):
            raise RuntimeError("rewrite: backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the "
                               "Triton kernels on the CPU (slowly); use backend='torch' or 'auto' here")
        self._check_inductor()

    def _check_inductor(self) -> None:
        if not any(self.inductor is c or (isinstance(c, str) and self.inductor == c) for c in INDUCTOR_CHOICES):
            raise ValueError(f"rewrite: inductor must be True, False or 'auto', got {self.inductor!r}")
        if self.mode is not None and not isinstance(self.mode, str):
            raise TypeError(f"rewrite: mode must be a string such as 'reduce-overhead', got {self.mode!r}")
        mode_config(self.mode)  # an unknown mode is an error
        config = self.inductor_config
        if not isinstance(config, (Mapping, tuple)):
            raise TypeError(f"rewrite: inductor_config must be a dict of torch._inductor.config names, "
                            f"got {type(config).__name__}")
        config = check_inductor_config(dict(config))
        object.__setattr__(self, "inductor_config", tuple(sorted(config.items())))
        if self.inductor is False and (self.mode not in (None, "default") or config):
            what = f"mode={self.mode!r}" if self.mode not in (None, "default") else "inductor_config"
            raise ValueError(f"rewrite: {what} is for Inductor, but inductor=False; drop it or pass "
                             "inductor=True (or 'auto')")

    @classmethod
    def from_mapping(cls, options: Mapping | None, where: str) -> Options:
        """Options from ``torch.compile(..., options=...)``: every key is one of ours or, passed
        through to Inductor, a ``torch._inductor.config`` name (as for ``backend="inductor"``)."""
        options = dict(options or {})
        names = [f.name for f in fields(cls)]
        others = {k: v for k, v in options.items() if k not in names}
        known = inductor_config_names() if others else {}
        unknown = sorted(k for k in others if str(k).replace("-", "_") not in known)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"the rewrite backend takes {', '.join(map(repr, names))} and "
                             "torch._inductor.config names")
        ours = {k: v for k, v in options.items() if k in names}
        if others:
            ours["inductor_config"] = {**dict(ours.get("inductor_config") or {}), **others}
        try:
            return cls(**ours)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
