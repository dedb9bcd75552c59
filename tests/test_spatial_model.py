"""The analytic model: against SCALE-Sim and FuseMax's published tables, and its invariants."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.codegen.spatial import (
    GemmShape,
    MappingError,
    Workload,
    evaluate,
    load_architecture,
    map_cascade,
    systolic_cycles,
    tile_density,
)
from rewrite.codegen.spatial.validation import compare_fusemax
from rewrite.ir.cascade import Cascade, m, p

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reference"
FUSEMAX = load_architecture("fusemax_cloud")
FLAT = load_architecture("flat_cloud")


def _scalesim_rows() -> list[dict]:
    with open(REFERENCE / "scalesim_gemm.csv") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


# ---- SCALE-Sim ------------------------------------------------------------------------------
def test_gemm_cycles_match_scalesim_within_10_percent():
    rows = _scalesim_rows()
    assert len(rows) >= 50 and {r["dataflow"] for r in rows} == {"os", "ws", "is"}
    for r in rows:
        ours = systolic_cycles(GemmShape(1, int(r["M"]), int(r["N"]), int(r["K"])), int(r["rows"]),
                               int(r["cols"]), r["dataflow"]).cycles
        assert abs(ours - int(r["cycles"])) / int(r["cycles"]) < 0.10, r


def test_gemm_cascade_through_simulate_matches_scalesim():
    from rewrite.simulation import simulate

    r = next(r for r in _scalesim_rows() if r["dataflow"] == "ws" and r["rows"] != r["cols"])
    sim = simulate(Cascade.gemm(int(r["M"]), int(r["N"]), int(r["K"])), arch="fusemax_cloud",
                   array=(int(r["rows"]), int(r["cols"])), dataflow="ws")
    assert abs(sim.cycles - int(r["cycles"])) / int(r["cycles"]) < 0.10


# ---- FuseMax's published results ------------------------------------------------------------
@pytest.fixture(scope="module")
def fusemax_rows():
    return compare_fusemax(REFERENCE / "fusemax")


def test_speedup_and_utilisation_within_25_percent_everywhere(fusemax_rows):
    rows = [r for r in fusemax_rows if r.metric != "energy_ratio"]
    assert len(rows) == 72
    bad = [(r.model, r.seq_len, r.metric, r.published, r.ours) for r in rows if abs(r.rel_error) > 0.25]
    assert not bad


def test_mean_speedup_close_to_published(fusemax_rows):
    sp = [r for r in fusemax_rows if r.metric == "speedup"]
    ours, pub = (sum(getattr(r, k) for r in sp) / len(sp) for k in ("ours", "published"))
    assert abs(ours - pub) / pub < 0.05  # published mean 6.72×


def test_energy_ratio_within_25_percent_where_nothing_spills(fusemax_rows):
    # At 256K and 1M FLAT spills its score fibers; there our DRAM price per word (HBM2-class,
    # 31 MACs) is far above the artifact's and our ratio is lower: documented, not hidden.
    for r in fusemax_rows:
        if r.metric != "energy_ratio":
            continue
        if r.seq_len in ("256K", "1M"):
            assert r.ours < r.published
        else:
            assert abs(r.rel_error) < 0.25, r


# ---- pass counting drives buffer and traffic ------------------------------------------------
def test_pass_counts():
    assert Cascade.softmax_attention().pass_count() == 3
    assert Cascade.online_softmax_attention().pass_count() == 1
    assert Cascade.linear_attention().pass_count() == Cascade.linear_attention(causal=True).pass_count() == 1
    assert Cascade.flow_attention().pass_count() == 4  # Ô waits for ΣφK through I (transitive)


def test_flat_spills_once_the_fiber_outgrows_the_buffer():
    w = Workload("BERT", 64, 12, 64, 64)
    short = map_cascade(w.cascade(4096), FLAT, "flat")
    long = map_cascade(w.cascade(2**18), FLAT, "flat")
    assert short.passes == 3 and short.spill_fraction == 0
    # live across a pass boundary: the score fiber of each row plus one row statistic (GM or SD)
    assert long.spill_fraction > 0.5 and long.live_words == long.tile_p * (2**18 + 1)
    fm = map_cascade(w.cascade(2**18), FUSEMAX, "fusemax")
    assert fm.passes == 1 and fm.live_words == 0 and fm.spill_fraction == 0
    # FLAT moves ~4 words per score when it spills all of it: (passes − 1) × (write + read).
    c = evaluate(long)
    scores = 64 * 12 * 2**36
    assert 3.0 * long.spill_fraction * scores < c.dram_bytes / 2 < 4.5 * scores


def test_unfused_moves_intermediates_through_dram():
    c = Workload("BERT", 64, 12, 64, 64).cascade(4096)
    un, fl = (evaluate(map_cascade(c, FLAT, k)) for k in ("unfused", "flat"))
    assert un.dram_bytes > 5 * fl.dram_bytes and un.cycles > fl.cycles


# ---- invariants (hypothesis) ----------------------------------------------------------------
VARIANTS = ["dense", "causal", "linear", "linear_causal", "flow"]


@settings(max_examples=60, deadline=None)
@given(variant=st.sampled_from(VARIANTS), kind=st.sampled_from(["unfused", "flat", "fusemax", "sparse"]),
       arch=st.sampled_from(["fusemax_cloud", "flat_cloud", "flat_edge"]),
       log_n=st.integers(6, 20), heads=st.integers(1, 16), e=st.sampled_from([32, 64, 128]),
       density=st.floats(0.05, 1.0))
def test_cycles_never_below_compute_or_bandwidth_floor(variant, kind, arch, log_n, heads, e, density):
    c = Workload("w", 2, heads, e, e, variant).cascade(2**log_n)
    cost = evaluate(map_cascade(c, load_architecture(arch), kind, density=density))
    assert cost.cycles >= cost.compute_floor_cycles * (1 - 1e-9)
    assert cost.cycles >= cost.bandwidth_floor_cycles * (1 - 1e-9)
    assert 0 <= cost.util_2d <= 1 + 1e-9 and 0 <= cost.util_1d <= 1 + 1e-9
    assert cost.energy_pj > 0 and cost.buffer_required_bytes >= 0


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 3000), N=st.integers(1, 3000), K=st.integers(1, 3000), rows=st.sampled_from([8, 32, 128]),
       cols=st.sampled_from([8, 32, 128]), df=st.sampled_from(["os", "ws", "is"]), piped=st.booleans())
def test_gemm_cycles_cover_the_macs_and_the_skew(M, N, K, rows, cols, df, piped):
    sc = systolic_cycles(GemmShape(1, M, N, K), rows, cols, df, piped)
    assert sc.cycles >= M * N * K / (rows * cols)
    assert sc.cycles >= rows + cols - 2  # at least one fill and drain
    assert 0 < sc.mapping_efficiency <= 1


@settings(max_examples=25, deadline=None)
@given(density=st.floats(0.05, 1.0), log_n=st.integers(14, 20))
def test_sparse_cycles_scale_with_density(density, log_n):
    c = Workload("w", 8, 12, 64, 64).cascade(2**log_n)
    full = evaluate(map_cascade(c, FUSEMAX, "sparse", density=1.0))
    part = evaluate(map_cascade(c, FUSEMAX, "sparse", density=density))
    # Everything per score and per (query, key tile) scales; the per-query division does not.
    assert part.cycles == pytest.approx(density * full.cycles, rel=0.02, abs=0.02 * full.cycles)
    assert part.cycles <= full.cycles


def test_dense_mappings_ignore_density():
    c = Workload("w", 8, 12, 64, 64).cascade(2**14)
    a, b = (evaluate(map_cascade(c, FUSEMAX, "fusemax", density=d)).cycles for d in (1.0, 0.1))
    assert a == b


@pytest.mark.parametrize("n", [1024, 4096, 65536])
def test_tile_density_of_causal_and_banded_masks(n):
    tiles = n // 256
    assert tile_density(None, n, n, 256, 256) == 1.0
    assert tile_density(m <= p, n, n, 256, 256) == pytest.approx((tiles + 1) / (2 * tiles))
    # |p − m| ≤ 200 touches the diagonal tile and one neighbour on each side (one at the ends).
    band = (3 * tiles - 2) / tiles**2
    assert tile_density(sympy.Abs(p - m) <= 200, n, n, 256, 256) == pytest.approx(band, rel=0.05)
    assert tile_density(m > p + 10**9, n, n, 256, 256) == 0.0


def test_tile_density_samples_long_masks_without_bias():
    n, tiles = 2**20, 2**20 // 256
    est = tile_density(sympy.Abs(p - m) <= 200, n, n, 256, 256)
    assert est == pytest.approx((3 * tiles - 2) / tiles**2, rel=0.25)


# ---- bad input ------------------------------------------------------------------------------
def test_unplaceable_einsum_is_named():
    no_divide = FUSEMAX.with_array(256, 256)
    from dataclasses import replace

    no_divide = replace(no_divide, array_1d=replace(no_divide.array_1d, ops=("+", "×", "max")))
    with pytest.raises(MappingError, match=r"Einsum A \(÷\).*cannot|cannot place Einsum A \(÷"):
        map_cascade(Cascade.softmax_attention().with_sizes(b=1, h=1, p=64, m=64, e=8, f=8), no_divide, "flat")


def test_symbolic_sizes_and_unknown_mapping_are_errors():
    with pytest.raises(MappingError, match="rank p has a symbolic size|has no size"):
        map_cascade(Cascade.softmax_attention().with_sizes(p="N"), FUSEMAX, "flat")
    c = Workload("w", 1, 1, 8, 8).cascade(64)
    with pytest.raises(MappingError, match="unknown mapping 'tiled'"):
        map_cascade(c, FUSEMAX, "tiled")
    with pytest.raises(MappingError, match="unknown dataflow 'rs'"):
        map_cascade(c, FUSEMAX, "flat", dataflow="rs")


def test_state_that_cannot_fit_is_an_error():
    tiny = FUSEMAX.with_array(4, 4)
    from dataclasses import replace

    tiny = replace(tiny, buffer=replace(tiny.buffer, capacity_bytes=64))
    with pytest.raises(MappingError, match="does not fit"):
        map_cascade(Workload("w", 1, 1, 64, 64).cascade(1024), tiny, "fusemax")


def test_one_million_tokens_is_fast():
    import time

    c = Workload("BERT", 64, 12, 64, 64).cascade(2**20)
    t = time.perf_counter()
    for kind in ("unfused", "flat", "fusemax", "sparse"):
        assert math.isfinite(evaluate(map_cascade(c, FUSEMAX, kind, density=0.5)).cycles)
    assert time.perf_counter() - t < 1.0
