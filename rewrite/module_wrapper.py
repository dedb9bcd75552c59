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
        """The model's forward as it is now (an instance-level one too: a hook's, the user's) compiled
        with this module's backend; compiled again only when that forward changes."""
        model = self._modules["_orig_mod"]
        source = model.__dict__.get("forward") or type(model).forward
        cached = self.__dict__.get("_rewritten_forward")
        if cached is None or cached[0] is not source:
            cached = (source, self.dynamo_ctx(model.forward))
            self.__dict__["_rewritten_forward"] = cached
        return cached[1]


_ABSENT = object()


def _with_rewritten_forward(wrapper: RewrittenModule, model: torch.nn.Module, method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        before = model.__dict__.get("forward", _ABSENT)
        cached = wrapper.__dict__.get("_rewritten_forward")
        if cached is not None and before is cached[1]:  # already inside such a call
            return method(*args, **kwargs)
        model.__dict__["forward"] = wrapper.rewritten_forward()
        try:
            return method(*args, **kwargs)
        finally:
            if before is _ABSENT:
                model.__dict__.pop("forward", None)
            else:
                model.__dict__["forward"] = before

    return run
