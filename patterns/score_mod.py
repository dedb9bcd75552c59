"""Lift the pointwise part of a score chain that is not scale / bias / mask into a `ScoreMod`.

The score chain (patterns/softmax_chain.py walks it back from the softmax) is read by
softmax_attention as ``scale · s + Σ bias`` with masks. Anything else on it (tanh, sigmoid, abs,
clamp, a product with a tensor, a score subtracted from something) is a score modifier: the chain
up to and including the last such op becomes the modifier's steps, and the rest of the chain is
read as before, over the modifier's output. A mask inside the modifier's part is refused: the
modifier would change what the mask wrote, which the kernels (masks first decide which tiles run)
cannot reproduce.

A bias built from positions (ALiBi, patterns/position_bias.py) is also lifted: its add becomes a
modifier step and the bias's own expression steps over the positions ``p``, ``m``, so the tile
computes it and no N×M tensor is built. Its positions are placeholders (``@atom``) until the site
knows its query and key axes (`LiftedMod.resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from rewrite.ir.score_mod import ModStep, ScoreMod

from .axes import AtomSizes, Axes, NoMatch, align_broadcast, dtype_of, is_layout_op, shape_of
from .contraction import Contraction
from .position_bias import NotPositional, PositionProgram, reads_positions, resolve_positions
from .softmax_chain import MODIFIER_OPS, pass_through, scalar_value

aten = torch.ops.aten

UNARY = {aten.tanh.default: "tanh", aten.sigmoid.default: "sigmoid", aten.abs.default: "abs",
         aten.neg.default: "neg"}
CLAMPS = {aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default}
BINARY = {aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
          aten.div.Tensor: "div", aten.div.Scalar: "div", aten.add.Scalar: "add", aten.sub.Scalar: "sub"}
MASKS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
         aten.where.ScalarSelf}


@dataclass
class LiftedMod:
    steps: list[ModStep]  # operands may name positions as "@atom" (see `resolve`)
    leaves: list[tuple[Node, Axes]]  # each leaf's graph value and its axes against the scores
    nodes: list[Node]  # the chain nodes the modifier covers
    rest: list[Node]  # the chain after it, read as scale / bias / mask
    axes: Axes  # the score axes after the modifier's part
    spelling: list[str] = field(default_factory=list)
    tables: dict[int, str] = field(default_factory=dict)  # leaf index → its table atom

    def leaf_groups(self, rows: list[str], cols: list[str]):
        """(node, axes, rows, cols) per leaf for its canonical plan: [*batch, N, M] broadcast, or a
        table [*batch, 1, T]."""
        return [(node, ax, *(([], [self.tables[i]]) if i in self.tables else (rows, cols)))
                for i, (node, ax) in enumerate(self.leaves)]

    def resolve(self, rows: list[str], cols: list[str]) -> ScoreMod:
        """The modifier with its positions named p (the query axis ``rows``) and m (the key axis
        ``cols``); `PositionsUnaligned` where a position is another axis."""
        steps = resolve_positions([(s.op, s.args) for s in self.steps], rows, cols)
        return ScoreMod(tuple(ModStep(op, args) for op, args in steps), len(self.leaves))


def position_biases(qk: Contraction, chain: list[Node], axes: Axes, sizes: AtomSizes, score_of,
                    own_atoms: set[str], notes: list[str]) -> dict[Node, PositionProgram]:
    """The biases added on the chain (or by the product itself) that are computed from positions,
    translated; each one built from ``arange`` that does not translate gets a note with the reason."""
    found: dict[Node, PositionProgram] = {}
    candidates = [qk.added] if isinstance(qk.added, Node) and qk.beta == 1 else []
    for node in chain:
        if node.target in (aten.add.Tensor, aten.sub.Tensor) and not is_layout_op(node):
            candidates += [a for a in node.args[:2] if isinstance(a, Node) and a is not score_of(node, chain)]
    first_mask = next((i for i, n in enumerate(chain) if n.target in MASKS), len(chain))
    late = {a for n in chain[first_mask:] for a in n.args[:2] if isinstance(a, Node)}
    for bias in candidates:
        if shape_of(bias) is None or not reads_positions(bias):
            continue
        if bias in late:  # masks first decide which tiles run: a modifier after a mask is not one
            notes.append(f"the bias {bias.name} is built from positions but stays a tensor: it is added after "
                         "a mask (the tiles apply a score modifier before the masks)")
            continue
        try:
            found[bias] = PositionProgram(bias, axes, sizes, own_atoms)
        except (NotPositional, NoMatch) as e:
            notes.append(f"the bias {bias.name} is built from positions but stays a tensor: {e}")
    return found


def needs_modifier(node: Node, score: Node | None) -> bool:
    """An op the linear reading (scale · s + Σ bias, masks) cannot take."""
    t = node.target
    if t in MODIFIER_OPS:
        return True
    if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        others = [a for a in node.args[:2] if a is not score]
        if not others:
            return True  # s · s
        val = scalar_value(others[0])
        if val is None:
            return True  # a tensor scale
        return val <= 0 or t in (aten.div.Tensor, aten.div.Scalar) and node.args[1] is score
    if t == aten.sub.Tensor:
        return node.args[0] is not score  # c − s
    return False


def lift_modifier(qk: Contraction, chain: list[Node], axes: Axes, sizes: AtomSizes, score_of,
                  own_atoms: set[str] = frozenset(), notes: list[str] | None = None) -> LiftedMod | None:
    """The modifier of ``chain`` (None when every op is scale, bias, mask or layout). ``own_atoms``:
    the product's atoms that only one operand has (the query and key positions), where biases
    computed from positions are lifted (none when empty); ``notes`` gets why one was not."""
    positional = position_biases(qk, chain, axes, sizes, score_of, own_atoms, notes if notes is not None else []) \
        if own_atoms else {}
    marks = [i for i, n in enumerate(chain) if not is_layout_op(n) and (
        needs_modifier(n, score_of(n, chain)) or n.target in (aten.add.Tensor, aten.sub.Tensor)
        and any(a in positional for a in n.args[:2]))]
    if not marks and qk.added not in positional:
        return None
    end = marks[-1] + 1 if marks else 0
    part, rest = chain[:end], chain[end:]
    steps: list[ModStep] = []
    leaves: list[tuple[Node, Axes]] = []
    tables: dict[int, str] = {}  # leaf index → the table's own atom (gathered, not broadcast)
    cur: str = "s"

    def step(op, *args) -> str:
        steps.append(ModStep(op, tuple(float(a) if not isinstance(a, str) else a for a in args)))
        return f"r{len(steps) - 1}"

    def leaf(x, leaf_axes=None, table_atom=None) -> str:
        leaves.append((x, align_broadcast(shape_of(x), axes, sizes) if leaf_axes is None else leaf_axes))
        if table_atom is not None:
            tables[len(leaves) - 1] = table_atom
        return f"L{len(leaves) - 1}"

    def operand(x) -> str | float:
        if x in positional:
            return positional[x].replay(step, leaf)
        val = scalar_value(x)
        if val is not None:
            return val
        if not isinstance(x, Node) or shape_of(x) is None:
            raise NoMatch(f"score modifier operand {x!r} is neither a constant nor a tensor")
        if dtype_of(x) is not None and not dtype_of(x).is_floating_point:
            raise NoMatch(f"score modifier operand {x.name} is not a float tensor")
        return leaf(x)

    if qk.alpha != 1:
        cur = step("mul", cur, qk.alpha)
    if qk.added is not None and qk.beta != 0:
        b = operand(qk.added)
        if qk.beta != 1:
            b = step("mul", b, qk.beta)
        cur = step("add", cur, b)
    for node in part:
        t = node.target
        moved = pass_through(node, axes, sizes, "inside a score modifier")
        if moved is not None:
            axes = moved
            continue
        if t in MASKS:
            raise NoMatch(f"{node.name}: a mask applied before a score modifier (the modifier changes the "
                          "masked scores; mask after it, as the kernels do)")
        score = score_of(node, chain)
        if t in UNARY:
            cur = step(UNARY[t], cur)
        elif t in CLAMPS:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
            if t == aten.clamp_max.default:
                lo, hi = None, node.args[1]
            for bound, op in ((lo, "max"), (hi, "min")):
                if bound is not None:
                    val = scalar_value(bound)
                    if val is None:
                        raise NoMatch(f"{node.name}: clamp to a tensor bound")
                    cur = step(op, cur, val)
        elif t in BINARY:
            a, b = node.args[:2]
            other = b if a is score else a
            if other is score:
                raise NoMatch(f"{node.name}: the scores combined with themselves")
            o = operand(other)
            alpha = node.kwargs.get("alpha", 1)
            if alpha != 1:
                o = o * alpha if isinstance(o, float) else step("mul", o, alpha)
            op = BINARY[t]
            cur = step(op, cur, o) if a is score else step(op, o, cur)
        else:
            raise NoMatch(f"unsupported op {t} in a score modifier")
    what = ("score modifier with a position bias computed in the tile" if positional
            else f"score modifier {ScoreMod(tuple(steps), len(leaves))}")
    return LiftedMod(steps, leaves, part, rest, axes, [what], tables)
