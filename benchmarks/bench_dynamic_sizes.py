"""What a new size costs a dynamic graph, and what generate() pays for it (issue 12 item 1), on the CPU.

A tiny Llama (hidden 64, 2 layers, eager attention, fp32) under ``rewrite.compile``. Side by side, in one
process:

* per new size: the symbolic ATen graph concretised at the size (rewrite/concretise.py) vs traced again
  with make_fx (capture.traced_at), and the rewrite of the result (passes/pipeline.rewrite_graph): the
  median of --repeats, on the decode graph generate() specialises;
* generate() of --new-tokens greedy tokens after a --prompt-token prompt: eager, rewrite with the
  DynamicCache (a new size every step), rewrite with cache_implementation="static" (two static graphs);
  the second generate of each is timed (the first compiles), the median of --repeats.

    python -P benchmarks/bench_dynamic_sizes.py --out benchmarks/results

Writes dynamic_sizes_cpu_<date>.{json,md} under --out (date, versions, command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import rewrite
import rewrite.backend as backend
from rewrite.capture import specialised, traced_at
from rewrite.passes.pipeline import rewrite_graph


def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 128, (1, a.prompt), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
    m = model()

    seen = []
    real = backend.specialised

    def keep(symbolic, args):
        seen.append((symbolic, args))
        return real(symbolic, args)

    backend.specialised = keep
    with torch.no_grad():
        rewrite.compile(m).generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    backend.specialised = real
    symbolic, args = seen[-1]
    row = {"graph_nodes": len(symbolic.graph.nodes),
           "concretise_ms": 1e3 * median_s(lambda: specialised(symbolic, args), a.repeats),
           "trace_ms": 1e3 * median_s(lambda: traced_at(symbolic, args), a.repeats),
           "rewrite_ms": 1e3 * median_s(lambda: rewrite_graph(specialised(symbolic, args), "auto", args), a.repeats)
           - 1e3 * median_s(lambda: specialised(symbolic, args), a.repeats)}

    def timed_generate(fn, **kw):
        with torch.no_grad():
            fn(ids, **gen, **kw)  # compiles, and fills the size cache for these lengths
            return 1e3 * median_s(lambda: fn(ids, **gen, **kw), a.repeats)

    torch._dynamo.reset()
    row["eager_generate_ms"] = timed_generate(m.generate)
    torch._dynamo.reset()
    fresh = rewrite.compile(model())
    with torch.no_grad():  # every timed generate meets new sizes: a longer prompt each time
        fresh.generate(ids, **gen)
        times = []
        for i in range(a.repeats):
            longer = torch.cat([ids, ids[:, : (i + 1) * (a.new_tokens + 1)]], 1)
            t = time.perf_counter()
            fresh.generate(longer, **gen)
            times.append(time.perf_counter() - t)
    row["rewrite_dynamic_new_sizes_generate_ms"] = 1e3 * statistics.median(times)
    torch._dynamo.reset()
    row["rewrite_dynamic_cached_generate_ms"] = timed_generate(rewrite.compile(model()).generate)
    torch._dynamo.reset()
    row["rewrite_static_generate_ms"] = timed_generate(rewrite.compile(model()).generate,
                                                       cache_implementation="static")
    meta = {"card": "cpu (this project's 2-core machine)", "date": dt.date.today().isoformat(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "command": "python -P " + shlex.join(sys.argv)}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"dynamic_sizes_cpu_{meta['date']}"
    (a.out / f"{stem}.json").write_text(json.dumps({**meta, "row": row}, indent=1))
    lines = ["# What a new size costs a dynamic graph, and generate() (tiny Llama, CPU)", "",
             f"{meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}, one thread; "
             f"`{meta['command']}`", "",
             f"Prompt {a.prompt} tokens, {a.new_tokens} new tokens, median of {a.repeats}.", "",
             "| quantity | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in row.items() if k != "graph_nodes"]
    lines += ["", f"The decode graph has {row['graph_nodes']} nodes. `rewrite_dynamic_new_sizes`: every step a "
              "size not seen before (the usual first generate); `cached`: the same lengths again (sizes in "
              "the cache of 64)."]
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
