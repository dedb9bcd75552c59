"""Attention workloads given by shape: the four models of FuseMax's evaluation and friends."""

from __future__ import annotations

from dataclasses import dataclass

from rewrite.ir.cascade import Cascade, m, p


@dataclass(frozen=True)
class Workload:
    """One attention layer's shape; ``variant`` picks the cascade."""

    name: str
    batch: int
    heads: int
    e: int           # q/k embedding per head
    f: int           # value embedding per head
    variant: str = "dense"   # dense | causal | linear | linear_causal | flow
    density: float = 1.0     # kept fraction of score entries (for block-sparse sites)

    def cascade(self, seq_len: int, kv_len: int | None = None) -> Cascade:
        return workload_cascade(self.variant).with_sizes(
            b=self.batch, h=self.heads, p=seq_len, m=kv_len or seq_len, e=self.e, f=self.f)


def workload_cascade(variant: str) -> Cascade:
    if variant in ("dense", "block_sparse", "neighborhood"):
        return Cascade.softmax_attention()
    if variant == "causal":
        return Cascade.softmax_attention(mask=m <= p)
    if variant == "linear":
        return Cascade.linear_attention(causal=False)
    if variant == "linear_causal":
        return Cascade.linear_attention(causal=True)
    if variant == "flow":
        return Cascade.flow_attention()
    raise ValueError(f"unknown attention variant {variant!r}")


# FuseMax evaluates batch 64 (data/fusemax/README.md).
WORKLOADS: dict[str, Workload] = {
    "bert": Workload("BERT", batch=64, heads=12, e=64, f=64),
    "trxl": Workload("TrXL", batch=64, heads=16, e=64, f=64),
    "t5": Workload("T5", batch=64, heads=8, e=64, f=64),
    "xlm": Workload("XLM", batch=64, heads=16, e=128, f=128),
    "gpt2": Workload("GPT-2", batch=1, heads=12, e=64, f=64, variant="causal"),
}


def workload(name: str) -> Workload:
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"bertbase": "bert", "trxlwt103": "trxl", "t5small": "t5"}
    key = aliases.get(key, key)
    if key not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; named workloads: {', '.join(WORKLOADS)}")
    return WORKLOADS[key]
