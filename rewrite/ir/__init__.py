"""The IR every stage shares: cascades, mask specifications and the one keep predicate, sites
(what recognisers emit) and plans (what passes decide). Nothing here reads fx graphs or runs
kernels; patterns, passes and codegen all import it, it imports none of them."""

from .cascade import Cascade, Einsum, T, TensorRef, m, p
from .mask import MaskSpec, spec_keep

__all__ = ["Cascade", "Einsum", "MaskSpec", "T", "TensorRef", "m", "p", "spec_keep"]
