"""How well-conditioned a fuzzed case is: the largest softmax input the reference run computes.

A kernel that rounds the scores once differently from eager (float32 accumulation where eager rounds
``q·kᵀ`` to float16, ``x · 20`` where eager computes ``x / 0.05``, an added −1e9 whose float64 ulp
is 1.2e-7) moves every logit by up to u·|S| (u the unit roundoff), and so the output by up to
2·u·max|S|·max|v| (softmax's first-order sensitivity: Σ|Δp| ≤ 2·max|ΔS|). Eager's own error is one
draw of the same rounding and may be lucky, so the oracle adds half that bound to its tolerance
(``fuzz_harness.compare``). In float32 and float64 it matters only where the logits are large
(scores scaled ×20, a −1e9 bias over a row); in the half types it often exceeds the dtype's own
tolerance (|S| ≈ 10 with |v| ≈ 4 gives 0.02 in float16), which loosens the value check there. So
every outcome records it (``allowance``) and whether the case passed only thanks to it
(``rescued``, counted in the run's summary), and a run says how many cases that was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.exp, torch.Tensor.exp, torch.log_softmax,
            F.log_softmax, torch.Tensor.log_softmax}
_SDPA = {F.scaled_dot_product_attention}


class LargestLogit(TorchFunctionMode):
    """Records max |finite entry| of every softmax / exp input, and of an SDPA call's scaled scores."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0.0

    def _see(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            t = t.detach()
            fin = t[torch.isfinite(t)]
            if fin.numel():
                self.largest = max(self.largest, float(fin.abs().max()))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX and args:
            self._see(args[0])
        elif func in _SDPA and len(args) >= 2:
            q, k = args[0], args[1]
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            with torch.no_grad():
                kk = k if k.shape[-3:-2] == q.shape[-3:-2] or k.dim() < 3 else k.repeat_interleave(
                    q.shape[-3] // k.shape[-3], -3)
                self._see(torch.matmul(q, kk.transpose(-2, -1)) * scale)
        return func(*args, **kwargs)


def allowance(largest_logit: float, largest_value: float, dtype: torch.dtype) -> float:
    """u·max|S|·max|v|: half the first-order bound 2·u·max|S|·max|v| of what rounding the scores once
    more in ``dtype`` moves the output by (the bound needs every logit's rounding aligned)."""
    u = torch.finfo(dtype).eps / 2
    return u * largest_logit * largest_value
