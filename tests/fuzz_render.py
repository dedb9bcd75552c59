"""Render a drawn attention program as Python source (see ``fuzz_programs``).

Each ``render_*`` draws the remaining choices (contraction, scale, mask application, softmax,
GQA expansion, epilogue) and returns ``(source, tags)``; the tags name every choice so the
summary can break rewrite rates down and a mismatch says what it was made of.
"""

from __future__ import annotations

NEG_INF = ["float('-inf')", "-float('inf')", "-math.inf"]
FINITE = ["torch.finfo(s.dtype).min", "-1e4", "-10000.0", "-1e9"]
NOTS = ["~keep", "keep == 0", "keep.logical_not()", "torch.logical_not(keep)", "keep == False"]  # noqa: E712
SCALE_MUL = ["d ** -0.5", "1 / math.sqrt(d)", "1.0 / d ** 0.5", "math.sqrt(1.0 / d)", "q.shape[-1] ** -0.5",
             "torch.tensor(d ** -0.5)", "torch.tensor(d, dtype=q.dtype).rsqrt()", "{temp}"]
SCALE_DIV = ["math.sqrt(d)", "d ** 0.5", "math.sqrt(q.size(-1))", "torch.tensor(d).sqrt()", "{temp}"]
PY_SCALE = ["d ** -0.5", "1 / math.sqrt(d)", "1.0 / d ** 0.5", "{temp}"]


def _letters(draw) -> dict[str, str]:
    perm = draw.perm(list("bhnmdxyzijkl"))
    return dict(zip("BHNMD", perm[:5]))


def _temp(draw) -> str:
    return repr(draw.pick([0.37, 1.7, 0.05, 2.0, 1.0]))


def _prologue(draw, layout: str, sz, native_bnhd: bool) -> list[str]:
    if layout == "bnhd" and not native_bnhd:
        t = draw.pick(["transpose", "permute"])
        lines = (["q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)"] if t == "transpose" else
                 ["q = q.permute(0, 2, 1, 3)", "k = k.permute(0, 2, 1, 3)", "v = v.permute(0, 2, 1, 3)"])
        return lines + ["b, h, n, d = q.shape", "m = v.shape[-2]"]
    if layout == "bnhd":
        return ["b, n, h, d = q.shape", "m = v.shape[1]"]
    if layout == "flat":
        return ["bh, n, d = q.shape", "m = v.shape[-2]"]
    return ["b, h, n, d = q.shape", "m = v.shape[-2]"]


def _gqa(draw, sz, kname: str, sdpa: bool) -> tuple[list[str], str]:
    if sz.Hkv == sz.H:
        return [], "none"
    forms = ["repeat_interleave", "torch_repeat_interleave", "expand_reshape", "repeat_tile"]
    form = draw.pick(forms + (["enable_gqa", "enable_gqa"] if sdpa else []))
    g = "g = h // v.shape[1]"
    lines = {
        "repeat_interleave": [g, f"{kname} = {kname}.repeat_interleave(g, dim=1)", "v = v.repeat_interleave(g, dim=1)"],
        "torch_repeat_interleave": [g, f"{kname} = torch.repeat_interleave({kname}, g, 1)",
                                    "v = torch.repeat_interleave(v, g, 1)"],
        "expand_reshape": [g, f"{kname} = {kname}[:, :, None].expand(-1, -1, g, -1, -1)"
                              f".reshape(b, h, *{kname}.shape[2:])",
                           "v = v[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, h, *v.shape[2:])"],
        "repeat_tile": [g, f"{kname} = {kname}.repeat(1, g, 1, 1)", "v = v.repeat(1, g, 1, 1)"],
        "enable_gqa": [],
    }[form]
    return lines, form


