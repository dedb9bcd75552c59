"""A neighborhood mask in NATTEN's terms, for people reading the report.

The IR (rewrite/ir/mask.py) holds a sliding window as a half-width w in positions with dilation
d: keys on the query's residue class in [c − w, c + w], or [c − w, c] when causal. Users count
keys: NATTEN's kernel size is 2·(w // d) + 1 for a symmetric window and w // d + 1 for a causal one
(Mistral's ``sliding_window=32``, keys m in (p − 32, p], is the IR's w = 31: kernel size 32). A
``clamped`` axis already holds NATTEN's kernel size. HaloNet blocks stay block and halo."""

from __future__ import annotations

from typing import Any

from .ir.mask import MaskSpec


def window_terms(spec: MaskSpec | None) -> dict[str, Any] | None:
    """kernel_size, dilation, causal, edges ("clamped": NATTEN's shifted window at the borders,
    "cut": a sliding window cut at them) and grid per axis; None for masks without a window."""
    if spec is None or spec.kind != "neighborhood" or not spec.window:
        return None
    axes = range(len(spec.window))
    if spec.block and any(spec.block):
        return None
    kernel = []
    for a in axes:
        w, d = spec.window[a], spec.dilation[a] or 1
        if spec.clamped[a]:
            kernel.append(w)
        else:
            kernel.append(w // d + 1 if spec.causal[a] else 2 * (w // d) + 1)
    terms: dict[str, Any] = {"kernel_size": tuple(kernel), "dilation": tuple(spec.dilation),
                             "causal": tuple(spec.causal),
                             "edges": tuple("clamped" if c else "cut" for c in spec.clamped),
                             "grid": tuple(spec.grid) if spec.grid else None}
    if spec.stride and any(s != 1 for s in spec.stride):
        terms["stride"] = tuple(spec.stride)
    if spec.offset:
        terms["offset"] = spec.offset
    return terms


def window_text(spec: MaskSpec | None) -> str:
    """``7×7 window, dilation 2, on a 16×16 grid`` / ``causal window 32 (keys m in (p − 32, p])``."""
    t = window_terms(spec)
    if t is None:
        return ""
    ks = "×".join(str(k) for k in t["kernel_size"])
    parts = []
    causal = all(t["causal"])
    if len(ks.split("×")) == 1 and causal and t["edges"] == ("cut",):
        k = t["kernel_size"][0]
        shift = f" + {t['offset']}" if t.get("offset") else ""
        parts.append(f"causal window {k} (keys m in (p{shift} − {k}, p{shift}]"
                     + (f" every {t['dilation'][0]}" if t["dilation"][0] != 1 else "") + ")")
    else:
        parts.append(("causal " if causal else "") + f"{ks} window")
        if any(c for c in t["causal"]) and not causal:
            parts.append(f"causal per axis {t['causal']}")
        if any(d != 1 for d in t["dilation"]):
            parts.append("dilation " + "×".join(str(d) for d in t["dilation"]))
        if t.get("offset"):
            parts.append(f"offset {t['offset']}")
    if "clamped" in t["edges"]:
        parts.append("clamped at the edges (NATTEN)" if all(e == "clamped" for e in t["edges"])
                     else f"edges {t['edges']}")
    if t.get("stride"):
        parts.append(f"stride {t['stride']}")
    if t["grid"] and len(t["grid"]) > 1 and all(g is not None for g in t["grid"]):
        parts.append("on a " + "×".join(str(g) for g in t["grid"]) + " grid")
    return ", ".join(parts)
