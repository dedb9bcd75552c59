"""Recognise linear (kernelized) attention, however it is spelled, in an ATen graph.

The softmax recogniser keys on softmax nodes; this one keys on a *contraction chain with no
softmax in it*. Every matmul / bmm / einsum spelling is read as a labelled `Contraction`
(contraction.py) and the named axes are carried through layout ops (axes.py), so the
spellings collapse onto three canonical shapes:

- quadratic (this file):  W = [scale·] φQ φKᵀ [⊙ mask] [÷ Σ_m]  →  out = W V  [÷ Σ_m (φQ φKᵀ ⊙ mask)]
- reassociated (linear_reassociated.py):  KV = φKᵀ V  →  out = φQ KV  [÷ φQ · Σ_m φK]   (non-causal)
- cumsum (linear_cumsum.py):  KV = cumsum_n(φK ⊗ V)  →  out = φQ · KV  [÷ φQ · cumsum_n(φK)]   (causal)

Everything met between the two contractions is recorded as an Einsum of the site's
*original cascade* (a mask as a predicate, a scale as ×, a row-sum normaliser as ÷, anything
else under its own name), and passes/linearize.py proves on that cascade whether
reassociation is exact. The recogniser only refuses shapes that are not attention at all
(silently) and bindings it cannot express (with the reason, for the report). The site type and
the helpers every linear recogniser shares are in linear_site.py; masks are read in linear_masks.py.
Every recogniser reads the graph's normal form (linear_normal.py: reciprocals as divisions, products as binary
einsums); the entry point over a graph is linear_find.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from rewrite.ir.cascade import Cascade, Einsum, T

from .axes import AtomSizes, Axes, NoMatch, dtype_of, is_layout_op, propagate, shape_of
from .contraction import Contraction, as_contraction
from .linear_decay import decay_factor, looks_like_gate, read_decay
from .linear_masks import align, read_masks
from .linear_site import (
    LinearSite,
    NotOurs,
    broadcasts_as,
    den_axes,
    phi_name,
    plan_operand,
    row_sum,
    same_weights,
)
from .softmax_attention import location_of
from .softmax_chain import SOFTMAX_OPS, scalar_value

aten = torch.ops.aten

MASK_OPS = {aten.mul.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
            aten.where.ScalarOther, aten.where.ScalarSelf}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
# Ops that make a chain "attention-like but not linear": reported, never rewritten.
NONLINEAR = {aten.relu.default: "relu", aten.exp.default: "exp", aten.sigmoid.default: "sigmoid",
             aten.tanh.default: "tanh", aten.elu.default: "elu", aten.gelu.default: "gelu",
             aten.pow.Tensor_Scalar: "pow", aten.square.default: "square", aten.abs.default: "abs",
             aten.silu.default: "silu", aten.softplus.default: "softplus", aten.log.default: "log",
             aten.sqrt.default: "sqrt", aten.clamp.default: "clamp", aten.clamp_min.default: "clamp"}
# In-place edits of the scores (functional in the captured graph): ``s[..., 5, 3] = 0`` is a select_scatter.
EDIT_OPS = {aten.select_scatter.default: "select_scatter", aten.slice_scatter.default: "slice_scatter",
            aten.diagonal_scatter.default: "diagonal_scatter", aten.index_put.default: "index_put",
            aten.masked_scatter.default: "masked_scatter", aten.scatter.src: "scatter", aten.scatter.value: "scatter",
            aten.index_fill.int_Scalar: "index_fill", aten.index_fill.int_Tensor: "index_fill",
            aten.index_copy.default: "index_copy"}
WRITTEN_SOFTMAX = {aten.exp.default, aten.amax.default, aten.max.dim, aten.logsumexp.default}


# ---- helpers ---------------------------------------------------------------------------------
def reaches_contraction(node, memo: dict, depth: int = 0) -> bool:
    if not isinstance(node, Node):
        return False
    if node in memo:
        return memo[node]
    memo[node] = False
    ok = as_contraction(node) is not None
    if not ok and depth < 32 and node.op == "call_function" and (
            is_layout_op(node) or node.target in MASK_OPS | SCALE_OPS | set(NONLINEAR) | SOFTMAX_OPS | set(EDIT_OPS)
            | {aten.sum.dim_IntList, aten.add.Tensor, aten.sub.Tensor, aten.neg.default}):
        ok = any(reaches_contraction(a, memo, depth + 1) for a in node.args[:3] if isinstance(a, Node))
    memo[node] = ok
    return ok


def _label_atoms(c: Contraction, sizes: AtomSizes) -> tuple[dict[str, str], Axes, Axes, Axes]:
    """Name C1's axes: batch labels → b0, b1…, the query label → p, key label → m, contracted → e."""
    sa, sb, so = shape_of(c.a), shape_of(c.b), shape_of(c.node)
    if sa is None or sb is None or so is None:
        raise NoMatch("shapes unknown")
    size: dict[str, int] = {}
    for labels, shape in ((c.a_labels, sa), (c.b_labels, sb), (c.out_labels, so)):
        for lab, s in zip(labels, shape):
            if lab and s != 1:
                if size.setdefault(lab, s) != s:
                    raise NoMatch("inconsistent contraction sizes")
    big = [lab for lab in size]
    contracted = [lab for lab in big if lab in c.a_labels and lab in c.b_labels and lab not in c.out_labels]
    only_a = [lab for lab in big if lab in c.a_labels and lab not in c.b_labels]
    only_b = [lab for lab in big if lab in c.b_labels and lab not in c.a_labels]
    batch = [lab for lab in big if lab in c.a_labels and lab in c.b_labels and lab in c.out_labels]
    if len(contracted) != 1 or len(only_a) != 1 or len(only_b) != 1:
        raise NoMatch("not a product of queries and keys over one feature axis")
    if not batch:
        raise NoMatch("no batch axis shared by queries and keys (a plain matrix product)")
    names = {contracted[0]: "e", only_a[0]: "p", only_b[0]: "m"}
    for i, lab in enumerate(batch):
        names[lab] = f"b{i}"
    for lab, atom in names.items():
        sizes.sizes[atom] = size[lab]

    def axes(labels, shape):
        return tuple((names[lab],) if lab in names and s != 1 else () for lab, s in zip(labels, shape))

    return names, axes(c.a_labels, sa), axes(c.b_labels, sb), axes(c.out_labels, so)


