"""The normal form the linear-attention recognisers read: small exact rules over a copy of the graph.

Every product of tensors is read as one labelled sum of products (a `Product`, what an einsum says) and written
back as the binary einsums the recognisers key on; every multiplication by a reciprocal becomes a division:

- ``x · (1/d)``, ``x · d.reciprocal()``, ``x · d**-1``  →  ``x ÷ d``  (equal at 0, ±inf and NaN too);
- a broadcast product read by a (cum)sum, ``k[..., :, None] · v[..., None, :]``, and a product then a sum,
  ``(q · z).sum(-1)``  →  einsum;
- a row-vector product ``(q.unsqueeze(-2) @ S).squeeze(-2)``  →  einsum;
- an einsum of any number of operands: operands that are reciprocals over output axes only (``bhn`` in
  ``"bhnd,bhde,bhn->bhne"``) become divisions of the result, and the rest a chain of binary einsums in one
  association order (`NaryEinsum`: the finder tries the others when the first is not attention); a pair with
  nothing summed whose one operand's axes lie inside the other's (a mask ``nm`` on the weights ``bhnm``) is the
  multiplication the recognisers read between two products.

The readers of products in their spellings are in linear_products.py.

The rules run on a copy (`NormalForm`), so a spelling read one way and then refused leaves the user's graph as it
was. `NormalForm.to_original` maps a site found on the copy back: a copied node to its original, a node a rule
built to the original node it stands for (same value, same shape). A site that would replace only part of an
original node (one binary product inside a three-operand einsum) is refused with the reason: the rewrite must
replace the whole node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node
from torch.utils._pytree import tree_flatten, tree_map

from .axes import NoMatch, shape_of
from .linear_cse import merge_duplicates
from .linear_products import (
    Product,
    association_orders,
    equation,
    from_product,
    is_call,
    kept_labels,
    product_of_einsum,
    product_of_matmul,
    product_of_mul,
    reciprocal_of,
)

log = logging.getLogger("rewrite")
aten = torch.ops.aten
RULE = "linear_normal"  # meta key of a node a rule built: {"stands_for": original | None, "part_of": …, "rule": …}


# ---- the copy and its rules ------------------------------------------------------------------------
@dataclass
class NaryEinsum:
    """An einsum of more than two operands (or one with a reciprocal operand), written as binary ones."""

    original: Node  # in the user's graph
    spelling: str
    factors: list[tuple[Node, tuple[str, ...]]]  # the operands multiplied in
    dens: list[tuple[Node, tuple[str, ...]]]  # d of each reciprocal operand 1/d (divides the result)
    out: tuple[str, ...]
    trees: list = field(default_factory=list)
    tree: int = 0
    chain: list[Node] = field(default_factory=list)  # the nodes of the current tree, the result last


class NormalForm:
    """A copy of ``graph`` with the rules applied; `to_original` maps sites back."""

    def __init__(self, graph: Graph):
        self.graph = Graph(owning_module=graph.owning_module)
        val_map: dict[Node, Node] = {}
        out = self.graph.graph_copy(graph, val_map)
        if out is not None:
            self.graph.output(out)
        self.origin = {new: old for old, new in val_map.items()}
        self.nary: list[NaryEinsum] = []
        self.built: list[Node] = []
        self.failures: list[tuple[Node, str]] = []  # (node, why): a rule that raised, not a NoMatch
        merge_duplicates(self.graph)
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            start = len(self.built)
            try:
                self._apply(node)
            except Exception as exc:  # noqa: BLE001 - a rule stopped half-way: the node stays as written
                if not isinstance(exc, NoMatch):
                    log.warning("linear normal form: a rule failed on %s (%s): the node is read as written",
                                node.format_node(), exc)
                    self.failures.append((node, f"{type(exc).__name__}: {str(exc)[:160]}"))
                for n in reversed(self.built[start:]):
                    if not n.users:
                        self.graph.erase_node(n)
                del self.built[start:]
        self.graph.eliminate_dead_code()

    # -- building -------------------------------------------------------------------------------
    def _node(self, before: Node, target, args, rule: str, stands_for: Node | None, part_of: Node | None,
              kwargs: dict | None = None) -> Node:
        kwargs = kwargs or {}
        vals = tree_map(lambda a: a.meta.get("val") if isinstance(a, Node) else a, args)
        mode = detect_fake_mode(tree_flatten(vals)[0]) or detect_fake_mode([before.meta.get("val")])
        try:  # the value's shape and dtype, from fake (or meta) tensors: nothing is computed
            with torch.no_grad():
                if mode is not None:
                    with mode:
                        val = target(*vals, **kwargs)
                else:
                    val = target(*tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, vals),
                                 **{**kwargs, **({"device": "meta"} if "device" in kwargs else {})})
        except Exception as exc:  # noqa: BLE001 - a rule that does not apply here: the node stays as written
            raise NoMatch(f"normal form: {rule}: {exc}") from exc
        with self.graph.inserting_before(before):
            n = self.graph.call_function(target, args, kwargs)
        n.meta.update({k: v for k, v in before.meta.items() if k in ("stack_trace", "nn_module_stack")})
        n.meta["val"] = val
        n.meta[RULE] = {"rule": rule, "stands_for": stands_for, "part_of": part_of}
        self.built.append(n)
        return n

    def _replace(self, old: Node, new: Node) -> None:
        if shape_of(new) != shape_of(old) or new.meta["val"].dtype != old.meta["val"].dtype:
            raise NoMatch(f"normal form: {new} does not have {old}'s shape and dtype")  # never replaced then
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)

    def _orig(self, node: Node) -> Node | None:
        info = node.meta.get(RULE)
        return info["stands_for"] if info else self.origin.get(node)

    def _einsum(self, before, product: Product, rule, stands_for, part_of) -> Node:
        """The einsum of ``product``; output labels no operand has (size 1: a peeled unsqueeze) are unsqueezed."""
        have = {x for _, lab in product.operands for x in lab}
        missing = [i for i, x in enumerate(product.out) if x not in have]
        eq = equation([lab for _, lab in product.operands], tuple(x for x in product.out if x in have))
        n = self._node(before, aten.einsum.default, (eq, [o for o, _ in product.operands]), rule,
                       None if missing else stands_for, part_of)
        for i in missing:
            n = self._node(before, aten.unsqueeze.default, (n, i), rule, None, part_of)
        if missing:
            n.meta[RULE]["stands_for"] = stands_for
        return n

    def _apply(self, node: Node) -> None:
        t = node.target
        if t == aten.mul.Tensor:
            for x, r in (node.args[:2], reversed(node.args[:2])):
                d = reciprocal_of(r)
                if isinstance(x, Node) and d is not None and shape_of(x) == shape_of(node):
                    self._replace(node, self._node(node, aten.div.Tensor, (x, d), "× 1/d read as ÷ d",
                                                   self._orig(node), None))
                    return
            users = list(node.users)
            used: set[str] = set()
            prod = product_of_mul(node, used)
            if prod is not None and users and all(is_call(u, aten.cumsum.default) for u in users) and \
                    any(len(lab) < len(prod.out) for _, lab in prod.operands):
                self._replace(node, self._einsum(node, prod, "broadcast outer product read as einsum",
                                                 self._orig(node), self._orig(node)))
            return
        if t == aten.sum.dim_IntList:
            self._sum_of_product(node)
            return
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.select.int):
            self._squeezed_matmul(node)
            return
        if t == aten.einsum.default:
            self._einsum_rule(node)
        if t in (aten.tril.default, aten.triu.default):
            self._triangle_of_scores(node)

    def _triangle_of_scores(self, node: Node) -> None:
        """``scores.tril(k)`` → ``where(tril(ones, k), scores, 0)``: the 0/1 mask the recognisers read (exact:
        NaN and inf above the diagonal become 0 either way)."""
        x = node.args[0]
        shape = shape_of(x)
        if not isinstance(x, Node) or shape is None or len(shape) < 2 or not from_product(x):
            return
        diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        whole, rule = self._orig(node), f"scores.{node.target.__name__.split('.')[0]}() read as a 0/1 mask"
        ones = self._node(node, aten.ones.default, (list(shape[-2:]),), rule, None, whole,
                          {"dtype": torch.bool, "device": x.meta["val"].device})
        keep = self._node(node, node.target, (ones, diagonal), rule, None, whole)
        self._replace(node, self._node(node, aten.where.ScalarOther, (keep, x, 0.0), rule, whole, whole))

    def _sum_of_product(self, node: Node) -> None:
        """``(a · b).sum(dims[, keepdim])`` → einsum (+ unsqueeze), when the product has no other reader."""
        src = node.args[0]
        if not isinstance(src, Node) or len(src.users) != 1 or len(node.args) < 2 or node.kwargs.get("dtype"):
            return
        used: set[str] = set()
        prod = product_of_mul(src, used)
        if prod is None:
            return
        rank = len(prod.out)
        if not node.args[1]:
            return  # sum over every dim (dim=None or [])
        dims = sorted({d + rank if d < 0 else d for d in node.args[1]})
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        summed = Product(prod.operands, tuple(lab for i, lab in enumerate(prod.out) if i not in dims))
        whole = self._orig(node)
        rule = "product then sum read as einsum"
        new = self._einsum(node, summed, rule, None if keep else whole, whole)
        if keep:
            for d in dims:
                new = self._node(node, aten.unsqueeze.default, (new, d), rule, None, whole)
            new.meta[RULE]["stands_for"] = whole
        self._replace(node, new)

    def _squeezed_matmul(self, node: Node) -> None:
        """``(q.unsqueeze(-2) @ S).squeeze(-2)`` (or ``[..., 0, :]``, ``.squeeze()``) → einsum without the size-1
        dim."""
        src = node.args[0]
        if not isinstance(src, Node) or len(src.users) != 1 or not is_call(src, aten.matmul.default, aten.bmm.default):
            return
        shape = shape_of(src)
        used: set[str] = set()
        prod = product_of_matmul(src, used)
        if prod is None or shape is None:
            return
        if node.target == aten.squeeze.default:
            dims = [d for d, size in enumerate(shape) if size == 1]
        elif node.target == aten.select.int:  # x[..., 0, :] of a size-1 dim
            if node.args[2] not in (0, -1):
                return
            dims = [node.args[1]]
        else:
            dims = node.args[1] if node.target == aten.squeeze.dims else [node.args[1]]
        dims = {d + len(shape) if d < 0 else d for d in dims}
        if not dims or any(shape[d] != 1 for d in dims):
            return
        squeezed = Product(prod.operands, tuple(lab for i, lab in enumerate(prod.out) if i not in dims))
        self._replace(node, self._einsum(node, squeezed, "row-vector matmul read as einsum", self._orig(node),
                                         self._orig(node)))

    # -- einsums of several operands ----------------------------------------------------------------
    def _einsum_rule(self, node: Node) -> None:
        prod = product_of_einsum(node)
        if prod is None:
            return
        factors, dens = [], []
        for o, lab in prod.operands:
            d = reciprocal_of(o)
            if d is not None and set(lab) <= set(prod.out) and shape_of(d) == shape_of(o):
                dens.append((d, lab))
            else:
                factors.append((o, lab))
        if len(prod.operands) == 2 and not dens:
            self._sum_first(node, prod)  # otherwise a binary product: the recognisers read it as it is
            return
        if not factors or (len(factors) == 1 and tuple(factors[0][1]) != prod.out):
            return
        nary = NaryEinsum(self._orig(node), f"einsum('{node.args[0]}')", factors, dens, prod.out)
        nary.trees = association_orders([lab for _, lab in factors], prod.out)
        nary.chain = self._build(node, nary, nary.trees[0])
        self._replace(node, nary.chain[-1])
        self.nary.append(nary)

    def _sum_first(self, node: Node, prod: Product) -> None:
        """A label only one operand has and the output lacks is summed in that operand first:
        ``einsum("bhnd,bhmd->bhn", q, k)`` = ``einsum("bhnd,bhd->bhn", q, k.sum(2))`` (φQ · Σ_m φK)."""
        (a, la), (b, lb) = prod.operands
        operands = []
        for x, lab, other in ((a, la, lb), (b, lb, la)):
            private = [i for i, c in enumerate(lab) if c not in other and c not in prod.out]
            if private and any(c in other for c in lab):  # an operand summed whole is left as written
                x = self._node(node, aten.sum.dim_IntList, (x, private), "a sum over one operand's own axis taken "
                               "first", None, self._orig(node))
                lab = tuple(c for i, c in enumerate(lab) if i not in private)
            operands.append((x, lab))
        if operands != list(prod.operands):
            self._replace(node, self._einsum(node, Product(operands, prod.out), "a sum over one operand's own "
                                             "axis taken first", self._orig(node), self._orig(node)))

    def _build(self, before: Node, nary: NaryEinsum, tree) -> list[Node]:
        """The nodes of ``tree`` (binary products of the factors) then the divisions: the result last."""
        chain: list[Node] = []
        rule = f"{nary.spelling} read as binary products" + (", × 1/d as ÷ d" if nary.dens else "")
        whole = nary.original

        def emit(t, top: bool):
            if isinstance(t, int):
                return nary.factors[t]
            (na, la), (nb, lb) = emit(t[0], False), emit(t[1], False)
            keep = kept_labels(t, [lab for _, lab in nary.factors], nary.out)
            out = nary.out if top else tuple(dict.fromkeys(x for x in (*la, *lb) if x in keep))
            stands = whole if top and not nary.dens else None
            (nbig, lbig), (nsmall, lsmall) = ((na, la), (nb, lb)) if len(la) >= len(lb) else ((nb, lb), (na, la))
            if set(lsmall) <= set(lbig) and set(out) == set(lbig) and (not top or lbig == out):
                # Nothing summed and one operand's axes inside the other's: an elementwise product (a mask or a
                # scale), written as the multiplication the recognisers read between two products.
                n = self._node(before, aten.mul.Tensor, (nbig, self._broadcast(before, nsmall, lsmall, lbig, rule,
                                                                                whole, chain)), rule, stands, whole)
                chain.append(n)
                return n, lbig
            n = self._node(before, aten.einsum.default, (equation([la, lb], out), [na, nb]), rule, stands, whole)
            chain.append(n)
            return n, out

        if isinstance(tree, int):
            cur = nary.factors[tree][0]
        else:
            cur = emit(tree, True)[0]
        for i, (d, lab) in enumerate(nary.dens):
            b = self._broadcast(before, d, lab, nary.out, rule, whole, chain)
            last = i == len(nary.dens) - 1
            cur = self._node(before, aten.div.Tensor, (cur, b), rule, whole if last else None, whole)
            chain.append(cur)
        return chain

    def _broadcast(self, before, node: Node, labels, out, rule, whole, chain: list[Node]) -> Node:
        """``node`` (with ``labels``) permuted and unsqueezed to broadcast against a tensor labelled ``out``."""
        order = [x for x in out if x in labels]
        if list(labels) != order:
            node = self._node(before, aten.permute.default, (node, [labels.index(x) for x in order]), rule, None,
                              whole)
            chain.append(node)
        for j, x in enumerate(out):
            if x not in labels:
                node = self._node(before, aten.unsqueeze.default, (node, j), rule, None, whole)
                chain.append(node)
        return node

    def resplit(self, nary: NaryEinsum, index: int) -> None:
        """Write ``nary`` in its ``index``-th association order instead of the current one."""
        old = nary.chain
        start = len(self.built)
        try:
            nary.chain = self._build(old[-1], nary, nary.trees[index])
        except NoMatch:
            for n in reversed(self.built[start:]):
                if not n.users:
                    self.graph.erase_node(n)
            del self.built[start:]
            raise
        nary.tree = index
        old[-1].replace_all_uses_with(nary.chain[-1])
        for n in reversed(old):
            if not n.users:
                self.graph.erase_node(n)

    # -- back to the user's graph -----------------------------------------------------------------
    def to_original(self, site):
        """The site with every node of the copy mapped to the user's graph (refused when it would replace
        part of a node)."""
        rules: list[str] = []

        def back(node, parts: list | None = None):
            if not isinstance(node, Node):
                return node
            info = node.meta.get(RULE)
            if info is None:
                return self.origin.get(node)
            if info["rule"] not in rules:
                rules.append(info["rule"])
            if info["stands_for"] is None:
                if parts is not None:
                    parts.append(info["part_of"])
                return info["part_of"]
            return info["stands_for"]

        out_parts: list[Node] = []
        out = back(site.out_node, out_parts)
        if out is None:
            return None
        for plan in (site.fq, site.fk, site.v, getattr(site.decay, "g", None)):
            if plan is not None:
                parts: list[Node] = []
                plan.node = back(plan.node, parts)
                if parts and not site.rejected:
                    site.rejected = (f"an operand is built from other operands of {_spelling(parts[0])}: only part "
                                     "of it is linear attention, so the rewrite cannot replace the whole einsum")
        site.nodes = list(dict.fromkeys(n for n in map(back, site.nodes) if n is not None))
        if out_parts and not site.rejected:
            site.rejected = _part_reason(out_parts[0], site)
        site.out_node = out
        site.bindings = {}
        if rules:
            site.spelling += " (normal form: " + "; ".join(rules) + ")"
            site.notes.append("normal form: " + "; ".join(rules))
        return site


def _spelling(node: Node) -> str:
    if is_call(node, aten.einsum.default):
        return f"einsum('{node.args[0]}')"
    return node.name


def _part_reason(whole: Node, site) -> str:
    what = _spelling(whole)
    return (f"only part of {what} is linear attention: its other operands are no normaliser (a reciprocal "
            f"1/(φQ·ΣφK) over the output's axes{' of these queries and keys' if site.normalize else ''}), so the "
            "rewrite cannot replace the whole einsum")
