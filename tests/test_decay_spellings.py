"""Decay-gated linear attention written recurrently (RetNet / Lightning: a loop over steps that
torch.compile unrolls) and chunk by chunk (chunkwise retention), rewritten to the op the quadratic γ^(p−m)
spelling reaches (rewrite::decay_linear_attention), against an eager float64 quadratic reference; the
near-misses (an off-by-one exponent, a γ per step, a reset state, a decay missing between or inside the
chunks, a chunk update with γ^C) are left alone, with their reason, and compute what eager computes.
The spellings are written the way the papers' reference code writes them, not from the recogniser."""

from __future__ import annotations

import pytest
import torch
from reference import close_relative

import rewrite


def _gammas(h, dtype=torch.float32):  # RetNet: γ_h = 1 − 2^(−5−h)
    return 1 - 2.0 ** (-5 - torch.arange(h, dtype=dtype))


def quadratic_reference(q, k, v, gamma, scale=1.0, layout="bhnd"):
    """Σ_{m ≤ p} γ_h^(p−m) (q_p·k_m) v_m in float64, over [B, H, N, D] (or [B, N, H, D])."""
    q, k, v = (t.double() for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    n = q.shape[2]
    i = torch.arange(n, dtype=torch.float64)
    dist = i[:, None] - i[None, :]
    g = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1, 1, 1)
    d = torch.where(dist >= 0, g ** dist.clamp(min=0), torch.zeros(()))
    out = ((q @ k.transpose(-1, -2)) * scale * d) @ v
    return out.transpose(1, 2) if layout == "bnhd" else out


# ---- recurrent spellings: fn(q, k, v) ------------------------------------------------------------------
def recurrent_stack_einsum(q, k, v):  # outer product by broadcasting, einsum readout, torch.stack, D^−½
    B, H, N, D = q.shape
    gamma = _gammas(H).view(1, H, 1, 1)
    S = torch.zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        S = gamma * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t] * D ** -0.5, S))
    return torch.stack(outs, 2)


def recurrent_cat_matmul(q, k, v):  # one γ for all heads, t:t+1 slices, kᵀ @ v, output read after the update
    B, H, N, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        kt, vt = k[:, :, t:t + 1], v[:, :, t:t + 1]
        S = S * 0.9 + kt.transpose(-1, -2) @ vt
        outs.append(q[:, :, t:t + 1] @ S)
    return torch.cat(outs, dim=2)


def recurrent_bnhd_decay_after_readout(q, k, v):  # [B, N, H, D]; state decayed after o_t is read (same form)
    B, N, H, D = q.shape
    gamma = _gammas(H)[:, None, None]
    S = torch.zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        S = S + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        outs.append(torch.einsum("bhde,bhd->bhe", S, q[:, t]))
        S = S * gamma
    return torch.stack(outs, dim=1)


RECURRENT = {"recurrent_stack_einsum": (recurrent_stack_einsum, "per head", "bhnd"),
             "recurrent_cat_matmul": (recurrent_cat_matmul, 0.9, "bhnd"),
             "recurrent_bnhd_decay_after_readout": (recurrent_bnhd_decay_after_readout, "per head", "bnhd")}


# ---- chunked spellings: make(C) → fn(q, k, v) --------------------------------------------------------------
def chunkwise_matmul(C):  # RetNet's chunkwise retention: intra ⊙ D, inter q·γ^(l+1)·S, S = γ^L·S + Σ γ^(L−1−j) kᵀv
    def fn(q, k, v):
        B, H, N, D = q.shape
        log_g = torch.log(_gammas(H)).view(H, 1)
        S = q.new_zeros(B, H, D, v.shape[-1])
        outs = []
        for s in range(0, N, C):
            qi, ki, vi = q[:, :, s:s + C], k[:, :, s:s + C], v[:, :, s:s + C]
            L = qi.shape[2]
            idx = torch.arange(L, dtype=q.dtype)
            d_intra = torch.exp(log_g[..., None] * (idx[:, None] - idx[None, :])).masked_fill(
                idx[:, None] < idx[None, :], 0)
            intra = (qi @ ki.transpose(-1, -2) * d_intra) @ vi
            inter = (qi * torch.exp(log_g * (idx + 1)).unsqueeze(-1)) @ S
            outs.append(intra + inter)
            k_dec = ki * torch.exp(log_g * (L - 1 - idx)).unsqueeze(-1)
            S = torch.exp(log_g * L).unsqueeze(-1) * S + k_dec.transpose(-1, -2) @ vi
        return torch.cat(outs, 2)
    return fn


