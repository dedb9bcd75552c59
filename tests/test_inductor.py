"""Inductor around the rewrite (rewrite/inductor.py): the rest of each rewritten graph compiled by
Inductor, the ``rewrite::`` ops opaque custom ops inside the graph Inductor lowers.

Inductor compiles C++ on a CPU (seconds a graph), so only seven tests here compile with it (five of
them the same graph, whose C++ Inductor's code cache then holds); the rest check the options, the
notes and the nested ``torch.compile`` without compiling.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from eager_cases import grads_as_float64
from reference import TOLERANCES
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, GraphModule

import rewrite
from rewrite.api import reachable_inside_torch_compile
from rewrite.backend import make_backend, rewrite_backend
from rewrite.inductor import config_patches, inductor_on, nothing_to_fuse
from rewrite.options import Options
from rewrite.report import Report

WIDTH = 16


def block(q, k, v, w, b):
    """Causal attention as a user writes it (triu of the removed pairs), then gelu and layer norm."""
    n = q.shape[-2]
    removed = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / q.shape[-1] ** 0.5)
    out = scores.masked_fill(removed, float("-inf")).softmax(dim=-1).matmul(v)
    out = out.transpose(1, 2).flatten(2)  # [B, N, H·D]
    return F.layer_norm(F.gelu(out), (out.shape[-1],), w, b)


def block_inputs(seed: int, device="cpu", requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 37, WIDTH, generator=gen, dtype=torch.float64) for _ in range(3))
    w = 1 + 0.1 * torch.randn(3 * WIDTH, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(3 * WIDTH, generator=gen, dtype=torch.float64)
    return tuple(t.float().to(device).requires_grad_(requires_grad) for t in (q, k, v, w, b))


def as_float64(args):
    return tuple(a.detach().double() for a in args)


def same_as_float64(out, args, what: str) -> None:
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), block(*as_float64(args)), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


class GraphSpy(CustomGraphPass):
    """Inductor's post-grad custom pass: records the ops of every graph Inductor lowers."""

    def __init__(self):
        self.graphs: list[list[str]] = []

    def __call__(self, graph):
        self.graphs.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    def uuid(self):
        return None  # no cache entry: every compile runs the pass


def compiled_with_report(fn, **options):
    torch._dynamo.reset()
    report = Report()
    return torch.compile(fn, backend=make_backend(Options(**options), report), dynamic=False), report


def causal_site(report: Report):
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.rewritten and site.variant == "causal", (site.variant, site.reason)
    return site


# ------------------------------------------------------------------ Inductor compiles (slow: seven)


def test_inductor_compiles_the_rest_and_the_site_runs_inside():
    spy = GraphSpy()
    fn, report = compiled_with_report(block, inductor=True, inductor_config={"post_grad_custom_post_pass": spy})
    args = block_inputs(0)
    same_as_float64(fn(*args), args, "first call")
    args = block_inputs(1)
    same_as_float64(fn(*args), args, "second call")
    site = causal_site(report)
    assert site.ran == {"sdpa": 2}, site.ran  # the rewrite::attention op ran on both calls
    assert len(spy.graphs) == 1, spy.graphs
    ops = spy.graphs[0]
    assert "rewrite.attention.default" in ops, ops  # opaque inside the graph Inductor lowered
    assert not any("softmax" in op or "bmm" in op for op in ops), ops  # the eager attention is gone
    assert any("erf" in op for op in ops), ops  # gelu, decomposed for Inductor to fuse
    assert report.notes == ["graph 0: Inductor compiled the rest of the graph (inductor=True); the rewrite:: ops "
                            "stay opaque custom ops"], report.notes
    assert "note: graph 0: Inductor compiled the rest" in str(report)


def test_gradients_through_the_rewritten_op_under_inductor():
    spy = GraphSpy()
    fn, report = compiled_with_report(block, inductor=True, inductor_config={"post_grad_custom_post_pass": spy})
    args = block_inputs(2, requires_grad=True)
    out = fn(*args)
    same_as_float64(out, args, "forward")
    grads_as_float64(block, list(args), out)
    site = causal_site(report)
    # AOTAutograd traces the op's backward formula into its backward graph: the backward path is
    # chosen (and counted) once, at trace time, where no values are in hand: the eager spelling.
    assert site.ran == {"sdpa": 1, "backward: eager spelling": 1}, site.ran
    assert len(spy.graphs) == 2, spy.graphs  # AOTAutograd's forward and backward graphs
    assert "rewrite.attention.default" in spy.graphs[0], spy.graphs[0]
    assert "Inductor compiled the rest" in report.notes[0], report.notes


