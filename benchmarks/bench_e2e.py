"""End-to-end speed of Hugging Face models: eager, HF's SDPA, Inductor and rewrite, side by side.

Issue 12 item 6. Two decoder models built from their configs with random weights (nothing
downloaded), bf16 on one GPU: a Llama-style model (hidden 2048, 16 layers, 16 heads, 8 KV heads,
intermediate 5632, vocab 32000) and a Mistral-style one of the same sizes with ``sliding_window=4096``.
Each cell runs on a freshly built model with the same seeded weights, in one process:

* ``eager``: ``attn_implementation="eager"``, the plain model;
* ``hf_sdpa``: ``attn_implementation="sdpa"``, the plain model;
* ``inductor``: the eager model under ``torch.compile(model)``; for generate() its forward is
  compiled in place (``model.forward = torch.compile(model.forward)``, so generate() runs it);
* ``rewrite``: the eager model under ``rewrite.compile(model)`` (its generate() runs the rewritten
  forward); the sites it rewrites are read by ``rewrite.inspect`` on the cell's prompt first.

Points: prefill (B=1, N in --prefill, ``use_cache=False``, ``logits_to_keep=1`` so the N×vocab logits
do not dominate) and decode (``generate`` of --new-tokens greedy tokens after a --prompt-token prompt,
``min_new_tokens`` the same, DynamicCache unless --cache static; HF's own auto-compile is disabled).
Decode reports the total ms and ms per token = (total − a generate of 1 token) / (new tokens − 1),
so the prompt's prefill is not counted. Time: CUDA-synchronised wall time; a first call (compile
included: ``first_call_s``), then the median of --repeats calls; peak memory per cell. Greedy tokens
(decode) or the last position's argmax (prefill) are compared with eager's (``tokens_equal``,
recorded, never a failure). An OOM or any other error is recorded in its cell; cells past
--budget-s are recorded as skipped. JSON and markdown are rewritten after every cell.

    python -P benchmarks/bench_e2e.py --out benchmarks/results
    python -P benchmarks/bench_e2e.py --smoke --out /tmp/e2e_smoke     # CPU, tiny sizes, fp32

Writes e2e_<card>_<date>[_smoke].{json,md} under --out (card, date, versions, command).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import gc
import inspect
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import rewrite

VARIANTS = ["eager", "hf_sdpa", "inductor", "rewrite"]
MODELS = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}


def config(name: str, attn: str, smoke: bool):
    if smoke:
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
        window = 8
    else:
        sizes = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=8, vocab_size=32000)
        window = 4096
    sizes["max_position_embeddings"] = 65536
    if name == "mistral":
        return transformers.MistralConfig(**sizes, sliding_window=window, attn_implementation=attn)
    return transformers.LlamaConfig(**sizes, attn_implementation=attn)


def build(name: str, variant: str, args):
    """A fresh model with the seed's weights (the same for every variant)."""
    attn = "sdpa" if variant == "hf_sdpa" else "eager"
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = MODELS[name](config(name, attn, args.smoke))
    return model.to(dtype=args.dtype).eval()


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: str) -> tuple[float, object]:
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return (time.perf_counter() - t) * 1e3, out


def site_summary(report) -> str:
    done = collections.Counter(f"{s.variant} on {s.kernel}" for s in report.sites if s.rewritten)
    left = [s.reason or "?" for s in report.sites if not s.rewritten]
    text = f"{sum(done.values())}/{len(report.sites)} sites rewritten"
    if done:
        text += " (" + ", ".join(f"{n} {k}" for k, n in done.items()) + ")"
    if left:
        text += f"; {len(left)} left alone: {left[0][:80]}"
    if report.graph_breaks:
        text += f"; {len(report.graph_breaks)} graph break reason(s)"
    return text


