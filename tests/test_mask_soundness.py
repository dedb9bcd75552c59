"""End to end, with the concrete check switched off: each bug class of issue 10 ("Sound by
construction") as model code writes it, compiled with ``rewrite.compile`` on the torch and the
Triton backend. Every case asserts what the mask was proven to be (or that it was not proven) and
the output against an eager float64 run of the same function. Near misses (one entry more or less,
a window of w + 1, a constant that shifts the meaning) must be refused, not rounded to a family.

The masks are spelled here the way people spell them; nothing below reads the lifter's code."""

from __future__ import annotations

import pytest
import torch

from rewrite.backend import make_backend
from rewrite.options import Options
from rewrite.passes import mask_proofs, plan
from rewrite.report import Report

BACKENDS = ["torch", "triton"]
PROOFS = ("symbolic", "per-axis", "exhaustive")  # what MaskSpec.proof says of a proven structure


@pytest.fixture(autouse=True)
def _proofs_alone(monkeypatch):
    monkeypatch.setattr(plan, "CONCRETE_CHECK", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _attend(keep_fn, bias=False):
    def fn(q, k, v):
        mask = keep_fn(q.shape[-2], k.shape[-2])
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        s = s + mask if bias else s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ v
    return fn


def _compiled(fn, backend, *args):
    """The rewritten function's output on ``args`` and the report of its one capture."""
    report = Report()
    out = torch.compile(fn, backend=make_backend(Options(backend=backend), report), dynamic=False)(*args)
    assert len(report.sites) == 1, report
    return out, report.sites[0]


def _run(keep_fn, n, m, backend, bias=False):
    fn = _attend(keep_fn, bias)
    g = torch.Generator().manual_seed(n * 131 + m)
    q = torch.randn(1, 2, n, 16, generator=g)
    k, v = torch.randn(1, 2, m, 16, generator=g), torch.randn(1, 2, m, 16, generator=g)
    out, site = _compiled(fn, backend, q, k, v)
    want = fn(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5, equal_nan=True)
    assert site.rewritten, site.reason
    assert site.kernel == "triton" if backend == "triton" else site.kernel != "triton", site.kernel
    return site


def _ij(n, m):
    return torch.arange(n)[:, None], torch.arange(m)[None, :]


# ---------------------------------------------------------------- pos * c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slack, window", [(0, 3), (1, 3), (2, 4)])
def test_scaled_positions_keep_their_constant(backend, slack, window):
    # |2i − 2j| ≤ 2w + slack is |i − j| ≤ w + slack // 2: the factor 2 is not dropped (a window of 2w).
    def keep(n, m):
        i, j = torch.arange(n), torch.arange(m)
        return (i[:, None] * 2 - j[None, :] * 2).abs() <= 2 * 3 + slack

    site = _run(keep, 40, 40, backend)
    assert site.variant == "neighborhood" and site.mask_spec.window == (window,), site.mask
    assert site.proof == "symbolic"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scaled_comparison_is_not_causal(backend):
    def keep(n, m):  # 2j ≤ 3i: not m ≤ p
        i, j = torch.arange(n), torch.arange(m)
        return j[None, :] * 2 <= i[:, None] * 3

    site = _run(keep, 24, 36, backend)
    assert site.mask_spec.kind not in ("causal", "neighborhood"), site.mask


# ---------------------------------------------------------------- rounding modes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["trunc", "floor"])
def test_trunc_and_floor_differ_on_negative_values(backend, mode):
    def keep(n, m):  # trunc((i − j)/4) == 0 is |i − j| ≤ 3; floor(...) == 0 is 0 ≤ i − j ≤ 3
        i, j = _ij(n, m)
        return torch.div(i - j, 4, rounding_mode=mode) == 0

    site = _run(keep, 32, 32, backend)
    assert site.variant == "neighborhood" and site.mask_spec.window == (3,), site.mask
    assert site.mask_spec.causal == ((mode == "floor"),) and site.proof == "symbolic"


# ---------------------------------------------------------------- KV-cache decode: negative slices


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spelling, offset", [("last_n", 8), ("before_last", 7), ("narrow", 8), ("stepped", 8)])
def test_decode_positions_from_negative_slices(backend, spelling, offset):
    def keep(n, m):
        pos = torch.arange(m)
        q_pos = {"last_n": pos[-n:], "before_last": pos[-n - 1:-1], "narrow": pos.narrow(0, -n, n),
                 "stepped": torch.arange(2 * m)[::2][-n:] // 2}[spelling]
        return pos[None, :] <= q_pos[:, None]

    site = _run(keep, 4, 12, backend)
    assert site.variant == "causal" and site.mask_spec.offset == offset, site.mask


# ---------------------------------------------------------------- low-precision positions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, start, exact", [(torch.float16, 0, True), (torch.bfloat16, 200, True),
                                                 (torch.bfloat16, 250, False)])
def test_positions_in_a_low_precision_dtype(backend, dtype, start, exact):
    # bf16 holds every integer up to 256 only: 250..265 round (257 → 256), so ties appear.
    def keep(n, m):
        pos = torch.arange(start, start + n).to(dtype)
        return pos[None, :] <= pos[:, None]

    site = _run(keep, 16, 16, backend)
    if exact:
        assert site.variant == "causal" and site.mask_spec.offset == 0 and site.proof == "symbolic", site.mask
    else:
        assert site.mask_spec.kind != "causal" and site.proof not in PROOFS, site.mask