def test_torch_compile_options_reach_inductor():
    spy = GraphSpy()
    torch._dynamo.reset()
    fn = torch.compile(block, backend="rewrite", options={"inductor": True, "post_grad_custom_post_pass": spy})
    args = block_inputs(3)
    same_as_float64(fn(*args), args, "torch.compile(backend='rewrite', options=...)")
    assert len(spy.graphs) == 1 and "rewrite.attention.default" in spy.graphs[0], spy.graphs


def test_rewrite_compile_with_inductor():
    spy = GraphSpy()
    torch._dynamo.reset()
    fn = rewrite.compile(block, inductor=True, inductor_config={"post_grad_custom_post_pass": spy})
    args = block_inputs(4)
    same_as_float64(fn(*args), args, "rewrite.compile(inductor=True)")
    assert len(spy.graphs) == 1 and "rewrite.attention.default" in spy.graphs[0], spy.graphs


def test_an_input_written_in_place_under_inductor():
    def step(q, k, v, cache):
        cache[:, :, 2:2 + k.shape[2]] = k  # a KV cache written in place, then attended over
        scores = torch.einsum("bhnd,bhmd->bhnm", q, cache) / q.shape[-1] ** 0.5
        return torch.relu(scores.softmax(-1) @ v) * 2

    gen = torch.Generator().manual_seed(13)
    q, k = (torch.randn(1, 2, 7, 16, generator=gen) for _ in range(2))
    v, cache = (torch.randn(1, 2, 9, 16, generator=gen) for _ in range(2))
    want_cache = cache.double().clone()
    want = step(q.double(), k.double(), v.double(), want_cache)
    fn, report = compiled_with_report(step, inductor=True)
    out = fn(q, k, v, cache)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.double(), want_cache, atol=0, rtol=0)  # the write reached the input
    assert len(report.sites) == 1 and report.sites[0].rewritten, str(report)
    assert report.sites[0].ran == {"sdpa": 1}, report.sites[0].ran
    assert "Inductor compiled the rest" in report.notes[0], report.notes


