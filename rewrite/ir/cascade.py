"""The one IR: extended Einsum cascades (FuseMax's notation).

A `Cascade` is an ordered tuple of `Einsum`s. Each names its output and inputs with
their ranks (FuseMax letters: ``p`` query position, ``m`` key position, ``e`` q/k
embedding, ``f`` value embedding, ``b`` batch, ``h`` head), a map operator applied
point-wise to the inputs, a reduce operator over the ranks that vanish from the
output, and an optional mask predicate (a sympy Boolean over position symbols).

Ranks that split a longer rank into tiles carry a digit suffix (``m1`` the tile
index, ``m0`` the position inside a tile); both belong to the *family* ``m``. An
Einsum marked ``scan`` is a recurrence over the named rank (FuseMax's running max
``RM[m1+1] = max(RM[m1], LM[m1])``): it walks the rank once, in order, and does not
need the whole fiber before it can continue, which is what lets a cascade run in
one pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import networkx as nx
import sympy

# Operation counts of map operators on a vector unit (FuseMax: exp is 6 MACs + 1 add).
MAP_OPS: dict[str, int] = {
    "×": 1, "+": 1, "−": 1, "÷": 1, "max": 1, "id": 0, "exp": 7, "sigmoid": 9,
    "φ": 2, "cast": 0, "where": 1, "select": 1,
    "fma": 2,  # fma(a, b, c) = a + b·c: a running state updated by a product (one MAC)
    "mod": 4,  # a site's score modifier (ir/score_mod.py), e.g. soft-capping's tanh and two products
}
REDUCE_OPS = ("+", "max")

# Integer position symbols used in mask predicates.
p, m = sympy.symbols("p m", integer=True, nonnegative=True)


def rank_family(rank: str) -> str:
    """``m1`` and ``m0`` are tiles of ``m``; ``m`` is its own family."""
    return re.sub(r"\d+$", "", rank)


@dataclass(frozen=True)
class TensorRef:
    """A tensor named in a cascade and the ranks that index it."""

    name: str
    ranks: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name}[{','.join(self.ranks)}]" if self.ranks else self.name


def T(name: str, ranks: str | Iterable[str] = "") -> TensorRef:
    """Short constructor: ``T("QK", "mp")`` or ``T("RM", ["m1", "p"])``."""
    if isinstance(ranks, str):
        ranks = tuple(ranks)
    return TensorRef(name, tuple(ranks))


@dataclass(frozen=True)
class Einsum:
    """One extended Einsum: ``out[...] = reduce_{vanishing ranks} map(inputs) where mask``."""

    output: TensorRef
    inputs: tuple[TensorRef, ...]
    map_op: str = "×"
    reduce_op: str | None = None
    mask: sympy.Basic | None = None
    scan: str | None = None  # a rank this Einsum walks as a recurrence (not a reduction)
    note: str = ""

    def __post_init__(self) -> None:
        if self.map_op not in MAP_OPS:
            raise ValueError(f"Einsum {self.output.name}: unknown map operator {self.map_op!r}; "
                             f"use one of {sorted(MAP_OPS)}")
        if self.reduce_op is not None and self.reduce_op not in REDUCE_OPS:
            raise ValueError(f"Einsum {self.output.name}: reduce operator must be one of {REDUCE_OPS}")
        if self.reduced_ranks and self.reduce_op is None:
            raise ValueError(f"Einsum {self.output.name}: ranks {self.reduced_ranks} vanish from the "
                             "output but no reduce operator is given")

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def iteration_ranks(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for ref in (*self.inputs, self.output):
            for r in ref.ranks:
                seen.setdefault(r, None)
        return tuple(seen)

    @property
    def reduced_ranks(self) -> tuple[str, ...]:
        out = set(self.output.ranks)
        return tuple(r for r in self.iteration_ranks if r not in out and r != self.scan)

    def reads_whole_fiber(self, family: str) -> bool:
        """True when the output needs every position of ``family`` before it is known."""
        ranks_in = [r for r in self.iteration_ranks if rank_family(r) == family]
        return bool(ranks_in) and all(r in self.reduced_ranks for r in ranks_in)

    def iterates(self, family: str) -> bool:
        return any(rank_family(r) == family for r in self.iteration_ranks)

    def __str__(self) -> str:
        sym = {"×": " · ", "+": " + ", "−": " − ", "÷": " ÷ ", "max": " max "}
        if self.map_op == "fma" and len(self.inputs) == 3:
            a, x, y = (str(i) for i in self.inputs)
            return self._with_tail(f"{self.output} = {a} + {x} · {y}")
        args = [str(i) for i in self.inputs]
        if self.map_op in sym:
            body = sym[self.map_op].join(args)
        elif self.map_op == "id":
            body = args[0] if args else ""
        else:
            body = f"{self.map_op}({', '.join(args)})"
        return self._with_tail(f"{self.output} = {body}")

    def _with_tail(self, text: str) -> str:
        tail = []
        if self.reduce_op and self.reduced_ranks:
            tail.append(f"({'Σ' if self.reduce_op == '+' else 'max'} {','.join(self.reduced_ranks)})")
        if self.scan:
            tail.append(f"(scan {self.scan})")
        if self.mask is not None and self.mask is not sympy.true:
            tail.append(f"where {self.mask}")
        if self.note:
            tail.append(f"# {self.note}")
        return text + ("   " + " ".join(tail) if tail else "")


@dataclass(frozen=True)
class Cascade:
    """An ordered tuple of Einsums; the one IR every pass reads."""

    einsums: tuple[Einsum, ...]
    name: str = "cascade"
    rank_sizes: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        produced: set[str] = set()
        for e in self.einsums:
            if e.output.name in produced and e.scan is None:
                raise ValueError(f"cascade {self.name}: {e.output.name} is produced twice")
            produced.add(e.output.name)

    # ---- structure ---------------------------------------------------------------------
    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.einsums)

    def __iter__(self):
        return iter(self.einsums)

    def __len__(self) -> int:
        return len(self.einsums)

    def __getitem__(self, name: str) -> Einsum:
        for e in self.einsums:
            if e.name == name:
                return e
        raise KeyError(f"cascade {self.name} has no Einsum producing {name}")

    @property
    def outputs(self) -> tuple[str, ...]:
        used = {i.name for e in self.einsums for i in e.inputs}
        return tuple(e.name for e in self.einsums if e.name not in used)

    @property
    def inputs(self) -> tuple[TensorRef, ...]:
        produced = {e.name for e in self.einsums}
        seen: dict[str, TensorRef] = {}
        for e in self.einsums:
            for i in e.inputs:
                if i.name not in produced:
                    seen.setdefault(i.name, i)
        return tuple(seen.values())

    def graph(self) -> nx.DiGraph:
        """Einsums as nodes, an edge producer → consumer labelled with the tensor."""
        g = nx.DiGraph(name=self.name)
        producer = {}
        for e in self.einsums:
            g.add_node(e.name, einsum=e)
            for i in e.inputs:
                if i.name in producer and producer[i.name] != e.name:
                    g.add_edge(producer[i.name], e.name, tensor=i.name)
            producer[e.name] = e.name
        return g

    def with_sizes(self, **sizes: object) -> Cascade:
        return replace(self, rank_sizes={**self.rank_sizes, **sizes})

    # ---- analyses that belong with the IR ------------------------------------------------
    def pass_levels(self, family: str = "m") -> dict[str, int]:
        """The pass over rank ``family`` in which each Einsum runs (0: it does not walk the
        rank). FuseMax §4: an Einsum that walks the rank and depends on a value reduced over
        the *whole* fiber must start a new pass, also when the dependency runs through
        Einsums that do not walk the rank (Flow-Attention's Ô needs Σ_m φK through I)."""
        producer = {e.name: e for e in self.einsums}
        level: dict[str, int] = {}
        complete_after: dict[str, int] = {}  # the pass after which the value is fully known
        for e in self.einsums:
            walks = e.iterates(family)
            lv = 1 if walks else 0
            needs = 0
            for i in e.inputs:
                src = producer.get(i.name)
                if src is None or src is e:
                    continue
                needs = max(needs, complete_after[src.name])
                lv = max(lv, level[src.name])
                if walks and complete_after[src.name]:
                    lv = max(lv, complete_after[src.name] + 1)
            level[e.name] = lv
            complete_after[e.name] = max(needs, lv if e.reads_whole_fiber(family) else 0)
        return level

    def pass_count(self, family: str = "m") -> int:
        """Passes over rank ``family`` (see ``pass_levels``): 3 for the softmax cascade, 1 for
        the online-softmax one."""
        return max(self.pass_levels(family).values(), default=0)

    def size(self, rank: str) -> sympy.Expr:
        fam = rank_family(rank)
        v = self.rank_sizes.get(rank, self.rank_sizes.get(fam))
        return sympy.sympify(v) if v is not None else sympy.Symbol(rank.upper(), positive=True, integer=True)

    def flops(self) -> sympy.Expr:
        """Operations over the whole cascade: each Einsum's iteration space × its map cost
        (+1 per point for a reduction). Masks are not discounted here; the cost pass
        scales by the mask's kept fraction."""
        total = sympy.Integer(0)
        for e in self.einsums:
            space = sympy.Integer(1)
            for r in e.iteration_ranks:
                space *= self.size(r)
            per_point = MAP_OPS[e.map_op] + (1 if e.reduce_op and e.reduced_ranks else 0)
            total += space * per_point
        return sympy.simplify(total)

    # ---- the canonical cascades ----------------------------------------------------------
    @staticmethod
    def softmax_attention(mask: sympy.Basic | None = None, batch: str = "bh", score_mod: str = "") -> Cascade:
        """The 3-pass softmax cascade every softmax-attention spelling is normalised to. ``score_mod``
        (a `ScoreMod` as text): a pointwise modifier of the raw products, before the mask."""
        b = tuple(batch)
        qk = T("QK", (*b, "m", "p"))
        head: tuple[Einsum, ...] = (
            Einsum(qk, (T("Q", (*b, "e", "p")), T("K", (*b, "e", "m"))), "×", "+", mask=None if score_mod else mask),)
        if score_mod:
            head += (Einsum(T("QKM", (*b, "m", "p")), (qk,), "mod", mask=mask, note=f"s' = {score_mod}"),)
            qk = T("QKM", (*b, "m", "p"))
        return Cascade((
            *head,
            Einsum(T("GM", (*b, "p")), (qk,), "id", "max"),
            Einsum(T("SN", (*b, "m", "p")), (qk, T("GM", (*b, "p"))), "−",
                   note="then exp"),
            Einsum(T("SE", (*b, "m", "p")), (T("SN", (*b, "m", "p")),), "exp"),
            Einsum(T("SD", (*b, "p")), (T("SE", (*b, "m", "p")),), "id", "+"),
            Einsum(T("A", (*b, "m", "p")), (T("SE", (*b, "m", "p")), T("SD", (*b, "p"))), "÷"),
            Einsum(T("AV", (*b, "f", "p")), (T("A", (*b, "m", "p")), T("V", (*b, "f", "m"))), "×", "+"),
        ), name="softmax-attention (3-pass)")

    @staticmethod
    def online_softmax_attention(mask: sympy.Basic | None = None, batch: str = "bh") -> Cascade:
        """The 1-pass cascade (FlashAttention-2 / FuseMax): m split into tiles (m1, m0),
        a running max RM and rescaled running sums RD, RNV carried across m1."""
        b = tuple(batch)

        def t(name, ranks):
            return T(name, (*b, *ranks))

        return Cascade((
            Einsum(t("BQK", ["m1", "m0", "p"]), (t("Q", ["e", "p"]), t("BK", ["e", "m1", "m0"])), "×", "+",
                   mask=mask),
            Einsum(t("LM", ["m1", "p"]), (t("BQK", ["m1", "m0", "p"]),), "id", "max"),
            Einsum(t("RM", ["m1", "p"]), (t("RM", ["m1", "p"]), t("LM", ["m1", "p"])), "max", scan="m1",
                   note="RM' = max(RM, LM)"),
            Einsum(t("SLN", ["m1", "m0", "p"]), (t("BQK", ["m1", "m0", "p"]), t("RM", ["m1", "p"])), "exp",
                   note="exp(BQK − RM')"),
            Einsum(t("SLD", ["m1", "p"]), (t("SLN", ["m1", "m0", "p"]),), "id", "+"),
            Einsum(t("SLNV", ["m1", "f", "p"]), (t("SLN", ["m1", "m0", "p"]), t("BV", ["f", "m1", "m0"])),
                   "×", "+"),
            Einsum(t("PRM", ["m1", "p"]), (t("RM", ["m1", "p"]),), "exp", scan="m1", note="exp(RM − RM')"),
            Einsum(t("RD", ["m1", "p"]), (t("SLD", ["m1", "p"]), t("RD", ["m1", "p"]), t("PRM", ["m1", "p"])),
                   "+", scan="m1", note="RD' = SLD + RD·PRM"),
            Einsum(t("RNV", ["m1", "f", "p"]),
                   (t("SLNV", ["m1", "f", "p"]), t("RNV", ["m1", "f", "p"]), t("PRM", ["m1", "p"])),
                   "+", scan="m1", note="RNV' = SLNV + RNV·PRM"),
            Einsum(t("AV", ["f", "p"]), (t("RNV", ["m1", "f", "p"]), t("RD", ["m1", "p"])), "÷", "+",
                   note="final state: RNV[M1] ÷ RD[M1]"),
        ), name="softmax-attention (1-pass, online softmax)")

    @staticmethod
    def linear_attention(causal: bool = False, feature_map: str = "φ", batch: str = "bh", normalize: bool = True,
                         decay: bool = False) -> Cascade:
        """Linear attention O = φQ (φKᵀ V) ÷ φQ (φKᵀ 1): one pass over m, no [m,p] tensor.

        Causal: the key-side sums become running states over m (prefix sums); each query
        reads the state at its own position (``where m = p``). ``decay``: the running state is
        multiplied by exp(G_m − G_{m−1}) before each step (retention, gated linear attention)."""
        b = tuple(batch)

        def t(name, ranks):
            return T(name, (*b, *ranks))

        fq = Einsum(t("FQ", "ep"), (t("Q", "ep"),), feature_map)
        fk = Einsum(t("FK", "em"), (t("K", "em"),), feature_map)
        if not causal:
            body = (
                Einsum(t("KV", "ef"), (t("FK", "em"), t("V", "fm")), "×", "+"),
                Einsum(t("KS", "e"), (t("FK", "em"),), "id", "+"),
                Einsum(t("NUM", "fp"), (t("FQ", "ep"), t("KV", "ef")), "×", "+"),
                Einsum(t("DEN", "p"), (t("FQ", "ep"), t("KS", "e")), "×", "+"),
            )
        else:
            at_p = sympy.Eq(m, p)
            kv = (Einsum(t("KV", "mef"), (t("KV", "mef"), t("DG", "m"), t("FK", "em"), t("V", "fm")), "fma",
                         scan="m", note="running exp(G_m − G_{m−1})·state + φK·Vᵀ") if decay else
                  Einsum(t("KV", "mef"), (t("KV", "mef"), t("FK", "em"), t("V", "fm")), "fma", scan="m",
                         note="running Σ φK·Vᵀ"))
            body = (
                kv,
                Einsum(t("KS", "me"), (t("KS", "me"), t("FK", "em")), "+", scan="m", note="running Σ φK"),
                Einsum(t("NUM", "fp"), (t("FQ", "ep"), t("KV", "mef")), "×", "+", mask=at_p),
                Einsum(t("DEN", "p"), (t("FQ", "ep"), t("KS", "me")), "×", "+", mask=at_p),
            )
        if not normalize:
            body = tuple(e for e in body if e.name not in ("KS", "DEN"))
            out = Einsum(t("AV", "fp"), (t("NUM", "fp"),), "id")
        else:
            out = Einsum(t("AV", "fp"), (t("NUM", "fp"), t("DEN", "p")), "÷")
        kind = ("decay-gated " if decay else "") + ("causal" if causal else "non-causal")
        return Cascade((fq, fk, *body, out), name=f"linear-attention ({kind})")

    @staticmethod
    def flow_attention(batch: str = "bh") -> Cascade:
        """Flow-Attention (Flowformer), non-causal: sigmoid feature maps, flow conservation,
        a softmax competition over the sources (m) and a sigmoid allocation over the sinks (p)."""
        b = tuple(batch)

        def t(name, ranks):
            return T(name, (*b, *ranks))

        return Cascade((
            Einsum(t("FQ", "ep"), (t("Q", "ep"),), "sigmoid"),
            Einsum(t("FK", "em"), (t("K", "em"),), "sigmoid"),
            Einsum(t("SK", "e"), (t("FK", "em"),), "id", "+"),
            Einsum(t("SQ", "e"), (t("FQ", "ep"),), "id", "+"),
            Einsum(t("I", "p"), (t("FQ", "ep"), t("SK", "e")), "×", "+", note="incoming flow"),
            Einsum(t("O", "m"), (t("FK", "em"), t("SQ", "e")), "×", "+", note="outgoing flow"),
            Einsum(t("KO", "em"), (t("FK", "em"), t("O", "m")), "÷"),
            Einsum(t("SKO", "e"), (t("KO", "em"),), "id", "+"),
            Einsum(t("QI", "ep"), (t("FQ", "ep"), t("I", "p")), "÷"),
            Einsum(t("SQI", "e"), (t("QI", "ep"),), "id", "+"),
            Einsum(t("IH", "p"), (t("FQ", "ep"), t("SKO", "e")), "×", "+", note="conserved incoming Î"),
            Einsum(t("OH", "m"), (t("FK", "em"), t("SQI", "e")), "×", "+", note="conserved outgoing Ô"),
            Einsum(t("MX", ""), (t("OH", "m"),), "id", "max"),
            Einsum(t("EX", "m"), (t("OH", "m"), t("MX", "")), "exp", note="exp(Ô − max Ô)"),
            Einsum(t("SE", ""), (t("EX", "m"),), "id", "+"),
            Einsum(t("W", "m"), (t("EX", "m"), t("SE", "")), "÷", note="competition softmax(Ô) (× M)"),
            Einsum(t("VH", "fm"), (t("V", "fm"), t("W", "m")), "×"),
            Einsum(t("KVH", "ef"), (t("FK", "em"), t("VH", "fm")), "×", "+"),
            Einsum(t("R", "fp"), (t("QI", "ep"), t("KVH", "ef")), "×", "+", note="aggregation"),
            Einsum(t("G", "p"), (t("IH", "p"),), "sigmoid", note="allocation (× N/M)"),
            Einsum(t("AV", "fp"), (t("R", "fp"), t("G", "p")), "×"),
        ), name="flow-attention")

    @staticmethod
    def gemm(M: int, N: int, K: int) -> Cascade:
        """C[M,N] = A[M,K] · B[K,N] as a one-Einsum cascade (ranks named m, n, k)."""
        return Cascade((Einsum(T("C", "mn"), (T("A", "mk"), T("B", "kn")), "×", "+"),),
                       name=f"gemm {M}x{N}x{K}", rank_sizes={"m": M, "n": N, "k": K})
