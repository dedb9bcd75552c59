"""Causal linear attention written as a Python loop over chunks (unrolled by torch.compile) recognised as one
causal linear site, against an eager float64 quadratic causal reference; near misses (a decay, a state that
skips or repeats a chunk, a mask other than l' <= l, overlapping or gapped chunks, a cast into the buffer, a
state from other keys) are left alone, whole, with the reason, and compute what eager computes. Slice writes
are read for what the functional graph computes: disjoint writes in any order, a write overwritten whole, or a
buffer whose values are never read still make the cat of the chunks, and are rewritten."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite
from rewrite.codegen.linear_ops import linear_reference

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=(Phase.explicit, Phase.reuse, Phase.generate))


def phi_elu(x):
    return F.elu(x) + 1


def _tril(C, like, dtype=torch.bool):
    return torch.tril(torch.ones(C, C, dtype=dtype, device=like.device))


# ---- spellings: make(C) → fn(q, k, v); q, k, v are [B, H, N, D] unless the layout says [B, N, H, D] ---------
def cat_masked_fill(C):  # the reference as users write it: new_zeros state, masked_fill, @, torch.cat
    def fn(q, k, v):
        fq, fk = phi_elu(q), phi_elu(k)
        B, H, N, D = q.shape
        kv = q.new_zeros(B, H, D, v.shape[-1])
        mask = _tril(C, q)
        outs = []
        for s in range(0, N, C):
            qi, ki, vi = fq[:, :, s:s + C], fk[:, :, s:s + C], v[:, :, s:s + C]
            n = qi.shape[2]
            intra = (qi @ ki.transpose(-1, -2)).masked_fill(~mask[:n, :n], 0) @ vi
            outs.append(qi @ kv + intra)
            kv = kv + ki.transpose(-1, -2) @ vi
        return torch.cat(outs, dim=2)
    return fn


def slice_assign_inplace(C):  # torch.zeros state updated in place, tril multiply, written into an empty buffer
    def fn(q, k, v):
        fq, fk = phi_elu(q), phi_elu(k)
        B, H, N, D = q.shape
        kv = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype, device=q.device)
        o = torch.empty_like(v)
        mask = _tril(C, q, q.dtype)
        for s in range(0, N, C):
            e = min(s + C, N)
            qi, ki, vi = fq[:, :, s:e], fk[:, :, s:e], v[:, :, s:e]
            o[:, :, s:e] = qi @ kv + ((qi @ ki.transpose(-1, -2)) * mask[:e - s, :e - s]) @ vi
            kv += ki.transpose(-1, -2) @ vi
        return o
    return fn


def einsum_where_scaled(C):  # einsum, where(), no state for the first chunk, a scale on both parts
    def fn(q, k, v):
        fq, fk = F.relu(q), F.relu(k)
        N, scale = q.shape[2], q.shape[-1] ** -0.5
        keep = _tril(C, q)
        outs, kv = [], None
        for s in range(0, N, C):
            qi, ki, vi = fq[:, :, s:s + C], fk[:, :, s:s + C], v[:, :, s:s + C]
            n = qi.shape[2]
            scores = torch.einsum("bhld,bhmd->bhlm", qi, ki) * scale
            o = torch.einsum("bhlm,bhmf->bhlf", torch.where(keep[:n, :n], scores, 0.0), vi)
            if kv is not None:
                o = torch.einsum("bhld,bhdf->bhlf", qi, kv) * scale + o
            outs.append(o)
            kvi = torch.einsum("bhmd,bhmf->bhdf", ki, vi)
            kv = kvi if kv is None else kv + kvi
        return torch.cat(outs, 2)
    return fn


def bnhd_state_transposed(C):  # [B, N, H, D] layout, chunks along dim 1, the state kept as [F, D]
    def fn(q, k, v):
        N = q.shape[1]
        vk = torch.zeros(q.shape[0], q.shape[2], v.shape[-1], q.shape[-1], dtype=q.dtype, device=q.device)
        outs = []
        for s in range(0, N, C):
            qi, ki, vi = q[:, s:s + C], k[:, s:s + C], v[:, s:s + C]
            n = qi.shape[1]
            w = torch.einsum("blhd,bmhd->bhlm", qi, ki) * _tril(n, q, q.dtype)
            inter = torch.einsum("blhd,bhfd->blhf", qi, vk)
            outs.append(torch.einsum("bhlm,bmhf->blhf", w, vi) + inter)
            vk = vk + torch.einsum("bmhf,bmhd->bhfd", vi, ki)
        return torch.cat(outs, dim=1)
    return fn


# name: (make, φ, scale(D), layout)
SPELLINGS = {
    "cat_masked_fill": (cat_masked_fill, phi_elu, lambda d: 1.0, "bhnd"),
    "slice_assign_inplace": (slice_assign_inplace, phi_elu, lambda d: 1.0, "bhnd"),
    "einsum_where_scaled": (einsum_where_scaled, F.relu, lambda d: d ** -0.5, "bhnd"),
    "bnhd_state_transposed": (bnhd_state_transposed, lambda x: x, lambda d: 1.0, "bnhd"),
}


def make_inputs(b, h, n, d, f, seed, dtype, layout="bhnd"):
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, n) if layout == "bhnd" else (b, n, h)
    q, k = (torch.randn(*shape, d, generator=g) for _ in range(2))
    v = torch.randn(*shape, f, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v))


def quadratic_reference(name, q, k, v):
    """Eager float64 causal linear attention over the whole sequences, the quadratic form."""
    _, phi, scale, layout = SPELLINGS[name]
    q, k, v = (t.double() for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = linear_reference(phi(q) * scale(q.shape[-1]), phi(k), v, causal=True, normalize=False, eps=0.0)
    return out.transpose(1, 2) if layout == "bnhd" else out


def run(name, dtype, n, C, d, f, b, h, seed):
    make, *_, layout = SPELLINGS[name]
    fn = make(C)
    q, k, v = make_inputs(b, h, n, d, f, seed, dtype, layout)
    want = quadratic_reference(name, q, k, v)
    close_relative(fn(q.double(), k.double(), v.double()), want, torch.float64, f"{name}: eager loop vs quadratic")
    report = rewrite.inspect(fn, q, k, v, backend="torch")
    assert len(report.sites) == 1, report
    (s,) = report.sites
    assert s.variant == "linear" and s.rewritten and s.mask == "causal m <= p", report
    assert "loop over" in s.spelling and s.shapes["n"] == n, report
    chunks = -(-n // C)
    assert any(f"loop over chunks: {chunks} chunks of {C}" in note for note in s.notes), s.notes
    torch._dynamo.reset()
    got = rewrite.compile(fn, backend="torch")(q, k, v)
    assert got.dtype == dtype
    close_relative(got, want, dtype, f"{name} {dtype}")


@settings(max_examples=6, **SETTINGS)
@given(name=st.sampled_from(sorted(SPELLINGS)), chunks=st.integers(2, 5), C=st.sampled_from([8, 12, 16]),
       rest=st.integers(1, 3), d=st.sampled_from([16, 24, 32, 64]), f=st.sampled_from([16, 20, 40]),
       bh=st.sampled_from([(1, 2), (2, 1), (2, 3)]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_loop_spellings(name, chunks, C, rest, d, f, bh, dtype, seed):
    n = (chunks - 1) * C + 2 * rest + 1  # odd, not a multiple of C (a last chunk of one position: not matched)
    run(name, dtype, n, C, d, f, *bh, seed)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_each_loop_spelling_once(name):
    run(name, torch.float32, 37, 8, 16, 12, 1, 2, 0)


def test_rewritten_graph_has_no_chunk_bodies():
    """In the functional graph (rewrite/capture.py) the state updates are adds and the slice assignments a
    slice_scatter chain: all of it dies with the site, one op and no product left."""
    from rewrite.capture import to_aten
    from rewrite.passes.pipeline import rewrite_graph

    aten = torch.ops.aten
    q, k, v = make_inputs(1, 2, 29, 16, 16, 3, torch.float32)
    gm = to_aten(slice_assign_inplace(8), (q, k, v))
    assert aten.slice_scatter.default in {n.target for n in gm.graph.nodes}
    gm, reports = rewrite_graph(gm, "torch", (q, k, v))
    assert [r.rewritten for r in reports] == [True]
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.rewrite.linear_attention.default in targets
    assert not {aten.matmul.default, aten.slice_scatter.default, aten.copy.default} & targets, gm.graph
    close_relative(gm(q, k, v), quadratic_reference("slice_assign_inplace", q, k, v), torch.float32, "fx")


# ---- near misses: left alone, whole, with the reason ------------------------------------------------------
C_NEG = 8


def _loop(q, k, v, *, state_keys=None, update=None, mask=None, ranges=None, out="cat", order=None,
          buffer=torch.zeros_like, first=None):
    """The cat/slice-assignment loop with one thing changed. ``out="buffer"``: each chunk is written into
    ``buffer(v)`` by slice assignment, in the loop (or afterwards, in ``order``), after ``first(o)``."""
    fq, fk = phi_elu(q), phi_elu(k)
    sk = fk if state_keys is None else state_keys(k)
    N = q.shape[2]
    kv = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    keep = _tril(C_NEG, q) if mask is None else mask(q)
    ranges = ranges or [(s, min(s + C_NEG, N)) for s in range(0, N, C_NEG)]
    outs, o = [], buffer(v)
    if first is not None:
        first(o)
    for i, (s, e) in enumerate(ranges):
        qi, ki, vi = fq[:, :, s:e], fk[:, :, s:e], v[:, :, s:e]
        n = e - s
        piece = qi @ kv + (qi @ ki.transpose(-1, -2)).masked_fill(~keep[:n, :n], 0) @ vi
        outs.append(piece)
        if out == "buffer" and order is None:
            o[:, :, s:e] = piece
        prod = sk[:, :, s:e].transpose(-1, -2) @ vi
        kv = kv + prod if update is None else update(i, kv, prod, sk[:, :, s:e], vi)
    for i in order or []:
        o[:, :, ranges[i][0]:ranges[i][1]] = outs[i]
    return torch.cat(outs, 2) if out == "cat" else o


def decay(q, k, v):
    return _loop(q, k, v, update=lambda i, kv, prod, ki, vi: 0.9 * kv + prod)


def skips_a_chunk(q, k, v):
    return _loop(q, k, v, update=lambda i, kv, prod, ki, vi: kv if i == 1 else kv + prod)


def adds_a_chunk_twice(q, k, v):
    return _loop(q, k, v, update=lambda i, kv, prod, ki, vi: kv + prod + ki.transpose(-1, -2) @ vi if i == 0
                 else kv + prod)


def mask_not_causal(q, k, v):  # tril(diagonal=1): each position also sees the next one of its chunk
    return _loop(q, k, v, mask=lambda q: torch.ones(C_NEG, C_NEG, dtype=torch.bool, device=q.device).tril(1))


def chunks_overlap(q, k, v):  # written into a buffer: the later chunk overwrites one position
    return _loop(q, k, v, ranges=[(0, 8), (7, 15), (15, 23), (23, 29)], out="buffer")


def chunks_leave_a_gap(q, k, v):  # position 8 is never computed (the zero buffer keeps it zero)
    return _loop(q, k, v, ranges=[(0, 8), (9, 17), (17, 25), (25, 29)], out="buffer")


def state_from_other_keys(q, k, v):
    return _loop(q, k, v, state_keys=F.relu)


def cat_of_overlapping_chunks(q, k, v):  # concatenated: position 7 is computed twice, the output is too long
    return _loop(q, k, v, ranges=[(0, 8), (7, 15), (15, 23), (23, 29)])


def written_with_a_cast(q, k, v):  # a float64 buffer: each chunk is cast on its way in
    return _loop(q, k, v, out="buffer", buffer=lambda v: torch.zeros_like(v, dtype=torch.float64))


def zeroed_after_the_loop(q, k, v):  # a later write of zeros over the end of chunk 0 and the start of chunk 1
    o = _loop(q, k, v, out="buffer")
    o[:, :, 7:9] = 0.0
    return o


@pytest.mark.parametrize("fn,reason", [
    (decay, "something other than chunk products"), (skips_a_chunk, "not exactly chunks"),
    (adds_a_chunk_twice, "twice"), (mask_not_causal, "not l' <= l"),
    (chunks_overlap, "the chunks overlap: the write of [7, 15) overwrites positions [7, 8) of the earlier write of "
                     "[0, 8)"),
    (chunks_leave_a_gap, "the chunks leave a gap: no chunk is written to positions [8, 9)"),
    (cat_of_overlapping_chunks, "the chunks overlap: chunk 1 starts at position 7"),
    (written_with_a_cast, "cast"),
    (zeroed_after_the_loop, "the chunks overlap: the write of [7, 9) overwrites positions [7, 8)"),
    (state_from_other_keys, "very keys and values")])
def test_near_misses_are_left_alone(fn, reason):
    q, k, v = make_inputs(1, 2, 29, 16, 12, 1, torch.float32)
    report = rewrite.inspect(fn, q, k, v)
    assert len(report.sites) == 1, report
    (s,) = report.sites
    assert s.variant == "linear" and not s.rewritten, report
    assert "loop over chunks" in s.reason and reason in s.reason, s.reason
    torch._dynamo.reset()
    close_relative(rewrite.compile(fn)(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32,
                   fn.__name__)


# ---- slice writes whose result is the cat of the chunks: rewritten -------------------------------------------
def written_in_reverse(q, k, v):  # disjoint writes commute: the buffer is the same whatever their order
    return _loop(q, k, v, out="buffer", order=[3, 2, 1, 0], buffer=torch.empty_like)


def written_twice(q, k, v):  # chunk 1 written again with the same value: the first write is never seen
    return _loop(q, k, v, out="buffer", order=[0, 1, 2, 1, 3])


def first_write_overwritten(q, k, v):  # o[:, :, 2:6] = 1 is overwritten whole by chunk 0: it never shows
    def first(o):
        o[:, :, 2:6] = 1.0
    return _loop(q, k, v, out="buffer", first=first)


def buffer_is_an_input_copy(q, k, v):  # the buffer's values are never read when the writes tile it
    return _loop(q, k, v, out="buffer", buffer=lambda v: v.clone() * 3)


@pytest.mark.parametrize("fn", [written_in_reverse, written_twice, first_write_overwritten, buffer_is_an_input_copy])
def test_slice_writes_that_tile_are_rewritten(fn):
    q, k, v = make_inputs(1, 2, 29, 16, 12, 2, torch.float32)
    torch._dynamo.reset()
    report = rewrite.inspect(fn, q, k, v)
    (s,) = report.sites
    assert s.variant == "linear" and s.rewritten and s.mask == "causal m <= p", report
    assert "slice assignment" in s.spelling and any("4 chunks of 8" in n for n in s.notes), s
    torch._dynamo.reset()
    want = quadratic_reference("cat_masked_fill", q, k, v)
    close_relative(rewrite.compile(fn)(q, k, v), want, torch.float32, fn.__name__)
    close_relative(fn(q.double(), k.double(), v.double()), want, torch.float64, "eager")