def measure(cell: dict, ids: torch.Tensor, ref: dict, args) -> None:
    """Fills ``cell`` in place (so a failure keeps what was measured before it)."""
    dev, variant = args.device, cell["variant"]
    model = build(cell["model"], variant, args)
    prefill = cell["point"] == "prefill"
    prefill_kw = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        prefill_kw["logits_to_keep"] = 1
    if variant == "rewrite":
        t = time.perf_counter()
        with torch.no_grad():
            cell["sites"] = site_summary(rewrite.inspect(model, input_ids=ids, **prefill_kw))
        cell["inspect_s"] = time.perf_counter() - t
    if variant == "inductor":
        if prefill:
            runner = torch.compile(model)
        else:
            model.forward = torch.compile(model.forward)
            runner = model
    elif variant == "rewrite":
        runner = rewrite.compile(model)
    else:
        runner = model
    if dev == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
    if prefill:
        def call():
            with torch.no_grad():
                return runner(input_ids=ids, **prefill_kw).logits[:, -1].float()
    else:
        gen_kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, disable_compile=True)
        if args.cache == "static":
            gen_kw["cache_implementation"] = "static"

        def generate(steps):
            return lambda: runner.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **gen_kw)
        call = generate(args.new_tokens)
    first, out = timed(call, dev)
    cell["first_call_s"] = first / 1e3
    reps = args.repeats
    if time.perf_counter() - args.start + first / 1e3 * (2 if prefill else 3) * reps > args.budget_s:
        reps, cell["note"] = 1, "repeats cut to 1 (budget)"
    times = [timed(call, dev)[0] for _ in range(reps)]
    cell["ms"] = statistics.median(times)
    if prefill:
        key, value = (cell["model"], "prefill", cell["N"]), out
    else:
        key, value = (cell["model"], "decode", cell["N"]), out[0, ids.shape[1]:].tolist()
        cell["generated"] = len(value)
        one = generate(1)
        timed(one, dev)  # its first call may compile the prompt's length without the cache
        gen1 = statistics.median(timed(one, dev)[0] for _ in range(reps))
        cell["gen1_ms"] = gen1
        cell["ms_per_token"] = (cell["ms"] - gen1) / max(args.new_tokens - 1, 1)
    if variant == "eager":
        ref[key] = value
    elif key in ref:
        if prefill:
            cell["tokens_equal"] = bool(torch.equal(value.argmax(-1), ref[key].argmax(-1)))
            cell["max_abs_diff"] = float((value - ref[key]).abs().max())
        else:
            cell["tokens_equal"] = value == ref[key]
            same = next((i for i, (a, b) in enumerate(zip(value, ref[key])) if a != b), None)
            if same is not None:
                cell["first_diff_at"] = same
    if dev == "cuda":
        cell["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def run_cell(cell: dict, ref: dict, args) -> None:
    if time.perf_counter() - args.start > args.budget_s:
        cell["ms"] = "skipped: budget"
        return
    gen = torch.Generator(device="cpu").manual_seed(cell["N"])
    vocab = config(cell["model"], "eager", args.smoke).vocab_size
    ids = torch.randint(0, vocab, (1, cell["N"]), generator=gen).to(args.device)
    t = time.perf_counter()
    try:
        measure(cell, ids, ref, args)
    except torch.cuda.OutOfMemoryError:
        cell["ms"] = "OOM"
    except Exception as exc:  # noqa: BLE001 - a failing cell is a result, with its error
        text = str(exc).strip().splitlines()
        oom = "out of memory" in str(exc).lower()  # an OOM wrapped by Dynamo/Inductor (BackendCompilerFailed)
        cell.setdefault("ms", "OOM" if oom else f"error: {type(exc).__name__}: {text[0] if text else ''}"[:200])
        if isinstance(cell["ms"], float):  # failed after the timing (decode's 1-token reference)
            cell["note"] = f"error after timing: {type(exc).__name__}: {text[0] if text else ''}"[:200]
    cell["cell_s"] = time.perf_counter() - t
    if args.device == "cuda" and "peak_gib" not in cell:
        cell["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    torch._dynamo.reset()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def cells(args) -> list[dict]:
    """The most informative first: the first prefill length on both models, Llama's decode, the
    other prefill lengths, Mistral's decode."""
    models = [m for m in ("llama", "mistral") if m in args.models]
    first, rest = args.prefill[:1], args.prefill[1:]
    order = [(m, "prefill", n) for n in first for m in models]
    order += [("llama", "decode", args.prompt)] if "llama" in models else []
    order += [(m, "prefill", n) for n in rest for m in models]
    order += [("mistral", "decode", args.prompt)] if "mistral" in models else []
    return [{"model": m, "point": p, "N": n, "variant": v} for m, p, n in order for v in args.variants]


def fmt(x, digits: int = 2) -> str:
    if isinstance(x, bool) or x is None:
        return "–" if x is None else str(x).lower()
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x).replace("|", "/")


def ratio(a, b) -> str:
    return f"{a / b:.2f}×" if isinstance(a, float) and isinstance(b, float) and b > 0 else "–"


def write(rows: list[dict], args, meta: dict) -> None:
    card = re.sub(r"[^A-Za-z0-9]+", "_", meta["card"]).strip("_")
    stem = f"e2e_{card}_{meta['date']}{'_smoke' if args.smoke else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    names = [v for v in VARIANTS if v in args.variants]
    lines = [f"# End-to-end model speed: eager, HF SDPA, Inductor, rewrite ({meta['card']})", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
             f"{meta['dtype']}, B=1, repeats {args.repeats}, cache {args.cache}; `{meta['command']}`", "",
             "ms: median of the timed calls after a first call (CUDA-synchronised wall time). Prefill: one forward, "
             "use_cache=False, logits_to_keep=1. Decode: generate() of the new tokens after the prompt (greedy, "
             "min_new_tokens = max_new_tokens); ms/token = (total − a 1-token generate) / (new tokens − 1). "
             "inductor/rewrite = inductor ms / rewrite ms (> 1: rewrite faster); eager/rewrite likewise.", ""]
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        cfg = config(model, "eager", args.smoke)
        window = f", sliding_window {cfg.sliding_window}" if model == "mistral" else ""
        lines += [f"## {model} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}"
                  f"/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}{window})", "",
                  "| point | " + " | ".join(names) + " | inductor/rewrite | eager/rewrite |",
                  "|" + "---|" * (len(names) + 3)]
        points = list(dict.fromkeys((r["point"], r["N"]) for r in mine))
        for point, n in points:
            by = {r["variant"]: r for r in mine if (r["point"], r["N"]) == (point, n)}
            fields = [("ms", f"prefill N={n} (ms)")] if point == "prefill" else \
                [("ms", f"decode {n}+{args.new_tokens} total (ms)"), ("ms_per_token", "decode ms/token")]
            for key, label in fields:
                vals = {}
                for v in names:
                    r = by.get(v, {})
                    vals[v] = r.get(key, r.get("ms") if isinstance(r.get("ms"), str) else None)
                lines.append(f"| {label} | " + " | ".join(fmt(vals[v]) for v in names)
                             + f" | {ratio(vals.get('inductor'), vals.get('rewrite'))}"
                             + f" | {ratio(vals.get('eager'), vals.get('rewrite'))} |")
        sites = list(dict.fromkeys(f"{r['point']} N={r['N']}: {r['sites']}" for r in mine if r.get("sites")))
        lines += [""] + [f"rewrite sites ({s})" for s in sites] + [""]
    cols = ["model", "point", "N", "variant", "ms", "ms_per_token", "first_call_s", "peak_gib", "tokens_equal",
            "max_abs_diff", "cell_s", "note"]
    lines += ["## Cells", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), 4 if c == "max_abs_diff" else 2) for c in cols) + " |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--prefill", default="4096,32768", help="prefill lengths, comma-separated")
    p.add_argument("--prompt", type=int, default=4096, help="decode: prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="decode: the KV cache")
    p.add_argument("--models", default="llama,mistral")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new cell after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models in fp32, 1 repeat (checks the script)")
    args = p.parse_args()
    args.start = time.perf_counter()
    if args.smoke:
        args.prefill, args.prompt, args.new_tokens, args.repeats = "32,64", 32, 8, 1
        args.budget_s = min(args.budget_s, 300.0)
    args.prefill = [int(n) for n in args.prefill.split(",") if n]
    args.models, args.variants = args.models.split(","), args.variants.split(",")
    args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import triton  # noqa: F401 - for its version
    except ImportError:
        pass
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"card": card, "date": dt.date.today().isoformat(), "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", "none"),
            "transformers": transformers.__version__, "dtype": str(args.dtype).removeprefix("torch."),
            "command": shlex.join(sys.orig_argv)}
    rows, ref = cells(args), {}
    for cell in rows:
        run_cell(cell, ref, args)
        print(json.dumps(cell), flush=True)
        write(rows, args, meta)  # after every cell: a time-out keeps what was measured
    print(f"total {time.perf_counter() - args.start:.1f} s")


if __name__ == "__main__":
    main()
