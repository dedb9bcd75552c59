"""rewrite.simulate and ``python -m rewrite simulate``: workloads, cascades, real models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewrite.codegen.spatial import MappingError
from rewrite.ir.cascade import Cascade, m, p
from rewrite.simulation import cli_main, simulate


class BertLikeSelfAttention(nn.Module):
    """BERT's attention as Hugging Face's eager path spells it: q·kᵀ/√d, softmax, ·v."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))


class GPT2LikeSelfAttention(nn.Module):
    """GPT-2's attention through SDPA with a causal mask (its default attention path)."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (t.view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for t in self.c_attn(x).split(D, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, N, D))


def test_named_workload_sweep_reports_fusemax_speedups():
    sim = simulate("bert", seq_lens=[1024, 2**20])
    assert sim.baseline == "flat"
    assert {(pt.mapping, pt.seq_len) for pt in sim.points} == \
        {(k, n) for k in ("unfused", "flat", "fusemax") for n in (1024, 2**20)}
    fm = sim.point("fusemax", 1024)
    assert 5 < fm.speedup < 9 and fm.energy_ratio < 1
    assert sim.point("flat", 1024).cost.util_2d == pytest.approx(0.125)
    assert sim.point("fusemax", 2**20).cost.util_2d > 0.95


def test_result_table_dict_and_plot(tmp_path):
    sim = simulate("xlm", seq_lens=[4096, 65536], mappings=["flat", "fusemax", "sparse"], density=0.25)
    text = str(sim)
    assert "fusemax" in text and "speedup" in text
    d = json.loads(json.dumps(sim.to_dict()))
    assert len(d["points"]) == 6 and {"cycles", "util_2d", "energy_pj", "stage_cycles"} <= set(d["points"][0])
    assert d["points"][0]["einsums"][0]["einsum"] == "QK"
    sim.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    sparse, dense = sim.point("sparse", 65536), sim.point("fusemax", 65536)
    assert sparse.cost.cycles < 0.3 * dense.cost.cycles


def test_cascade_input_and_its_mask_density():
    c = Cascade.softmax_attention(mask=m <= p).with_sizes(b=2, h=4, p=8192, m=8192, e=64, f=64)
    sim = simulate(c, mappings=["fusemax", "sparse"])
    assert [pt.seq_len for pt in sim.points] == [8192, 8192]
    ratio = sim.point("sparse").cycles / sim.point("fusemax").cycles
    assert 0.45 < ratio < 0.56  # the causal half, measured from the mask itself


def test_linear_and_flow_cascades_are_mapped():
    for c in (Cascade.linear_attention(causal=True), Cascade.flow_attention()):
        sim = simulate(c.with_sizes(b=1, h=8, p=2**16, m=2**16, e=64, f=64), seq_lens=[2**16, 2**18])
        ratio = sim.point("fusemax", 2**18).cycles / sim.point("fusemax", 2**16).cycles
        assert 3.5 < ratio < 4.5  # linear in sequence length, not quadratic


def test_gemm_alone_has_cycles():
    sim = simulate(Cascade.gemm(256, 128, 512), array=(32, 32), dataflow="os")
    assert [pt.mapping for pt in sim.points] == ["unfused"]
    assert sim.cycles == (256 // 32) * (128 // 32) * (512 + 32 + 32 - 2)


def test_bad_inputs():
    with pytest.raises(MappingError, match="unknown mapping"):
        simulate("bert", mappings=["flash"], seq_lens=[1024])
    with pytest.raises(MappingError, match="baseline 'flat' is not among"):
        simulate("bert", mappings=["fusemax"], seq_lens=[1024], baseline="flat")
    with pytest.raises(ValueError, match="unknown workload"):
        simulate("llama9")
    with pytest.raises(TypeError, match="simulate"):
        simulate(42)
    with pytest.raises(ValueError, match="points"):
        _ = simulate("t5", seq_lens=[1024, 2048]).cycles


@pytest.mark.parametrize("model,variant", [(BertLikeSelfAttention, "dense"), (GPT2LikeSelfAttention, "causal")])
def test_real_models_through_inspect(model, variant):
    torch.manual_seed(0)
    x = torch.randn(2, 128, 64)
    sim = simulate(model().eval(), x, seq_lens=[1024, 16384], mappings=["flat", "fusemax", "sparse"])
    sites = {pt.site for pt in sim.points}
    assert len(sites) == 1 and variant in next(iter(sites))
    fm = sim.point("fusemax", 16384)
    assert fm.speedup > 3
    sparse_ratio = sim.point("sparse", 16384).cycles / fm.cycles
    assert sparse_ratio == pytest.approx(0.5 if variant == "causal" else 1.0, abs=0.05)


def test_cli(capsys, tmp_path):
    assert cli_main(["bert", "--seq-lens", "1K,64K", "--mappings", "flat,fusemax",
                     "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "fusemax" in out and (tmp_path / "p.png").exists()
    assert cli_main(["gemm:64,64,64", "--array", "16x16", "--dataflow", "os", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["points"][0]["cycles"] == 16 * (64 + 16 + 16 - 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nclock_ghz: -1\n")
    assert cli_main(["bert", "--arch", str(bad), "--seq-lens", "1K"]) == 2
    assert "clock_ghz" in capsys.readouterr().out


def test_rewrite_simulate_stays_callable():
    import rewrite

    first = rewrite.simulate("t5", seq_lens=[1024], mappings=["fusemax"])
    second = rewrite.simulate("t5", seq_lens=[1024], mappings=["fusemax"])
    assert first.cycles == second.cycles > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hugging_face_models(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=100)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0,
                                      eos_token_id=0)
        model = transformers.GPT2Model(cfg)
    ids = torch.randint(0, 100, (2, 32))
    sim = simulate(model.eval(), ids, seq_lens=[4096], mappings=["flat", "fusemax", "sparse"])
    sites = sorted({pt.site for pt in sim.points})
    assert sites and all(s.startswith("2× sites 0…1") for s in sites)  # both layers, simulated once
    for site in sites:
        fm = sim.point("fusemax", 4096, site)
        assert fm.speedup > 3 and fm.cost.util_2d > 0.8
        if family == "gpt2":
            assert "causal" in site
            assert sim.point("sparse", 4096, site).cycles < 0.6 * fm.cycles


def test_decoding_site_keeps_its_queries():
    c = Cascade.softmax_attention().with_sizes(b=1, h=8, p=1, m=4096, e=64, f=64)
    sim = simulate(c, seq_lens=[4096, 65536], mappings=["fusemax"])
    short, long = sim.point(seq_len=4096), sim.point(seq_len=65536)
    assert long.cost.dram_bytes == pytest.approx(16 * short.cost.dram_bytes, rel=0.01)  # K, V grow
    assert short.cost.bound == long.cost.bound == "DRAM"  # one query: no reuse of K and V


def test_breakdown_and_progress(capsys):
    sim = simulate("bert", seq_lens=[2**k for k in range(10, 21)], mappings=["flat", "fusemax", "sparse"],
                   progress=True)
    assert len(sim.points) == 33
    assert cli_main(["xlm", "--seq-lens", "64K", "--mappings", "fusemax", "--breakdown"]) == 0
    out = capsys.readouterr().out
    for name in ("BQK", "SLNV", "RNV", "stage: 1-D array", "fill+drain"):
        assert name in out
