"""Dynamic shapes: a graph with symbolic sizes is rewritten per concrete size, never left alone.

Dynamo hands over a graph with symbolic sizes on the second distinct length (automatic dynamic),
under ``dynamic=True`` and for ``mark_dynamic`` inputs. Over 20 lengths (odd ones too) every
call must run the rewritten site, equal eager float64, and cost at most 2 Dynamo compiles; the
report keeps one entry per site and plan (noted with its sizes), not one per length. A plan that
depends on the size (a window covering every key at small N is dense there) is chosen per size.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

import rewrite
import rewrite.backend
import rewrite.capture
import rewrite.specialise
from rewrite.backend import make_backend
from rewrite.options import Options
from rewrite.report import Report

LENGTHS = (5, 9, 16, 3, 17, 31, 8, 23, 12, 33, 7, 41, 2, 27, 13, 64, 19, 50, 11, 37)  # 20 lengths
WINDOW = 6
TOL = {"atol": 1e-10, "rtol": 1e-8}  # float64 in, float64 out


def causal_by_hand(q, k, v):
    n, d = q.shape[-2], q.shape[-1]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * d**-0.5
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return weights @ v


def windowed_by_hand(q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n, device=q.device)
    far = (pos.view(-1, 1) - pos.view(1, -1)).abs() > WINDOW
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.masked_fill(far, float("-inf")).softmax(-1) @ v


def _qkv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    dynamo_counters.clear()
    yield
    torch._dynamo.reset()


def _compiles() -> int:
    return dynamo_counters["stats"]["unique_graphs"]


def _run_lengths(fn, compiled, lengths=LENGTHS):
    for i, n in enumerate(lengths):
        args = _qkv(n, seed=i)
        torch.testing.assert_close(compiled(*args), fn(*args), **TOL)


def _calls(report: Report) -> int:
    return sum(sum(s.ran.values()) for s in report.sites)


@pytest.mark.parametrize("fn, variants", [(causal_by_hand, {"causal"}),
                                          (windowed_by_hand, {"dense", "neighborhood"})])
def test_twenty_lengths_every_call_rewritten_two_compiles(fn, variants):
    report = Report()
    compiled = torch.compile(fn, backend=make_backend(Options(), report))
    _run_lengths(fn, compiled)
    assert _compiles() <= 2, dynamo_counters["stats"]
    assert all(s.rewritten for s in report.sites), str(report)
    assert {s.variant for s in report.sites} == variants, str(report)
    assert _calls(report) == len(LENGTHS), [s.ran for s in report.sites]  # every call ran a rewritten site
    dynamic = [s for s in report.sites if s.graph == 1]
    # One entry per plan, not per length: the static first graph's site, and the dynamic graph's.
    assert len(report.sites) == 1 + len(dynamic) and len(dynamic) == len(variants), str(report)
    notes = " ".join(n for s in dynamic for n in s.notes)
    assert "dynamic graph: specialised for sizes" in notes and f"{len(LENGTHS) - 1} cached" in notes, notes


def test_torch_compile_backend_string_logs_every_specialisation(caplog):
    compiled = torch.compile(causal_by_hand, backend="rewrite")
    with caplog.at_level(logging.INFO, logger="rewrite"):
        _run_lengths(causal_by_hand, compiled)
    assert _compiles() <= 2, dynamo_counters["stats"]
    messages = [r.getMessage() for r in caplog.records]
    specialised = [m for m in messages if "specialised for input sizes" in m]
    assert len(specialised) == len(LENGTHS) - 1, messages
    assert all("1 site(s), 1 rewritten" in m for m in specialised), specialised
    assert not any("left alone" in m for m in messages), messages


def test_rewrite_compile_uses_default_dynamism(caplog):
    compiled = rewrite.compile(causal_by_hand)
    with caplog.at_level(logging.INFO, logger="rewrite"):
        _run_lengths(causal_by_hand, compiled)
    assert _compiles() <= 2, dynamo_counters["stats"]
    specialised = [r.getMessage() for r in caplog.records if "specialised for input sizes" in r.getMessage()]
    assert len(specialised) == len(LENGTHS) - 1 and all("1 rewritten" in m for m in specialised), specialised
    report = rewrite.inspect(causal_by_hand, *_qkv(21, seed=99))
    assert [s.variant for s in report.sites] == ["causal"] and report.sites[0].rewritten, str(report)


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_symbolic_from_the_first_call(how):
    report = Report()
    compiled = torch.compile(causal_by_hand, backend=make_backend(Options(), report),
                             dynamic=True if how == "dynamic=True" else None)
    lengths = (7, 12, 5, 30, 12, 7)  # repeats hit the cache
    for i, n in enumerate(lengths):
        args = _qkv(n, seed=i)
        if how == "mark_dynamic":
            for t in args:
                torch._dynamo.mark_dynamic(t, 2)
        torch.testing.assert_close(compiled(*args), causal_by_hand(*args), **TOL)
    assert _compiles() == 1, dynamo_counters["stats"]
    assert len(report.sites) == 1 and report.sites[0].rewritten, str(report)
    assert report.sites[0].ran == {"sdpa": len(lengths)}, report.sites[0].ran
    assert "4 cached, 4 built" in " ".join(report.sites[0].notes), report.sites[0].notes


def test_a_plan_that_depends_on_the_size_is_chosen_per_size():
    """A window of 6 covers every key when N <= 7: dense there, a neighborhood beyond; going back
    and forth between the two must run each size's own plan (both right)."""
    report = Report()
    compiled = torch.compile(windowed_by_hand, backend=make_backend(Options(), report), dynamic=True)
    lengths = (40, 5, 40, 7, 9, 5, 33)
    _run_lengths(windowed_by_hand, compiled, lengths)
    by_variant = {s.variant: s for s in report.sites}
    assert set(by_variant) == {"dense", "neighborhood"}, str(report)
    assert by_variant["dense"].ran == {"sdpa": 3}, by_variant["dense"].ran  # N = 5, 7, 5
    assert sum(by_variant["neighborhood"].ran.values()) == 4, by_variant["neighborhood"].ran  # 40, 40, 9, 33
    dense_note = next(n for n in by_variant["dense"].notes if n.startswith("dynamic graph"))
    assert "(n=5, m=5), (n=7, m=7)" in dense_note and "n=40" not in dense_note, dense_note