def chunkwise_einsum_pow(C, scale=True):  # einsum letters, γ ** distance, inter first, state by einsum, scaled q
    def fn(q, k, v):
        B, H, N, D = q.shape
        gamma = _gammas(H)
        S = None
        outs = []
        for s in range(0, N, C):
            e = min(s + C, N)
            qi = q[:, :, s:e] * (D ** -0.5 if scale else 1.0)
            ki, vi = k[:, :, s:e], v[:, :, s:e]
            pos = torch.arange(e - s)
            dist = (pos[:, None] - pos[None, :]).float()
            decay = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp(min=0), 0.0)
            o = torch.einsum("bhxy,bhyf->bhxf", torch.einsum("bhxd,bhyd->bhxy", qi, ki) * decay, vi)
            if S is not None:
                q_dec = qi * (gamma[:, None] ** (pos + 1).float())[..., None]
                o = torch.einsum("bhxd,bhdf->bhxf", q_dec, S) + o
            w = gamma[:, None] ** (e - s - 1 - pos).float()
            kv = torch.einsum("bhyd,bhyf->bhdf", ki * w[..., None], vi)
            S = kv if S is None else S * (gamma ** (e - s))[:, None, None] + kv
            outs.append(o)
        return torch.cat(outs, dim=2)
    return fn


def _inputs(b, h, n, d, f, seed=0, layout="bhnd"):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, h, n) if layout == "bhnd" else (b, n, h)
    q, k = (torch.randn(*shape, d, generator=gen) / d ** 0.25 for _ in range(2))
    return q, k, torch.randn(*shape, f, generator=gen)


def _site(fn, *args, backend="torch"):
    report = rewrite.inspect(fn, *args, backend=backend)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert len(lin) == 1, report
    return lin[0]


def _check_rewritten(fn, q, k, v, want, n, backend="torch"):
    site = _site(fn, q, k, v, backend=backend)
    assert site.rewritten and site.kernel == f"rewrite::decay_linear_attention[{backend}]", site
    assert "decay loop" in site.spelling and "γ^(p−m)" in " ".join(site.notes), site
    assert site.shapes["n"] == n, site.shapes
    torch._dynamo.reset()
    close_relative(rewrite.compile(fn, backend=backend)(q, k, v), want, torch.float32, fn.__name__)
    return site


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_recurrent_spellings_rewritten(name):
    fn, gamma, layout = RECURRENT[name]
    q, k, v = _inputs(2, 3, 13, 8, 6, layout=layout)
    gamma = _gammas(3) if gamma == "per head" else gamma
    scale = 8 ** -0.5 if name == "recurrent_stack_einsum" else 1.0
    want = quadratic_reference(q, k, v, gamma, scale, layout)
    close_relative(fn(*(t.double() for t in (q, k, v))), want, torch.float64, f"{name}: eager vs quadratic")
    site = _check_rewritten(fn, q, k, v, want, 13)
    assert "recurrent, 13 steps" in site.spelling


@pytest.mark.parametrize("make,n,C", [(chunkwise_matmul, 29, 8), (chunkwise_matmul, 24, 8),
                                      (chunkwise_einsum_pow, 31, 7)],
                         ids=["matmul-29-8", "matmul-24-8", "einsum-31-7"])
def test_chunked_spellings_rewritten(make, n, C):
    fn = make(C)
    q, k, v = _inputs(1, 2, n, 8, 12, seed=n)
    scale = 8 ** -0.5 if make is chunkwise_einsum_pow else 1.0
    want = quadratic_reference(q, k, v, _gammas(2), scale)
    # the γ powers are float32 constants (exp of log γ·l): float32's tolerance
    close_relative(fn(*(t.double() for t in (q, k, v))), want, torch.float32, "eager chunks vs quadratic")
    site = _check_rewritten(fn, q, k, v, want, n)
    assert f"chunked, {-(-n // C)} chunks" in site.spelling


def test_triton_backend_runs_the_decay_kernel():
    """Under TRITON_INTERPRET=1 on a CPU: the recurrent loop runs the Triton decay kernel."""
    q, k, v = _inputs(1, 2, 11, 16, 16, seed=3)
    want = quadratic_reference(q, k, v, 0.9)
    _check_rewritten(recurrent_cat_matmul, q, k, v, want, 11, backend="triton")


def test_chunked_gradients_match_float64():
    fn = chunkwise_einsum_pow(6)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 17, 8, 8, seed=5))
    assert _site(fn, q, k, v).rewritten
    out = rewrite.compile(fn)(q, k, v)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = quadratic_reference(*ref_in, _gammas(2), 8 ** -0.5)
    close_relative(out, ref, torch.float32)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    for got, want in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, ref_in, do.double())):
        close_relative(got, want, torch.float32)


