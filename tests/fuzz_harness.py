"""Run a fuzzed program eagerly and rewritten, and judge the rewrite.

`rewrite_program` is the one place that knows how a program is rewritten (and so the one
place that imports internal paths): ``path="fast"`` lowers it with ``rewrite.capture.to_aten``
and rewrites the ATen graph with ``rewrite.passes.pipeline.rewrite_graph`` (no Dynamo, ~30 ms);
``path="real"`` goes through ``rewrite.compile`` (Dynamo) and reads the report from
``rewrite.inspect``.

The oracle (`compare`): the program run eagerly on float64 copies of its inputs is the reference.
The rewritten output, in the program's own dtype, must be within max(the dtype's tolerance in
``tests/reference.py``, a small multiple of eager's own-dtype error) of it, and its NaN / ±inf
positions must be eager's own-dtype ones, unless the site's report notes declare a deliberate
difference (`noted_difference`). The absolute tolerance also holds the case's conditioning
allowance, u·max|S|·max|v| (``fuzz_condition.py``: what rounding the logits once more moves the
output by; recorded per case as ``allowance``). Gradients (of ``(out * g).sum()``) are judged the same way, with
the absolute tolerance scaled by the case's largest gradient entry (x ``GRAD_ATOL_FACTOR``).

Deliberate exceptions, each for a reason that is eager's and not the rewrite's: NaN entries that
PyTorch's CPU bf16 matmul leaks into a neighbouring row (`_bf16_leak`); no NaN/inf is injected
where gradients are taken (eager's backward spreads it through 0·NaN), and none into v at a key a
mask might drop, nor ±inf into v at all (``fuzz_programs._qkv_specs``). A float64 program that
casts to float32 is judged at float32's tolerance (`tolerance_dtype`).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import torch
from fuzz_condition import LargestLogit, allowance
from fuzz_inputs import as_float64, make_args, second_call
from fuzz_programs import Program, base_family
from reference import TOLERANCES

ERROR_FACTOR = 4.0  # a rewrite may be this many times less accurate than eager (worst element)
GRAD_ATOL_FACTOR = 2.0  # a backward combines more rounded terms than the forward (fused: dS = P(dP - D))
NOTE_WORDS = ("overflow", "differs from eager", "unlike eager", "eager gives", "deliberate")


def rewrite_program(fn, args, backend: str, path: str):
    """(callable running the rewritten program, site reports, None) or (None, [], why-not-captured)."""
    if path == "fast":
        from rewrite.capture import CaptureError, to_aten
        from rewrite.passes.pipeline import rewrite_graph

        try:
            gm = to_aten(fn, list(args))
        except CaptureError as exc:
            return None, [], f"capture: {str(exc)[:120]}"
        new_gm, reports = rewrite_graph(gm, backend, list(args))
        return new_gm, list(reports), None
    import rewrite

    report = rewrite.inspect(fn, *args, backend=backend)  # resets Dynamo before and after
    return rewrite.compile(fn, backend=backend), list(report.sites), None


def noted_difference(notes: list[str]) -> bool:
    return any(w in n.lower() for n in notes for w in NOTE_WORDS)


def compare(c: torch.Tensor, e: torch.Tensor, r: torch.Tensor, dtype: torch.dtype, what: str,
            noted: bool, scale: float = 1.0, extra: float = 0.0) -> list[str]:
    """Problems of the rewritten result ``c`` against eager in its own dtype ``e`` and the
    float64 reference ``r`` (empty: fine). ``scale`` multiplies the absolute tolerance (gradients:
    the largest gradient entry of the case, so a fused backward's rounding, relative to the
    quantities it combines, is not judged against a gradient that happens to be ~0). ``extra``:
    the case's conditioning allowance (tests/fuzz_condition.py), added to the absolute tolerance."""
    if c is None or e is None:
        return [] if c is None and e is None else [f"{what}: None vs tensor (compiled {c is None}, eager {e is None})"]
    if c.shape != e.shape:
        return [f"{what}: shape {tuple(c.shape)} != eager {tuple(e.shape)}"]
    problems = [] if c.dtype == e.dtype else [f"{what}: dtype {c.dtype} != eager {e.dtype}"]
    low = e.dtype == torch.bfloat16
    c, e, r = (t.detach().to(torch.float64) for t in (c, e, r))
    leak = _bf16_leak(c, e, r) if low else None
    if leak is not None:
        e = torch.where(leak, r, e)  # eager's kernel artifact: judge those entries against float64
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        pc, pe = f(c), f(e)
        if not torch.equal(pc, pe) and not noted:
            extra, missing = int((pc & ~pe).sum()), int((pe & ~pc).sum())
            sign = "+" if extra and not missing else "-" if missing and not extra else "±"
            problems.append(f"{what}: {name}{sign} positions differ (compiled {int(pc.sum())}, eager {int(pe.sum())}; "
                            f"{extra} only compiled, {missing} only eager)")
    fin = torch.isfinite(c) & torch.isfinite(e) & torch.isfinite(r)
    if fin.any():
        atol, rtol = TOLERANCES[dtype]
        atol = atol + extra / scale
        cf, ef, rf = c[fin], e[fin], r[fin]
        err_c, err_e = (cf - rf).abs(), (ef - rf).abs()
        if (err_c > atol * scale + rtol * rf.abs()).any():
            worst_c, worst_e = float(err_c.max()), float(err_e.max())
            if worst_c > ERROR_FACTOR * worst_e + atol * scale:
                problems.append(f"{what}: max error {worst_c:.3g} vs float64 (eager {str(dtype)[6:]}: {worst_e:.3g}, "
                                f"atol {atol * scale:.3g})")
    return problems


