"""Command line: ``python -m rewrite {demo, inspect FILE.py:NAME, simulate ...}``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def load_callable(target: str):
    """``path/to/file.py:NAME`` → (callable, example inputs)."""
    if ":" not in target:
        raise SystemExit(f"rewrite inspect: expected FILE.py:NAME, got {target!r}")
    path, name = target.rsplit(":", 1)
    if not Path(path).is_file():
        raise SystemExit(f"rewrite inspect: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise SystemExit(f"rewrite inspect: {path} defines no {name!r}")
    obj = getattr(module, name)
    import torch

    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        obj = obj()
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    maker = getattr(module, f"{name}_inputs", None) or getattr(module, "example_inputs", None)
    if maker is None:
        raise SystemExit(f"rewrite inspect: {path} must define {name}_inputs() or example_inputs() "
                         "returning the example inputs (a tuple)")
    inputs = maker() if callable(maker) else maker
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    return obj, inputs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rewrite", description="the attention compiler")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rewrite {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="small transformer: report, check and time eager vs rewritten (CPU)")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--batch", type=int, default=2)
    i = sub.add_parser("inspect", help="inspect a model or function defined in a file")
    i.add_argument("target", help="FILE.py:NAME (the file also defines NAME_inputs() or example_inputs())")
    i.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("simulate", help="spatial-array simulation (see python -m rewrite simulate -h)",
                   add_help=False)
    if argv[:1] == ["--version"]:
        return _print_version()
    if argv and argv[0] == "simulate":
        from .simulation import cli_main

        return cli_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from .demo import main as demo_main

        return demo_main(args.seq_len, args.batch)
    if args.cmd == "inspect":
        import rewrite

        fn, inputs = load_callable(args.target)
        report = rewrite.inspect(fn, *inputs, backend=args.backend)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report)
        return 0
    return 2


def _print_version() -> int:
    import torch

    from . import __version__

    print(f"rewrite {__version__} (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
