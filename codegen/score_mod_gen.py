"""One generator for a `ScoreMod`'s code: torch (the CPU tiles, the backward) and Triton (the fused
kernels' tiles). Both are printed from the same steps, so what runs is what the report shows.

The Triton function has one signature for every modifier, which the softmax-attention tile
(codegen/attention_tiles.py) calls on each score tile before its masks:

    score_mod(s, rows, cols, b, h, N, M, args) -> s'

``s`` the float32 tile of raw products q·kᵀ, ``rows``/``cols`` its query and key indices, ``b``/``h``
the program's batch and query head, ``args`` a tuple of (pointer, stride_b, stride_h, stride_n,
stride_m) per leaf tensor (broadcast dims have stride 0). The positions ``p``/``m`` are ``rows``/``cols``
as float32 (exact integers below 2²⁴); the recogniser (patterns/position_bias.py) has already folded
any alignment offset into the steps. Position-side steps (those that do not read ``s``) are computed
in float32 on both paths, as eager computes them (or rounded where eager computes in a half type).
The source is written to a file (Triton
reads a kernel's source back) and shown as the site's ``kernel_source``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from rewrite.ir.score_mod import ScoreMod


def _round_to(dtype):
    return lambda x: x.to(dtype).to(x.dtype)  # the value rounded, held in the input's (wider) dtype


_TORCH = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "neg": torch.neg,
          "tanh": torch.tanh, "sigmoid": torch.sigmoid, "abs": torch.abs,
          "round_bf16": _round_to(torch.bfloat16), "round_f16": _round_to(torch.float16)}


def position_grid(r0: int, r1: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 positions of a block of score rows r0:r1 against every key: p [r1-r0, 1], m [1, m]."""
    p = torch.arange(r0, r1, device=device, dtype=torch.float32)[:, None]
    return p, torch.arange(m, device=device, dtype=torch.float32)[None, :]


def apply_torch(mod: ScoreMod, s: torch.Tensor, leaves: list[torch.Tensor],
                positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The modifier on a tensor of raw products (any shape the leaves broadcast to), differentiable.
    ``positions``: the (p, m) grid of the rows of ``s`` (`position_grid`), for a positional modifier."""
    env: dict[str, torch.Tensor] = {"s": s}
    env.update({f"L{i}": t for i, t in enumerate(leaves)})
    if mod.positional:
        if positions is None:
            raise ValueError("a positional score modifier applied without the score positions")
        env["p"], env["m"] = positions
    out = s
    for i, st in enumerate(mod.steps):
        args = [env[a] if isinstance(a, str) else a for a in st.args]
        if st.op == "gather":  # table [*, 1, T] at an integer index [rows, M]: [*, rows, M]
            table, idx = args
            out = table[..., 0, :][..., idx.long()]
            env[f"r{i}"] = out
            continue
        if st.op in ("max", "min"):
            a, b = args
            a, b = (a, b) if isinstance(a, torch.Tensor) else (b, a)
            f = torch.maximum if st.op == "max" else torch.minimum
            out = f(a, b) if isinstance(b, torch.Tensor) else (a.clamp_min(b) if st.op == "max" else a.clamp_max(b))
        elif all(not isinstance(a, torch.Tensor) for a in args):
            out = torch.tensor(_python(st.op, *args), dtype=s.dtype, device=s.device)
        else:
            out = _TORCH[st.op](*args)
        env[f"r{i}"] = out
    return out


def _python(op: str, *args: float) -> float:
    import math

    a = args[0]
    if op.startswith("round_"):
        return float(_TORCH[op](torch.tensor(a, dtype=torch.float32)))
    return {"add": lambda: a + args[1], "sub": lambda: a - args[1], "mul": lambda: a * args[1],
            "div": lambda: a / args[1], "neg": lambda: -a, "tanh": lambda: math.tanh(a),
            "sigmoid": lambda: 1 / (1 + math.exp(-a)), "abs": lambda: abs(a)}[op]()


def modified_bound(mod: ScoreMod, s_bound: torch.Tensor, leaves: list[torch.Tensor],
                   extent: tuple[int, int] | None = None) -> torch.Tensor:
    """An upper bound of |mod(s)| over |s| ≤ ``s_bound`` (a float64 tensor, e.g. [B, Hq, N]) and every
    leaf within its own [min, max]: interval arithmetic over the steps (sound; loose where a leaf
    multiplies s). +inf where a division's interval holds 0 or a leaf is not finite. ``extent``:
    (N, M), the positions' ranges (unbounded when not given)."""
    inf = float("inf")
    env: dict[str, tuple] = {"s": (-s_bound, s_bound)}
    for name, size in zip(("p", "m"), extent or (None, None)):
        top = float(size - 1) if size else inf
        env[name] = (torch.tensor(0.0, dtype=torch.float64), torch.tensor(max(top, 0.0), dtype=torch.float64))
    for i, t in enumerate(leaves):
        lo, hi = (float(x) for x in torch.aminmax(t.detach().double())) if t.numel() else (0.0, 0.0)
        env[f"L{i}"] = (torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))

    def iv(a):
        if isinstance(a, str):
            return env[a]
        c = torch.tensor(float(a), dtype=torch.float64)
        return c, c

    def mul(a, b):
        ps = [torch.nan_to_num(x * y, nan=0.0) for x in a for y in b]  # 0·inf: the factor is exactly 0
        lo, hi = ps[0], ps[0]
        for x in ps[1:]:
            lo, hi = torch.minimum(lo, x), torch.maximum(hi, x)
        return lo, hi

    for i, st in enumerate(mod.steps):
        a = iv(st.args[0])
        b = iv(st.args[1]) if len(st.args) == 2 else None
        if st.op == "add":
            r = (a[0] + b[0], a[1] + b[1])
        elif st.op == "sub":
            r = (a[0] - b[1], a[1] - b[0])
        elif st.op == "mul":
            r = mul(a, b)
        elif st.op == "div":
            straddles = (b[0] <= 0) & (b[1] >= 0)
            lo, hi = mul(a, (1.0 / b[1], 1.0 / b[0]))
            r = (torch.where(straddles, -inf, lo), torch.where(straddles, inf, hi))
        elif st.op in ("max", "min"):
            f = torch.maximum if st.op == "max" else torch.minimum
            r = (f(a[0], b[0]), f(a[1], b[1]))
        elif st.op == "neg":
            r = (-a[1], -a[0])
        elif st.op == "gather":  # a value of the table
            r = a
        elif st.op.startswith("round_"):  # round to nearest is monotone
            dt = torch.bfloat16 if st.op == "round_bf16" else torch.float16
            r = (a[0].to(dt).double(), a[1].to(dt).double())
        elif st.op in ("tanh", "sigmoid"):
            f = torch.tanh if st.op == "tanh" else torch.sigmoid
            r = (f(a[0]), f(a[1]))
        else:  # abs
            top = torch.maximum(-a[0], a[1])
            r = (torch.where(a[0] >= 0, a[0], torch.where(a[1] <= 0, -a[1], 0.0)), top)
        env[f"r{i}"] = (torch.nan_to_num(r[0], nan=-inf), torch.nan_to_num(r[1], nan=inf))  # NaN: unbounded
    lo, hi = env[f"r{len(mod.steps) - 1}"]
    return torch.maximum(-lo, hi).expand_as(s_bound)