def _bf16_leak(c: torch.Tensor, e: torch.Tensor, r: torch.Tensor) -> torch.Tensor | None:
    """Entries where eager's bfloat16 output is NaN only because PyTorch's CPU bf16 batched matmul
    spreads a NaN row of its left operand into the neighbouring row (``fuzz_findings/
    00_eager_bf16_bmm_nan_leak.py``): NaN in eager, finite in float64 and in the rewrite, in a
    result that has true (float64) NaNs to leak from. None when there are none."""
    if not torch.isnan(r).any():
        return None
    leak = torch.isnan(e) & torch.isfinite(r) & torch.isfinite(c)
    return leak if leak.any() else None


@dataclass
class Outcome:
    program: Program
    backend: str
    path: str
    status: str = "ok"  # ok | mismatch | crash | invalid | uncaptured | no_site
    rewritten: bool = False
    variant: str = "-"
    kernel: str = "-"
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process time: what the case costs on an otherwise idle machine
    allowance: float = 0.0  # the conditioning allowance the values were judged with (fuzz_condition.py)
    rescued: bool = False  # passed only with that allowance (beyond the dtype's tolerance)

    def klass(self) -> str:
        """A mismatch class: family, what differs, variant, kernel, backend."""
        first = self.problems[0] if self.problems else ""
        head, _, rest = first.partition(": ")
        what = head + ":" + ("crash" if self.status == "crash" else rest.split(" ")[0] if " positions" in rest
                             else "value")
        return f"{base_family(self.program.family)} | {what} | {self.variant}/{self.kernel} | {self.backend}"

    def to_dict(self) -> dict:
        return {"family": self.program.family, "describe": self.program.describe(), "backend": self.backend,
                "path": self.path, "status": self.status, "rewritten": self.rewritten, "variant": self.variant,
                "kernel": self.kernel, "reason": self.reason, "notes": self.notes, "problems": self.problems,
                "source": self.program.source if self.status in ("mismatch", "crash") else None,
                "args": [[a.name, a.kind, list(a.shape), a.pattern] for a in self.program.args],
                "dtype": str(self.program.dtype), "seed": self.program.seed, "grad": self.program.grad,
                "second": self.program.second, "tags": self.program.tags,
                "class": self.klass() if self.status in ("mismatch", "crash") else None, "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds, "allowance": self.allowance,
                "rescued": self.rescued}


def _forward_and_grads(fn, args, prog: Program, gw_seed: int):
    out = fn(*args)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not prog.grad:
        return out, ()
    xs = [a for a, s in zip(args, prog.args) if s.kind == "x"]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(gw_seed)).to(out.dtype)
    loss = out.sum() if gw_seed % 3 == 0 else (out * g).sum()
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    return out.detach(), grads


def _eager(prog, args):
    """Eager results in the program's dtype, and the reference: the program in float64 throughout
    (for the ~8k programs, float32); computed once where the two are the same computation."""
    with LargestLogit() as seen:
        out, grads = _forward_and_grads(prog.fn, args, prog, prog.seed)
    if prog.reference_is_eager:
        return out, grads, out, grads, seen.largest
    with LargestLogit() as seen:  # the reference's logits: what the rounding acts on
        ref = _forward_and_grads(prog.fn64, as_float64(args, prog.grad, prog.ref_dtype), prog, prog.seed)
    return (out, grads, *ref, seen.largest)