# ---- the quadratic form ------------------------------------------------------------------------
@dataclass
class _Step:
    node: Node
    what: str  # "layout" | "scale" | "mask" | "norm" | "nonlinear"
    detail: object = None


def _walk_back(x: Node) -> tuple[Contraction, list[Node]]:
    memo: dict = {}
    chain: list[Node] = []
    cur = x
    for _ in range(48):
        c = as_contraction(cur)
        if c is not None:
            return c, list(reversed(chain))
        if not isinstance(cur, Node) or cur.op != "call_function":
            raise NoMatch("not a chain from a product")
        if cur.target in SOFTMAX_OPS or cur.target in WRITTEN_SOFTMAX:
            raise NotOurs("softmax")  # also written out as exp(x − max)/Σ: the softmax recogniser's
        chain.append(cur)
        if is_layout_op(cur):
            cur = cur.args[0]
            continue
        cands = [a for a in cur.args[:3] if isinstance(a, Node) and reaches_contraction(a, memo)]
        if cur.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            cands = [a for a in cands if a is not cur.args[0]]
        if cur.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            cands = [a for a in cands if a is cur.args[0]]
        if cur.target == aten.div.Tensor and len(cands) == 2 and row_sum(cur.args[1]) is not None:
            cands = [cur.args[0]]
        if cur.target == aten.mul.Tensor and len(cands) == 2 and sum(map(looks_like_gate, cands)) == 1:
            cands = [a for a in cands if not looks_like_gate(a)]  # exp(G_p − G_m) of a projected gate
        if len(cands) != 1:
            raise NoMatch(f"cannot tell which operand of {cur.name} holds the scores")
        cur = cands[0]
    raise NoMatch("chain too long")


