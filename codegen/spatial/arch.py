"""Accelerator architecture as data: a 2-D PE array, a 1-D vector array, a global buffer, DRAM.

Loaded from a small YAML or JSON file (``presets/*.yaml`` ship with the package). Every
field is checked on load; a missing, negative or mistyped field raises
:class:`ArchitectureError` naming the field by its dotted path (``array_2d.rows``).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).with_name("presets")
GIB = 2**30


class ArchitectureError(ValueError):
    """An architecture file or dict is malformed; the message names the field."""


@dataclass(frozen=True)
class Array2D:
    """A rows × cols systolic array; each PE does one MAC (or one of ``ops``) per cycle."""

    rows: int
    cols: int
    ops: tuple[str, ...] = ("+", "×", "max")
    # PE cycles one exp(x − y) takes; None when the array cannot evaluate exp at all.
    exp_cycles: int | None = None

    @property
    def pes(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class Array1D:
    """A row of vector PEs; each does one of ``ops`` per cycle (a MAC counts as two)."""

    lanes: int
    ops: tuple[str, ...] = ("+", "×", "max", "÷")
    exp_cycles: int | None = 1


@dataclass(frozen=True)
class Buffer:
    """The on-chip global buffer shared by both arrays."""

    capacity_bytes: int
    bandwidth_words_per_cycle: float


@dataclass(frozen=True)
class Dram:
    bandwidth_gib_per_s: float

    @property
    def bytes_per_second(self) -> float:
        return self.bandwidth_gib_per_s * GIB


@dataclass(frozen=True)
class Energy:
    """Energy per action in picojoules; accesses are per word of ``word_bytes``."""

    mac_pj: float            # one 2-D PE operation (a MAC, or one step of exp/max/add there)
    vector_op_pj: float      # one 1-D PE operation
    buffer_access_pj: float  # one word read from or written to the global buffer
    dram_access_pj: float    # one word read from or written to DRAM


@dataclass(frozen=True)
class Architecture:
    name: str
    clock_ghz: float
    word_bytes: int
    array_2d: Array2D
    array_1d: Array1D
    buffer: Buffer
    dram: Dram
    energy: Energy
    source: str = ""

    @property
    def clock_hz(self) -> float:
        return self.clock_ghz * 1e9

    @property
    def dram_bytes_per_cycle(self) -> float:
        return self.dram.bytes_per_second / self.clock_hz

    def with_array(self, rows: int, cols: int) -> Architecture:
        """The same machine with a differently sized 2-D array (for GEMM sweeps)."""
        return replace(self, array_2d=replace(self.array_2d, rows=rows, cols=cols),
                       name=f"{self.name} ({rows}x{cols})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        if not isinstance(data, dict):
            raise ArchitectureError("architecture: expected a mapping of fields at the top level")
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: str | Path) -> Architecture:
        path = Path(path)
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        try:
            return cls.from_dict(data)
        except ArchitectureError as err:
            raise ArchitectureError(f"{path}: {err}") from None


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ArchitectureError(f"unknown field {prefix}{unknown[0]} (known: {', '.join(known)})")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        path = f"{prefix}{name}"
        if name not in data:
            if f.default is not MISSING:
                continue
            raise ArchitectureError(f"missing field {path}")
        kwargs[name] = _check(f.type, data[name], path)
    return cls(**kwargs)


_NESTED = {"Array2D": Array2D, "Array1D": Array1D, "Buffer": Buffer, "Dram": Dram, "Energy": Energy}


def _check(type_name: str, value: Any, path: str) -> Any:
    if type_name in _NESTED:
        if not isinstance(value, dict):
            raise ArchitectureError(f"field {path} must be a mapping")
        return _build(_NESTED[type_name], value, path + ".")
    if type_name == "str":
        if not isinstance(value, str):
            raise ArchitectureError(f"field {path} must be a string")
        return value
    if type_name == "tuple[str, ...]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ArchitectureError(f"field {path} must be a list of operator names")
        return tuple(value)
    optional = type_name.endswith("| None")
    if value is None:
        if optional:
            return None
        raise ArchitectureError(f"field {path} must not be empty")
    want_int = type_name.startswith("int")
    kind = "an integer" if want_int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArchitectureError(f"field {path} must be {kind}, got {value!r}")
    if value < 0:
        raise ArchitectureError(f"field {path} must not be negative, got {value}")
    if want_int and value != int(value):
        raise ArchitectureError(f"field {path} must be {kind}, got {value!r}")
    if value == 0 and not path.startswith("energy."):
        raise ArchitectureError(f"field {path} must be positive, got {value}")
    return int(value) if want_int else float(value)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_architecture(spec: str | Path | dict[str, Any] | Architecture) -> Architecture:
    """An Architecture from a preset name (``"fusemax_cloud"``), a YAML/JSON path or a dict."""
    if isinstance(spec, Architecture):
        return spec
    if isinstance(spec, dict):
        return Architecture.from_dict(spec)
    key = str(spec).replace("-", "_").lower()
    if (PRESET_DIR / f"{key}.yaml").exists():
        return Architecture.load(PRESET_DIR / f"{key}.yaml")
    path = Path(spec)
    if path.exists():
        return Architecture.load(path)
    raise ArchitectureError(f"no architecture preset or file named {spec!r}; presets: "
                            f"{', '.join(preset_names())}")
