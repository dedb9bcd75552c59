"""A small canonical expression algebra over named axes, for recognising Flow-Attention by what it computes.

An `Expr` is a tensor-valued expression whose value at an index depends only on the atoms in ``free``
(named axes: batch atoms, the query axis, the key axis, features). Layout is gone: a transposed or
reshaped tensor is the same Expr. The constructors keep every expression in one canonical form, so two
spellings that are equal by the rules below build the same ``key``:

- products are flat: a coefficient times bases with integer exponents, bases sorted (x·y⁻¹ ≡ x/y);
- sums of terms are flat: a constant plus sorted terms;
- a sum (or prefix sum) over atoms keeps only the factors that depend on those atoms, the others and the
  coefficient move out (Σ_m a·x_m = a·Σ_m x_m); nested sums merge;
- softmax over an atom is its own head; exp(y)·(Σ exp(y))⁻¹ written out is the same when y = x − max x
  (the stable form) or y is clamped (otherwise eager's written-out form overflows where softmax does not);
- x·x⁻¹ cancels only for values in (0, ∞) (sigmoids + eps, p + 1, …): for a value that may be 0 or ∞
  eager computes NaN there, so the lift refuses.

``key`` is the canonical form as text; ``shape_key`` is the same with every constant blanked, so a
mismatch that is only a constant can be named.
"""

from __future__ import annotations

import math

from .axes import NoMatch


class Expr:
    __slots__ = ("head", "args", "key", "shape_key", "free", "_hash")

    def __init__(self, head: str, args: tuple, free: frozenset):
        self.head, self.args, self.free = head, args, free
        self.key = _key(head, args, blank=False)
        self.shape_key = _key(head, args, blank=True)
        self._hash = hash(self.key)

    def __eq__(self, other):
        return isinstance(other, Expr) and other.key == self.key

    def __hash__(self):
        return self._hash

    def __repr__(self):
        return self.key

    def walk(self):
        """Every sub-expression, this one included (each once)."""
        seen: dict[str, Expr] = {}
        stack = [self]
        while stack:
            x = stack.pop()
            if x.key in seen:
                continue
            seen[x.key] = x
            stack.extend(_children(x))
        return list(seen.values())

    def constants(self) -> list[float]:
        """The constants in ``key``'s order (what ``shape_key`` blanks)."""
        out: list[float] = []
        _collect_constants(self, out)
        return out


def _children(x: Expr) -> list[Expr]:
    h, a = x.head, x.args
    if h in ("fn",):
        return [a[1]]
    if h == "clamp":
        return [a[0]]
    if h in ("sum", "cumsum", "softmax", "max"):
        return [a[1]]
    if h == "prod":
        return [b for b, _ in a[1]]
    if h == "add":
        return list(a[1])
    return []


def _collect_constants(x: Expr, out: list[float]) -> None:
    h, a = x.head, x.args
    if h == "const":
        out.append(a[0])
    elif h == "clamp":
        _collect_constants(a[0], out)
        out.extend(v for v in a[1:] if v is not None)
    elif h == "prod":
        out.append(a[0])
        for b, _ in a[1]:
            _collect_constants(b, out)
    elif h == "add":
        out.append(a[0])
        for t in a[1]:
            _collect_constants(t, out)
    else:
        for c in _children(x):
            _collect_constants(c, out)


def _num(v, blank: bool) -> str:
    return "#" if blank else repr(float(v))


def _key(head: str, args: tuple, blank: bool) -> str:
    k = (lambda e: e.shape_key) if blank else (lambda e: e.key)
    if head == "leaf":
        return f"{args[0]}[{','.join(args[1])}]"
    if head == "pos":
        return f"pos<{args[0]}>"
    if head == "const":
        return _num(args[0], blank)
    if head == "fn":
        return f"{args[0]}({k(args[1])})"
    if head == "clamp":
        lo, hi = ("-" if v is None else _num(v, blank) for v in args[1:])
        return f"clamp({k(args[0])},{lo},{hi})"
    if head == "softmax":
        return f"softmax_{args[0]}({k(args[1])})"
    if head == "max":
        return f"max_{{{','.join(args[0])}}}({k(args[1])})"
    if head in ("sum", "cumsum"):
        atoms = args[0] if head == "sum" else (args[0],)
        return f"{'Σ' if head == 'sum' else 'cumΣ'}_{{{','.join(atoms)}}}({k(args[1])})"
    if head == "prod":
        body = "·".join(k(b) if e == 1 else f"{k(b)}^{e}" for b, e in args[1])
        return f"({_num(args[0], blank)}*{body})"
    if head == "add":
        return f"({_num(args[0], blank)}+{'+'.join(k(t) for t in args[1])})"
    raise ValueError(head)