def _scores(draw, layout: str, native_bnhd: bool, bias_ok: bool, scale_py: str | None):
    """Source of s = q·kᵀ; returns (lines, tag, alpha_used)."""
    if layout == "kT":
        form = draw.pick(["at", "matmul", "einsum"])
        return [{"at": "s = q @ kt", "matmul": "s = torch.matmul(q, kt)",
                 "einsum": "s = torch.einsum('bhnd,bhdm->bhnm', q, kt)"}[form]], f"kT_{form}", False
    L = _letters(draw)
    B, H, N, M, D = (L[c] for c in "BHNMD")
    if native_bnhd:
        swap = draw.bool()
        spec = f"{B}{M}{H}{D},{B}{N}{H}{D}->{B}{H}{N}{M}" if swap else f"{B}{N}{H}{D},{B}{M}{H}{D}->{B}{H}{N}{M}"
        return [f"s = torch.einsum('{spec}', {'k, q' if swap else 'q, k'})"], "einsum_bnhd", False
    flat = layout == "flat"
    forms = ["at_T", "at_mT", "matmul_T", "einsum", "einsum_swap", "einsum_ellipsis", "bmm", "baddbmm0"]
    forms += [] if flat else ["matmul_perm"]
    if bias_ok:
        forms += ["baddbmm_bias"]
    form = draw.pick(forms)
    pre = f"{B}" if flat else f"{B}{H}"
    r3 = (lambda x: x) if flat else (lambda x: f"{x}.reshape(-1, {x}.shape[-2], {x}.shape[-1])")
    back = "" if flat else ".view(b, h, n, m)"
    alpha = f", alpha={scale_py}" if scale_py else ""
    lines = {
        "at_T": ["s = q @ k.transpose(-2, -1)"],
        "at_mT": ["s = q @ k.mT"],
        "matmul_T": ["s = torch.matmul(q, k.transpose(-1, -2))"],
        "matmul_perm": ["s = torch.matmul(q, k.permute(0, 1, 3, 2))"],
        "einsum": [f"s = torch.einsum('{pre}{N}{D},{pre}{M}{D}->{pre}{N}{M}', q, k)"],
        "einsum_swap": [f"s = torch.einsum('{pre}{M}{D},{pre}{N}{D}->{pre}{N}{M}', k, q)"],
        "einsum_ellipsis": [f"s = torch.einsum('...{N}{D},...{M}{D}->...{N}{M}', q, k)"],
        "bmm": [f"s = torch.bmm({r3('q')}, {r3('k')}.transpose(1, 2)){back}"],
        "baddbmm0": [f"s0 = torch.empty({r3('q')}.shape[0], n, m, dtype=q.dtype)",
                     f"s = torch.baddbmm(s0, {r3('q')}, {r3('k')}.transpose(1, 2), beta=0.0{alpha}){back}"],
        "baddbmm_bias": [f"s = torch.baddbmm(bias3, {r3('q')}, {r3('k')}.transpose(1, 2){alpha}){back}"],
    }[form]
    return lines, form, form.startswith("baddbmm") and bool(scale_py)


def _av(draw, layout: str, native_bnhd: bool, p: str) -> tuple[str, str]:
    if native_bnhd:
        L = _letters(draw)
        B, H, N, M, D = (L[c] for c in "BHNMD")
        return f"torch.einsum('{B}{H}{N}{M},{B}{M}{H}{D}->{B}{N}{H}{D}', {p}, v)", "einsum_bnhd"
    flat = layout == "flat"
    form = draw.pick(["at", "matmul", "einsum", "einsum_swap", "bmm"])
    L = _letters(draw)
    B, H, N, M, D = (L[c] for c in "BHNMD")
    pre = B if flat else f"{B}{H}"
    r3 = (lambda x: x) if flat else (lambda x: f"{x}.reshape(-1, {x}.shape[-2], {x}.shape[-1])")
    back = "" if flat else ".view(b, h, n, v.shape[-1])"
    return {
        "at": f"{p} @ v",
        "matmul": f"torch.matmul({p}, v)",
        "einsum": f"torch.einsum('{pre}{N}{M},{pre}{M}{D}->{pre}{N}{D}', {p}, v)",
        "einsum_swap": f"torch.einsum('{pre}{M}{D},{pre}{N}{M}->{pre}{N}{D}', v, {p})",
        "bmm": f"torch.bmm({r3(p)}, {r3('v')}){back}",
    }[form], form