def tolerance_dtype(prog: Program) -> torch.dtype:
    """The dtype whose tolerance applies: a float64 program that casts its scores or weights to
    float32 (``.float()``, ``dtype=torch.float32``) is only float32-accurate, in eager too."""
    if prog.dtype == torch.float64 and (".float()" in prog.source or "dtype=torch.float32" in prog.source):
        return torch.float32
    return prog.dtype


def _judge(prog, new, args, outcome: Outcome, call: str, eager=None) -> None:
    out_e, g_e, out_r, g_r, logit = eager or _eager(prog, args)
    try:
        out_c, g_c = _forward_and_grads(new, args, prog, prog.seed)
    except Exception as exc:  # noqa: BLE001 - any failure of the rewritten program is a finding
        outcome.status = "crash"
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        outcome.problems.append(f"{call}run: {type(exc).__name__}: {first}")
        return
    noted, tol = noted_difference(outcome.notes), tolerance_dtype(prog)
    values = [a for a, s in zip(args, prog.args) if s.kind == "x" and s.name.startswith("v") and a.is_floating_point()]
    finite_v = [a.detach()[torch.isfinite(a.detach())] for a in values]
    vmax = max([0.0] + [float(f.abs().max()) for f in finite_v if f.numel()])
    extra = allowance(logit, vmax, tol)
    outcome.allowance = max(outcome.allowance, extra)
    finite = [g[torch.isfinite(g)] for g in g_r if g is not None]
    scale = GRAD_ATOL_FACTOR * max([1.0] + [float(g.abs().max()) for g in finite if g.numel()])
    names = [s.name for s in prog.args if s.kind == "x"]
    judged = [(out_c, out_e, out_r, f"{call}out", 1.0, extra),
              *((gc, ge, gr, f"{call}grad_{n}", scale, allowance(logit, 1.0, tol) * scale)
                for n, gc, ge, gr in zip(names, g_c, g_e, g_r))]
    for c, e, r, what, sc, ex in judged:
        found = compare(c, e, r, tol, what, noted, sc, ex)
        if not found and ex and compare(c, e, r, tol, what, noted, sc):
            outcome.rescued = True  # within the conditioning allowance only: counted in the summary
        outcome.problems += found


def run_case(prog: Program, backend: str = "torch", path: str = "fast") -> Outcome:
    """Run one program eagerly and rewritten (``backend``, harness ``path``) and judge it."""
    t0, c0 = time.perf_counter(), time.process_time()
    outcome = Outcome(prog, backend, path)
    _run(prog, outcome)
    outcome.seconds, outcome.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return outcome


def _run(prog: Program, outcome: Outcome) -> None:
    backend, path = outcome.backend, outcome.path
    args = make_args(prog.args, prog.dtype, prog.seed, prog.grad)
    try:
        eager = _eager(prog, args)
    except Exception as exc:  # noqa: BLE001 - a program eager rejects is not attention
        outcome.status, outcome.reason = "invalid", f"{type(exc).__name__}: {str(exc)[:120]}"
        return
    try:
        new, reports, why = rewrite_program(prog.fn, args, backend, path)
    except Exception as exc:  # noqa: BLE001
        outcome.status = "crash"
        outcome.problems.append(f"rewrite: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        outcome.reason = traceback.format_exc(limit=-3)
        return
    if new is None:
        outcome.status, outcome.reason = "uncaptured", why
        return
    rewritten = [r for r in reports if r.rewritten]
    outcome.rewritten = bool(rewritten)
    site = rewritten[0] if rewritten else (reports[0] if reports else None)
    if site is None:
        outcome.status = "no_site"
    else:
        outcome.variant, outcome.kernel = site.variant, str(site.kernel or "-")
        outcome.reason = site.reason or ""
        outcome.notes = [n for r in reports for n in r.notes]
    _judge(prog, new, args, outcome, "", eager)
    if prog.second and outcome.status != "crash":
        desc = second_call(prog.args, args, prog.second, prog.dtype, prog.seed)
        before = len(outcome.problems)
        _judge(prog, new, args, outcome, "call2_")
        if len(outcome.problems) > before:
            outcome.problems.append(f"(second call: {desc})")
    if outcome.problems and outcome.status == "ok":
        outcome.status = "mismatch"