# ---- constructors (every one returns the canonical form) -------------------------------------------
def leaf(name: str, atoms: tuple[str, ...]) -> Expr:
    return Expr("leaf", (name, tuple(atoms)), frozenset(atoms))


def pos(atom: str) -> Expr:
    """The position along ``atom`` (0, 1, 2, …): what ``arange`` holds."""
    return Expr("pos", (atom,), frozenset((atom,)))


def const(c: float) -> Expr:
    return Expr("const", (float(c),), frozenset())


def fn(name: str, x: Expr) -> Expr:
    return Expr("fn", (name, x), x.free)


def clamp(x: Expr, lo: float | None, hi: float | None) -> Expr:
    """clamp(clamp(x, a, b), c, d) is clamp(x, max(a, c), min(b, d)) when the two ranges overlap."""
    lo, hi = (None if v is None else float(v) for v in (lo, hi))
    if x.head == "clamp":
        inner, a, b = x.args
        new_lo = a if lo is None else (lo if a is None else max(a, lo))
        new_hi = b if hi is None else (hi if b is None else min(b, hi))
        if new_lo is None or new_hi is None or new_lo <= new_hi:
            return Expr("clamp", (inner, new_lo, new_hi), inner.free)
    return Expr("clamp", (x, lo, hi), x.free)


def _factors(x: Expr) -> tuple[float, list[tuple[Expr, int]]]:
    if x.head == "prod":
        return x.args[0], list(x.args[1])
    if x.head == "const":
        return x.args[0], []
    return 1.0, [(x, 1)]


def finite_nonneg(x: Expr) -> bool:
    """x ≥ 0 and finite wherever the inputs are finite."""
    h, a = x.head, x.args
    if h == "fn":
        return a[0] == "sigmoid"
    if h in ("pos", "const"):
        return h == "pos" or a[0] >= 0
    if h in ("add", "prod"):
        return a[0] >= 0 and all(finite_nonneg(t) for t in a[1]) if h == "add" else (
            a[0] >= 0 and all(e > 0 and finite_nonneg(b) for b, e in a[1]))
    if h in ("sum", "cumsum"):
        return finite_nonneg(a[1])
    return False


def safe_divisor(x: Expr) -> bool:
    """x is in (0, ∞) wherever the inputs are finite (sigmoids + eps, p + 1, their sums and products), so
    x·x⁻¹ = 1 in floating point too (up to rounding), not 0·∞."""
    h, a = x.head, x.args
    if h == "const":
        return a[0] > 0
    if h == "add":
        return a[0] > 0 and all(finite_nonneg(t) for t in a[1])
    if h == "prod":
        return a[0] > 0 and all(safe_divisor(b) for b, _ in a[1])
    if h in ("sum", "cumsum"):
        return safe_divisor(a[1])
    return False


def _stable_argument(y: Expr, atom: str) -> Expr | None:
    """x when y is x − max_atom(x) (the written-out stable softmax subtracts the max), else None."""
    if y.head != "add":
        return None
    for t in y.args[1]:
        if t.head == "prod" and t.args[0] == -1.0 and len(t.args[1]) == 1 and t.args[1][0][1] == 1:
            mx = t.args[1][0][0]
            if mx.head == "max" and mx.args[0] == (atom,):
                rest = add(y.args[0], *(u for u in y.args[1] if u is not t))
                if rest == mx.args[1]:
                    return rest
    return None


def _softmax_written_out(acc: dict[str, list]) -> None:
    """exp(y)·(Σ_a exp(y))⁻¹ is softmax over a when y = x − max_a x (the stable form), or when y is clamped
    to finite bounds (it cannot overflow there); otherwise eager's written-out form overflows where softmax
    does not, so it stays as it is."""
    for key, (b, e) in list(acc.items()):
        if b.head != "sum" or e != -1 or len(b.args[0]) != 1 or b.args[1].head != "fn" or b.args[1].args[0] != "exp":
            continue
        ex, atom = b.args[1], b.args[0][0]
        y = ex.args[1]
        x = y if y.head == "clamp" and None not in y.args[1:] else _stable_argument(y, atom)
        if x is not None and ex.key in acc and acc[ex.key][1] == 1:
            del acc[key], acc[ex.key]
            sm = softmax(atom, x, {})
            acc[sm.key] = [sm, 1]


