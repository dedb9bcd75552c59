"""The one table that picks a site's kernel from its variant, the backend asked for and the device.

Rules are tried in order; the first that matches decides, and its reason goes into the report.
Everything a kernel choice depends on is an argument here, so the choice is made once, in the
plan; ops and kernels only carry it out (and report when a run-time check changed it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOFTMAX = ("dense", "causal")
SPARSE = ("neighborhood", "block_sparse")
LINEAR_TIME = ("linear", "flow")


@dataclass(frozen=True)
class Rule:
    variants: tuple[str, ...]
    backends: tuple[str, ...]  # which `backend=` values the rule applies to
    gpu: bool | None  # True: only on a CUDA device; False: only off it; None: either
    bottom_right: bool | None  # causal with a non-zero offset (None: either)
    kernel: str
    reason: str


TABLE: tuple[Rule, ...] = (
    Rule(SOFTMAX, ("triton",), None, None, "triton", "backend='triton' asked for"),
    Rule(("causal",), ("auto",), True, True, "triton",
         "bottom-right causal: SDPA would need a materialised mask, the Triton kernel skips the tiles"),
    Rule(SOFTMAX, ("auto", "torch"), None, None, "sdpa", "the exact SDPA call (cuDNN / flash / memory-efficient)"),
    Rule(SPARSE + LINEAR_TIME, ("triton",), None, None, "triton", "backend='triton' asked for"),
    Rule(SPARSE + LINEAR_TIME, ("auto",), True, None, "triton", "a generated Triton kernel on the GPU"),
    Rule(SPARSE, ("auto", "torch"), None, None, "torch", "tile-skipping torch code (no GPU, or backend='torch')"),
    Rule(LINEAR_TIME, ("auto", "torch"), None, None, "torch", "the O(N) torch implementation"),
)


# What the Triton kernels compute in; any other dtype (float64) runs the torch/SDPA kernels exactly.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# A site with a score modifier (SDPA takes none): the generated Triton kernel, or eager's math by rows.
MODIFIED: tuple[Rule, ...] = (
    Rule(SOFTMAX, ("triton",), None, None, "triton", "backend='triton' asked for: the modifier generated into "
         "the fused kernel's tiles"),
    Rule(SOFTMAX, ("auto",), True, None, "triton", "score modifier: generated into the fused kernel's tiles "
         "(SDPA takes no modifier)"),
    Rule(SOFTMAX, ("auto", "torch"), None, None, "torch", "score modifier: eager's math by row blocks (no GPU, "
         "or backend='torch'; SDPA takes no modifier)"),
    Rule(("neighborhood",), ("triton",), None, None, "triton", "backend='triton' asked for: the modifier "
         "generated into the neighborhood kernel's tiles"),
    Rule(("neighborhood",), ("auto",), True, None, "triton", "score modifier: generated into the neighborhood "
         "kernel's tiles"),
    Rule(("neighborhood",), ("auto", "torch"), None, None, "torch", "score modifier: eager's math by row blocks "
         "with the window (no GPU, or backend='torch')"),
)


def choose_kernel(variant: str, backend: str, on_gpu: bool, bottom_right: bool = False,
                  dtype: torch.dtype | None = None, modified: bool = False) -> tuple[str, str]:
    """(kernel, reason) for a site; every (variant, backend) has a rule. ``modified``: the site has a
    score modifier (dense, causal, and neighborhood structures that replaced their mask tensors)."""
    if modified:
        if dtype is not None and dtype not in TRITON_DTYPES:
            return "torch", f"score modifier in {str(dtype).removeprefix('torch.')}: eager's math by row blocks"
        return _first_rule(MODIFIED, variant, backend, on_gpu, bottom_right, "a score-modified ")
    if dtype is not None and dtype not in TRITON_DTYPES and backend in ("triton", "auto"):
        kernel, why = choose_kernel(variant, "torch", on_gpu, bottom_right)
        names = ", ".join(str(d).removeprefix("torch.") for d in TRITON_DTYPES)
        return kernel, f"{why}; the Triton kernels take {names}, not {str(dtype).removeprefix('torch.')}"
    return _first_rule(TABLE, variant, backend, on_gpu, bottom_right)


def _first_rule(rules: tuple[Rule, ...], variant: str, backend: str, on_gpu: bool, bottom_right: bool,
                what: str = "") -> tuple[str, str]:
    for rule in rules:
        if (variant in rule.variants and backend in rule.backends
                and (rule.gpu is None or rule.gpu == on_gpu)
                and (rule.bottom_right is None or rule.bottom_right == bottom_right)):
            return rule.kernel, rule.reason
    raise ValueError(f"no kernel rule for {what}variant {variant!r} with backend {backend!r}")
