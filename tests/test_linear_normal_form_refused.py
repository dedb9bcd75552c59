"""Near-misses of the linear-attention normal form (patterns/linear_normal.py), each left alone with its reason and
still equal to eager float64: a third einsum operand that is not the normaliser, reciprocals of other things, a
normaliser over half the keys, along the wrong axes or with its eps inside the key sum, a causal numerator with
a non-causal normaliser, a cumsum over a feature axis, triangles of the scores that are not m ≤ p; and a division
after the product that is not the normaliser, which stays in the graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import close_relative
from test_linear_normal_form import D, linear_sites, phi, qkv

import rewrite


# ---- near-misses: left alone with the reason ---------------------------------------------------------------
def third_operand_weight(q, k, v):  # a per-query weight that is not 1/(φQ·ΣφK)
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    w = torch.sigmoid(q.sum(-1))
    return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, w)


def reciprocal_of_something_else(q, k, v):  # 1/(φQ·ΣφQ): the queries' sum, not the keys'
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = 1 / torch.einsum("bhnd,bhd->bhn", q, q.sum(2))
    return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)


def normaliser_over_half_the_keys(q, k, v):
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = 1 / torch.einsum("bhnd,bhd->bhn", q, k[:, :, : k.shape[2] // 2].sum(2))
    return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)


def eps_inside_the_key_sum(q, k, v):  # φQ·(ΣφK + eps) = φQ·ΣφK + eps·ΣφQ: another normaliser
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = 1 / torch.einsum("bhnd,bhd->bhn", q, k.sum(2) + 0.5)
    return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)


def eps_after_the_reciprocal(q, k, v):  # 1/den + eps is no reciprocal of a normaliser
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = 1 / torch.einsum("bhnd,bhd->bhn", q, k.sum(2)) + 0.5
    return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)


def causal_normaliser_not_cumulated(q, k, v):  # causal numerator, Σ over every key in the normaliser
    q, k = phi(q), phi(k)
    s = torch.cumsum(k[..., None] * v[..., None, :], dim=2)
    z = 1 / torch.einsum("bhnd,bhd->bhn", q, k.sum(2))
    return torch.einsum("bhnd,bhnde,bhn->bhne", q, s, z)


def cumsum_over_a_feature_axis(q, k, v):
    q, k = phi(q), phi(k)
    s = torch.cumsum(k[..., None] * v[..., None, :], dim=3)
    return torch.einsum("bhnd,bhnde->bhne", q, s)


def triu_of_the_scores(q, k, v):  # anti-causal
    return (F.relu(q) @ F.relu(k).transpose(-1, -2)).triu() @ v


def strictly_lower_scores(q, k, v):  # m < p: the diagonal dropped
    return (F.relu(q) @ F.relu(k).transpose(-1, -2)).tril(-1) @ v


@pytest.mark.parametrize("fn,reason", [
    (triu_of_the_scores, "not causal or dense"), (strictly_lower_scores, "not causal or dense"),
    (third_operand_weight, "only part of einsum('bhnd,bhde,bhn->bhne') is linear attention"),
    (reciprocal_of_something_else, "no normaliser"),
    (normaliser_over_half_the_keys, "no normaliser"),
    (eps_inside_the_key_sum, "no normaliser"),
    (eps_after_the_reciprocal, "no normaliser"),
    (causal_normaliser_not_cumulated, "no normaliser"),
    (cumsum_over_a_feature_axis, "the cumsum does not run along the shared sequence axis")])
def test_near_misses_are_left_alone_with_the_reason(fn, reason):
    q, k, v = qkv(13, seed=4)
    report, lin = linear_sites(fn, q, k, v)
    assert len(lin) == 1 and not lin[0].rewritten and reason in lin[0].reason, report
    torch._dynamo.reset()
    close_relative(rewrite.compile(fn, backend="torch")(q, k, v), fn(q.double(), k.double(), v.double()),
                   torch.float32, fn.__name__)


def normaliser_pairs_batch_with_heads(q, k, v):  # with B == H this runs, and pairs query heads with key batches
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = 1 / torch.einsum("bhnd,hbd->bhn", q, k.sum(2))
    return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)


def test_a_normaliser_read_along_the_wrong_axes_is_refused():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(3, 3, 13, D, generator=g) for _ in range(3))
    report, lin = linear_sites(normaliser_pairs_batch_with_heads, q, k, v)
    assert len(lin) == 1 and not lin[0].rewritten and "no normaliser" in lin[0].reason, report
    torch._dynamo.reset()
    fn = normaliser_pairs_batch_with_heads
    close_relative(rewrite.compile(fn, backend="torch")(q, k, v), fn(q.double(), k.double(), v.double()),
                   torch.float32, "swapped")


def divided_by_something_else(q, k, v):  # ÷ a per-query value that is not the normaliser: stays in the graph
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    return torch.einsum("bhnd,bhde->bhne", q, kv) * (1 / (q.sum(-1, keepdim=True) + 1))


def test_a_division_that_is_not_the_normaliser_stays_in_the_graph():
    q, k, v = qkv(13, seed=5)
    report, (site,) = linear_sites(divided_by_something_else, q, k, v)
    assert site.rewritten and not any(n.startswith("normalised (eps") for n in site.notes), report
    assert any("not its normaliser" in n for n in site.notes), site.notes
    torch._dynamo.reset()
    close_relative(rewrite.compile(divided_by_something_else, backend="torch")(q, k, v),
                   divided_by_something_else(q.double(), k.double(), v.double()), torch.float32, "÷ other")


def test_the_users_graph_is_untouched_by_the_normal_form():
    """The rules run on a copy: finding sites (rewritten or refused) leaves the captured graph as it was."""
    from rewrite.capture import to_aten
    from rewrite.patterns import find_sites

    for fn in (third_operand_weight, normaliser_over_half_the_keys, divided_by_something_else):
        gm = to_aten(fn, qkv(11))
        before = str(gm.graph)
        sites = [s for s, _ in find_sites(gm.graph)]
        assert sites and str(gm.graph) == before
        assert all(n.graph is gm.graph for s in sites for n in s.nodes), fn.__name__


def test_a_rule_that_raises_is_in_the_report_with_the_node_it_stopped_at(monkeypatch):
    """A normal-form rule that fails with an error (a bug of ours, not a spelling refused) leaves the node as
    written; the report must say so at that node's line, not only the log."""
    import torch.nn.functional as F

    import rewrite
    from rewrite.patterns.linear_normal import NormalForm

    def linear(q, k, v):
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        z = 1 / torch.einsum("bhnd,bhd->bhn", q, k.sum(2))
        return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)

    real = NormalForm._apply

    def broken(self, node):
        if "einsum" in str(node.target) and len(node.args[1]) == 3:
            raise RuntimeError("rule bug for the test")
        return real(self, node)

    monkeypatch.setattr(NormalForm, "_apply", broken)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    report = rewrite.inspect(linear, q, k, v)
    failed = [s for s in report.sites if not s.rewritten and "normal-form rule failed" in (s.reason or "")]
    assert failed, str(report)
    assert "rule bug for the test" in failed[0].reason and "test_linear_normal_form_refused.py" in failed[0].location
