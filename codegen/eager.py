"""What eager PyTorch computes for a rewritten site, and the one mechanism that holds every fast
kernel (SDPA, Triton, torch tiles) to it.

The spelling decides what the kernels cannot see (``Spelling``): the value eager gives the scores
that the op removes (its mask operand, causal rule or structure): ``fill``, −inf or finite
(``masked_fill(finfo.min)``, −1e4, a where-built bias of finfo.min); whether that value is written
over the score (masked_fill, where: a NaN or ±inf score is hidden) or added to it (an additive bias:
NaN + fill is NaN, and the gradient flows through); and whether the site was an
``F.scaled_dot_product_attention`` call, whose own semantics are eager's there (a row with no kept
key is 0 and has finite gradients).

A fast kernel computes the softmax over the keys it keeps. That is eager's result exactly when

1. eager's weight of every removed key is zero. With fill −inf it always is (a row with no kept
   key is then 0/0 = NaN in eager and in the Triton and tile kernels; SDPA returns 0 there, so its
   rows are set to NaN). With a finite fill, eager's weight of a removed key is
   exp(s_removed − max_row) with s_removed ≤ fill (+ |scale·q·k| when the fill is added), and exp is
   0 in eager's softmax dtype (float32 for half types) below ln(smallest subnormal) − ln 2 (−103.97 in
   float32, −745.13 in float64; correctly rounded). ``underflow`` is ln(smallest subnormal) − 1, a
   third of a nat lower (exp's last-ulp error), and ``unsettled`` flags a row unless
   fill − floor + slack < underflow (slack: a few ulps of |fill| and |floor| for the rounding of a
   float32 LSE and of eager's own fill − max), where ``floor`` is a
   lower bound of the row's largest kept score: LSE − ln M from a kernel's row log-sum-exp (Σ over at
   most M kept keys, so LSE ≤ max + ln M), or a Cauchy–Schwarz bound where the kernel returns none.
   A row that keeps no key has floor −inf and is always flagged. Flagged rows are recomputed by
   ``eager_attention`` over every key with the fill (``settle``); eager's other rows are the kernel's
   up to summation order, since the terms it skips are exact zeros there.
2. no removed key's value reaches eager's result through arithmetic. Eager multiplies v by the
   removed key's zero weight (0·NaN = NaN, 0·inf = NaN: every row of that column), an additive mask
   adds −inf to the score (NaN − inf = NaN), and SDPA adds its bool mask too and on the CPU returns 0
   for a NaN query row at small N. The Triton and tile kernels apply masks by selection and let a NaN
   row be NaN, so for them NaN/inf queries and keys are eager's by construction and only v (keys they
   skip) and, under an additive mask, k need to be finite; SDPA needs q, k, v finite and no score able
   to overflow. ``tame`` checks that on the CPU (one min/max pass per tensor); where it fails the
   whole site runs ``eager_attention``. On a GPU the check would cost a host sync per call (and break
   CUDA-graph capture), so it is not made there: README, Semantics.

The same conditions choose the backward: the fused one (SDPA, kept tiles) where they hold, else
autograd through ``eager_attention``, which applies masks as the spelling does (masked_fill's
backward zeroes the removed scores' gradients; an added −inf lets a NaN row's gradient through).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rewrite.ir.mask import MaskSpec, keep_rows

from . import counters

NEG_INF = float("-inf")
MASKED_ROWS = ("nan", "mean", "zero", "zero_masked", "biased_fill")
ROW_ELEMS = 1 << 24  # score entries (all batch·heads) of one block of rows in eager_attention


@dataclass(frozen=True)
class Spelling:
    """How the original graph treats the scores the op removes (see the module docstring)."""

    fill: float = NEG_INF
    additive: bool = False
    biased: bool = False  # the bias is added after the fill is written: removed scores are fill + bias (GPT-Neo)
    sdpa: bool = False
    sdpa_masked: bool = False  # the SDPA call passed an attn_mask (one the rewrite may have proven keeps all)

    @staticmethod
    def of(masked_row: str, fill: float | None, additive: bool, dtype: torch.dtype) -> Spelling:
        """From the ops' arguments: ``masked_row`` "zero" is an SDPA call, "zero_masked" one that passed
        an attn_mask; ``fill`` None is −inf, or for "mean" (a finite fill whose value the caller did
        not give) finfo(dtype).min."""
        if masked_row not in MASKED_ROWS:
            raise ValueError(f"masked_row must be one of {MASKED_ROWS}, not {masked_row!r}")
        if masked_row in ("zero", "zero_masked"):
            return Spelling(sdpa=True, sdpa_masked=masked_row == "zero_masked")
        if fill is None:
            fill = torch.finfo(dtype).min if masked_row in ("mean", "biased_fill") else NEG_INF
        biased = masked_row == "biased_fill"
        if biased and (additive or not math.isfinite(fill)):
            raise ValueError("masked_row 'biased_fill' is a finite fill written over the score, then biased")
        return Spelling(float(fill), bool(additive), biased)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.fill)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The kernels' arithmetic: float32 for half types, the inputs' own precision otherwise."""
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.promote_types(dt, torch.float32)