def test_a_full_cache_drops_the_least_recently_used_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(rewrite.specialise, "CACHE_SIZE", 2)
    report = Report()
    compiled = torch.compile(causal_by_hand, backend=make_backend(Options(), report), dynamic=True)
    with caplog.at_level(logging.INFO, logger="rewrite"):
        _run_lengths(causal_by_hand, compiled, (5, 6, 7, 5))  # 5 was dropped by 7: rewritten again
    dropped = [r for r in caplog.records if "least recently used" in r.getMessage()]
    assert [r.levelno for r in dropped] == [logging.WARNING], dropped  # warned once, then counted
    assert report.sites[0].ran == {"sdpa": 4}, report.sites[0].ran
    note = next(n for n in report.sites[0].notes if n.startswith("dynamic graph"))
    assert "2 cached, 4 built, 2 dropped" in note, note


@pytest.mark.parametrize("symbolic", [True, False], ids=["traced-from-symbolic", "lowered-per-size"])
def test_both_lowerings_of_a_size_rewrite_alike(symbolic, monkeypatch, caplog):
    """Each size is traced from one symbolic ATen graph, or (where that trace fails or assumes a size)
    lowered on its own: the same sites, plans and answers either way."""
    if not symbolic:
        monkeypatch.setattr(rewrite.backend, "to_symbolic_aten", lambda gm: None)
    report = Report()
    compiled = torch.compile(windowed_by_hand, backend=make_backend(Options(), report), dynamic=True)
    with caplog.at_level(logging.INFO, logger="rewrite"):
        _run_lengths(windowed_by_hand, compiled, (5, 40, 7, 33))
    way = "evaluated from its symbolic ATen graph" if symbolic else "lowered on its own"
    assert any(way in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert {s.variant: sum(s.ran.values()) for s in report.sites} == {"dense": 2, "neighborhood": 2}, str(report)


def test_a_symbolic_capture_that_assumes_a_size_is_refused(monkeypatch):
    """A guard added while lowering would not be checked by Dynamo: such a symbolic graph is not used."""
    graphs = []
    torch.compile(causal_by_hand, backend=lambda gm, _: graphs.append(gm) or gm.forward, dynamic=True)(*_qkv(9, 0))
    assert rewrite.capture.to_symbolic_aten(graphs[0]) is not None
    lower = rewrite.capture.to_aten

    def lower_and_assume(gm, args):
        out = lower(gm, args)
        fake = next(a for a in args if isinstance(a, torch.Tensor))
        assert bool(fake.shape[-2] > 3)  # a guard on N
        return out

    monkeypatch.setattr(rewrite.capture, "to_aten", lower_and_assume)
    assert rewrite.capture.to_symbolic_aten(graphs[0]) is None


def test_gradients_through_a_dynamic_graph():
    report = Report()
    compiled = torch.compile(causal_by_hand, backend=make_backend(Options(), report))
    for i, n in enumerate((6, 11, 19)):
        args = [t.requires_grad_() for t in _qkv(n, seed=i)]
        grads = torch.autograd.grad(compiled(*args).square().sum(), args)
        want = torch.autograd.grad(causal_by_hand(*args).square().sum(), args)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, **TOL)
    assert [s.graph for s in report.sites] == [0, 1] and all(s.rewritten for s in report.sites), str(report)
    assert report.sites[1].ran == {"sdpa": 2, "backward: fused sdpa": 2}, report.sites[1].ran  # two sizes