def test_heads_as_a_view_of_the_projection_under_inductor():
    """HF's layout: q, k, v are ``view(B, N, H, D).transpose(1, 2)`` of a projection, so SDPA's
    output is [B, N, H, D] in memory; Inductor reads it with the strides the op's fake declares."""
    def heads(x, wq, wk):
        b, n, c = x.shape
        q = (x @ wq).view(b, n, 3, c // 3).transpose(1, 2)
        k = (x @ wk).view(b, n, 3, c // 3).transpose(1, 2)
        v = x.view(b, n, 3, c // 3).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.tanh(out.transpose(1, 2).reshape(b, n, c)) + x

    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 11, 3 * WIDTH, generator=gen)
    wq, wk = (torch.randn(3 * WIDTH, 3 * WIDTH, generator=gen) / 7 for _ in range(2))
    fn, report = compiled_with_report(heads, inductor=True, count_calls=True)  # the op, not a direct aten call
    out = fn(x, wq, wk)
    torch.testing.assert_close(out.double(), heads(x.double(), wq.double(), wk.double()), atol=1e-5, rtol=1e-4)
    assert causal_site(report).ran == {"sdpa": 1}
    assert "Inductor compiled the rest" in report.notes[0], report.notes


def test_reduce_overhead_on_cpu_compiles_without_cuda_graphs():
    spy = GraphSpy()
    fn, report = compiled_with_report(block, mode="reduce-overhead",
                                      inductor_config={"post_grad_custom_post_pass": spy})
    for seed in (11, 12):
        args = block_inputs(seed)
        same_as_float64(fn(*args), args, f"reduce-overhead, seed {seed}")
    assert causal_site(report).ran == {"sdpa": 2}
    assert len(spy.graphs) == 1 and "rewrite.attention.default" in spy.graphs[0], spy.graphs
    assert report.notes[0].startswith("graph 0: Inductor compiled the rest of the graph (mode='reduce-overhead' and "
                                      "Inductor config ask for it)"), report.notes
    assert "rewrite::attention run between the captured graphs" in report.notes[1], report.notes


# ------------------------------------------------------------------ without compiling


def _layouts():
    gen = torch.Generator().manual_seed(15)
    contiguous = torch.randn(2, 3, 13, WIDTH, generator=gen)
    hf = torch.randn(2, 13, 3, WIDTH, generator=gen).transpose(1, 2)
    decode = torch.randn(2, 1, 3, WIDTH, generator=gen).transpose(1, 2)
    merged = torch.randn(6, 13, WIDTH, generator=gen)
    return {"contiguous": contiguous, "hf": hf, "decode": decode, "merged": merged}


@pytest.mark.parametrize("layout", ["contiguous", "hf", "decode", "merged"])
@pytest.mark.parametrize("kernel, masked", [("sdpa", False), ("sdpa", True), ("reference", False)],
                         ids=["sdpa", "sdpa_runtime_mask", "reference"])
def test_the_op_returns_the_strides_its_fake_declares(layout, kernel, masked):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = _layouts()[layout]
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool).tril().flip(-1) if masked else None  # not causal: the general path
    args = (q, q * 0.5, q + 1, None, mask, 0.25, not masked, 0, "nan", kernel, torch.float32)
    real = torch.ops.rewrite.attention(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.rewrite.attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert real.shape == fake.shape and real.stride() == fake.stride(), (real.stride(), fake.stride())


def test_auto_and_false_stay_off_on_cpu_and_say_so():
    fn, report = compiled_with_report(block)
    args = block_inputs(5)
    same_as_float64(fn(*args), args, "auto on the CPU")
    assert causal_site(report).ran == {"sdpa": 1}
    assert report.notes == ["graph 0: Inductor off on CPU (auto: a C++ compile costs seconds a graph); pass "
                            "inductor=True to compile the rest with Inductor"], report.notes
    fn, report = compiled_with_report(block, inductor=False)
    fn(*block_inputs(6))
    assert report.notes == ["graph 0: Inductor off (inductor=False): the rewritten graph runs as an fx graph"]


def test_when_inductor_is_on():
    cpu, gpu_like = [torch.ones(2)], [torch.ones(2, device="meta")]
    assert inductor_on(Options(), cpu)[0] is False
    assert inductor_on(Options(), gpu_like)[0] is False  # only CUDA inputs switch auto on
    assert inductor_on(Options(inductor=True), cpu)[0] is True
    on, why = inductor_on(Options(mode="max-autotune-no-cudagraphs"), cpu)
    assert on and "mode='max-autotune-no-cudagraphs' asks for it" in why, why
    on, why = inductor_on(Options(inductor_config={"max_autotune": True}), cpu)
    assert on and "Inductor config asks for it" in why, why
    on, why = inductor_on(Options(), cpu, per_size=True)  # a dynamic graph: one compile per size
    assert not on and "rewritten per size" in why, why
    assert inductor_on(Options(), cpu, per_size=True, hot=True)[0] is False  # a recurring size, but on a CPU
    assert inductor_on(Options(mode="max-autotune-no-cudagraphs"), cpu, per_size=True)[0] is True


def test_auto_leaves_a_graph_with_nothing_to_fuse_to_fx():
    """A rewritten graph that is only the attention call (and views) gains nothing from Inductor,
    whose compiled wrapper would only add host time to every call: auto keeps it an fx graph."""
    import rewrite

    def sdpa_heads_last(q, k, v):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    q, k, v = block_inputs(7)[:3]
    only_attention, = rewrite.rewritten_graphs(sdpa_heads_last, q, k, v)
    with_norm, = rewrite.rewritten_graphs(block, *block_inputs(8))
    assert nothing_to_fuse(only_attention), only_attention.code
    assert not nothing_to_fuse(with_norm), with_norm.code
    on, why = inductor_on(Options(), [q], gm=only_attention)
    assert not on and "nothing to fuse" in why, why
    assert "nothing to fuse" not in inductor_on(Options(), [q], gm=with_norm)[1]
    assert inductor_on(Options(inductor=True), [q], gm=only_attention)[0] is True  # asked for: compiled
    assert inductor_on(Options(mode="reduce-overhead"), [q], gm=only_attention)[0] is True  # CUDA graphs


def test_inductor_failure_falls_back_with_a_note(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    def failing(*args, **kwargs):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(compile_fx_module, "compile_fx", failing)
    fn, report = compiled_with_report(block, inductor=True)
    args = block_inputs(7)
    same_as_float64(fn(*args), args, "fallback")
    assert causal_site(report).ran == {"sdpa": 1}
    assert report.notes == ["graph 0: Inductor failed (RuntimeError: lowering failed); the rewritten graph runs "
                            "as an fx graph"], report.notes


def _graph_calling_attention() -> GraphModule:
    graph = Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    out = graph.call_function(torch.ops.rewrite.attention.default,
                              (q, k, v, None, None, 0.25, True, 0, "nan", "sdpa", torch.float32))
    graph.output(out)
    return GraphModule(torch.nn.Module(), graph)


def test_cuda_graphs_partition_around_the_rewrite_ops():
    patches, notes = config_patches(Options(mode="reduce-overhead"), _graph_calling_attention())
    assert patches["triton.cudagraphs"] is True
    assert patches["graph_partition"] is True and patches["custom_should_partition_ops"] == ["rewrite::attention"]
    assert notes and "rewrite::attention run between the captured graphs" in notes[0], notes
    patches, notes = config_patches(Options(inductor_config={"max_autotune": True}), _graph_calling_attention())
    assert patches == {"max_autotune": True} and notes == []


def test_torch_compile_mode_is_passed_on():
    gm = _graph_calling_attention()
    assert rewrite_backend(gm, [], mode="max-autotune").options.mode == "max-autotune"
    assert rewrite_backend(gm, [], mode="default").options.mode is None
    assert rewrite_backend(gm, [], options={"inductor": False}).options.inductor is False
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        rewrite_backend(gm, [], mode="fastest")


@pytest.mark.parametrize("options, error, match", [
    ({"inductor": "yes"}, ValueError, "inductor must be True, False or 'auto', got 'yes'"),
    ({"inductor": 1}, ValueError, "inductor must be True, False or 'auto', got 1"),
    ({"mode": "fast"}, ValueError, "unknown mode 'fast'; Inductor takes 'default'"),
    ({"inductor": False, "mode": "reduce-overhead"}, ValueError, "mode='reduce-overhead' is for Inductor, but "
                                                                 "inductor=False"),
    ({"inductor": False, "max_autotune": True}, ValueError, "inductor_config is for Inductor"),
    ({"max_autotune": "yes"}, TypeError, "Inductor config 'max_autotune' takes a bool"),
    ({"no_such_option": 1}, ValueError, "unknown option\\(s\\) 'no_such_option'; the rewrite backend takes"),
], ids=["inductor_str", "inductor_int", "mode", "mode_without_inductor", "config_without_inductor",
        "config_type", "unknown"])
def test_bad_options_are_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        Options.from_mapping(options, 'torch.compile(..., backend="rewrite")')
    torch._dynamo.reset()
    with pytest.raises(Exception, match=match):  # torch.compile wraps the backend's error
        torch.compile(block, backend="rewrite", options=options)(*block_inputs(8))


def test_bad_rewrite_compile_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="inductor must be"):
        rewrite.compile(block, inductor="on")
    with pytest.raises(ValueError, match="'not_a_config' is not an Inductor config name"):
        rewrite.compile(block, inductor_config={"not_a_config": 1})


# ------------------------------------------------------------------ torch.compile(rewrite.compile(fn))


class Outer:
    """An outer torch.compile backend that runs Dynamo's graphs as they are and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


class Attention(torch.nn.Module):
    def forward(self, q, k, v, w, b):
        return block(q, k, v, w, b)


@pytest.mark.parametrize("make", [lambda: block, lambda: Attention()], ids=["function", "module"])
def test_outer_torch_compile_reaches_the_rewrite(make):
    fn = make()
    options = Options()
    torch._dynamo.reset()
    report = Report()
    inner = reachable_inside_torch_compile(torch.compile(fn, backend=make_backend(options, report), dynamic=False),
                                           fn, options)
    args = block_inputs(9)
    with pytest.warns(UserWarning, match="called inside torch.compile.*backend='rewrite'.*inductor=True"):
        out = torch.compile(inner, backend=Outer())(*args)
    same_as_float64(out, args, "nested")
    assert causal_site(report).ran == {"sdpa": 1}  # the rewritten op ran, under the outer compile

    def model(q, k, v, w, b):
        return inner(q * 0.5, k, v, w, b) + 1

    outer = Outer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per rewrite.compile already
        out = torch.compile(model, backend=outer)(*args)
    q, k, v, w, b = as_float64(args)
    torch.testing.assert_close(out.double(), block(q * 0.5, k, v, w, b) + 1, atol=1e-5, rtol=1e-4)
    assert outer.graphs == 2  # around the rewritten call: before it and after it
    assert causal_site(report).ran == {"sdpa": 2}


def test_rewrite_compile_inside_torch_compile_warns_and_runs():
    torch._dynamo.reset()
    args = block_inputs(10)
    for inner in (rewrite.compile(block), rewrite.compile(Attention())):
        with pytest.warns(UserWarning, match="rewrite.compile\\((block|Attention)\\) called inside torch.compile"):
            out = torch.compile(inner, backend=Outer())(*args)
        same_as_float64(out, args, "nested rewrite.compile")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # called on its own: no warning
            same_as_float64(inner(*args), args, "rewrite.compile alone")
