"""Where the host time of one counted ``rewrite::attention`` call goes on a GPU (a finite-fill causal
site: Hugging Face's additive finfo.min mask), pieces timed one by one. A diagnostic, printed only:

    python -P benchmarks/profile_op_host.py [--n 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rewrite
from rewrite.codegen.eager import Spelling
from rewrite.codegen.settle_bound import settled_by_norms

sys.path.insert(0, str(Path(__file__).parent))
from bench_overhead import prefill_attention as hf_causal  # noqa: E402  (the spelling the overhead table times)


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128)
    a = p.parse_args()
    q, k, v = (torch.randn(2, 16, a.n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    graph, = rewrite.rewritten_graphs(hf_causal, q, k, v)
    call = next(n for n in graph.graph.nodes if n.op == "call_function" and "rewrite" in str(n.target))
    op_args = [{"arg0_1": q, "arg1_1": k, "arg2_1": v}.get(getattr(x, "name", None), x) for x in call.args]
    print("op call:", call.format_node()[:300])
    sem = Spelling.of("nan", torch.finfo(torch.bfloat16).min, True, torch.bfloat16)
    rows = {
        "direct F.sdpa is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "settled_by_norms (one sync)": lambda: settled_by_norms(q, k, 0.125, sem, torch.bfloat16),
        "torch.cuda.synchronize alone": torch.cuda.synchronize,
        "torch.ops.rewrite.attention": lambda: call.target(*op_args),
        "rewrite.compile(hf spelling)": (lambda f: lambda: f(q, k, v))(rewrite.compile(hf_causal, count_calls=True)),
    }
    with torch.no_grad():
        for name, fn in rows.items():
            print(f"{name:36s} {per_call_us(fn):9.1f} us/call", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                call.target(*op_args)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
