"""Spatial-array simulator: architecture data, mappings generated from a Cascade, and an
analytic cost model (cycles, utilisation, traffic, energy, buffer size)."""

from .arch import (
    Architecture,
    ArchitectureError,
    Array1D,
    Array2D,
    Buffer,
    Dram,
    Energy,
    load_architecture,
    preset_names,
)
from .cost import Cost, EinsumCost, evaluate
from .mapper import MAPPING_KINDS, Mapping, Placement, map_cascade, one_pass_form
from .systolic import DATAFLOWS, GemmShape, SystolicCost, systolic_cycles
from .work import MappingError, tile_density
from .workloads import WORKLOADS, Workload, workload

__all__ = [
    "Architecture", "ArchitectureError", "Array1D", "Array2D", "Buffer", "Dram", "Energy",
    "load_architecture", "preset_names", "Cost", "EinsumCost", "evaluate", "MAPPING_KINDS",
    "Mapping", "Placement", "map_cascade", "one_pass_form", "DATAFLOWS", "GemmShape",
    "SystolicCost", "systolic_cycles", "MappingError", "tile_density",
    "WORKLOADS", "Workload", "workload",
]
