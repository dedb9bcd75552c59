"""Where the fuzzer's choices come from.

The program builders call ``draw.pick / int / bool / float / perm``. `SeededDraw` (the default)
takes one integer from Hypothesis per program and makes every choice from ``random.Random`` of
it: Hypothesis's own generation mutates earlier examples, which for a program built from ~40
dependent choices gave less than half the CI draws distinct; one seed per example gives every
example its own program, still derandomised under the "ci" profile. ``FUZZ_DRAW=hypothesis``
draws every choice through Hypothesis instead (`HypothesisDraw`), which lets it shrink.
"""

from __future__ import annotations

import os
import random

from hypothesis import strategies as st

MODE = os.environ.get("FUZZ_DRAW", "seeded")


class SeededDraw:
    def __init__(self, seed: int | str):
        self.r = random.Random(seed)  # a str seed is hashed with SHA-512: stable across runs

    def pick(self, options):
        options = list(options)
        return options[self.r.randrange(len(options))]

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def bool(self) -> bool:
        return self.r.random() < 0.5

    def float(self) -> float:
        return self.r.random()

    def perm(self, seq) -> list:
        out = list(seq)
        self.r.shuffle(out)
        return out


class HypothesisDraw:
    def __init__(self, draw):
        self.d = draw

    def pick(self, options):
        return self.d(st.sampled_from(list(options)))

    def int(self, lo: int, hi: int) -> int:
        return self.d(st.integers(lo, hi))

    def bool(self) -> bool:
        return self.d(st.booleans())

    def float(self) -> float:
        return self.d(st.floats(0, 1))

    def perm(self, seq) -> list:
        return self.d(st.permutations(list(seq)))


def chooser(hypothesis_draw, salt: str = "") -> SeededDraw | HypothesisDraw:
    """``salt`` (the strategy's arguments) keeps two fuzz tests, whose Hypothesis seeds coincide
    under derandomisation, from drawing correlated programs."""
    if MODE == "hypothesis":
        return HypothesisDraw(hypothesis_draw)
    return SeededDraw(f"{salt}:{hypothesis_draw(st.integers(0, 2**64 - 1))}")