def test_triton_kernels_per_size():
    """backend="triton" (the interpreter on a CPU): each size runs its own plan's Triton kernel."""
    report = Report()
    compiled = torch.compile(windowed_by_hand, backend=make_backend(Options(backend="triton"), report))
    for i, n in enumerate((5, 19, 33)):
        args = [t.float() for t in _qkv(n, seed=i)]
        want = windowed_by_hand(*(t.double() for t in args)).float()
        torch.testing.assert_close(compiled(*args), want, atol=1e-5, rtol=1e-4)
    assert [(s.graph, s.variant, s.kernel) for s in report.sites] == [(0, "dense", "triton"),
                                                                       (1, "neighborhood", "triton")], str(report)
    assert report.sites[1].ran == {"triton": 2}, report.sites[1].ran


def test_inductor_on_a_dynamic_graph_compiles_each_size():
    """inductor=True on a graph rewritten per size: each size's rewritten graph goes to Inductor
    (the rewrite op inside it, run on every call); the note is said once per graph."""
    report = Report()
    compiled = torch.compile(causal_by_hand, backend=make_backend(Options(inductor=True), report))
    _run_lengths(causal_by_hand, compiled, lengths=(5, 9, 12))
    assert _compiles() <= 2, dynamo_counters["stats"]
    assert _calls(report) == 3 and all(s.rewritten for s in report.sites), str(report)
    assert report.notes == [f"graph {g}: Inductor compiled the rest of the graph (inductor=True); the rewrite:: ops "
                            "stay opaque custom ops" for g in (0, 1)], report.notes


def test_a_size_that_recurs_is_compiled_once_on_its_third_call():
    """auto on a per-size graph: a one-off size stays an fx graph (each decode step's length would be
    one Inductor compile each), a size that recurs is handed to ``compile_hot`` once, on call 3."""
    hot_calls = []

    def build(args):
        return (lambda *a: ("fx", a[0])), [], f"graph for {args[0]}"

    def compile_hot(graph, args):
        hot_calls.append(graph)
        return lambda *a: ("inductor", a[0])

    runner = rewrite.specialise.SpecialisedGraph(0, build, None, compile_hot)
    assert [runner(7)[0] for _ in range(5)] == ["fx", "fx", "inductor", "inductor", "inductor"]
    assert hot_calls == ["graph for 7"]
    assert [runner(8)[0] for _ in range(2)] == ["fx", "fx"] and hot_calls == ["graph for 7"]
    never = rewrite.specialise.SpecialisedGraph(0, lambda args: ((lambda *a: ("fx",)), [], None), None, compile_hot)
    assert {never(7)[0] for _ in range(4)} == {"fx"} and hot_calls == ["graph for 7"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_recurring_size_on_the_gpu_goes_to_inductor():
    report = Report()

    def block(q, k, v):  # something around the site for Inductor to fuse
        return torch.nn.functional.gelu(causal_by_hand(q, k, v))

    compiled = torch.compile(block, backend=make_backend(Options(), report))
    for n in (5, 9, 9, 9, 9):
        q, k, v = (t.cuda() for t in _qkv(n, seed=n))
        torch.testing.assert_close(compiled(q, k, v).cpu(), block(*(t.cpu() for t in (q, k, v))), **TOL)
    assert any("Inductor compiled a size of a graph rewritten per size on its call 3" in n for n in report.notes), \
        report.notes
    assert any("until a size has run 3 times" in n for n in report.notes), report.notes


def test_many_sizes_say_what_each_costs_and_what_avoids_it(caplog):
    """A graph that keeps meeting new sizes (generate() with a DynamicCache: one per decode step) is told,
    once, that each size is a new lowering and what keeps decode at one size."""
    report = Report()
    runner = rewrite.specialise.SpecialisedGraph(3, lambda args: ((lambda *a: a[0]), [], None), report)
    with caplog.at_level(logging.WARNING, logger="rewrite"):
        for n in range(rewrite.specialise.MANY_SIZES + 4):
            runner(n)
    said = [r.getMessage() for r in caplog.records if "sizes rewritten so far" in r.getMessage()]
    assert len(said) == 1 and "cache_implementation='static'" in said[0], said
    assert [n for n in report.notes if n.startswith("graph 3: dynamic:")] == [said[0].removeprefix("rewrite: ")]
