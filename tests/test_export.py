"""rewrite.export: a torch.export program whose graph calls the rewrite:: ops (one per attention), equal
to eager, with the model's parameters and buffers kept as such; it saves, loads (here and in a fresh
process that imports rewrite) and AOTInductor packages it on the CPU. rewrite.rewritten_graphs shows
the rewritten fx graph of each captured graph. A model without attention exports unchanged with a
report of no sites; a dynamic size with a rewritten site is refused with the reason."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind

import rewrite

FP32 = {"atol": 1e-5, "rtol": 1e-5}


class CausalSelfAttention(torch.nn.Module):
    """nanoGPT's way: fused qkv projection, a registered tril buffer, masked_fill, softmax."""

    def __init__(self, dim: int = 24, heads: int = 3, max_len: int = 32):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (c // self.heads) ** 0.5)
        att = att.masked_fill(self.tril[:, :, :n, :n] == 0, float("-inf"))
        y = torch.softmax(att, dim=-1) @ v
        return self.out(y.transpose(1, 2).contiguous().view(b, n, c))


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([CausalSelfAttention(), CausalSelfAttention()])
        self.norm = torch.nn.LayerNorm(24)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(self.norm(x))
        return x


def rewrite_calls(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("rewrite.")]


def _model_and_input(seed: int = 0):
    torch.manual_seed(seed)
    return TwoBlocks().eval(), torch.randn(2, 13, 24, generator=torch.Generator().manual_seed(seed + 1))


def _float64_reference(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def test_two_attentions_export_as_two_rewrite_ops_equal_to_eager():
    model, x = _model_and_input()
    program = rewrite.export(model, (x,))
    assert rewrite_calls(program) == ["rewrite.attention.default"] * 2
    report = program.rewrite_report
    assert [(s.rewritten, s.variant) for s in report.sites] == [(True, "causal")] * 2, report
    with torch.no_grad():
        got = program.module()(x)
    torch.testing.assert_close(got.double(), _float64_reference(model, x), atol=1e-5, rtol=1e-5)
    # The program is for the example's sizes: another length is refused, not run wrongly.
    with pytest.raises(AssertionError, match=r"Guard failed: x\.size\(\)\[1\] == 13"):
        program.module()(x[:, :7])


def test_gradients_through_the_program_match_float64_eager():
    model, x = _model_and_input(seed=10)
    module = rewrite.export(model, (x,)).module()
    module(x).square().sum().backward()
    reference = copy.deepcopy(model).double()
    reference(x.double()).square().sum().backward()
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.grad.double(), reference.get_parameter(name).grad, atol=1e-4, rtol=1e-4)


def test_parameters_and_buffers_stay_in_the_signature():
    model, x = _model_and_input(seed=1)
    program = rewrite.export(model, (x,))
    specs = program.graph_signature.input_specs
    params = {s.target for s in specs if s.kind == InputKind.PARAMETER}
    buffers = {s.target for s in specs if s.kind == InputKind.BUFFER}
    assert params == {name for name, _ in model.named_parameters()}
    assert buffers == {name for name, _ in model.named_buffers()}
    assert set(program.state_dict) == set(model.state_dict())
    assert not program.constants  # nothing of the model baked in as a constant
    # New weights loaded into the program's module are used (they are inputs, not folded).
    module = program.module()
    with torch.no_grad():
        module.get_parameter("blocks.0.qkv.weight").mul_(0.5)
        model.blocks[0].qkv.weight.mul_(0.5)
        torch.testing.assert_close(module(x), model(x), **FP32)


class MaskInputAttention(torch.nn.Module):
    """A keep mask passed in by the caller, a call counter updated in place."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x, keep):
        self.calls += 1
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / 4.0
        return torch.einsum("bhqk,bhkd->bhqd", scores.masked_fill(~keep, float("-inf")).softmax(-1), v)


def test_a_mask_input_causal_in_the_example_is_not_assumed_causal_later():
    model = MaskInputAttention().eval()
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(6))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    program = rewrite.export(model, (x, causal))
    assert rewrite_calls(program) == ["rewrite.attention.default"]
    assert program.rewrite_report.sites[0].rewritten, program.rewrite_report
    module = program.module()
    band = (torch.arange(10)[:, None] - torch.arange(10)).abs() <= 2
    padded = torch.ones(10, 10, dtype=torch.bool)
    padded[:, 6:] = False
    before = int(module.get_buffer("calls"))
    with torch.no_grad():
        for keep in (causal, band, padded):
            want = copy.deepcopy(model).double()(x.double(), keep)
            torch.testing.assert_close(module(x, keep).double(), want, atol=1e-5, rtol=1e-5)
    assert int(module.get_buffer("calls")) == before + 3  # the in-place update is kept


def test_save_and_load_here_and_in_a_fresh_process(tmp_path):
    model, x = _model_and_input(seed=2)
    program = rewrite.export(model, (x,))
    path, x_path, out_path = tmp_path / "attn.pt2", tmp_path / "x.pt", tmp_path / "out.pt"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    assert rewrite_calls(loaded) == ["rewrite.attention.default"] * 2
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(loaded.module()(x), want, **FP32)
    torch.save(x, x_path)
    script = textwrap.dedent(f"""
        import torch
        import rewrite  # registers the rewrite:: ops, which torch.export.load needs
        program = torch.export.load({str(path)!r})
        calls = [n for n in program.graph.nodes if str(n.target).startswith("rewrite.")]
        assert len(calls) == 2, calls
        with torch.no_grad():
            torch.save(program.module()(torch.load({str(x_path)!r})), {str(out_path)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    torch.testing.assert_close(torch.load(out_path), want, **FP32)


class BandAttention(torch.nn.Module):
    """A local window built from positions: the neighborhood (block-sparse) op."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).chunk(3, dim=-1)
        pos = torch.arange(x.shape[1])
        far = (pos[:, None] - pos[None, :]).abs() > 3
        return (q @ k.transpose(-1, -2) * 0.25).masked_fill(far, float("-inf")).softmax(-1) @ v


class EluLinearAttention(torch.nn.Module):
    """Katharopoulos et al.'s elu + 1 feature map: the linear-time op."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).chunk(3, dim=-1)
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        state = torch.einsum("bnd,bne->bde", k, v)
        norm = 1 / (torch.einsum("bnd,bd->bn", q, k.sum(1)) + 1e-6)
        return torch.einsum("bnd,bde,bn->bne", q, state, norm)


@pytest.mark.parametrize(("module", "op", "variant"), [
    (BandAttention, "rewrite.sparse_attention.default", "neighborhood"),
    (EluLinearAttention, "rewrite.linear_attention.default", "linear"),
], ids=["neighborhood", "linear"])
def test_other_op_families_export_save_and_load(tmp_path, module, op, variant):
    torch.manual_seed(8)
    model, x = module().eval(), torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(9))
    program = rewrite.export(model, (x,))
    assert rewrite_calls(program) == [op]
    assert [(s.rewritten, s.variant) for s in program.rewrite_report.sites] == [(True, variant)]
    torch.export.save(program, tmp_path / "program.pt2")
    loaded = torch.export.load(tmp_path / "program.pt2")
    assert rewrite_calls(loaded) == [op]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x).double(), _float64_reference(model, x), atol=1e-5, rtol=1e-5)