def _classify_step(node: Node, axes: Axes, sizes: AtomSizes, score: Node) -> _Step:
    t = node.target
    args = node.args
    if t in SCALE_OPS:
        other = args[1] if args[0] is score else args[0]
        val = scalar_value(other)
        if val is not None and (t in (aten.mul.Tensor, aten.mul.Scalar) or args[0] is score):
            return _Step(node, "scale", val if t in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / val)
        if t == aten.div.Tensor and args[0] is score:
            rs = row_sum(args[1], of=score)
            if rs is not None and axes[rs[1]] == ("m",):
                return _Step(node, "norm", rs[2])
            return _Step(node, "nonlinear", "÷ by something other than the row sum of the scores")
        if t == aten.mul.Tensor and isinstance(other, Node):
            batch = sorted(a for a in sizes.sizes if a.startswith("b"))
            factor = decay_factor(node, other, axes, sizes, batch)
            if factor is not None:
                return _Step(node, "decay", factor)
            try:
                rows, cols = align(shape_of(other), axes, sizes)
            except NoMatch as exc:
                return _Step(node, "nonlinear", f"× a tensor that is neither a 0/1 mask nor a decay "
                                                f"exp(G_p − G_m) ({exc})")
            return _Step(node, "mask", (other, False, rows, cols))
        return _Step(node, "nonlinear", f"{t}")
    if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        if scalar_value(args[2]) != 0.0:
            return _Step(node, "nonlinear", "masked entries are filled with a non-zero value")
        rows, cols = align(shape_of(args[1]), axes, sizes)
        return _Step(node, "mask", (args[1], True, rows, cols))
    if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        cond, a, b = args[:3]
        if a is score and scalar_value(b) == 0.0:
            invert = False
        elif b is score and scalar_value(a) == 0.0:
            invert = True
        else:
            return _Step(node, "nonlinear", "where() with a non-zero fill")
        rows, cols = align(shape_of(cond), axes, sizes)
        return _Step(node, "mask", (cond, invert, rows, cols))
    if t in EDIT_OPS and args[0] is score:
        return _Step(node, "edit", EDIT_OPS[t])
    return _Step(node, "nonlinear", NONLINEAR.get(t, str(t)))


def _build_cascade(steps: list[_Step], normalize_after: bool, mask_pred) -> Cascade:
    """The original cascade, as the graph wrote it (quadratic form)."""
    b = ("b", "h")

    def t(name, ranks):
        return T(name, (*b, *ranks))

    es = [Einsum(t("FQ", "ep"), (t("Q", "ep"),), "φ"), Einsum(t("FK", "em"), (t("K", "em"),), "φ"),
          Einsum(t("QK", "mp"), (t("FQ", "ep"), t("FK", "em")), "×", "+", mask=mask_pred)]
    cur = "QK"
    for i, s in enumerate(st for st in steps if st.what != "layout"):
        name = f"W{i}"
        if s.what == "scale":
            es.append(Einsum(t(name, "mp"), (t(cur, "mp"), T("c")), "×", note=f"c = {s.detail:g}"))
        elif s.what == "mask":
            es.append(Einsum(t(name, "mp"), (t(cur, "mp"), t("MASK", "mp")), "×", note="0/1 mask"))
        elif s.what == "decay":
            es.append(Einsum(t(name, "mp"), (t(cur, "mp"), t("DECAY", "mp")), "×",
                             note="decay exp(G_p − G_m)" if s.detail.g is not None else "constant factor"))
        elif s.what == "norm":
            es.append(Einsum(t(f"SD{i}", "p"), (t(cur, "mp"),), "id", "+", note="row sum (+ eps)"))
            es.append(Einsum(t(name, "mp"), (t(cur, "mp"), t(f"SD{i}", "p")), "÷"))
        elif s.what == "edit":
            es.append(Einsum(t(name, "mp"), (t(cur, "mp"),), "φ", note=f"edited in place: {s.detail}"))
        else:
            op = s.detail if s.detail in ("exp", "sigmoid", "max") else "φ"
            es.append(Einsum(t(name, "mp"), (t(cur, "mp"),), op, note=f"nonlinear: {s.detail}"))
        cur = name
    es.append(Einsum(t("AV", "fp"), (t(cur, "mp"), t("V", "fm")), "×", "+"))
    if normalize_after:
        es.append(Einsum(t("SD", "p"), (t(cur, "mp"),), "id", "+", note="row sum (+ eps)"))
        es.append(Einsum(t("O", "fp"), (t("AV", "fp"), t("SD", "p")), "÷"))
    return Cascade(tuple(es), name="linear-attention (quadratic, as written)")