# ---- Triton --------------------------------------------------------------------------------------
_TRITON_BINARY = {"add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})", "div": "({a} / {b})",
                  "max": "tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)",
                  "min": "tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"}  # NaN as torch
_TRITON_UNARY = {"neg": "(-{a})", "tanh": "_tanh({a})", "sigmoid": "tl.sigmoid({a})", "abs": "tl.abs({a})",
                 "round_bf16": "{a}.to(tl.bfloat16).to(tl.float32)",  # round to nearest even, as torch
                 "round_f16": "{a}.to(tl.float16).to(tl.float32)"}


def triton_source(mod: ScoreMod) -> str:
    """The Triton source of ``mod`` (see the module docstring for its signature)."""
    lines = [
        "# Generated by rewrite (codegen/score_mod_gen.py) from the site's score modifier:",
        f"#   s' = {mod}",
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        "def _tanh(x):",
        "    # tanh(x) = sign(x)·(1 − e)/(1 + e), e = exp(−2|x|): no overflow for any x",
        "    e = tl.exp(-2.0 * tl.abs(x))",
        "    t = (1.0 - e) / (1.0 + e)",
        "    return tl.where(x < 0, -t, t)",
        "",
        "",
        "@triton.jit",
        "def score_mod(s, rows, cols, b, h, N, M, args):",
    ]
    if mod.positional:
        lines += ["    p = rows[:, None].to(tl.float32)", "    m = cols[None, :].to(tl.float32)"]
    if mod.leaves:
        lines.append("    inside = (rows[:, None] < N) & (cols[None, :] < M)")
    for i in range(mod.leaves):
        j = 5 * i
        if i in mod.tables:
            continue  # read by its gather
        lines.append(f"    L{i} = tl.load(args[{j}] + b * args[{j + 1}] + h * args[{j + 2}]"
                     f" + rows[:, None] * args[{j + 3}] + cols[None, :] * args[{j + 4}],"
                     " mask=inside, other=0.0).to(tl.float32)")

    def val(a):
        return a if isinstance(a, str) else repr(float(a))

    for i, st in enumerate(mod.steps):
        args = [val(a) for a in st.args]
        if st.op == "gather":
            j = 5 * int(st.args[0][1:])
            lines.append(f"    r{i} = tl.load(args[{j}] + b * args[{j + 1}] + h * args[{j + 2}]"
                         f" + {args[1]}.to(tl.int32) * args[{j + 4}], mask=inside, other=0.0).to(tl.float32)")
            continue
        if len(args) == 2:
            code = _TRITON_BINARY[st.op].format(a=args[0], b=args[1])
        else:
            code = _TRITON_UNARY[st.op].format(a=args[0])
        lines.append(f"    r{i} = {code}")
    lines.append(f"    return r{len(mod.steps) - 1}")
    return "\n".join(lines) + "\n"


_LOADED: dict[str, object] = {}


def source_dir() -> Path:
    root = os.environ.get("REWRITE_KERNEL_DIR") or os.path.join(tempfile.gettempdir(), f"rewrite-kernels-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_path(mod: ScoreMod) -> Path:
    return source_dir() / f"score_mod_{mod.key}.py"


def triton_function(mod: ScoreMod):
    """The jitted ``score_mod`` of ``mod``: written once to ``source_path(mod)``, imported, cached."""
    fn = _LOADED.get(mod.key)
    if fn is None:
        path = source_path(mod)
        text = triton_source(mod)
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)  # atomic: another process may import the same file
        spec = importlib.util.spec_from_file_location(f"rewrite_score_mod_{mod.key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = _LOADED[mod.key] = module.score_mod
    return fn


def leaf_args(leaves4: list[torch.Tensor]) -> tuple:
    """The ``args`` tuple of the Triton function: (pointer, 4 strides) per [B, Hq, N, M] leaf view."""
    out: list = []
    for t in leaves4:
        out += [t, *t.stride()]
    return tuple(out)
