"""Architecture files: presets load, and every bad field is reported by its dotted name."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.codegen.spatial.arch import (
    PRESET_DIR,
    Architecture,
    ArchitectureError,
    load_architecture,
    preset_names,
)

BASE = yaml.safe_load((PRESET_DIR / "fusemax_cloud.yaml").read_text())
OPTIONAL = {"source", "array_2d.ops", "array_2d.exp_cycles", "array_1d.ops", "array_1d.exp_cycles"}


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _without(path: str) -> dict:
    data = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    del node[leaf]
    return data


def _with(path: str, value) -> dict:
    data = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value
    return data


def eval_path(data: dict, path: str):
    for key in path.split("."):
        data = data[key]
    return data


NUMERIC = [p for p in _leaves(BASE)
           if isinstance(eval_path(BASE, p), (int, float)) and not isinstance(eval_path(BASE, p), bool)]


@pytest.mark.parametrize("name", ["fusemax_cloud", "flat_cloud", "flat_edge"])
def test_presets_load(name):
    arch = load_architecture(name)
    assert name in preset_names()
    assert arch.array_2d.pes > 0 and arch.array_1d.lanes > 0 and arch.dram.bytes_per_second > 0
    assert load_architecture(name.replace("_", "-")) == arch


def test_fusemax_preset_is_the_evaluated_machine():
    fm, flat = load_architecture("fusemax_cloud"), load_architecture("flat_cloud")
    assert (fm.array_2d.rows, fm.array_2d.cols, fm.array_1d.lanes) == (256, 256, 256)
    assert fm.clock_ghz == 0.94 and fm.dram.bandwidth_gib_per_s == 400 and fm.word_bytes == 2
    assert fm.buffer.capacity_bytes == 16 * 2**20 and flat.buffer.capacity_bytes == 32 * 2**20
    assert fm.array_2d.exp_cycles == 7 and flat.array_2d.exp_cycles is None


@pytest.mark.parametrize("path", [p for p in _leaves(BASE) if p not in OPTIONAL])
def test_missing_field_is_named(path):
    with pytest.raises(ArchitectureError, match=rf"missing field {path}\b"):
        Architecture.from_dict(_without(path))


@pytest.mark.parametrize("path", sorted(OPTIONAL & set(_leaves(BASE))))
def test_optional_fields_have_defaults(path):
    Architecture.from_dict(_without(path))


@settings(max_examples=40, deadline=None)
@given(path=st.sampled_from(NUMERIC), value=st.floats(max_value=-1e-9, min_value=-1e12))
def test_negative_field_is_named(path, value):
    with pytest.raises(ArchitectureError, match=rf"field {path} must not be negative"):
        Architecture.from_dict(_with(path, value))


@pytest.mark.parametrize("path,value,message", [
    ("array_2d.rows", 2.5, "must be an integer"),
    ("array_2d.rows", "wide", "must be an integer"),
    ("clock_ghz", 0, "must be positive"),
    ("array_1d.ops", "+", "must be a list of operator names"),
    ("buffer", 16, "must be a mapping"),
])
def test_bad_values_are_named(path, value, message):
    with pytest.raises(ArchitectureError, match=rf"field {path} {message}"):
        Architecture.from_dict(_with(path, value))


def test_unknown_field_is_named():
    with pytest.raises(ArchitectureError, match="unknown field dram.latency"):
        Architecture.from_dict(_with("dram.latency", 100))


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(BASE))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(BASE, allow_unicode=True))
    assert load_architecture(tmp_path / "a.json") == load_architecture(tmp_path / "a.yaml") \
        == load_architecture("fusemax_cloud")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(_without("energy.mac_pj"), allow_unicode=True))
    with pytest.raises(ArchitectureError, match=r"bad\.yaml: missing field energy\.mac_pj"):
        load_architecture(tmp_path / "bad.yaml")


def test_unknown_preset_lists_presets():
    with pytest.raises(ArchitectureError, match="fusemax_cloud"):
        load_architecture("tpu_v9")


def test_with_array_resizes_only_the_array():
    arch = load_architecture("fusemax_cloud").with_array(32, 16)
    assert (arch.array_2d.rows, arch.array_2d.cols) == (32, 16)
    assert arch.array_1d == load_architecture("fusemax_cloud").array_1d
