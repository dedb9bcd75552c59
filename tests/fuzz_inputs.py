"""Input tensors for fuzzed attention programs, and the edits made between two calls.

Every tensor comes from a seeded ``torch.Generator`` (never zeros). q, k, v may carry
injected NaN/±inf at drawn positions; mask arguments follow a drawn pattern (random with
a density, causal-looking, a band, all-True, blocks) and may have emptied rows.
"""

from __future__ import annotations

import torch
from fuzz_masks import ArgSpec

FLOATS = ("x", "bias")


def _structure(pat: dict, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    n, m = shape[-2], shape[-1]
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    s = pat.get("structure", "random")
    if s == "random":
        keep = torch.rand(*shape, generator=g) < pat.get("density", 0.5)
    else:
        base = {"tril": j <= i, "band": (i - j).abs() <= pat.get("w", 2), "ones": torch.ones(n, m, dtype=torch.bool),
                "blocks": (i // 4) == (j // 4)}[s]
        keep = base.expand(shape).clone()
    rows = pat.get("empty_rows", 0)
    if rows and n > 1:
        for r in torch.randint(0, n, (rows,), generator=g).tolist():
            keep[..., r, :] = False
    elif rows:
        keep.view(-1, m)[0] = False
    return keep


def _lengths(pat: dict, b: int, m: int, g: torch.Generator) -> torch.Tensor:
    kind = pat.get("lengths", "random")
    if kind == "same":
        return torch.full((b,), int(torch.randint(1, m + 1, (1,), generator=g)), dtype=torch.int64)
    if kind == "full":
        return torch.full((b,), m, dtype=torch.int64)
    lengths = torch.randint(1, m + 1, (b,), generator=g)
    if kind == "empty_one":
        lengths[int(torch.randint(0, b, (1,), generator=g))] = 0
    return lengths


def make_tensor(spec: ArgSpec, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    pat = spec.pattern
    if spec.kind == "x":
        t = torch.randn(*spec.shape, generator=g, dtype=torch.float32) * pat.get("std", 1.0)
        t = t.to(dtype)
        for frac, value in pat.get("inject", ()):
            t.view(-1)[min(int(frac * t.numel()), t.numel() - 1)] = value
        nc = pat.get("noncontig")
        if nc == "transposed":
            t = t.transpose(-2, -1).contiguous().transpose(-2, -1)
        elif nc == "sliced":
            t = torch.cat([t, t], dim=-1)[..., : spec.shape[-1]]
        return t
    if spec.kind == "bool":
        return _structure(pat, spec.shape, g)
    if spec.kind == "bias":
        keep = _structure(pat, spec.shape, g)
        vals = torch.randn(*spec.shape, generator=g) * 0.5 if pat.get("values") else torch.zeros(spec.shape)
        return vals.masked_fill(~keep, float("-inf")).to(dtype)
    b, m = spec.shape[0], spec.shape[-1]
    lengths = _lengths(pat, b, m, g)
    if spec.kind == "lengths":
        return lengths
    keep = torch.arange(m)[None, :] < lengths[:, None]
    return ~keep if pat.get("invert") else keep  # "pad"


def make_args(specs: list[ArgSpec], dtype: torch.dtype, seed: int, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    args = [make_tensor(s, dtype, g) for s in specs]
    if grad:
        args = [a.detach().requires_grad_() if s.kind == "x" else a for s, a in zip(specs, args)]
    return args


def as_float64(args: list[torch.Tensor], grad: bool = False, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Copies of ``args`` with floating tensors in ``dtype`` (the reference's)."""
    out = []
    for a in args:
        if a.is_floating_point():
            a = a.detach().to(dtype)
            if grad:
                a.requires_grad_()
        out.append(a)
    return out


def second_call(specs: list[ArgSpec], args: list[torch.Tensor], how: str, dtype: torch.dtype, seed: int) -> str:
    """Change the run-time mask argument before a second call: ``how`` = "new" (a fresh tensor
    of another pattern, replacing the entry of ``args``) or "edit" (the same tensor edited in
    place, which bumps its version counter). Returns a description for the report."""
    g = torch.Generator().manual_seed(seed + 7919)
    idx = next(i for i, s in enumerate(specs) if s.kind in ("bool", "bias", "pad", "lengths"))
    spec, t = specs[idx], args[idx]
    if how == "new":
        pat = dict(spec.pattern)
        pat["structure"] = ["random", "tril", "band", "ones", "blocks"][int(torch.randint(0, 5, (1,), generator=g))]
        pat["lengths"] = ["random", "same", "full", "empty_one"][int(torch.randint(0, 4, (1,), generator=g))]
        pat["empty_rows"] = int(torch.randint(0, 3, (1,), generator=g))
        args[idx] = make_tensor(ArgSpec(spec.name, spec.kind, spec.shape, pat), dtype, g)
        return f"new {spec.name}: {pat}"
    choice = int(torch.randint(0, 4, (1,), generator=g))
    with torch.no_grad():
        if spec.kind == "lengths":
            edits = ["t[0] = 0", "t.fill_(t.max())", "t[-1] = 1", "t.sub_(1).clamp_(min=0)"]
        elif spec.kind == "pad":
            edits = ["t[0, -1] = ~t[0, -1]", "t[:, t.shape[-1] // 2:] = t[:, :1]", "t.logical_not_()",
                     "t[-1] = t[-1, 0]"]
        elif spec.kind == "bias":
            edits = ["t[..., 0, :] = float('-inf')", "t.zero_()", "t[..., -1] = 0.0",
                     "t.copy_(torch.where(torch.isinf(t), 0.0, float('-inf')).to(t.dtype))"]
        else:
            edits = ["t[..., 0, :] = False", "t.fill_(True)", "t[..., -1] = True", "t.logical_not_()"]
        exec(edits[choice], {"torch": torch, "t": t})  # noqa: S102 - a fixed edit on a test tensor
    return f"edit {spec.name} in place: {edits[choice]}"
