"""Linear attention whose mask is edited after it is built (issue 10, item 2): ``keep = tril(...)`` then
``keep[5, 3] = False`` (a hole), ``keep[2, 7] = True`` (an entry above the diagonal), ``keep[:, 0] = True``
(an attention-sink column: a no-op on a causal base, not on an upper-triangular one), or an edit that
changes nothing. The capture is functional, so the edit is part of the mask's value, and the value decides:
the O(N) causal form runs only where the mask is exactly m <= p (or all kept); anything else is left alone
with a reason naming the mask. Every recogniser is covered: the quadratic form (masked_fill, multiply,
where; normalised or not; relu and elu+1), the chunked form, the loop over chunks, and the cumsum form
(which has no mask: an edit of its state is not linear attention, an edit of its keys is just its keys).

Each case asserts whether the site was rewritten and compares the compiled output with eager float64. The
expected verdict comes from the test's own rule: build the mask eagerly and compare it with ``tril``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=(Phase.explicit, Phase.reuse, Phase.generate))
EPS = 1e-6
aten = torch.ops.aten


def phi_elu(x):
    return F.elu(x) + 1


PHI = {"relu": F.relu, "elu+1": phi_elu}


# ---- masks: a base, then an edit, in place or functional ----------------------------------------------------
def base(kind: str, n: int) -> torch.Tensor:
    i = torch.arange(n)
    if kind == "tril":
        return torch.tril(torch.ones(n, n, dtype=torch.bool))
    if kind == "arange":
        return i[:, None] >= i[None, :]
    if kind == "upper":  # anti-causal: m >= p
        return torch.triu(torch.ones(n, n, dtype=torch.bool))
    if kind == "tril+1":  # one diagonal too many: causal only once the superdiagonal is dropped
        return torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    raise ValueError(kind)


# edit: (in place, functional) — each takes and returns the [n, n] bool mask
EDITS = {
    "hole": (lambda k: k.__setitem__((5, 3), False),
             lambda k: k & ~((_r(k) == 5) & (_c(k) == 3))),
    "extra": (lambda k: k.__setitem__((2, 7), True),
              lambda k: k | ((_r(k) == 2) & (_c(k) == 7))),
    "sink": (lambda k: k.__setitem__((slice(None), 0), True),
             lambda k: k | (_c(k) == 0)),
    "noop": (lambda k: k.__setitem__((5, 3), True),
             lambda k: torch.where((_r(k) == 5) & (_c(k) == 3), True, k)),
    "drop_superdiagonal": (lambda k: k.__setitem__((torch.arange(k.shape[0] - 1), torch.arange(1, k.shape[0])), False),
                           lambda k: k.index_put((torch.arange(k.shape[0] - 1), torch.arange(1, k.shape[0])),
                                                 torch.tensor(False))),
}


def _r(k):
    return torch.arange(k.shape[0])[:, None]


def _c(k):
    return torch.arange(k.shape[1])[None, :]


def edited(kind: str, edit: str, mode: str, n: int) -> torch.Tensor:
    keep = base(kind, n)
    inplace, functional = EDITS[edit]
    if mode == "inplace":
        inplace(keep)
        return keep
    return functional(keep)


def apply_mask(s, keep, style):
    if style == "masked_fill":
        return s.masked_fill(~keep, 0.0)
    if style == "multiply":
        return s * keep.to(s.dtype)
    return torch.where(keep, s, 0.0)


def quadratic(kind, edit, mode, style, norm, phi):
    def fn(q, k, v):
        fq, fk = PHI[phi](q), PHI[phi](k)
        keep = edited(kind, edit, mode, q.shape[-2])
        s = apply_mask(fq @ fk.transpose(-2, -1), keep, style)
        if norm == "before":
            s = s / (s.sum(-1, keepdim=True) + EPS)
        out = s @ v
        return out / (s.sum(-1, keepdim=True) + EPS) if norm == "after" else out
    return fn


def make(n, d, f, seed, b=1, h=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g),
            torch.randn(b, h, n, f, generator=g))


def check(fn, args, rewritten: bool, reason: str = "", variant: str = "linear"):
    """The one site's verdict, and the compiled output against eager float64."""
    torch._dynamo.reset()
    report = rewrite.inspect(fn, *args, backend="torch")
    assert not report.skipped_graphs, report.skipped_graphs
    sites = [s for s in report.sites if s.variant == variant]
    if rewritten:
        assert len(sites) == 1 and sites[0].rewritten and sites[0].mask == "causal m <= p", report
    else:
        assert not any(s.rewritten for s in report.sites), report
        if reason:
            assert len(sites) == 1 and reason in sites[0].reason, [s.reason for s in sites]
    want = fn(*(a.double() for a in args))
    assert bool(want.abs().amax() > 0)
    torch._dynamo.reset()
    got = rewrite.compile(fn, backend="torch")(*args)
    close_relative(got, want, torch.float32, f"{getattr(fn, '__name__', fn)}")
    return sites