def test_fp16_positions_above_2048_are_not_proven():
    def keep(n, m):
        pos = torch.arange(n, dtype=torch.float16)
        return pos[None, :] <= pos[:, None]

    site = _run(keep, 2100, 2100, "torch")
    assert site.mask_spec.kind != "causal" and site.proof not in PROOFS, site.mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["half", "third"])
def test_float_arithmetic_on_positions(backend, op):
    def keep(n, m):  # x·0.5 is exact (blocks of 2); x/3 is not integer arithmetic and is refused
        i, j = (x.to(torch.float32) for x in _ij(n, m))
        if op == "half":
            return torch.floor(i * 0.5) == torch.floor(j * 0.5)
        return i / 3 >= j / 3

    site = _run(keep, 20, 20, backend)
    if op == "half":
        assert site.mask_spec.kind == "blocked" and site.mask_spec.block == (2,), site.mask
    else:  # (the tensor is causal here: the op may use that, re-checking every tensor, but it is no proof)
        assert site.proof not in PROOFS, site.mask


# ---------------------------------------------------------------- in-place edits


def _tril(n, m):
    return torch.ones(n, m, dtype=torch.bool).tril()


def _edited(edit):
    def keep(n, m):
        k = _tril(n, m) if not edit.startswith("window") else None
        if edit.startswith("window"):
            i, j = _ij(n, m)
            k = (i - j >= 0) & (i - j <= 5)
        if edit in ("sink", "window_sink"):
            k[:, 0] = True  # an attention sink (a no-op on tril)
        elif edit == "hole":
            k[5, 3] = False
        elif edit == "noop":
            k[2, 5] = False
        elif edit == "diagonal":
            k.fill_diagonal_(False)
        elif edit == "rows":
            k[:2].copy_(torch.ones(2, m, dtype=torch.bool))
        elif edit == "window_extra":
            k[9, 1] = True
        elif edit == "window_masked":
            k.masked_fill_(torch.eye(n, m, dtype=torch.bool), False)
        return k
    return keep


def _folded(site, sparse: bool):
    """A position-only mask of no family: not proven, folded to its constant, run on the exact
    block-map path (block-sparse when at most half is kept, else dense with the mask)."""
    assert site.mask_spec.kind in ("arbitrary", "dense") and site.proof not in PROOFS, site.mask
    assert any("folded to a constant" in x for x in site.notes), site.notes
    assert (site.variant == "block_sparse") == sparse, site.variant


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["sink", "noop", "diagonal", "window_masked", "hole", "rows", "window_sink",
                                  "window_extra"])
def test_edited_masks(backend, edit):
    site = _run(_edited(edit), 40, 40, backend)
    if edit in ("sink", "noop", "diagonal"):  # no-op edits of tril, and its diagonal removed: causal
        assert site.variant == "causal" and site.proof == "exhaustive", site.mask
        assert site.mask_spec.offset == (-1 if edit == "diagonal" else 0)
    elif edit == "window_masked":  # a causal window 0..5 without its diagonal: the window 1..5
        assert site.variant == "neighborhood" and site.proof == "symbolic", site.mask
        assert (site.mask_spec.window, site.mask_spec.offset, site.mask_spec.causal) == ((4,), -1, (True,))
    else:
        _folded(site, sparse=edit.startswith("window"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_bias(backend):
    def bias(n, m):  # the last key is always kept (a sink at the end)
        b = torch.zeros(n, m).masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
        b[..., -1] = 0.0
        return b

    _folded(_run(bias, 40, 40, backend, bias=True), sparse=False)


# ---------------------------------------------------------------- no sampled proofs


def _band_with_hole(w, hole):
    def keep(n, m):
        i, j = _ij(n, m)
        k = (i - j).abs() <= w
        k[hole] = False
        return k
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_band_with_a_hole_above_the_exhaustive_limit_is_not_proven(backend, monkeypatch):
    monkeypatch.setattr(mask_proofs, "EXHAUSTIVE_LIMIT", 1000)  # 40·40 pairs: over it, as N = 10⁴ is
    site = _run(_band_with_hole(3, (20, 22)), 40, 40, backend)
    assert site.mask_spec.kind == "arbitrary" and site.proof not in PROOFS, site.mask


def test_band_with_one_hole_at_10001_is_not_a_window():
    n, w, hole = 10001, 16, (5000, 5003)
    fn = _attend(_band_with_hole(w, hole))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g) for _ in range(3))
    out, site = _compiled(fn, "torch", q, k, v)
    assert site.mask_spec.kind != "neighborhood" and site.variant != "neighborhood", site
    assert site.proof not in PROOFS, site
    rows = torch.tensor([0, 1, 4999, 5000, 5001, n - 1])
    i, j = rows[:, None], torch.arange(n)[None, :]
    keep = (i - j).abs() <= w
    keep[3, hole[1]] = False
    s = (q[0, 0, rows].double() @ k[0, 0].double().T) * 8 ** -0.5
    want = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v[0, 0].double()
    torch.testing.assert_close(out[0, 0, rows].double(), want, atol=2e-5, rtol=2e-5)