def test_tiny_llama_exports_one_rewrite_op_per_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval()
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    kwargs = {"input_ids": ids, "use_cache": False}
    program = rewrite.export(model, (), kwargs)
    assert rewrite_calls(program) == ["rewrite.attention.default"] * 2
    sites = program.rewrite_report.sites
    assert [(s.rewritten, s.variant, s.gqa) for s in sites] == [(True, "causal", True)] * 2
    params = {s.target for s in program.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    assert params == {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        got = program.module()(**kwargs).last_hidden_state
        want = copy.deepcopy(model).double()(**kwargs).last_hidden_state
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_aoti_packages_the_program_on_cpu(tmp_path):
    model, x = _model_and_input(seed=4)
    model.blocks = model.blocks[:1]
    program = rewrite.export(model, (x,))
    assert rewrite_calls(program) == ["rewrite.attention.default"]
    # The op runs through AOTInductor's proxy executor: loading the package also needs `import rewrite`.
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "attn_aoti.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **FP32)


def test_rewritten_graphs_show_the_op_of_each_captured_graph():
    first, second = CausalSelfAttention(), CausalSelfAttention()

    def two_graphs(x):
        y = first(x)
        torch._dynamo.graph_break()
        return second(y)

    x = torch.randn(1, 9, 24)
    graphs = rewrite.rewritten_graphs(two_graphs, x)
    assert len(graphs) == 2
    for gm in graphs:
        assert gm.code.count("torch.ops.rewrite.attention.default(") == 1, gm.code
        assert "softmax" not in gm.code


def test_model_without_attention_exports_unchanged_with_no_sites():
    mlp = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 24)).eval()
    x = torch.randn(2, 13, 24)
    program = rewrite.export(mlp, (x,))
    assert rewrite_calls(program) == []
    assert program.rewrite_report.sites == [] and program.rewrite_report.skipped_graphs == []
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), mlp(x), **FP32)
    # Nothing rewritten, so dynamic sizes are kept as asked.
    dynamic = rewrite.export(mlp, (x,), dynamic_shapes=({1: Dim("n", min=2, max=64)},))
    with torch.no_grad():
        torch.testing.assert_close(dynamic.module()(x[:, :7]), mlp(x[:, :7]), **FP32)


