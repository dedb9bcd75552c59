"""Linearizability: prove on a linear-attention site's cascade that reassociation is exact.

    (φQ φKᵀ ⊙ M) V  =  φQ (φKᵀ V)         when every step between the two products is linear
                                          in the scores: a scalar scale, a 0/1 mask, a division
                                          by a row sum (a value per query, constant along m).

The proof reads the *original cascade* the recogniser built from the graph (never the fx
nodes): every Einsum on the path from the Q·K product to the product with V must be ``×`` by
a constant or a mask, ``÷`` by a value that does not vary along m, or a layout/cast. Anything
else (exp, a feature map on the scores, max, a subtraction) is a nonlinearity: left alone.

Every form reduces to one canonical cascade (`reduce_to_normal_form`: φQ, φK, a reduction or a causal
scan over m, an optional normaliser, an optional decay): the quadratic one rule by rule as above, the
reassociated, cumsum, chunked and loop forms as written (their recognisers proved that structure). The
site's own facts (normalised, decayed, causal) must be the ones the cascade reduces to, and the rewritten
cascade in the report is that canonical one.

Two more facts decide whether the rewrite may run:
- the mask (a sympy predicate over p, m, from passes/masks.py) must be dense or causal m ≤ p
  with as many queries as keys; anything else is left alone;
- with a normaliser, both feature maps must be provably non-negative (relu, elu+1, exp,
  sigmoid, softmax, …). Then each row sum is a sum of non-negative terms in either order, so
  it is zero in the rewritten form exactly where it is zero in eager (up to underflow): inf and
  NaN appear in the same places. A signed φ can cancel to zero in one order and not the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewrite.ir.cascade import Cascade
from rewrite.ir.mask import MaskSpec, check_causal
from rewrite.ir.plan import Plan

from .kernels import choose_kernel

LINEAR_MAPS = {"id", "cast", "×", "÷"}


class NotLinearizable(Exception):
    """The reason a site is left alone."""


@dataclass(frozen=True)
class LinearNormalForm:
    """What an as-written cascade reduces to: the one canonical linear cascade
    (`Cascade.linear_attention`: φQ, φK, a reduction or a causal scan over m, an optional normaliser, an
    optional decay of the state), read off the cascade, never off the site's flags."""

    normalised: bool  # ÷ by the row sums Σ_m W (DEN = φQ · Σ_m φK)
    masked: bool  # a 0/1 mask (or a scan over m): the reduction is a scan when it is m ≤ p
    decayed: bool  # × exp(G_p − G_m): the scan carries a decayed state
    steps: tuple[str, ...]

    def cascade(self, causal: bool) -> Cascade:
        return Cascade.linear_attention(causal=causal, normalize=self.normalised, decay=self.decayed)


def reduce_to_normal_form(cascade: Cascade) -> LinearNormalForm:
    """Rewrite the as-written cascade, rule by rule, to the canonical one; NotLinearizable naming the Einsum
    that no rule takes.

    The quadratic form's rules, step by step between QK and AV: × a constant goes into φQ; × a 0/1 mask becomes
    the reduction's predicate; × exp(G_p − G_m) the decay of the scanned state; ÷ a row sum Σ_m (constant along
    m) the normaliser; the bilinear QK·V is then reassociated. The other forms are already written as a
    reduction or a scan over the keys (their recognisers proved that structure): their normaliser is DEN."""
    es = list(cascade.einsums)
    names = [e.name for e in es]
    if "QK" not in names:
        scanned = any(e.scan == "m" for e in es)
        decayed = any(i.name == "DG" for e in es for i in e.inputs)
        done = "already reassociated: φQ (φKᵀ V), a product over the keys then one over the features"
        return LinearNormalForm("DEN" in names, scanned, decayed, (done,))
    start = names.index("QK")
    end = names.index("AV")
    steps = ["QK[m,p] = Σ_e FQ·FK is bilinear in (FQ, FK)"]
    producers = {e.name: e for e in es}
    masked = es[start].mask is not None
    normalised = decayed = False
    for e in es[start + 1:end]:
        if e.reduce_op is not None and e.reduced_ranks:
            if e.reduce_op != "+" or e.map_op != "id" or e.output.ranks[-1:] != ("p",):
                raise NotLinearizable(f"{e.name} reduces the scores with {e.reduce_op}: not a row sum")
            steps.append(f"{e.name}[p] = Σ_m: constant along m")
            continue
        if e.map_op not in LINEAR_MAPS:
            raise NotLinearizable(f"{e.name} = {e.map_op}(…) is a nonlinearity between the two products "
                                  f"({e.note.removeprefix('nonlinear: ') or e.map_op}): reassociation would change "
                                  "the result")
        others = [i for i in e.inputs[1:]]
        for o in others:
            if e.map_op == "÷" and "m" in o.ranks:
                raise NotLinearizable(f"{e.name} divides by {o.name}, which varies along m")
            if e.map_op == "÷" and o.name in producers and producers[o.name].reduce_op != "+":
                raise NotLinearizable(f"{e.name} divides by {o.name}, not a row sum")
            normalised |= e.map_op == "÷"
            masked |= o.name == "MASK"
            decayed |= o.name == "DECAY"
        steps.append(f"{e.name} = {e.map_op} by {', '.join(o.name for o in others) or 'nothing'}: linear in the scores")
    normalised |= any(e.map_op == "÷" for e in es[end + 1:])
    steps.append("AV = Σ_m W·V: so AV = FQ·(Σ_m FK·V) (× mask prefix sums when causal) ÷ the row sums")
    return LinearNormalForm(normalised, masked, decayed, tuple(steps))