# ---- the quadratic form: named cases ------------------------------------------------------------------------
NOT_CAUSAL = "the mask is not causal or dense"
CASES = [  # (base, edit, rewritten, reason)
    ("tril", "hole", False, "(p=5, m=3) dropped"),
    ("arange", "hole", False, "(p=5, m=3) dropped"),
    ("tril", "extra", False, "(p=2, m=7) kept"),
    ("upper", "sink", False, NOT_CAUSAL),  # the sink column matters above an anti-causal base
    ("tril", "sink", True, ""),  # column 0 is already kept by m <= p: a no-op
    ("tril", "noop", True, ""),
    ("arange", "noop", True, ""),
    ("tril+1", "drop_superdiagonal", True, ""),  # the edit makes the mask exactly causal
]


@pytest.mark.parametrize("mode", ["inplace", "functional"])
@pytest.mark.parametrize("kind,edit,rewritten,reason", CASES)
def test_edited_mask_quadratic(kind, edit, rewritten, reason, mode):
    style = ["masked_fill", "multiply", "where"][CASES.index((kind, edit, rewritten, reason)) % 3]
    norm = ["none", "after", "before"][(CASES.index((kind, edit, rewritten, reason)) + (mode == "inplace")) % 3]
    fn = quadratic(kind, edit, mode, style, norm, "elu+1" if mode == "inplace" else "relu")
    check(fn, make(13, 16, 12, 0), rewritten, reason)


@settings(max_examples=16, **SETTINGS)
@given(kind=st.sampled_from(["tril", "arange", "upper", "tril+1"]), edit=st.sampled_from(sorted(EDITS)),
       mode=st.sampled_from(["inplace", "functional"]), style=st.sampled_from(["masked_fill", "multiply", "where"]),
       norm=st.sampled_from(["none", "after", "before"]), phi=st.sampled_from(sorted(PHI)),
       n=st.integers(9, 40), d=st.sampled_from([8, 16, 24]), f=st.sampled_from([8, 12]), seed=st.integers(0, 2**16))
def test_edited_mask_quadratic_any(kind, edit, mode, style, norm, phi, n, d, f, seed):
    keep = edited(kind, edit, mode, n)  # the test's own verdict: is the edited mask exactly m <= p?
    causal = torch.equal(keep, torch.ones(n, n, dtype=torch.bool).tril())
    check(quadratic(kind, edit, mode, style, norm, phi), make(n, d, f, seed), causal, "" if causal else NOT_CAUSAL)


def test_key_mask_broadcast_along_queries_is_not_causal():
    """A [1, N] key mask keeping key 0 only: as a 1 × N matrix it equals the first row of m <= p, but over the
    N × N scores it keeps column 0 alone (this was rewritten as causal)."""
    def fn(q, k, v):
        keep = torch.zeros(1, q.shape[-2], dtype=torch.bool)
        keep[0, 0] = True
        return ((F.relu(q) @ F.relu(k).transpose(-2, -1)) * keep) @ v
    check(fn, make(13, 16, 12, 1), False, NOT_CAUSAL)


def test_scores_edited_in_place_are_left_alone():
    def fn(q, k, v):
        n = q.shape[-2]
        s = (F.relu(q) @ F.relu(k).transpose(-2, -1)) * torch.tril(torch.ones(n, n))
        s[:, :, 5, 3] = 0  # a hole made in the weights instead of the mask
        return s @ v
    check(fn, make(13, 16, 12, 2), False, "the scores are edited in place between the two products (select_scatter)")


# ---- the chunked form: the mask inside a chunk --------------------------------------------------------------
C = 8


