"""Whether a run-time bias leaves a fast kernel's rows nothing to settle, derived once per bias tensor.

A site with a run-time additive bias and no fill of its own (Hugging Face's eager attention: the
mask arrives as one float tensor of 0 and finfo.min) runs SDPA with the bias; ``settle``
(codegen/eager.py) then fixes two kinds of rows: rows whose bias is −inf at every key (eager's
softmax gives NaN there, SDPA 0) and rows whose eager half-precision sum scores + bias is coarser
than the kernel's (``coarse_rows``). Both depend on the bias alone (and the dtype of that sum), and
a model passes the same mask tensor to every layer of a forward: the verdict is cached by the
tensor's identity and version (codegen/identity_cache.py), so one reduction and one host sync per
forward instead of per layer, and none when the verdict is "nothing to settle".
"""

from __future__ import annotations

import torch

from .eager import NEG_INF, Spelling, bias_sum_dtype, capturing, coarse_rows
from .identity_cache import IdentityCache

_VERDICTS = IdentityCache(256)


def bias_settles(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, sem: Spelling) -> bool:
    """True when ``bias`` (no keep mask beside it, a spelling with no finite fill) has no row that is
    −inf at every key and no coarse row: the SDPA result with the bias is then eager's. False means
    "settle as usual" (also under CUDA graph capture, where the verdict cannot be read)."""
    if sem.sdpa or sem.finite or bias is None or not bias.is_floating_point() or capturing():
        return False
    sum_dtype = bias_sum_dtype(q, k, bias, sem)
    verdict = _VERDICTS.get(bias, (sum_dtype,))
    if verdict is None:
        b = bias.detach()
        coarse = coarse_rows(q, k, b, None, sem)
        flags = [(b == NEG_INF).all(-1).any()] + ([coarse.any()] if coarse is not None else [])
        verdict = not any(torch.stack(flags).tolist())
        _VERDICTS.put(bias, (sum_dtype,), verdict)
    return verdict
