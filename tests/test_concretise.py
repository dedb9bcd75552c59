"""A dynamic graph at a concrete size (rewrite/concretise.py) is the graph a new trace would record: the
same ops with the same arguments, sizes inlined as numbers, the same values and source lines, and the
rewrite reads it the same way. Checked on dynamic Dynamo graphs written the way models write attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx import Node

from rewrite.capture import specialised, to_symbolic_aten, traced_at
from rewrite.concretise import concretised
from rewrite.passes.pipeline import rewrite_graph


def banded(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 5)
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def heads_split(x, w):
    b, n, _ = x.shape
    q, k, v = (x @ w).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, 16)


def dynamic_graph(fn, *args):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep, dynamic=True)(*args)
    (gm,) = graphs
    symbolic = to_symbolic_aten(gm)
    assert symbolic is not None
    return gm, symbolic


def dynamo_inputs(gm, args):
    """The Dynamo graph's inputs for the call ``fn(*args)``: the tensors in order, and each symbolic size
    Dynamo lifted as an input bound from the shapes of the tensors that carry it."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_phs = [n for n in phs if isinstance(n.meta["example_value"], torch.Tensor)]
    sizes = {}
    for node, t in zip(tensor_phs, args):
        for s, real in zip(node.meta["example_value"].shape, t.shape):
            if isinstance(s, torch.SymInt):
                sizes[str(s.node.expr)] = real
    tensors = iter(args)
    return [sizes[str(n.meta["example_value"].node.expr)] if isinstance(n.meta["example_value"], torch.SymInt)
            else next(tensors) for n in phs]


def same_graph(a, b):
    """Node by node: the same op, the same arguments (nodes matched by position), values of one shape."""
    na, nb = list(a.graph.nodes), list(b.graph.nodes)
    assert [(n.op, n.target) for n in na] == [(n.op, n.target) for n in nb]
    index_a, index_b = {n: i for i, n in enumerate(na)}, {n: i for i, n in enumerate(nb)}

    def norm(x, index):
        if isinstance(x, Node):
            return ("node", index[x])
        if isinstance(x, (list, tuple)):
            return tuple(norm(y, index) for y in x)
        return x

    for x, y in zip(na, nb):
        assert norm(x.args, index_a) == norm(y.args, index_b), (x.format_node(), y.format_node())
        assert norm(tuple(sorted(x.kwargs.items())), index_a) == norm(tuple(sorted(y.kwargs.items())), index_b)
        vx, vy = x.meta.get("val"), y.meta.get("val")
        if isinstance(vx, torch.Tensor):
            assert isinstance(vy, torch.Tensor) and vx.shape == vy.shape and vx.dtype == vy.dtype, x.format_node()
        assert x.meta.get("stack_trace") == y.meta.get("stack_trace")


CASES = {
    "banded": (banded, lambda n: [torch.randn(2, 3, n, 8) for _ in range(3)]),
    "heads_split": (heads_split, lambda n: [torch.randn(2, n, 16), torch.randn(16, 48)]),
}


def used_concretised(monkeypatch) -> list:
    """Record each graph `specialised` builds by concretising (not by its fallback trace)."""
    import rewrite.capture as capture

    made = []

    def recording(gm, args):
        made.append(concretised(gm, args))
        return made[-1]

    monkeypatch.setattr(capture, "concretised", recording)
    return made


@pytest.mark.parametrize("name", list(CASES))
def test_the_concrete_graph_is_the_traced_one(name, monkeypatch):
    fn, make = CASES[name]
    gm, symbolic = dynamic_graph(fn, *make(11))
    made = used_concretised(monkeypatch)
    for n in (7, 11, 30):
        args = dynamo_inputs(gm, make(n))
        graph = specialised(symbolic, args)
        assert len(made) == 1, "specialised fell back to tracing"
        made.clear()
        same_graph(graph, traced_at(symbolic, args))
        (out,) = graph(*args)
        torch.testing.assert_close(out, fn(*[a for a in args if isinstance(a, torch.Tensor)]))


def test_the_rewrite_reads_the_concrete_graph_as_the_traced_one(monkeypatch):
    gm, symbolic = dynamic_graph(banded, *[torch.randn(2, 3, 11, 8) for _ in range(3)])
    made = used_concretised(monkeypatch)
    for n in (9, 40):
        args = dynamo_inputs(gm, [torch.randn(2, 3, n, 8) for _ in range(3)])
        graphs = (specialised(symbolic, args), traced_at(symbolic, args))
        assert made, "specialised fell back to tracing"
        (a,), (b,) = (rewrite_graph(g, "torch", args)[1] for g in graphs)
        assert (a.rewritten, a.variant, a.mask, a.kernel) == (b.rewritten, b.variant, b.mask, b.kernel), (a, b)
        assert a.rewritten and a.variant in ("neighborhood", "causal"), str(a)


def test_a_node_it_cannot_evaluate_is_traced_instead(monkeypatch):
    import rewrite.capture as capture

    gm, symbolic = dynamic_graph(banded, *[torch.randn(2, 3, 11, 8) for _ in range(3)])
    args = dynamo_inputs(gm, [torch.randn(2, 3, 13, 8) for _ in range(3)])

    def refuse(*_):
        raise ValueError("concretise: refused for the test")

    monkeypatch.setattr(capture, "concretised", refuse)
    same_graph(specialised(symbolic, args), traced_at(symbolic, args))


def test_a_hugging_face_decode_graph_concretises_as_traced(monkeypatch):
    """The graph generate() specialises at every DynamicCache decode step (a tiny Llama, eager attention)."""
    transformers = pytest.importorskip("transformers")
    import rewrite
    import rewrite.backend as backend

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    seen = []
    real = backend.specialised

    def keep(symbolic, args):
        seen.append((symbolic, args))
        return real(symbolic, args)

    monkeypatch.setattr(backend, "specialised", keep)
    torch._dynamo.reset()
    with torch.no_grad():
        rewrite.compile(model).generate(torch.randint(0, 64, (1, 9)), max_new_tokens=4, min_new_tokens=4,
                                        do_sample=False)
    assert seen, "no dynamic graph was specialised"
    made = used_concretised(monkeypatch)
    symbolic, args = seen[-1]
    graph = specialised(symbolic, args)
    assert made, "specialised fell back to tracing"
    same_graph(graph, traced_at(symbolic, args))