def underflow(dtype: torch.dtype) -> float:
    """Below this, exp in eager's softmax arithmetic for ``dtype`` is zero (module docstring, 1)."""
    fi = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32)
    return math.log(fi.smallest_normal * fi.eps) - 1.0


@dataclass(frozen=True)
class Removed:
    """The keys an op removes, besides what its bias adds: a bool ``mask`` (token level, broadcastable
    to [B, Hq, N, M]), the causal rule m ≤ p + ``causal_offset``, a structure ``spec``."""

    n: int
    m: int
    mask: torch.Tensor | None = None
    causal_offset: int | None = None
    spec: MaskSpec | None = None
    blocks: tuple[int, int] | None = None  # (bq, bk): ``mask`` is a block table, token (p, m) at [p//bq, m//bk]

    def rows(self, r0: int, r1: int, device) -> torch.Tensor | None:
        """The kept pairs of rows r0:r1, broadcastable to [B, Hq, r1 − r0, M]; None: all kept."""
        keep = None
        if self.mask is not None:
            mk = self.mask
            if self.blocks is not None:
                bq, bk = self.blocks
                if mk.shape[-2] > 1:
                    mk = mk[..., torch.arange(r0, r1, device=mk.device) // bq, :]
                keep = mk.repeat_interleave(bk, -1)[..., :self.m]
            else:
                keep = mk[..., r0:r1, :] if mk.shape[-2] > 1 else mk
        if self.causal_offset is not None:
            i = torch.arange(r0, r1, device=device)[:, None]
            c = torch.arange(self.m, device=device)[None, :] <= i + self.causal_offset
            keep = c if keep is None else keep & c
        if self.spec is not None and self.spec.kind not in ("dense", "arbitrary"):
            s = keep_rows(self.spec, r0, r1, self.n, self.m, device)
            keep = s if keep is None else keep & s
        return keep


def _gqa(k: torch.Tensor, hq: int) -> torch.Tensor:
    return k if k.shape[1] == hq else k.repeat_interleave(hq // k.shape[1], dim=1)


def sdpa_call(q, k, v, bias, keep, scale: float, is_causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention on [B, H, N, D] operands with ``keep`` (bool) and ``bias`` as
    one mask (or ``is_causal``): an SDPA spelling's eager result, and the fused kernel."""
    dt = compute_dtype(q, k, v) if q.dtype != k.dtype or k.dtype != v.dtype else q.dtype
    attn = None
    if keep is not None and bias is not None:
        attn = bias.to(dt).masked_fill(~keep, NEG_INF)
    elif keep is not None:
        attn = keep
    elif bias is not None:
        attn = bias.to(dt)
    return F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), attn_mask=attn, is_causal=is_causal,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def eager_attention(q, k, v, bias, removed: Removed, scale: float, sem: Spelling,
                    rows: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    score_mod=None) -> torch.Tensor:
    """The eager spelling over every key: softmax(scale·q kᵀ + bias, removed scores given ``sem.fill``,
    written over the score or added to it) @ v, by blocks of rows, differentiable. q [B, Hq, N, D],
    k/v [B, Hkv, M, *], bias broadcastable to [B, Hq, N, M]. Arithmetic in ``compute_dtype`` (float32
    for half types, as the kernels: eager's own float16 score overflow is not reproduced, and the
    site's report says so). ``rows`` [B, Hq, N] bool with ``out``: recompute only the blocks that hold
    such rows and merge those rows into ``out``. An SDPA spelling is SDPA itself. ``score_mod(s, r0, r1)``
    (optional) modifies the raw products q kᵀ of rows r0:r1 before the scale (a site's `ScoreMod`)."""
    bsz, hq, n, _ = q.shape
    m = k.shape[2]
    if sem.sdpa:  # is_causal hides what a bool mask (added as −inf) does not: keep the call's own form
        flag = removed.causal_offset == 0 and removed.mask is None and removed.spec is None and bias is None
        keep = None if flag else removed.rows(0, n, q.device)
        if keep is None and bias is None and sem.sdpa_masked:
            # The call's mask kept every key and the rewrite dropped it, but SDPA without a mask takes
            # other kernels, whose NaN/inf propagation differs (a NaN key at M = 1 gives v): pass it.
            keep = torch.ones(n, m, dtype=torch.bool, device=q.device)
        res = sdpa_call(q, k, v, bias, keep, scale, is_causal=flag)
        return res if rows is None else torch.where(rows[..., None], res.to(out.dtype), out)
    dt = compute_dtype(q, k, v)
    sum_dtype = bias_sum_dtype(q, k, bias, sem)
    kk, vv = _gqa(k.to(dt), hq), _gqa(v.to(dt), hq)
    block = max(1, min(n, ROW_ELEMS // max(1, bsz * hq * m)))
    pieces = []
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        if rows is not None and not bool(rows[..., r0:r1].any()):
            pieces.append(out[:, :, r0:r1])
            continue
        s = q[:, :, r0:r1].to(dt) @ kk.transpose(-1, -2)
        s = (s if score_mod is None else score_mod(s, r0, r1)) * scale
        keep = removed.rows(r0, r1, q.device)
        added = None if bias is None else (bias[..., r0:r1, :] if bias.shape[-2] > 1 else bias).to(dt)
        if keep is not None and sem.additive:
            fills = torch.full(keep.shape, sem.fill, dtype=dt, device=q.device).masked_fill(keep, 0.0)
            added = fills if added is None else added + fills
        written = keep is not None and not sem.additive
        if written and sem.biased:  # the fill first, the bias over it
            s = s.masked_fill(~keep, sem.fill)
        if added is not None:
            s = add_as_eager(s, added, sum_dtype)
        if written and not sem.biased:
            s = s.masked_fill(~keep, sem.fill)
        o = torch.softmax(s, -1) @ vv
        if rows is not None:
            o = torch.where(rows[..., r0:r1, None], o.to(out.dtype), out[:, :, r0:r1])
        pieces.append(o)
    if not pieces:
        return q.new_empty(bsz, hq, 0, v.shape[-1], dtype=dt)
    return torch.cat(pieces, 2) if len(pieces) > 1 else pieces[0]


def bias_sum_dtype(q, k, bias, sem: Spelling) -> torch.dtype | None:
    """The half type eager adds a bias (or an added fill) to the scores in, when that is narrower than
    the kernels' arithmetic; None otherwise. (The rewrite passes a bias in the dtype of eager's sum.)"""
    dt = compute_dtype(q, k)
    if bias is not None and bias.is_floating_point():
        sd = torch.promote_types(torch.promote_types(q.dtype, k.dtype), bias.dtype)
    elif sem.additive and sem.finite:
        sd = torch.promote_types(q.dtype, k.dtype)
    else:
        return None
    return sd if torch.finfo(sd).eps > torch.finfo(dt).eps else None


COARSE_ULPS = 1 / 8  # a bias whose half-type ulp exceeds this: eager's sum with it is coarse
ABSORBED = 2.0 ** 40  # a bias this large absorbs every score in float32 as in the half type: no difference


def add_as_eager(s: torch.Tensor, added: torch.Tensor, sum_dtype: torch.dtype | None) -> torch.Tensor:
    """s + added, rounded in ``sum_dtype`` (a half type) as eager's sum is where the added term is
    coarse there (|added| · eps ≥ ``COARSE_ULPS``: a finfo.min bias absorbs the score) and s fits;
    elsewhere in the kernels' arithmetic, as the fast kernels add it. (Eager's own rounding of the
    scores, before the sum, is its error, not its meaning; where s does not fit, eager's score
    overflowed already, which the rewrite does not reproduce, and says so.)"""
    if sum_dtype is None:
        return s + added
    coarse = (added.abs() * torch.finfo(sum_dtype).eps >= COARSE_ULPS) & (s.abs() <= torch.finfo(sum_dtype).max)
    rounded = (s.to(sum_dtype) + added.to(sum_dtype)).to(s.dtype)
    return torch.where(coarse, rounded, s + added)


def coarse_rows(q, k, bias, keep, sem: Spelling) -> torch.Tensor | None:
    """[B, Hq, N] bool: rows where eager's half-precision sum scores + bias is coarser than the kernels'
    float32 one, so their results differ beyond rounding: every kept key of the row carries a bias b
    with |b| · eps(half) ≥ ``COARSE_ULPS`` (fp16: b ≤ −128; the common case: a finfo(float16).min
    bias over a row it masks entirely, which eager's float16 sum makes uniform). None: no such row.
    One pass over the bias (and, on a GPU, a host sync where the caller asks ``any``)."""
    sd = bias_sum_dtype(q, k, bias, sem)
    if sd is None or bias is None or not bias.is_floating_point():
        return None
    b = bias.detach()
    if keep is not None:
        b = b.masked_fill(~keep, NEG_INF)
    best = b.amax(-1)
    limit = COARSE_ULPS / torch.finfo(sd).eps
    rows = (best <= -limit) & (best > -ABSORBED)
    return rows.expand(q.shape[0], q.shape[1], q.shape[2])


# ---------------------------------------------------------------- condition 2: tame inputs

def tame(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, selecting: bool = False,
         additive: bool = False) -> bool:
    """Inputs a fast kernel takes exactly (module docstring, 2): every input finite and no score able
    to overflow (|scale·q·k| ≤ scale·D·max|q|·max|k| below a quarter of the compute dtype's max, room
    for a bias). ``selecting``: a kernel that applies masks by selection and propagates a NaN row
    (Triton, torch tiles, for a spelling that is not SDPA): there NaN/inf queries and keys come out as
    in eager by construction, and only v (0·NaN at keys it skips) and, under an ``additive`` mask, k
    (NaN − inf) are checked. One min/max pass per tensor (NaN propagates)."""
    if q.numel() == 0 or k.numel() == 0:
        return True
    tensors = ((v, k) if additive else (v,)) if selecting else (q, k, v)
    big = []
    for t in tensors:
        lo, hi = (float(x) for x in torch.aminmax(t.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return False
        big.append(max(-lo, hi))
    return selecting or big[0] * big[1] * q.shape[-1] * abs(scale) < torch.finfo(compute_dtype(q, k, v)).max / 4


def checks_inputs(q: torch.Tensor) -> bool:
    """Where ``tame`` is checked: on the CPU, where it costs no host sync."""
    return q.device.type == "cpu"


# ---------------------------------------------------------------- condition 1: settled rows

def score_bound(q, k, scale: float) -> torch.Tensor:
    """[B, Hq, N] float64: |scale·q_p·k_m| ≤ scale·‖q_p‖·max_m ‖k_m‖ (Cauchy–Schwarz)."""
    qn = torch.linalg.vector_norm(q.detach(), dim=-1, dtype=torch.float64)
    kn = torch.linalg.vector_norm(k.detach(), dim=-1, dtype=torch.float64).amax(-1, keepdim=True)
    return qn * _gqa(kn.unsqueeze(-1), q.shape[1]).squeeze(-1) * abs(scale)


def lse_floor(lse: torch.Tensor, m: int) -> torch.Tensor:
    """A lower bound of each row's largest kept score from its log-sum-exp over at most m keys."""
    return lse.detach().double() - math.log(max(m, 1))


def keep_floor(q, k, bias, keep, scale: float, bound: bool) -> torch.Tensor:
    """[B, Hq, N] float64 where a kernel returns no LSE: −inf for a row that keeps no key (``keep``,
    and a bias of −inf), else with ``bound`` a lower bound of its largest kept score (−score_bound
    plus its largest kept bias: that key's score is at least this), or 0 when only emptiness matters."""
    bsz, hq, n, _ = q.shape
    if k.shape[2] == 0:
        return torch.full((bsz, hq, n), NEG_INF, dtype=torch.float64, device=q.device)
    if bias is not None and bound:
        b = bias.detach().double()
        best = (b if keep is None else b.masked_fill(~keep, NEG_INF)).amax(-1)
    else:
        kept = keep
        if bias is not None:
            finite = bias.detach() != NEG_INF
            kept = finite if kept is None else kept & finite
        best = torch.zeros((), dtype=torch.float64, device=q.device)
        if kept is not None:
            best = best.masked_fill(~kept.any(-1), NEG_INF)
    best = best.expand(bsz, hq, n)
    return best - score_bound(q, k, scale) if bound else best


def unsettled(floor: torch.Tensor, sem: Spelling, dtype: torch.dtype, excess: torch.Tensor | None = None):
    """[B, Hq, N] bool: rows whose fast result may not be eager's (finite fills; module docstring, 1).
    ``excess``: how far above the fill a removed score can be (an added fill: the score bound)."""
    gap = sem.fill - floor
    if excess is not None:
        gap = gap + excess
    # Rounding: a float32 LSE, and eager's own fill − max, are exact to a few ulps of their magnitude
    # only (2e31 next to finfo.min): that much slack keeps the test one-sided.
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    slack = 4 * eps * (abs(sem.fill) + floor.abs().nan_to_num(posinf=0.0))
    return gap + slack >= underflow(dtype)  # floor −inf: always; NaN (a NaN row): never, it is eager's


def settle(out: torch.Tensor, floor: torch.Tensor, sem: Spelling, dtype: torch.dtype, recompute,
           excess: torch.Tensor | None = None, coarse: torch.Tensor | None = None) -> torch.Tensor:
    """The one mechanism: a fast kernel's ``out`` [B, Hq, N, F] with its rows' ``floor`` (lse_floor,
    keep_floor) made eager's. Rows with no kept key: SDPA's 0 for an SDPA spelling, NaN for fill −inf
    (eager's softmax over all −inf; the Triton and tile kernels give it already, SDPA gives 0);
    with a finite fill, every row ``unsettled`` flags is recomputed by ``recompute(out, rows)``
    (eager_attention over every key with the fill). ``coarse`` (coarse_rows): rows whose eager
    half-precision bias sum the kernel does not reproduce, recomputed too."""
    empty = (floor == NEG_INF).unsqueeze(-1)
    if sem.sdpa:
        return out.masked_fill(empty, 0.0)
    if not sem.finite:
        out, bad = out.masked_fill(empty, float("nan")), coarse
    else:
        bad = unsettled(floor, sem, dtype, excess)
        bad = bad if coarse is None else bad | coarse
    if bad is None:
        return out
    if capturing():  # which rows: a host sync, which a CUDA graph capture forbids; all rows are eager's
        counters.ran("eager spelling (CUDA graph capture: the rows to settle cannot be read)")
        return recompute(out, None)
    if not bool(bad.any()):
        return out
    counters.ran("rows recomputed with eager's spelling")
    return recompute(out, bad)


def capturing() -> bool:
    """Is a CUDA graph being captured on the current stream (no host sync allowed)?"""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def excess_of(q, k, scale: float, sem: Spelling, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """[B, Hq, N] float64: how far above the fill a removed score can be. An added finite fill: the
    score bound; a fill the bias is added over (``sem.biased``): the row's largest bias, NaN taken as
    +inf (eager's removed score is then NaN: the row is recomputed), a row of −inf as 0 (its removed
    scores are −inf), plus the rounding of fill + bias in the sum's dtype. None when the fill is
    written and nothing is added over it."""
    if sem.additive and sem.finite:
        return score_bound(q, k, scale)
    if not (sem.biased and bias is not None and bias.is_floating_point()):
        return None
    best = bias.detach().double().amax(-1).nan_to_num(nan=math.inf, neginf=0.0)
    sd = bias_sum_dtype(q, k, bias, sem) or compute_dtype(q, k)
    best = best + 2 * torch.finfo(sd).eps * (abs(sem.fill) + best.abs().nan_to_num(posinf=0.0))
    return best.expand(q.shape[0], q.shape[1], q.shape[2])
