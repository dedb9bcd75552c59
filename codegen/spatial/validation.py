"""Our model against FuseMax's published results (the artifact's pregenerated tables).

Per (model, sequence length): FuseMax's speedup over FLAT on attention, its energy relative
to FLAT's, and the 2-D utilisation of each. The reference numbers are only *read* here to
compare; nothing from them feeds the model.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .arch import load_architecture
from .cost import evaluate
from .mapper import map_cascade
from .workloads import workload

SEQ = {"1K": 2**10, "4K": 2**12, "16K": 2**14, "64K": 2**16, "256K": 2**18, "1M": 2**20}
METRICS = ("speedup", "energy_ratio", "util_2d_flat", "util_2d_fusemax")


@dataclass(frozen=True)
class Comparison:
    model: str
    seq_len: str
    metric: str
    published: float
    ours: float

    @property
    def rel_error(self) -> float:
        return (self.ours - self.published) / self.published


def _read(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path) as f:
        return {(r["model"], r["seq_len"]): r for r in csv.DictReader(f)}


def compare_fusemax(reference_dir: str | Path) -> list[Comparison]:
    ref = Path(reference_dir)
    flat_pub, fm_pub = _read(ref / "attn-flat.csv"), _read(ref / "attn-binding.csv")
    fm_arch, flat_arch = load_architecture("fusemax_cloud"), load_architecture("flat_cloud")
    out = []
    for (model, seq), fm_row in fm_pub.items():
        flat_row = flat_pub[(model, seq)]
        cascade = workload(model).cascade(SEQ[seq])
        fm = evaluate(map_cascade(cascade, fm_arch, "fusemax"))
        flat = evaluate(map_cascade(cascade, flat_arch, "flat"))
        pub = {
            "speedup": float(flat_row["latency"]) / float(fm_row["latency"]),
            "energy_ratio": float(fm_row["energy"]) / float(flat_row["energy"]),
            "util_2d_flat": float(flat_row["util_2d"]),
            "util_2d_fusemax": float(fm_row["util_2d"]),
        }
        ours = {"speedup": flat.seconds / fm.seconds, "energy_ratio": fm.energy_pj / flat.energy_pj,
                "util_2d_flat": flat.util_2d, "util_2d_fusemax": fm.util_2d}
        out += [Comparison(model, seq, k, pub[k], ours[k]) for k in METRICS]
    return out


def compare_unfused(reference_dir: str | Path) -> list[Comparison]:
    """Informational: unfused latency over FLAT's. The artifact's "unfused" baseline runs the
    softmax Einsums as one kernel (QK and A through DRAM); ours runs every Einsum as its own
    kernel, as the simulator defines unfused, so it moves ~10 score-sized tensors, not 4."""
    ref = Path(reference_dir)
    flat_pub, un_pub = _read(ref / "attn-flat.csv"), _read(ref / "attn-unfused.csv")
    arch = load_architecture("flat_cloud")
    out = []
    for (model, seq), un_row in un_pub.items():
        cascade = workload(model).cascade(SEQ[seq])
        un, flat = (evaluate(map_cascade(cascade, arch, k)) for k in ("unfused", "flat"))
        out.append(Comparison(model, seq, "unfused_over_flat",
                              float(un_row["latency"]) / float(flat_pub[(model, seq)]["latency"]),
                              un.seconds / flat.seconds))
    return out
