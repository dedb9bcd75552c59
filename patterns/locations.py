"""Where a site is, as a user reads it: ``model.layers.0.self_attn (modeling_llama.py:229, eager_attention_forward)``.

Dynamo names modules from its own roots (``L['self']``, ``L['args'][0]`` when a decorator takes
``*args``, ``L['fn']``) and puts a ``File "…", line N, in f`` frame in the stack trace; both are
trimmed: the root and Dynamo's indexing go, a file under site-packages is named by its basename,
one under the working directory by its relative path."""

from __future__ import annotations

import os
import re

from torch.fx import Node

_ROOT = re.compile(r"^[LG]\['[^']*'\](\[\d+\])?\.?")
_FRAME = re.compile(r'File "?(?P<file>[^",]+)"?, line (?P<line>\d+)(, in (?P<fn>.+))?')


def module_path_of(node: Node) -> str:
    """The nn.Module path that ran the node (``transformer.h.0.attn``), or ""."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = _ROOT.sub("", str(list(stack.values())[-1][0]))
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")


def short_file(path: str) -> str:
    if "site-packages" in path or "dist-packages" in path:
        return os.path.basename(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return rel if not rel.startswith("..") else path


def location_of(node: Node) -> str:
    """Where a site is: the module path (when inside a module) and the user's source line."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    match = _FRAME.search(frames[-1]) if frames else None
    if match:
        line = f"{short_file(match['file'])}:{match['line']}" + (f", {match['fn']}" if match["fn"] else "")
    else:
        line = frames[-1].replace("File ", "").replace('"', "") if frames else node.name
    module = module_path_of(node)
    return f"{module} ({line})" if module else line
