"""Survey: real architectures built from small configs (random weights, never downloaded), each run
through ``rewrite.inspect`` and ``rewrite.compile`` on the CPU: how many attention sites were found,
how many rewritten, the reason of every site left alone, graphs skipped, and whether the compiled
model's output equals eager's.

    python benchmarks/survey_models.py --out benchmarks/results

The count of attention modules beside each row is the number of ``nn.Module`` instances whose class
name ends in "Attention" (or is a known attention class) and that have no such child: a cross-check of
"sites found", not a definition (some classes wrap two attentions, some attentions are functions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

import rewrite

V, SEQ = 128, 24
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=V)

# (name, builder) — builders return (model, kwargs); configs are as small as each family allows.


def _hf(model_type: str, seq: int = SEQ, pad: bool = True, **extra):
    def build():
        from transformers import AutoConfig, AutoModel

        cfg = AutoConfig.for_model(model_type, **{**SMALL, **extra})
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg, attn_implementation="eager").eval()
        ids = torch.randint(3, V, (2, seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 5:] = 0
        kw = {"input_ids": ids, "attention_mask": mask} if pad else {"input_ids": ids}
        if getattr(model.config, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = ids[:, : seq // 2]
        return model, kw
    return build


def _timm(name: str, **extra):
    def build():
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=5, **extra).eval()
        size = extra.get("img_size", 32)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        return model, {"x": x}
    return build


GQA = dict(num_key_value_heads=2)
MODELS = [
    ("bert", _hf("bert")), ("roberta", _hf("roberta", pad_token_id=1)), ("distilbert", _hf("distilbert", dim=64,
     n_layers=2, n_heads=4, hidden_dim=128)), ("albert", _hf("albert", embedding_size=32)),
    ("electra", _hf("electra", embedding_size=32)), ("xlm-roberta", _hf("xlm-roberta", pad_token_id=1)),
    ("deberta-v2", _hf("deberta-v2", relative_attention=True, pos_att_type=["p2c", "c2p"],
                       position_buckets=16, max_relative_positions=32)),
    ("mpnet", _hf("mpnet")), ("gpt2", _hf("gpt2", n_embd=64, n_layer=2, n_head=4)),
    ("gpt_neo", _hf("gpt_neo", num_layers=2, num_heads=4, window_size=8, attention_types=[[["global", "local"], 1]],
                    max_position_embeddings=64, bos_token_id=0, eos_token_id=0)),
    ("gptj", _hf("gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, bos_token_id=0, eos_token_id=0)),
    ("gpt_bigcode", _hf("gpt_bigcode", n_embd=64, n_layer=2, n_head=4, multi_query=True)),
    ("codegen", _hf("codegen", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, bos_token_id=0, eos_token_id=0)),
    ("opt", _hf("opt", ffn_dim=128, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    ("bloom", _hf("bloom", n_layer=2, n_head=4)), ("falcon", _hf("falcon", alibi=False)),
    ("falcon-alibi", _hf("falcon", alibi=True, new_decoder_architecture=False, multi_query=False)),
    ("llama", _hf("llama", **GQA)), ("mistral", _hf("mistral", sliding_window=8, **GQA)),
    ("mixtral", _hf("mixtral", sliding_window=8, num_local_experts=4, num_experts_per_tok=2, **GQA)),
    ("qwen2", _hf("qwen2", **GQA)), ("qwen3", _hf("qwen3", head_dim=16, **GQA)),
    ("phi", _hf("phi")), ("phi3", _hf("phi3", pad_token_id=0, bos_token_id=0, eos_token_id=0, **GQA)),
    ("gemma", _hf("gemma", head_dim=16, **GQA)),
    ("gemma2", _hf("gemma2", head_dim=16, sliding_window=8, attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                   **GQA)),
    ("stablelm", _hf("stablelm", **GQA)), ("olmo", _hf("olmo", pad_token_id=0, **GQA)),
    ("starcoder2", _hf("starcoder2", sliding_window=8, **GQA)), ("cohere", _hf("cohere", **GQA)),
    ("persimmon", _hf("persimmon")), ("t5", _hf("t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0)),
    ("bart", _hf("bart", d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)),
    ("longformer", _hf("longformer", attention_window=[8, 8], pad_token_id=1)),
    ("big_bird", _hf("big_bird", attention_type="block_sparse", block_size=4, num_random_blocks=2, seq=96,
                     max_position_embeddings=128)),
    ("big_bird-full", _hf("big_bird", attention_type="original_full")),
    ("gpt_neox", _hf("gpt_neox", rotary_pct=0.25)), ("mpt", _hf("mpt", d_model=64, n_layers=2, n_heads=4,
                                                                   expansion_ratio=2, max_seq_len=64)),
    ("gemma3_text", _hf("gemma3_text", head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **GQA)),
    ("qwen2_moe", _hf("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, **GQA)),
    ("modernbert", _hf("modernbert", global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
                       bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)),
    ("roformer", _hf("roformer", embedding_size=64)),
    ("xlnet", _hf("xlnet", d_model=64, n_layer=2, n_head=4, d_inner=128)),
    ("reformer", _hf("reformer", attn_layers=["local", "lsh"], axial_pos_embds=False, hidden_size=64,
                     attention_head_size=16, num_attention_heads=4, feed_forward_size=128, local_attn_chunk_length=8,
                     lsh_attn_chunk_length=8, num_buckets=4, pad_token_id=0)),
    ("megatron-bert", _hf("megatron-bert")), ("ernie", _hf("ernie")),
    ("timm vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)),
    ("timm deit", _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)),
    ("timm swin", _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=16,
                        depths=(2, 1), num_heads=(2, 4))),
    ("timm swinv2", _timm("swinv2_tiny_window8_256", img_size=32, patch_size=2, window_size=4, embed_dim=16,
                          depths=(2, 1), num_heads=(2, 4))),
    ("timm cait", _timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2, depth_token_only=2, embed_dim=64,
                        num_heads=4)),
    ("timm beit", _timm("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)),
    ("timm eva", _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2)),
    ("timm xcit", _timm("xcit_nano_12_p16_224", img_size=32, depth=2)),
    ("timm levit", _timm("levit_128s", img_size=64)),
]

ATTENTION_NAMES = ("Attention", "SelfAttention", "Attn")


def attention_modules(model: torch.nn.Module) -> int:
    def is_attn(m):
        name = type(m).__name__
        return any(name.endswith(s) for s in ATTENTION_NAMES) and "Output" not in name
    return sum(1 for m in model.modules() if is_attn(m) and not any(is_attn(c) for c in m.modules() if c is not m))


def survey_one(name: str, build) -> dict:
    row: dict = {"model": name}
    try:
        model, kw = build()
    except Exception as exc:  # a config this transformers/timm version does not take: recorded
        row["build_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return row
    row["attention_modules"] = attention_modules(model)
    try:
        torch._dynamo.reset()
        report = rewrite.inspect(model, **kw)
        torch._dynamo.reset()
        with torch.no_grad():
            eager, again = model(**kw), model(**kw)
            out = rewrite.compile(model)(**kw)
        pick = (lambda o: getattr(o, "last_hidden_state", None) if not isinstance(o, torch.Tensor) else o)
        e, e2, o = pick(eager), pick(again), pick(out)
        row["max_abs_diff"] = float((e.float() - o.float()).abs().max()) if e is not None and o is not None else None
        if e is not None and e2 is not None and not torch.equal(e, e2):  # random per call (Reformer's LSH)
            row["eager_not_deterministic"] = float((e.float() - e2.float()).abs().max())
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["trace"] = traceback.format_exc()[-800:]
        return row
    row["graphs"] = report.graphs
    row["skipped_graphs"] = list(report.skipped_graphs)
    row["graph_breaks"] = list(report.graph_breaks)
    row["sites"] = len(report.sites)
    row["rewritten"] = sum(s.rewritten for s in report.sites)
    row["variants"] = sorted({s.variant for s in report.sites if s.rewritten})
    row["left_alone"] = sorted({f"{s.location.split(':')[0]}: {s.reason}" for s in report.sites if not s.rewritten})
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="", help="comma-separated model names")
    args = ap.parse_args()
    import timm
    import transformers

    only = {x for x in args.only.split(",") if x}
    rows = []
    for name, build in MODELS:
        if only and name not in only:
            continue
        rows.append(survey_one(name, build))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "transformers": transformers.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "machine": "CPU", "command": "python " + " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"survey_models_cpu_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Survey of real architectures ({meta['date']}, CPU)", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, timm {meta['timm']}; random weights from "
             "small configs; `rewrite.inspect` and `rewrite.compile` vs eager.", "",
             f"Command: `{meta['command']}`", "",
             "| model | attention modules | sites | rewritten | variants | max abs diff vs eager | graphs skipped |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "build_error" in r or "error" in r:
            lines.append(f"| {r['model']} | {r.get('attention_modules', '—')} | — | — | — | — | "
                         f"{r.get('build_error') or r.get('error')} |")
            continue
        diff = "—" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}"
        if "eager_not_deterministic" in r:
            diff += f" (eager vs eager: {r['eager_not_deterministic']:.2g}, random per call)"
        lines.append(f"| {r['model']} | {r['attention_modules']} | {r['sites']} | {r['rewritten']} | "
                     f"{', '.join(r['variants'])} | {diff} | {len(r['skipped_graphs'])} |")
    found = sum(r.get("sites", 0) for r in rows)
    done = sum(r.get("rewritten", 0) for r in rows)
    lines += ["", f"Sites found: {found}, rewritten: {done}.", "", "## Left alone, with the reasons", ""]
    for r in rows:
        for why in r.get("left_alone", []):
            lines.append(f"- {r['model']}: {why}")
        for why in r.get("skipped_graphs", []):
            lines.append(f"- {r['model']} (graph skipped): {why}")
    missing = [r for r in rows if "sites" in r and r["sites"] < r["attention_modules"]]
    if missing:
        lines += ["", "## Attention modules with no site (the graph breaks the report names)", ""]
        lines += [f"- {r['model']}: {r['attention_modules'] - r['sites']} of {r['attention_modules']} "
                  f"({r['graphs']} graphs; graph breaks: {'; '.join(r.get('graph_breaks', [])) or 'none recorded'})"
                  for r in missing]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
