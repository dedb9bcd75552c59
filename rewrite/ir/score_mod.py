"""A score modifier: the pointwise program a site applies to its scores before the masks.

FlexAttention's ``score_mod``, but inferred from unmodified code: whatever pointwise chain a model
writes between the Q·K product and the softmax that is not a positive scalar scale, an added bias or
a mask (Gemma 2's soft-capping ``cap·tanh(s/cap)``, Swin V2's learned per-head scale, a bias inside a
non-linear map) is lifted into one `ScoreMod`: straight-line steps over the raw product ``s``
(eager's ``q @ kᵀ``, before any scale), constants, and *leaf* tensors broadcast to the canonical
``[*batch, N, M]`` score layout (``L0``, ``L1``, …; their bindings live on the site), and the
score's own positions ``p`` (the query row) and ``m`` (the key column), so that a bias computed from
positions (ALiBi's ``slope[h]·(m − p)``) is evaluated in the tile instead of read from an N×M tensor.
Positions are integers held in float32 (exact below 2²⁴); ``round_bf16`` / ``round_f16`` round a
float32 value to the nearest bfloat16 / float16, where eager computes a step in that dtype;
``gather(L<i>, idx)`` reads a *table* leaf (canonical [*batch, 1, T]: a relative-position table per
head) at an integer-valued index computed from positions (proven within [0, T) by the recogniser).
The site's
semantics become

    S = scale · mod(s, L…) + Σ bias,   then the masks,   then softmax(S) @ v

Masks stay masks (they decide which tiles run); the modifier is applied inside every tile. The
same steps are printed as torch code, as Triton code (codegen/score_mod_gen.py) and as a sympy
expression (the report and the cascade).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import sympy

# step op → arity. Binary ops take the running value or a leaf or a constant on either side.
STEP_OPS: dict[str, int] = {"add": 2, "sub": 2, "mul": 2, "div": 2, "max": 2, "min": 2,
                            "neg": 1, "tanh": 1, "sigmoid": 1, "abs": 1, "round_bf16": 1, "round_f16": 1,
                            "gather": 2}
POSITIONS = ("p", "m")  # the query row and the key column of the score

Operand = str | float  # "s" (the raw product), "p"/"m", "r<i>" (step i's result), "L<i>" (leaf i), a constant


@dataclass(frozen=True)
class ModStep:
    op: str
    args: tuple[Operand, ...]


@dataclass(frozen=True)
class ScoreMod:
    """Straight-line steps; the last step's result is the modified score."""

    steps: tuple[ModStep, ...]
    leaves: int = 0

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("ScoreMod: no steps")
        for i, st in enumerate(self.steps):
            if st.op not in STEP_OPS or len(st.args) != STEP_OPS[st.op]:
                raise ValueError(f"ScoreMod step {i}: {st.op}{st.args} is not one of {sorted(STEP_OPS)}")
            for a in st.args:
                if isinstance(a, str) and not (a in ("s", *POSITIONS) or a[0] == "r" and int(a[1:]) < i
                                               or a[0] == "L" and int(a[1:]) < self.leaves):
                    raise ValueError(f"ScoreMod step {i}: operand {a!r} is not defined before it")
            if st.op == "gather" and not (isinstance(st.args[0], str) and st.args[0][0] == "L"):
                raise ValueError(f"ScoreMod step {i}: gather reads a leaf table, not {st.args[0]!r}")

    @property
    def tables(self) -> frozenset[int]:
        """The leaves read by ``gather`` (tables [*batch, 1, T]), not broadcast over the scores."""
        return frozenset(int(st.args[0][1:]) for st in self.steps if st.op == "gather")

    # ---- serialisation (the op's string argument) ----------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"leaves": self.leaves, "steps": [[s.op, *s.args] for s in self.steps]})

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_json(text: str) -> ScoreMod:
        d = json.loads(text)
        return ScoreMod(tuple(ModStep(s[0], tuple(s[1:])) for s in d["steps"]), int(d["leaves"]))

    @property
    def positional(self) -> bool:
        """Whether a step reads the score's position (p or m)."""
        return any(a in POSITIONS for st in self.steps for a in st.args)

    @property
    def key(self) -> str:
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:12]

    # ---- the math ------------------------------------------------------------------------------
    def expr(self) -> sympy.Expr:
        """The modifier as one sympy expression in ``s``, ``p``, ``m`` and ``L0``, ``L1``, …"""
        s = sympy.Symbol("s", real=True)
        env: dict[str, sympy.Expr] = {"s": s, **{x: sympy.Symbol(x, integer=True, nonnegative=True)
                                                 for x in POSITIONS}}
        env.update({f"L{i}": sympy.Symbol(f"L{i}", real=True) for i in range(self.leaves)})

        def val(a):
            return env[a] if isinstance(a, str) else sympy.Float(a) if a != int(a) else sympy.Integer(int(a))

        fns = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
               "div": lambda a, b: a / b, "max": sympy.Max, "min": sympy.Min, "neg": lambda a: -a,
               "tanh": sympy.tanh, "sigmoid": lambda a: 1 / (1 + sympy.exp(-a)), "abs": sympy.Abs,
               "round_bf16": sympy.Function("bf16"), "round_f16": sympy.Function("f16")}
        out = s
        for i, st in enumerate(self.steps):
            if st.op == "gather":  # the table as a function of its index
                out = sympy.Function(st.args[0])(val(st.args[1]))
                env[f"r{i}"] = out
                continue
            out = fns[st.op](*(val(a) for a in st.args))
            env[f"r{i}"] = out
        return out

    def __str__(self) -> str:
        return str(self.expr())