def test_softmax_over_the_queries_is_left_alone_with_the_reason():
    class SoftmaxOverQueries(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.proj(x).chunk(3, dim=-1)
            return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-2) @ v

    model, x = SoftmaxOverQueries().eval(), torch.randn(2, 10, 16)
    program = rewrite.export(model, (x,))
    assert rewrite_calls(program) == []
    [site] = program.rewrite_report.sites
    assert not site.rewritten and "contracts an axis other than the keys" in site.reason
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), **FP32)


def test_dynamic_sequence_length_with_a_rewritten_site_is_refused():
    model, x = _model_and_input(seed=5)
    with pytest.raises(rewrite.RewriteError, match=r"planned and checked for the example's sizes.*"
                                                   r"Export without dynamic_shapes.*rewrite\.compile"):
        rewrite.export(model, (x,), dynamic_shapes=({1: Dim("n", min=2, max=31)},))


@pytest.mark.gpu
def test_cuda_program_saves_and_loads(tmp_path):
    model, x = _model_and_input(seed=7)
    model, x = model.cuda(), x.cuda()
    program = rewrite.export(model, (x,))
    assert rewrite_calls(program) == ["rewrite.attention.default"] * 2
    with torch.no_grad():
        want = _float64_reference(model, x)
        torch.export.save(program, tmp_path / "cuda.pt2")
        loaded = torch.export.load(tmp_path / "cuda.pt2").module()
        torch.testing.assert_close(loaded(x).double(), want, atol=1e-4, rtol=1e-4)


_LOAD_AOTI = textwrap.dedent("""
    import sys, torch, rewrite  # the op's proxy executor needs rewrite's ops registered
    x, want = torch.load(sys.argv[2])
    got = torch._inductor.aoti_load_package(sys.argv[1])(x)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
""")


@pytest.mark.gpu
def test_cuda_program_aoti_packages(tmp_path):
    """Loaded in a child process: on torch 2.11 (the H200's) loading this CUDA package crashes the
    process inside torch's ``_load_aoti`` (a segmentation fault, seen 2026-12-04), which must not take
    the test run with it. That crash, and only it, is an expected failure there."""
    model, x = _model_and_input(seed=8)
    model, x = model.cuda(), x.cuda()
    program = rewrite.export(model, (x,))
    with torch.no_grad():
        torch.save((x, _float64_reference(model, x)), tmp_path / "io.pt")
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "cuda_aoti.pt2"))
    run = subprocess.run([sys.executable, "-c", _LOAD_AOTI, package, str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)  # the installed rewrite
    if run.returncode == -11 and torch.__version__ < (2, 12):
        pytest.xfail(f"torch {torch.__version__}: aoti_load_package of a CUDA package segfaults in _load_aoti")
    assert run.returncode == 0, run.stderr[-3000:]
