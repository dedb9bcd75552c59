"""Mask families for the differential fuzzer, written the ways people write them.

Each builder draws one spelling of one family and returns a `MaskBuild`: source lines that
compute a boolean ``keep`` (True = attend) from positions or from run-time tensors, inside a
function where ``q`` and the ints ``n`` (queries), ``m`` (keys) are in scope. Deliberate
near-misses (one entry more or less, an in-place edit after the mask is built, a changed
constant) are drawn by `near_miss` and tagged, so the summary can say how often each family
was rewritten. Nothing here knows how the recognisers read masks: the oracle is eager PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ArgSpec:
    """One extra tensor argument of a program (besides q, k, v)."""

    name: str
    kind: str  # "bool" (keep or pad mask), "lengths" (int64 [B]), "bias" (float, -inf where masked)
    shape: tuple[int, ...]
    pattern: dict = field(default_factory=dict)


@dataclass
class MaskBuild:
    family: str  # "none", "causal", "causal_br", "window", ... (a near-miss appends "+kind")
    lines: list[str]
    shape: str  # what keep broadcasts as: "nm" (a real [N, M] tensor), "b11m", "b1nm", "bhnm", "n1", "1m"
    args: list[ArgSpec] = field(default_factory=list)
    bias_arg: bool = False  # the mask arrives as an additive float bias ``bias`` (no ``keep``)

    @property
    def present(self) -> bool:
        return self.family != "none"


# Set by `use_sizes` before a mask is drawn: the negative-slice spelling exists only for n <= m.
_SIZES = {"n": 1, "m": 1}


def use_sizes(n: int, m: int) -> None:
    _SIZES.update(n=n, m=m)


def query_pos(draw, offset: bool = False) -> str:
    """Query positions as an [N, 1] tensor; ``offset``: bottom-right aligned, i.e. m - n + row."""
    if offset:
        forms = ["torch.arange(m - n, m)[:, None]", "(torch.arange(n) + (m - n)).unsqueeze(-1)",
                 "torch.arange(n, device=q.device).view(n, 1) + m - n"]
        if _SIZES["n"] <= _SIZES["m"]:
            forms.append("torch.arange(m)[-n:][:, None]")
        return draw.pick(forms)
    return draw.pick(["torch.arange(n)[:, None]", "torch.arange(n, device=q.device).unsqueeze(-1)",
                        "torch.arange(n).view(n, 1)", "torch.arange(0, n, 1)[:, None]"])


def key_pos(draw) -> str:
    return draw.pick(["torch.arange(m)[None, :]", "torch.arange(m, device=q.device).unsqueeze(0)",
                        "torch.arange(m).view(1, m)"])


def _pos_lines(draw, offset: bool = False, dtype: str | None = None) -> list[str]:
    i, j = query_pos(draw, offset), key_pos(draw)
    if dtype is not None:
        i, j = f"({i}).to({dtype})", f"({j}).to({dtype})"
    return [f"i = {i}", f"j = {j}"]


ONES = "torch.ones(n, m, dtype=torch.bool, device=q.device)"


def causal(draw) -> MaskBuild:
    form = draw.pick(["tril", "tril_method", "triu_not", "triu_eq0", "cmp", "cmp_rev", "tril_float"])
    lines = {
        "tril": [f"keep = torch.tril({ONES})"],
        "tril_method": ["keep = torch.ones(n, m, dtype=torch.bool).tril()"],
        "triu_not": ["keep = ~torch.triu(torch.ones(n, m, dtype=torch.bool), diagonal=1)"],
        "triu_eq0": ["keep = torch.triu(torch.ones(n, m), 1) == 0"],
        "cmp": [*_pos_lines(draw), "keep = j <= i"],
        "cmp_rev": [*_pos_lines(draw), "keep = i >= j"],
        "tril_float": ["keep = torch.tril(torch.ones(n, m)).bool()"],
    }[form]
    return MaskBuild("causal", lines, "nm")


def causal_br(draw) -> MaskBuild:
    """Bottom-right causal (needs n <= m): query p sees keys up to p + m - n (KV-cache decoding)."""
    form = draw.pick(["tril_diag", "cmp_offset", "pos_offset", "triu_not"])
    lines = {
        "tril_diag": [f"keep = torch.tril({ONES}, diagonal=m - n)"],
        "cmp_offset": [*_pos_lines(draw), "keep = j <= i + (m - n)"],
        "pos_offset": [*_pos_lines(draw, offset=True), "keep = j <= i"],
        "triu_not": ["keep = ~torch.ones(n, m, dtype=torch.bool).triu(m - n + 1)"],
    }[form]
    return MaskBuild("causal_br", lines, "nm")


def window(draw) -> MaskBuild:
    w = draw.int(0, 12)
    form = draw.pick(["abs", "torch_abs", "two_sided", "triu_tril", "lt"])
    pos = _pos_lines(draw, offset=draw.bool() and form != "triu_tril")
    lines = {
        "abs": [*pos, f"keep = (i - j).abs() <= {w}"],
        "torch_abs": [*pos, f"keep = torch.abs(j - i) <= {w}"],
        "two_sided": [*pos, f"w = {w}", "keep = (j >= i - w) & (j <= i + w)"],
        "triu_tril": [f"keep = torch.ones(n, m, dtype=torch.bool).triu(-{w}).tril({w})"],
        "lt": [*pos, f"keep = (i - j).abs() < {w + 1}"],
    }[form]
    return MaskBuild("window", lines, "nm")


def causal_window(draw) -> MaskBuild:
    w = draw.int(1, 12)
    form = draw.pick(["and", "diff", "tril_diff"])
    pos = _pos_lines(draw, offset=draw.bool())
    lines = {
        "and": [*pos, f"keep = (j <= i) & (i - j < {w})"],
        "diff": [*pos, "d_ = i - j", f"keep = (d_ >= 0) & (d_ <= {w - 1})"],
        "tril_diff": [f"keep = torch.tril({ONES}) & ~torch.tril({ONES}, diagonal=-{w})"],
    }[form]
    return MaskBuild("causal_window", lines, "nm")


def dilated(draw) -> MaskBuild:
    dil, w = draw.int(2, 4), draw.int(1, 6)
    form = draw.pick(["mod", "remainder", "same_residue"])
    pos = _pos_lines(draw)
    lines = {
        "mod": [*pos, f"keep = ((i - j) % {dil} == 0) & ((i - j).abs() <= {w * dil})"],
        "remainder": [*pos, f"keep = (torch.remainder(i - j, {dil}) == 0) & ((i - j).abs() <= {w * dil})"],
        "same_residue": [*pos, f"keep = (i % {dil} == j % {dil}) & ((i - j).abs() <= {w * dil})"],
    }[form]
    return MaskBuild("dilated", lines, "nm")


def grid2d(draw, gh: int, gw: int) -> MaskBuild:
    """A 2-D neighborhood on a gh x gw grid flattened row-major (n == m == gh * gw)."""
    ry, rx = draw.int(0, 3), draw.int(0, 3)
    form = draw.pick(["divmod", "div_floor", "meshgrid"])
    pos = _pos_lines(draw)
    if form == "divmod":
        lines = [*pos, f"gw = {gw}", "yi, xi = i // gw, i % gw", "yj, xj = j // gw, j % gw",
                 f"keep = ((yi - yj).abs() <= {ry}) & ((xi - xj).abs() <= {rx})"]
    elif form == "div_floor":
        lines = [*pos, f"yi = torch.div(i, {gw}, rounding_mode='floor')",
                 f"yj = torch.div(j, {gw}, rounding_mode='floor')",
                 f"keep = ((yi - yj).abs() <= {ry}) & ((i - yi * {gw} - (j - yj * {gw})).abs() <= {rx})"]
    else:
        lines = [f"yy, xx = torch.meshgrid(torch.arange({gh}), torch.arange({gw}), indexing='ij')",
                 "c = torch.stack([yy.flatten(), xx.flatten()], dim=-1)",
                 "dist = (c[:, None, :] - c[None, :, :]).abs()",
                 f"keep = (dist[..., 0] <= {ry}) & (dist[..., 1] <= {rx})"]
    return MaskBuild("grid2d", lines, "nm")


def blocked(draw, n: int, m: int) -> MaskBuild:
    blk = draw.int(1, 9)
    forms = ["floordiv", "div_floor", "causal_blocks", "prefix_blocks"]
    if n == m and n % blk == 0:
        forms.append("block_diag")
    form = draw.pick(forms)
    pos = _pos_lines(draw)
    lines = {
        "floordiv": [*pos, f"keep = (i // {blk}) == (j // {blk})"],
        "div_floor": [*pos, f"keep = torch.div(i, {blk}, rounding_mode='floor') == "
                            f"torch.div(j, {blk}, rounding_mode='floor')"],
        "causal_blocks": [*pos, f"keep = (i // {blk} == j // {blk}) & (j <= i)"],
        "prefix_blocks": [*pos, f"keep = (j // {blk}) <= (i // {blk})"],
        "block_diag": [f"keep = torch.block_diag(*[torch.ones({blk}, {blk})] * {max(n // blk, 1)}).bool()"],
    }[form]
    return MaskBuild("blocked", lines, "nm")


def lifter_traps(draw, kind: str | None = None) -> MaskBuild:
    """Masks whose arithmetic a lifter may model wrongly: pos * c, trunc vs floor division of
    negative differences, negative slices of a position range (KV-cache decoding), float
    positions in a low-precision dtype."""
    kinds = ["pos_mul", "trunc_div", "floor_div_diff", "lowprec", "lowprec_scaled"]
    kind = kind or draw.pick(kinds + (["neg_slice"] if _SIZES["n"] <= _SIZES["m"] else []))
    if kind == "neg_slice":
        lines = [f"i = torch.arange({draw.pick(['m', 'm + 3'])})[-n:][:, None]", f"j = {key_pos(draw)}",
                 draw.pick(["keep = j <= i", f"keep = (i - j).abs() <= {draw.int(0, 6)}",
                            f"keep = (i - j >= 0) & (i - j < {draw.int(1, 6)})"])]
    elif kind == "pos_mul":
        c1, c2 = draw.pick([(2, 1), (1, 2), (3, 2), (2, 2), (1, 1)])
        lines = [*_pos_lines(draw), f"keep = j * {c1} <= i * {c2}"] if draw.bool() else \
            [*_pos_lines(draw), f"keep = (i * {c2} - j * {c1}).abs() <= {draw.int(0, 6)}"]
    elif kind == "trunc_div":
        blk = draw.int(2, 6)
        lines = [*_pos_lines(draw), f"keep = torch.div(i - j, {blk}, rounding_mode='trunc') == 0"]
    elif kind == "floor_div_diff":
        blk = draw.int(2, 6)
        lines = [*_pos_lines(draw), f"keep = (i - j) // {blk} == 0"]
    else:
        dt = draw.pick(["torch.float16", "torch.bfloat16"])
        pos = _pos_lines(draw, dtype=dt, offset=draw.bool())
        if kind == "lowprec":
            cmp = draw.pick(["keep = j <= i", f"keep = (i - j).abs() <= {draw.int(0, 8)}"])
        else:
            cmp = draw.pick(["keep = j * 0.1 <= i * 0.1", "keep = (i / 7) >= (j / 7)",
                               f"keep = (i * 0.5 - j * 0.5).abs() <= {draw.int(0, 4)}"])
        lines = [*pos, cmp]
    return MaskBuild(kind, lines, "nm")


def broadcast_one(draw) -> MaskBuild:
    """A mask with a broadcast axis of size 1: per-key ([1, M]) or per-query ([N, 1])."""
    form = draw.pick(["keys_last", "keys_even", "queries_first", "ones_row"])
    lines = {
        "keys_last": [f"j = {key_pos(draw)}", "keep = j < m - 1"],
        "keys_even": [f"j = {key_pos(draw)}", "keep = j % 2 == 0"],
        "queries_first": [f"i = {query_pos(draw)}", "keep = i > 0"],
        "ones_row": ["keep = torch.ones(1, m, dtype=torch.bool)"],
    }[form]
    return MaskBuild("broadcast1", lines, "n1" if form == "queries_first" else "1m")


def padding(draw, b: int, m: int, flat: bool) -> MaskBuild:
    """Key padding from a [B, M] tensor (or lengths [B]); optionally with causal on top."""
    lengths = draw.pick(["random", "same", "same", "full", "empty_one"])
    form = draw.pick(["keep_index", "pad_invert", "view", "lengths"])
    pat = {"lengths": lengths, "invert": form == "pad_invert"}
    if form == "lengths":
        args = [ArgSpec("lengths", "lengths", (b,), pat)]
        lines = [f"j = {key_pos(draw)}", "keep = (j < lengths[:, None])[:, None, None, :]"]
    else:
        args = [ArgSpec("pad", "pad", (b, m), pat)]
        lines = {"keep_index": ["keep = pad[:, None, None, :]"],
                 "pad_invert": ["keep = ~pad[:, None, None, :]"],
                 "view": ["keep = pad.view(pad.shape[0], 1, 1, m)"]}[form]
    shape = "b11m"
    if draw.int(0, 3) == 0:
        lines = [*lines, f"keep = keep & torch.tril({ONES})"]
        shape = "b1nm"
    return MaskBuild("padding" if shape == "b11m" else "padding+causal", lines, shape, args)


def runtime(draw, b: int, h: int, n: int, m: int, flat: bool, bias_ok: bool) -> MaskBuild:
    """A mask that arrives as an argument: bool keep or an additive float bias with -inf."""
    shapes = ["nm", "bhnm"] if flat else ["nm", "b1nm", "bhnm", "b11m"]
    shape = draw.pick(shapes)
    dims = {"nm": (n, m), "b1nm": (b, 1, n, m), "bhnm": (b * h, n, m) if flat else (b, h, n, m),
            "b11m": (b, 1, 1, m)}[shape]
    pattern = {"structure": draw.pick(["random", "random", "tril", "band", "ones", "blocks"]),
               "density": draw.pick([0.1, 0.5, 0.9]), "empty_rows": draw.int(0, 2),
               "w": draw.int(0, 5)}
    if bias_ok and draw.int(0, 3) == 0:
        return MaskBuild("runtime_bias", [], shape, [ArgSpec("bias", "bias", dims, pattern)], bias_arg=True)
    return MaskBuild("runtime", ["keep = mask"], shape, [ArgSpec("mask", "bool", dims, pattern)])


def near_miss(draw, mb: MaskBuild, n: int, m: int) -> MaskBuild:
    """One entry more or less than the family, built functionally or edited in place."""
    a, c = draw.int(0, n - 1), draw.int(0, m - 1)
    pos = ["ii = torch.arange(n)[:, None]", "jj = torch.arange(m)[None, :]"]
    kind = draw.pick(["or_onehot", "andnot_onehot", "sink", "ip_col0", "ip_entry_off", "ip_entry_on",
                        "ip_diag_on", "ip_diag_off", "ip_last", "ip_row_off", "clone_ip"])
    extra = {
        "or_onehot": [*pos, f"keep = keep | ((ii == {a}) & (jj == {c}))"],
        "andnot_onehot": [*pos, f"keep = keep & ~((ii == {a}) & (jj == {c}))"],
        "sink": [*pos, "keep = keep | (jj == 0)"],
        "ip_col0": ["keep[:, 0] = True"],
        "ip_entry_off": [f"keep[{a}, {c}] = False"],
        "ip_entry_on": [f"keep[{a}, {c}] = True"],
        "ip_diag_on": ["keep.fill_diagonal_(True)"],
        "ip_diag_off": ["keep.fill_diagonal_(False)"],
        "ip_last": ["keep[..., -1] = True"],
        "ip_row_off": [f"keep[{a}] = False"],
        "clone_ip": ["keep = keep.clone()", f"keep[{a}, {c}] = ~keep[{a}, {c}]"],
    }[kind]
    return MaskBuild(f"{mb.family}+{kind}", mb.lines + extra, mb.shape, mb.args, mb.bias_arg)
