"""Where the time of one rewritten Gemma 2 attention call goes on a GPU (torch.profiler, 5 calls).

bf16, B=2, Hq=16, Hkv=8, N=4096, D=128: the size at which bench_score_mod.py finds the op's per-call
host overhead comparable to its kernel. Prints the profiler's table sorted by CUDA time.

    python -P benchmarks/profile_score_mod.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import rewrite

sys.path.insert(0, str(Path(__file__).parent))
from bench_score_mod import gemma2_attention  # noqa: E402


def main() -> None:
    shape_q, shape_kv = (2, 16, 4096, 128), (2, 8, 4096, 128)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = rewrite.compile(gemma2_attention)
    for _ in range(3):
        fn(q, k, v)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn(q, k, v)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
