import torch, sys
sys.path.insert(0, "benchmarks")
from bench_score_mod import gemma2_attention
import rewrite
q=torch.randn(2,16,4096,128,device="cuda",dtype=torch.bfloat16); k=torch.randn(2,8,4096,128,device="cuda",dtype=torch.bfloat16); v=torch.randn_like(k)
f=rewrite.compile(gemma2_attention)
for _ in range(3): f(q,k,v)
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
    for _ in range(5): f(q,k,v)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))