def prove_reassociation(cascade: Cascade) -> list[str]:
    """The steps of the proof, or NotLinearizable naming the Einsum that breaks it."""
    return list(reduce_to_normal_form(cascade).steps)


def _agree(site, form: LinearNormalForm, causal: bool) -> None:
    """The recogniser's facts (what the op is called with) must be the ones the cascade reduces to."""
    if form.normalised != bool(site.normalize):
        raise NotLinearizable(f"the cascade {'has' if form.normalised else 'has no'} normaliser but the site "
                              f"{'has' if site.normalize else 'has none'}: the recogniser and the proof disagree")
    if form.decayed != (site.decay is not None):
        raise NotLinearizable("the cascade and the site disagree on the decay: the recogniser and the proof disagree")
    if causal and not (form.masked or form.decayed):  # a constant decay holds its own zeros above the diagonal
        raise NotLinearizable("the site is causal but its cascade has no mask or scan over m: the recogniser and "
                              "the proof disagree")


def mask_spec(site) -> MaskSpec:
    """Decided on the mask's value over the site's N×M scores: what the graph computes. The capture is
    functional, so a mask edited after it is built (``keep[5, 3] = False``, ``keep[:, 0] = True``) is read
    as edited; the recogniser refuses run-time masks. The symbolic predicate from patterns/lift.py is shown
    in the cascade but never decides."""
    if site.mask_pred is None and site.mask_const is None:
        return MaskSpec("dense")
    keep = site.mask_const
    if keep is None:
        return MaskSpec("arbitrary", predicate="unknown", runtime=True)
    keep = keep.to(torch.bool).expand(site.n, site.m)  # a mask broadcast along p or m keeps that everywhere
    if bool(keep.all()):
        return MaskSpec("dense", predicate="all kept")
    if check_causal(keep, 0):
        return MaskSpec("causal", predicate="m <= p", offset=0)
    return MaskSpec("arbitrary", predicate=_not_causal(keep))


def _not_causal(keep: torch.Tensor) -> str:
    """How a mask's value differs from m <= p: the entries, when there are few (an edited causal mask)."""
    n, m = keep.shape
    causal = torch.ones(n, m, dtype=torch.bool, device=keep.device).tril()
    wrong = (keep ^ causal).nonzero().tolist()
    text = "its value is neither all kept nor m <= p"
    if len(wrong) > max(3, n * m // 8):
        return text
    shown = ", ".join(f"(p={p}, m={c}) {'kept' if keep[p, c] else 'dropped'}" for p, c in wrong[:3])
    more = ", …" if len(wrong) > 3 else ""
    return f"{text}: it differs from m <= p at {len(wrong)} of {n * m} entries: {shown}{more}"


def plan_linear(site, backend: str, device: torch.device | None) -> Plan:
    """Prove, classify the mask, pick the kernel; NotLinearizable with the reason otherwise."""
    if site.rejected:
        raise NotLinearizable(site.rejected)
    form = reduce_to_normal_form(site.cascade)
    proof = list(form.steps)
    spec = mask_spec(site)
    causal = False
    if spec.kind == "causal":
        if spec.runtime:
            raise NotLinearizable("a run-time mask factor besides the causal one")
        if spec.offset != 0 or site.n != site.m:
            raise NotLinearizable(f"causal mask with offset {spec.offset} ({site.n} queries, {site.m} keys): "
                                  "only m <= p with as many queries as keys runs in O(N)")
        causal = True
    elif spec.kind != "dense" or spec.runtime:
        raise NotLinearizable(f"the mask is not causal or dense ({spec.describe()}): it has no O(N) form here")
    _agree(site, form, causal)
    notes = []
    if site.decay is not None:
        if not causal:
            raise NotLinearizable("a decay without the causal mask m ≤ p has no O(N) scan")
        if site.normalize:
            raise NotLinearizable("a normalised decay-gated form (Σ_m of decayed weights): not supported yet")
        proof.insert(-1, f"DECAY = {site.decay.describe}: exp(G_p − G_m) = exp(G_p − G_r)·exp(G_r − G_m) "
                         "factors through any position r between them, so the state is decayed and carried")
    if site.normalize:
        names = site.feature_maps
        if not all(nonneg for _, nonneg in names):
            raise NotLinearizable(f"normalised, but φ ({names[0][0]}, {names[1][0]}) is not provably non-negative: "
                                  "the row sums could cancel to zero in one association order and not the other, "
                                  "so inf/NaN would move")
        notes.append(f"normaliser: φ ({names[0][0]}, {names[1][0]}) non-negative, so zero row sums stay zero "
                     "(inf/NaN where eager has them)")
    kernel, why = choose_kernel("linear", backend, device is not None and device.type == "cuda")
    notes.append(f"kernel {kernel}: {why}")
    return Plan(site, "linear", kernel, spec, causal=causal, notes=notes, proof=proof)


def normal_form_cascade(site, plan: Plan) -> Cascade:
    """The canonical cascade the site runs as: the one its as-written cascade reduced to in `plan_linear`."""
    return reduce_to_normal_form(site.cascade).cascade(plan.causal)