def reduce_max(atoms, x: Expr) -> Expr:
    """The max over ``atoms`` (torch.amax); over atoms x does not depend on, x itself."""
    atoms = set(atoms) & x.free
    return x if not atoms else Expr("max", (tuple(sorted(atoms)), x), x.free - atoms)


def _build_prod(coeff: float, items: list[tuple[Expr, int]]) -> Expr:
    acc: dict[str, list] = {}
    signs: dict[str, set] = {}
    for b, e in items:
        if b.key in acc:
            acc[b.key][1] += e
        else:
            acc[b.key] = [b, e]
        signs.setdefault(b.key, set()).add(e > 0)
    for key, (b, _e) in acc.items():
        if len(signs[key]) == 2 and not safe_divisor(b):
            raise NoMatch(f"a value that may be 0 or ∞ cancels against its reciprocal: {b.key[:80]}")
    _softmax_written_out(acc)
    kept = sorted(((b, e) for b, e in acc.values() if e != 0), key=lambda be: (be[0].shape_key, be[0].key))
    if not kept:
        return const(coeff)
    if coeff == 1.0 and len(kept) == 1 and kept[0][1] == 1:
        return kept[0][0]
    return Expr("prod", (float(coeff), tuple(kept)), frozenset().union(*(b.free for b, _ in kept)))


def mul(*xs: Expr | float) -> Expr:
    coeff, items = 1.0, []
    for x in xs:
        c, fs = _factors(x if isinstance(x, Expr) else const(x))
        coeff *= c
        items += fs
    return _build_prod(coeff, items)


def power(x: Expr, n: int) -> Expr:
    c, fs = _factors(x)
    if c == 0 and n < 0:
        raise NoMatch("a reciprocal of zero")
    return _build_prod(c ** n, [(b, e * n) for b, e in fs])


def add(*xs: Expr | float) -> Expr:
    c, terms = 0.0, []
    for x in xs:
        x = x if isinstance(x, Expr) else const(x)
        if x.head == "const":
            c += x.args[0]
        elif x.head == "add":
            c += x.args[0]
            terms += list(x.args[1])
        else:
            terms.append(x)
    if not terms:
        return const(c)
    if c == 0.0 and len(terms) == 1:
        return terms[0]
    terms.sort(key=lambda t: (t.shape_key, t.key))
    return Expr("add", (c, tuple(terms)), frozenset().union(*(t.free for t in terms)))


def _split(x: Expr, atoms: set[str]) -> tuple[float, list, list]:
    """(coefficient, factors that depend on ``atoms``, factors that do not)."""
    c, fs = _factors(x)
    return c, [f for f in fs if f[0].free & atoms], [f for f in fs if not f[0].free & atoms]


def reduce_sum(atoms, x: Expr, sizes: dict[str, int]) -> Expr:
    """Σ over ``atoms`` of x; atoms x does not depend on multiply by their size."""
    atoms = set(atoms)
    absent = math.prod(sizes[a] for a in atoms - x.free)
    atoms &= x.free
    if not atoms:
        return mul(float(absent), x)
    c, inner, outer = _split(x, atoms)
    body = _build_prod(1.0, inner)
    if body.head == "sum":
        atoms |= set(body.args[0])
        body = body.args[1]
    summed = Expr("sum", (tuple(sorted(atoms)), body), body.free - atoms)
    return mul(c * absent, _build_prod(1.0, outer), summed)


def prefix_sum(atom: str, x: Expr) -> Expr:
    """The prefix sum along ``atom`` (torch.cumsum); of a value constant along it: (p + 1)·x."""
    if atom not in x.free:
        return mul(add(pos(atom), 1.0), x)
    c, inner, outer = _split(x, {atom})
    body = _build_prod(1.0, inner)
    return mul(c, _build_prod(1.0, outer), Expr("cumsum", (atom, body), body.free))


def softmax(atom: str, x: Expr, sizes: dict[str, int]) -> Expr:
    """torch.softmax over ``atom`` (it subtracts the max: it never overflows)."""
    return Expr("softmax", (atom, x), x.free)