# ---- near-misses: left alone, with the reason -----------------------------------------------------------
def gamma_after_update(q, k, v):  # S = γ·(S + kᵀv): each step's own key decayed once, γ^(p−m+1)
    B, H, N, D = q.shape
    gamma = _gammas(H).view(1, H, 1, 1)
    S = torch.zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        S = gamma * (S + k[:, :, t, :, None] * v[:, :, t, None, :])
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, 2)


def gamma_per_step(q, k, v):  # a decay schedule over the steps: γ_t, not one γ per head
    B, H, N, D = q.shape
    S = torch.zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        S = (0.9 + 0.005 * t) * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, 2)


def _chunks(q, k, v, *, reset_at=None, between=True, inside=True, state_pow_c=False, C=8):
    """chunkwise_matmul with one thing changed."""
    B, H, N, D = q.shape
    log_g = torch.log(_gammas(H)).view(H, 1)
    S = q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for i, s in enumerate(range(0, N, C)):
        if i == reset_at:
            S = q.new_zeros(B, H, D, v.shape[-1])
        qi, ki, vi = q[:, :, s:s + C], k[:, :, s:s + C], v[:, :, s:s + C]
        L = qi.shape[2]
        idx = torch.arange(L, dtype=q.dtype)
        dist = idx[:, None] - idx[None, :]
        d_intra = torch.exp(log_g[..., None] * dist) if inside else torch.ones(L, L)
        intra = (qi @ ki.transpose(-1, -2) * d_intra.masked_fill(dist < 0, 0)) @ vi
        inter = (qi * torch.exp(log_g * (idx + 1)).unsqueeze(-1) if between else qi) @ S
        outs.append(intra + inter)
        w = torch.exp(log_g * L) if state_pow_c else torch.exp(log_g * (L - 1 - idx))
        k_dec = ki * w.unsqueeze(-1) if between else ki
        S = (torch.exp(log_g * L).unsqueeze(-1) * S if between else S) + k_dec.transpose(-1, -2) @ vi
    return torch.cat(outs, 2)


def state_reset_in_chunk_2(q, k, v):
    return _chunks(q, k, v, reset_at=2)


def decay_only_inside_chunks(q, k, v):
    return _chunks(q, k, v, between=False)


def decay_only_between_chunks(q, k, v):
    return _chunks(q, k, v, inside=False)


def state_update_with_gamma_c(q, k, v):  # γ^C for every key of the chunk where γ^(C−1−j) is due
    return _chunks(q, k, v, state_pow_c=True)


def readout_before_update(q, k, v):  # o_t = q_t S_{t−1}: each step misses its own key (m < p)
    B, H, N, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        outs.append(q[:, :, t:t + 1] @ S)
        S = 0.9 * S + k[:, :, t:t + 1].transpose(-1, -2) @ v[:, :, t:t + 1]
    return torch.cat(outs, 2)


NOT_GAMMA = "is not γ^(p−m)"


@pytest.mark.parametrize("fn,reason", [
    (gamma_after_update, "γ^(p−m+1): one γ more than the quadratic γ^(p−m)"),
    (gamma_per_step, NOT_GAMMA), (state_reset_in_chunk_2, NOT_GAMMA), (decay_only_inside_chunks, NOT_GAMMA),
    (decay_only_between_chunks, NOT_GAMMA), (state_update_with_gamma_c, NOT_GAMMA),
    (readout_before_update, "before its own key is added")], ids=lambda x: getattr(x, "__name__", "reason"))
def test_near_misses_are_left_alone(fn, reason):
    n = 21 if fn in (gamma_after_update, gamma_per_step, readout_before_update) else 29
    q, k, v = _inputs(1, 2, n, 8, 6, seed=7)
    site = _site(fn, q, k, v)
    assert not site.rewritten and "decay loop" in site.reason and reason in site.reason, site.reason
    torch._dynamo.reset()
    close_relative(rewrite.compile(fn)(q, k, v), fn(*(t.double() for t in (q, k, v))), torch.float32, fn.__name__)


def gla_recurrent(q, k, v, g):  # simple GLA step by step: S = exp(g_t)·S + k_tᵀ v_t (a run-time gate)
    B, H, N, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        S = torch.exp(g[:, :, t])[..., None, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, 2)


def test_recurrent_gate_is_reported_not_read():
    """Not done yet: a run-time gate in the recurrent form is left alone, and the report says so."""
    q, k, v = _inputs(1, 2, 12, 8, 6, seed=2)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 2, 12, generator=torch.Generator().manual_seed(4)))
    site = _site(gla_recurrent, q, k, v, g)
    assert not site.rewritten and "run-time factor" in site.reason and "exp(g_t)" in site.reason, site.reason
    torch._dynamo.reset()
    close_relative(rewrite.compile(gla_recurrent)(q, k, v, g), gla_recurrent(*(t.double() for t in (q, k, v, g))),
                   torch.float32)