def match_quadratic(c2: Contraction) -> LinearSite:
    """C2 = W · V where W comes from C1 = φQ · φKᵀ through linear steps."""
    last_err: Exception | None = None
    for x, v_node, x_labels, v_labels in ((c2.a, c2.b, c2.a_labels, c2.b_labels),
                                          (c2.b, c2.a, c2.b_labels, c2.a_labels)):
        if not isinstance(x, Node):
            continue
        try:
            c1, chain = _walk_back(x)
        except NoMatch as exc:
            last_err = exc
            continue
        return _match_from(c2, c1, chain, x, v_node, x_labels, v_labels)
    raise last_err or NoMatch("no product feeds this one")


def _match_from(c2, c1, chain, x, v_node, x_labels, v_labels) -> LinearSite:
    if c1.node is c2.node or c1.added is not None or c2.added is not None:
        raise NoMatch("baddbmm")
    sizes = AtomSizes({})
    names, qa, ka, axes = _label_atoms(c1, sizes)
    steps: list[_Step] = []
    score = c1.node
    scale = c1.alpha * c2.alpha
    axes_of = {c1.node: axes}
    for node in chain:
        if is_layout_op(node):
            axes = propagate(node, axes, sizes)
            axes_of[node] = axes
            steps.append(_Step(node, "layout"))
        else:
            steps.append(_classify_step(node, axes, sizes, score))
            if steps[-1].what == "scale":
                scale *= steps[-1].detail
            axes_of[node] = axes
        score = node
    # C2's operand x: its labels name atoms.
    lab2atom: dict[str, str] = {}
    for lab, ax in zip(x_labels, axes):
        if lab and ax:
            if len(ax) != 1:
                raise NoMatch("the weights merge logical axes before the product with V")
            lab2atom[lab] = ax[0]
    contracted = [lab for lab in x_labels if lab in v_labels and lab not in c2.out_labels and lab]
    if len(contracted) != 1 or lab2atom.get(contracted[0]) != "m":
        raise NoMatch("the second product does not contract the key axis")
    sv = shape_of(v_node)
    v_axes = []
    f_seen = False
    for lab, s in zip(v_labels, sv):
        if s == 1 or not lab:
            v_axes.append(())
        elif lab in lab2atom:
            v_axes.append((lab2atom[lab],))
        elif not f_seen:
            v_axes.append(("f",))
            sizes.sizes["f"] = s
            f_seen = True
        else:
            raise NoMatch("the values have an axis that is not part of attention")
    if not f_seen:
        raise NoMatch("the values have no feature axis")
    v_axes = tuple(v_axes)
    out_axes = []
    for lab, s in zip(c2.out_labels, shape_of(c2.node)):
        if s == 1 or not lab:
            out_axes.append(())
        elif lab in lab2atom:
            out_axes.append((lab2atom[lab],))
        else:
            out_axes.append(("f",))
    out_axes = out_axes_c2 = tuple(out_axes)
    batch = sorted(a for a in sizes.sizes if a.startswith("b"))
    if sorted(a for ax in out_axes for a in ax) != sorted([*batch, "p", "f"]):
        raise NoMatch("the output does not keep batch, query and value axes")
    location = location_of(c2.node)
    site = LinearSite(spelling="", location=location, form="quadratic", fq=None, fk=None, v=None, out_node=c2.node,
                      atom_sizes=dict(sizes.sizes), batch_atoms=batch, scale=scale)
    site.n, site.m, site.e, site.f = (sizes.sizes[a] for a in ("p", "m", "e", "f"))
    # Normaliser after the product: (W V) ÷ (Σ_m W + eps), through layout ops.
    out, out_ax = c2.node, out_axes
    weights = x
    normalize_after = False
    cur = out
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if is_layout_op(u):
            out_ax = propagate(u, out_ax, sizes)
            cur = u
            continue
        if u.op == "call_function" and u.target == aten.div.Tensor and u.args[0] is cur:
            rs = row_sum(u.args[1])
            if rs is not None and same_weights(rs[0], weights) and rs[0] in axes_of:
                den = den_axes(rs[0], rs[1], axes_of[rs[0]])
                if den is not None and broadcasts_as(den, out_ax):
                    normalize_after, site.eps, out, out_axes = True, rs[2], u, out_ax
        break
    norms = [s for s in steps if s.what == "norm"]
    if norms:
        if steps[-1].what != "norm" and any(s.what != "layout" for s in steps[steps.index(norms[-1]) + 1:]):
            site.rejected = "the weights are changed after their normalisation"
        site.eps = norms[-1].detail
    if len(norms) + normalize_after > 1:
        site.rejected = "normalised twice"
    site.normalize = bool(norms) or normalize_after
    # Masks: the keep predicate over (p, m) for the cascade and, to decide, the mask's value (linear_masks.py).
    decays = [s.detail for s in steps if s.what == "decay"]
    masks = read_masks([*(s.detail for s in steps if s.what == "mask"), *_peeled(decays, sizes)], site.n, site.m)
    site.mask_pred, site.mask_const = masks.pred, masks.keep
    site.rejected = site.rejected or masks.rejected
    if decays and not site.rejected:
        site.decay, why = read_decay(decays, masks.keep, site.n, site.m, dtype_of(decays[0].node))
        site.rejected = why
        if site.decay is not None and masks.keep is None:  # the zeros above the diagonal were in the decay
            site.mask_const = torch.ones(site.n, site.m, dtype=torch.bool).tril()
    nonlinear = [s for s in steps if s.what == "nonlinear"]
    edits = [s for s in steps if s.what == "edit"]
    spelling = [c1.spelling, *(f"{s.what}" for s in steps if s.what != "layout"), c2.spelling]
    if normalize_after:
        spelling.append("÷Σ")
    site.spelling = " → ".join(spelling)
    site.cascade = _build_cascade(steps, normalize_after, site.mask_pred)
    site.notes.append(f"φQ, φK: {phi_name(c1.a)}, {phi_name(c1.b)}")
    if edits:
        site.rejected = site.rejected or (f"the scores are edited in place between the two products "
                                          f"({edits[0].detail}): the weights are then no masked product, so they "
                                          "have no O(N) form")
    if nonlinear:
        site.rejected = site.rejected or (f"a nonlinearity ({nonlinear[0].detail}) sits between the two products: "
                                          "reassociation would change the result")
    # Canonical operands (values without the batch axes are a weight: not attention).
    have_v = {a for ax in v_axes for a in ax}
    if any(a not in have_v for a in batch):
        raise NoMatch("the values lack a batch axis")
    try:
        site.fq = plan_operand(c1.a, qa, (batch, ["p"], ["e"]), sizes, "the queries")
        site.fk = plan_operand(c1.b, ka, (batch, ["m"], ["e"]), sizes, "the keys")
        site.v = plan_operand(v_node, v_axes, (batch, ["m"], ["f"]), sizes, "the values")
    except NoMatch as exc:
        site.rejected = site.rejected or str(exc)
    site.out_node = out
    site.out_atoms = [a for ax in out_axes for a in ax]
    site.out_shape = list(shape_of(out))
    site.out_dtype = dtype_of(out) or torch.float32
    site.nodes = [c1.node, *chain, c2.node, *([out] if out is not c2.node else [])]
    site.bindings = {"q": c1.a, "k": c1.b, "v": v_node, "weights": x, "q_axes": qa, "k_axes": ka,
                     "v_axes": v_axes, "out_axes": tuple(out_axes_c2), "axes_of": axes_of, "c1": c1, "c2": c2}
    return site


def _peeled(decays, sizes: AtomSizes) -> list:
    """The masks found around a gate (``where(tril, exp(G_p − G_m), 0)``), as mask-reader entries."""
    out = []
    for d in decays:
        for cond, invert in d.masks:
            rows, cols = align(shape_of(cond), (("p",), ("m",)), sizes)
            out.append((cond, invert, rows, cols))
    return out
