"""The custom op's registrations (fake kernel, autograd, export), verify=True catching a wrong
kernel, dynamic shapes left alone, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rewrite
import rewrite.codegen.ops as ops
from rewrite.__main__ import main as cli_main
from rewrite.backend import make_backend
from rewrite.options import Options
from rewrite.report import Report


def _args(seed=0, dtype=torch.float32, causal=False, with_mask=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 7, 16, generator=g, dtype=dtype)
    k = torch.randn(2, 3, 9, 16, generator=g, dtype=dtype)
    v = torch.randn(2, 3, 9, 8, generator=g, dtype=dtype)
    mask = (torch.rand(2, 1, 7, 9, generator=g) > 0.3) if with_mask else None
    return (q, k, v, None, mask, 0.25, causal, 2 if causal else 0, "nan", "sdpa", dtype)


@pytest.mark.parametrize("causal,with_mask", [(False, False), (True, False), (False, True)])
def test_opcheck(causal, with_mask):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration and
    the op's behaviour under torch.compile's tracing all agree."""
    q, k, v, *rest = _args(causal=causal, with_mask=with_mask)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *rest)
    torch.library.opcheck(torch.ops.rewrite.attention.default, args)


def test_op_gradients_equal_eager():
    q, k, v, bias, mask, scale, causal, off, row, kern, dt = _args(dtype=torch.float64, causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.rewrite.attention(*leaves, bias, mask, scale, causal, off, row, kern, dt)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = ref_leaves[0] @ ref_leaves[1].transpose(-1, -2) * scale
    keep = torch.ones(7, 9, dtype=torch.bool).tril(off)
    want_out = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ ref_leaves[2]
    want = torch.autograd.grad(want_out, ref_leaves, grad)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-10)


def test_rewritten_graph_exports():
    """A module calling the op exports with torch.export (the fake kernel gives shapes)."""

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.rewrite.attention(q, k, v, None, None, 0.25, True, 0, "nan", "sdpa", q.dtype)

    q, k, v = _args()[:3]
    ep = torch.export.export(M(), (q, k[..., :7, :], v[..., :7, :]))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewrite.attention.default in targets


def _eager_causal(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    return s.softmax(-1) @ v


def test_verify_raises_naming_the_site(monkeypatch):
    """A kernel that computes the wrong thing is caught on the first call, with the site."""
    torch._dynamo.reset()

    def wrong(q, k, v, **kw):
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", wrong)
    q = torch.randn(1, 2, 11, 16)
    with pytest.raises(rewrite.RewriteMismatch, match="test_ops_and_cli.py"):
        rewrite.compile(_eager_causal, verify=True)(q, q.clone(), q.clone())


def test_verify_passes_on_a_correct_site():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 11, 16) for _ in range(3))
    torch.testing.assert_close(rewrite.compile(_eager_causal, verify=True)(q, k, v), _eager_causal(q, k, v))


def test_torch_compile_options_are_honoured(monkeypatch):
    """options={"verify": True} through torch.compile verifies (the same wrong kernel is caught),
    and options={"backend": "torch"} reaches the plan (the report names the torch kernel)."""
    torch._dynamo.reset()

    def wrong(q, k, v, **kw):
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", wrong)
    q = torch.randn(1, 2, 11, 16)
    fn = torch.compile(_eager_causal, backend="rewrite", options={"verify": True})
    with pytest.raises(Exception, match="RewriteMismatch|differs from the original"):
        fn(q, q.clone(), q.clone())


@pytest.mark.parametrize("options, match", [({"verfy": True}, "unknown option.*'verfy'"),
                                            ({"backend": "cuda"}, "unknown backend 'cuda'"),
                                            ({"verify": "yes"}, "verify must be True or False")])
def test_torch_compile_options_are_validated(options, match):
    torch._dynamo.reset()
    q = torch.randn(1, 2, 5, 16)
    fn = torch.compile(_eager_causal, backend="rewrite", options=options)
    with pytest.raises(Exception, match=match):
        fn(q, q, q)


def test_dynamic_shapes_are_rewritten_per_size_and_correct():
    """torch.compile(dynamic=True) hands over symbolic shapes: rewritten per size (test_dynamic_shapes.py)."""
    torch._dynamo.reset()
    report = Report()
    fn = torch.compile(_eager_causal, backend=make_backend(Options(), report), dynamic=True)
    for n in (5, 9):
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        torch.testing.assert_close(fn(q, k, v), _eager_causal(q, k, v))
    assert [s.variant for s in report.sites] == ["causal"] and report.sites[0].ran == {"sdpa": 2}, str(report)


def test_cli_inspect_json(tmp_path, capsys):
    src = tmp_path / "model.py"
    src.write_text(
        "import torch\n"
        "def attn(q, k, v):\n"
        "    return torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v\n"
        "def attn_inputs():\n"
        "    return tuple(torch.randn(2, 4, 13, 16) for _ in range(3))\n")
    assert cli_main(["inspect", f"{src}:attn", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["variant"] for s in report["sites"]] == ["dense"]
    assert report["sites"][0]["rewritten"] is True


def test_cli_inspect_missing_inputs(tmp_path):
    src = tmp_path / "model.py"
    src.write_text("def attn(q):\n    return q\n")
    with pytest.raises(SystemExit, match="attn_inputs"):
        cli_main(["inspect", f"{src}:attn"])


def test_cli_demo_small(capsys):
    assert cli_main(["demo", "--seq-len", "64", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "causal" in out and "faster" in out


def test_internal_error_leaves_the_graph_unchanged(monkeypatch):
    """A bug in a pass must not break the user's model: the graph runs as captured."""
    import rewrite.passes.pipeline as pipeline

    def broken(graph, plan):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pipeline, "apply_plan", broken)
    q, k, v = (torch.randn(1, 2, 11, 16) for _ in range(3))
    report = rewrite.inspect(_eager_causal, q, k, v)
    assert any("internal error" in g for g in report.skipped_graphs), report.skipped_graphs
    torch._dynamo.reset()
    torch.testing.assert_close(rewrite.compile(_eager_causal)(q, k, v), _eager_causal(q, k, v))