def chunked(edit, mode, style):
    """flash-linear-attention's naive chunk form; the intra-chunk keep mask edited before use."""
    def fn(q, k, v):
        B, H, N, D = q.shape
        q, k, v = (t.reshape(B, H, N // C, C, t.shape[-1]) for t in (phi_elu(q), phi_elu(k), v))
        kv = (k.transpose(-1, -2) @ v).cumsum(2)
        kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
        keep = edited("tril", edit, mode, C)
        intra = apply_mask(q @ k.transpose(-1, -2), keep, style) @ v
        return (q @ kv + intra).reshape(B, H, N, -1)
    return fn


@pytest.mark.parametrize("edit,mode,style,rewritten", [
    ("hole", "inplace", "masked_fill", False), ("extra", "functional", "multiply", False),
    ("hole", "functional", "where", False), ("noop", "inplace", "multiply", True),
    ("sink", "functional", "masked_fill", True)])
def test_edited_mask_chunked(edit, mode, style, rewritten):
    sites = check(chunked(edit, mode, style), make(3 * C, 16, 12, 3), rewritten,
                  "" if rewritten else "chunked linear attention: the mask inside a chunk is not l' <= l")
    assert "chunked" in sites[0].spelling or not rewritten


def test_edited_fill_mask_chunked_in_place():
    """The reference's own spelling: ``masked_fill_(triu(…, 1), 0)``; the fill mask loses an entry above the
    diagonal (one more key kept)."""
    def fn(q, k, v):
        B, H, N, D = q.shape
        q, k, v = (t.view(B, H, N // C, C, t.shape[-1]) for t in (q, k, v))
        kv = (k.transpose(-1, -2) @ v).cumsum(2)
        kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
        drop = torch.triu(torch.ones(C, C, dtype=torch.bool), diagonal=1)
        drop[1, 6] = False
        return (q @ kv + (q @ k.transpose(-1, -2)).masked_fill_(drop, 0) @ v).view(B, H, N, -1)
    check(fn, make(3 * C, 16, 12, 4), False, "the mask inside a chunk is not l' <= l")


# ---- the loop over chunks: the mask may change between iterations --------------------------------------------
def loop(edit_at: int | None, edit: str = "hole"):
    """Lightning-style loop; the keep mask is edited in place just before chunk ``edit_at`` (None: never)."""
    def fn(q, k, v):
        fq, fk = phi_elu(q), phi_elu(k)
        N = q.shape[2]
        kv = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
        keep = torch.tril(torch.ones(C, C, dtype=torch.bool))
        outs = []
        for i, s in enumerate(range(0, N, C)):
            if i == edit_at:
                EDITS[edit][0](keep)
            qi, ki, vi = fq[:, :, s:s + C], fk[:, :, s:s + C], v[:, :, s:s + C]
            n = qi.shape[2]
            outs.append(qi @ kv + (qi @ ki.transpose(-1, -2)).masked_fill(~keep[:n, :n], 0) @ vi)
            kv = kv + ki.transpose(-1, -2) @ vi
        return torch.cat(outs, 2)
    return fn


@pytest.mark.parametrize("edit_at,edit,rewritten,reason", [
    (2, "hole", False, "loop over chunks: the mask inside chunk 2 is not l' <= l"),  # chunks 0, 1 are causal
    (0, "extra", False, "loop over chunks: the mask inside chunk 0 is not l' <= l"),
    (1, "noop", True, ""), (None, "hole", True, "")])
def test_edited_mask_loop(edit_at, edit, rewritten, reason):
    check(loop(edit_at, edit), make(4 * C + 3, 16, 12, 5), rewritten, reason)


# ---- the cumsum form: no mask; its state and its keys ---------------------------------------------------------
def cumsum_form(edit: str, normalise: bool):
    def fn(q, k, v):
        fq, fk = phi_elu(q), phi_elu(k)
        if edit == "keys":
            fk[:, :, 3] = 0.5  # an operand edited: the site computes with these keys, still linear attention
        kv = torch.einsum("bhnd,bhne->bhnde", fk, v).cumsum(2)
        if edit == "state":
            kv[:, :, 3] = 0  # the prefix state at position 3 zeroed: no longer Σ_{m <= p}
        out = torch.einsum("bhnd,bhnde->bhne", fq, kv)
        if not normalise:
            return out
        return out / (torch.einsum("bhnd,bhnd->bhn", fq, fk.cumsum(2)).unsqueeze(-1) + EPS)
    return fn


@pytest.mark.parametrize("edit,normalise,rewritten,reason", [
    ("keys", False, True, ""),
    # Normalised, the edited φK is no longer provably non-negative (the feature map reads select_scatter).
    ("keys", True, False, "not provably non-negative"),
    ("state", True, False, ""), ("state", False, False, "")])
def test_cumsum_form_edits(edit, normalise, rewritten, reason):
    check(cumsum_form(edit, normalise), make(17, 16, 12, 6), rewritten, reason)