def _apply(draw, mask, dtype) -> tuple[list[str], str]:
    """How the mask reaches the scores: (lines, tag)."""
    if mask.bias_arg:
        form = draw.pick(["add", "iadd"])
        return [{"add": "s = s + bias", "iadd": "s += bias"}[form]], f"bias_arg_{form}"
    fills = NEG_INF + FINITE if str(dtype) != "torch.float16" else NEG_INF + FINITE[:3]
    fill, inv = draw.pick(fills), draw.pick(NOTS)
    form = draw.pick(["masked_fill", "masked_fill", "masked_fill_", "where", "bias_zeros", "bias_mul",
                        "bias_where", "bias_iadd", "bias_hf"])
    if form == "bias_mul" and fill in NEG_INF:
        fill = "-1e4"  # (~keep) * -inf is NaN where kept: not attention
    zeros = f"torch.zeros(keep.shape, dtype=s.dtype).masked_fill({inv}, {fill})"
    lines = {
        "masked_fill": [f"s = s.masked_fill({inv}, {fill})"],
        "masked_fill_": [f"s.masked_fill_({inv}, {fill})"],
        "where": [f"s = torch.where(keep, s, {fill})"],
        "bias_zeros": [f"bias = {zeros}", "s = s + bias"],
        "bias_mul": [f"bias = ({inv}).to(s.dtype) * {fill}", "s = s + bias"],
        "bias_where": [f"s = s + torch.where(keep, 0.0, {fill}).to(s.dtype)"],
        "bias_iadd": [f"bias = {zeros}", "s += bias"],
        "bias_hf": ["s = s + (1.0 - keep.to(s.dtype)) * torch.finfo(s.dtype).min"],
    }[form]
    return lines, f"{form}:{fill}"


SOFTMAX = {
    "method": ["p = s.softmax(-1)"],
    "method_dim": ["p = s.softmax(dim=-1)"],
    "F": ["p = F.softmax(s, dim=-1)"],
    "torch": ["p = torch.softmax(s, -1)"],
    "posdim": ["p = F.softmax(s, dim=s.dim() - 1)"],
    "fp32_dtype": ["p = torch.softmax(s, -1, dtype=torch.float32).to(v.dtype)"],
    "float_cast": ["p = F.softmax(s.float(), dim=-1).type_as(v)"],
    "explicit_amax": ["e = torch.exp(s - s.amax(-1, keepdim=True))", "p = e / e.sum(-1, keepdim=True)"],
    "explicit_max": ["mx = s.max(-1, keepdim=True).values", "e = (s - mx).exp()",
                     "p = e / e.sum(dim=-1, keepdim=True)"],
    "explicit_max0": ["e = torch.exp(s - s.max(dim=-1, keepdim=True)[0])", "p = e / torch.sum(e, -1, keepdim=True)"],
    "detach_max": ["e = torch.exp(s - s.amax(-1, keepdim=True).detach())", "p = e / e.sum(-1, keepdim=True)"],
    "no_max": ["e = s.exp()", "p = e / e.sum(-1, keepdim=True)"],
    "log_softmax": ["p = s.log_softmax(-1).exp()"],
    "normalise_after": ["e = torch.exp(s - s.amax(-1, keepdim=True))"],
}


def _scale(draw, api_alpha: bool):
    places = ["scores", "scores", "scores_inplace", "q", "k", "qk", "none"]
    where = draw.pick(places + (["alpha"] if api_alpha else []))
    temp = _temp(draw)
    if where == "alpha":
        return where, draw.pick(PY_SCALE).format(temp=temp), []
    if where == "scores":
        if draw.bool():
            x = draw.pick(SCALE_MUL).format(temp=temp)
            return where, None, [draw.pick([f"s = s * {x}", f"s = {x} * s"])]
        return where, None, [f"s = s / {draw.pick(SCALE_DIV).format(temp=temp)}"]
    if where == "scores_inplace":
        if draw.bool():
            return where, None, [f"s *= {draw.pick(SCALE_MUL).format(temp=temp)}"]
        return where, None, [f"s /= {draw.pick(SCALE_DIV).format(temp=temp)}"]
    return where, None, []


