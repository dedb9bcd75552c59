"""``rewrite.compile(model)`` on an nn.Module instance: calls, and methods that call the model.

``torch.compile(model)`` compiles ``model.__call__`` only; every other attribute is the plain
model's, so ``compiled.generate(...)`` (Hugging Face) would run the model unrewritten. Here a
method of the model's own class (not one of nn.Module's: ``to``, ``state_dict``, ``parameters``
pass straight through) runs with the model's ``forward`` swapped, for the call, for the rewritten
one: ``generate`` calls ``self(...)``, which reaches the compiled forward. The model itself is left
as it was outside such a call.
"""

from __future__ import annotations

import functools
import types

import torch
from torch._dynamo.eval_frame import OptimizedModule


def compile_module(model: torch.nn.Module, backend) -> RewrittenModule:
    """``model`` compiled with the torch.compile ``backend`` (torch's default dynamism)."""
    return RewrittenModule(model, torch.compile(model, backend=backend).dynamo_ctx)


class RewrittenModule(OptimizedModule):
    """An ``OptimizedModule`` whose model methods (``generate``, …) run the rewritten forward."""

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        model = self._modules["_orig_mod"]
        if (name in ("forward", "_orig_mod") or not isinstance(value, types.MethodType) or value.__self__ is not model
                or getattr(torch.nn.Module, name, None) is value.__func__):
            return value
        return _with_rewritten_forward(self, model, value)

    def rewritten_forward(self):
        """The model's forward compiled with this module's backend (built on first use)."""
        forward = self.__dict__.get("_rewritten_forward")
        if forward is None:
            forward = self.dynamo_ctx(self._orig_mod.forward)
            self.__dict__["_rewritten_forward"] = forward
        return forward


def _with_rewritten_forward(wrapper: RewrittenModule, model: torch.nn.Module, method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        if "forward" in model.__dict__:  # already inside such a call (or the user set one): as it is
            return method(*args, **kwargs)
        model.__dict__["forward"] = wrapper.rewritten_forward()
        try:
            return method(*args, **kwargs)
        finally:
            model.__dict__.pop("forward", None)

    return run
