"""Results computed from a tensor's values, cached by the tensor's identity.

A registered buffer or a folded constant is the same tensor on every call: what was derived
from it (is it causal? its block map) is computed on the first call only. The key is the
storage, offset, version counter (an in-place change bumps it), shape, strides, dtype and
device; the entry holds a weak reference to the storage, so a freed tensor whose memory is
reused is never mistaken for the old one, and the cache never keeps a tensor alive.
Inference-mode tensors have no version counter and are never cached.

The contract (README, "Run-time masks"): a cached verdict is re-derived whenever the tensor's
identity or version changes, i.e. after any in-place op on it. Writes that bypass the version
counter (through ``.data``, a NumPy view, ``buf.data.copy_()``, a DLPack alias) are not seen:
after such a write call ``rewrite.clear_caches()``, or set ``REWRITE_MASK_CACHE=0`` to re-derive
every verdict on every call.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

_ALL: weakref.WeakSet = weakref.WeakSet()


def caching_enabled() -> bool:
    """False under ``REWRITE_MASK_CACHE=0``: every verdict is re-derived on every call."""
    return os.environ.get("REWRITE_MASK_CACHE", "1") != "0"


def clear_all() -> None:
    """Forget every cached verdict (``rewrite.clear_caches()``)."""
    for cache in list(_ALL):
        cache.clear()


class IdentityCache:
    """A bounded LRU map from (tensor identity, extra key) to a value."""

    def __init__(self, max_entries: int, max_bytes: int | None = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple, tuple[StorageWeakRef, Any, int]] = OrderedDict()
        _ALL.add(self)

    @staticmethod
    def key(t: torch.Tensor, extra: tuple) -> tuple | None:
        if not caching_enabled():
            return None
        try:
            version = t._version
        except RuntimeError:  # inference-mode tensor: no version counter
            return None
        return (t.untyped_storage().data_ptr(), t.storage_offset(), version, tuple(t.shape), tuple(t.stride()),
                t.device, t.dtype, *extra)

    def get(self, t: torch.Tensor, extra: tuple = ()) -> Any | None:
        key = self.key(t, extra)
        hit = self._items.get(key) if key is not None else None
        if hit is None or hit[0].expired():
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, t: torch.Tensor, extra: tuple, value: Any, size: int = 0) -> None:
        key = self.key(t, extra)
        if key is None:
            return
        for k in [k for k, v in self._items.items() if v[0].expired()]:
            del self._items[k]
        self._items[key] = (StorageWeakRef(t.untyped_storage()), value, size)
        while self._items and (len(self._items) > self.max_entries or
                               (self.max_bytes is not None and sum(v[2] for v in self._items.values())
                                > self.max_bytes)):
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