def render_manual(draw, layout: str, sz, mask, dtype, argnames: list[str]) -> tuple[str, dict]:
    kname = "kt" if layout == "kT" else "k"
    native = layout == "bnhd" and sz.Hkv == sz.H and not mask.present and draw.int(0, 2) == 0
    body = _prologue(draw, layout, sz, native)
    gqa_lines, gqa = _gqa(draw, sz, kname, sdpa=False)
    body += gqa_lines
    bias3_ok = layout != "kT" and not native and mask.present and mask.shape in ("nm", "n1", "1m") + (
        ("bhnm",) if layout == "flat" and mask.bias_arg else ())
    where, alpha, scale_lines = _scale(draw, api_alpha=layout != "kT" and not native)
    if where in ("q", "qk", "k"):
        x = draw.pick(SCALE_MUL).format(temp=_temp(draw)) if where != "qk" else "d ** -0.25"
        if where in ("q", "qk"):
            body.append(f"q = q * {x}")
        if where in ("k", "qk"):
            body.append(f"{kname} = {kname} * {x}")
    body += mask.lines
    apply_lines, apply_tag = [], "none"
    if mask.present:
        apply_lines, apply_tag = _apply(draw, mask, dtype)
    use_bias3 = bias3_ok and draw.int(0, 4) == 0
    if use_bias3:
        src = "bias" if mask.bias_arg else "torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float('-inf'))"
        body.append(f"bias3 = {src}")
        apply_lines, apply_tag = [], "baddbmm_input"
    score_lines, contraction, alpha_used = _scores(draw, layout, native, use_bias3, alpha)
    if use_bias3 and not contraction.startswith("baddbmm"):
        score_lines, contraction = [score_lines[0], "s = s + bias3"], contraction + "+bias3"
    if where == "alpha" and not alpha_used:
        scale_lines = [f"s = s * {alpha}"]
    body += score_lines
    after = draw.int(0, 4) == 0 and where.startswith("scores")
    body += (apply_lines + scale_lines) if after else (scale_lines + apply_lines)
    smax = draw.pick(list(SOFTMAX))
    body += SOFTMAX[smax]
    av, av_tag = _av(draw, layout, native, "e" if smax == "normalise_after" else "p")
    body.append(f"o = ({av}) / e.sum(-1, keepdim=True)" if smax == "normalise_after" else f"o = {av}")
    if layout == "bnhd" and not native:
        body.append(draw.pick(["o = o.transpose(1, 2)", "o = o.transpose(1, 2).reshape(b, n, -1)",
                                 "o = o.permute(0, 2, 1, 3).contiguous()"]))
    elif layout == "bhnd" and draw.int(0, 4) == 0:
        body.append("o = o.transpose(1, 2).reshape(b, n, -1)")
    body.append("return o")
    src = f"def attn({', '.join(argnames)}):\n" + "".join(f"    {ln}\n" for ln in body)
    tags = {"gqa": gqa, "scale": where + ("_after_mask" if after else ""), "contraction": contraction,
            "apply": apply_tag, "softmax": smax, "av": av_tag}
    return src, tags


def render_sdpa(draw, layout: str, sz, mask, dtype, argnames: list[str]) -> tuple[str, dict]:
    body = _prologue(draw, layout, sz, False)
    gqa_lines, gqa = _gqa(draw, sz, "k", sdpa=True)
    body += gqa_lines
    kwargs = []
    is_causal = mask.family == "causal" and draw.bool()
    if is_causal:
        kwargs.append("is_causal=True")
        apply = "is_causal"
    elif mask.present:
        body += mask.lines
        if mask.bias_arg:
            kwargs.append("attn_mask=bias")
            apply = "bias_arg"
        else:
            apply = draw.pick(["bool", "bool", "float"])
            if apply == "float":
                body.append("am = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float('-inf'))")
                kwargs.append("attn_mask=am")
            else:
                kwargs.append(draw.pick(["attn_mask=keep", "keep"]))
    else:
        apply = "none"
    scale = draw.pick(["default", "default", "explicit"])
    if scale == "explicit":
        kwargs.append(f"scale={draw.pick(PY_SCALE).format(temp=_temp(draw))}")
    if gqa == "enable_gqa":
        kwargs.append("enable_gqa=True")
    if draw.int(0, 3) == 0:
        kwargs.append("dropout_p=0.0")
    positional = [a for a in kwargs if "=" not in a]
    named = [a for a in kwargs if "=" in a]
    body.append(f"o = F.scaled_dot_product_attention(q, k, v, {', '.join(positional + named)})")
    if layout == "bnhd":
        body.append("o = o.transpose(1, 2)")
    body.append("return o")
    src = f"def attn({', '.join(argnames)}):\n" + "".join(f"    {ln}\n" for ln in body)
    return src, {"gqa": gqa, "scale": scale, "contraction": "sdpa", "apply": apply, "softmax": "sdpa", "av": "sdpa"}
