"""Hugging Face ``generate()`` through ``rewrite.compile(model)``: prefill and decode rewritten.

A tiny random Llama (2 layers, hidden 64, GQA 4/2 heads, never downloaded). Greedy decoding
of 12 new tokens must give eager's tokens; the prefill (causal) and every decode step (one
query over the cache: dense, or bottom-right causal) run rewritten sites; Dynamo compiles at
most 3 graphs (prefill, the first decode step, then one dynamic decode graph specialised per
cache length by rewrite/specialise.py) — no recompile per step.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

import rewrite
from rewrite.backend import make_backend
from rewrite.module_wrapper import compile_module
from rewrite.options import Options
from rewrite.report import Report

transformers = pytest.importorskip("transformers")

NEW_TOKENS, PROMPT = 12, 9
pytestmark = pytest.mark.usefixtures("fresh_dynamo_no_grad")


def _llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, attn_implementation=attn_implementation,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _prompt():
    ids = torch.randint(2, 128, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _generate(model, cache: str):
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    return model.generate(**_prompt(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          **extra)


@pytest.mark.parametrize("attn, cache", [("sdpa", "dynamic"), ("eager", "dynamic"), ("sdpa", "static")])
def test_generate_runs_the_rewritten_forward(attn, cache):
    model = _llama(attn)
    want = _generate(model, cache)
    report = Report()
    dynamo_counters.clear()
    compiled = compile_module(model, make_backend(Options(count_calls=True), report))
    got = _generate(compiled, cache)
    assert torch.equal(got, want), (got, want)
    assert dynamo_counters["stats"]["unique_graphs"] <= 3, dynamo_counters["stats"]
    assert report.sites and all(s.rewritten for s in report.sites), str(report)
    assert "forward" not in model.__dict__  # the model is as it was outside the call
    # Every forward (1 prefill + NEW_TOKENS - 1 decode steps) ran each layer's site rewritten.
    calls = sum(sum(s.ran.values()) for s in report.sites)
    assert calls == 2 * NEW_TOKENS, [(s.graph, s.variant, s.ran) for s in report.sites]
    prefill = [s for s in report.sites if s.shapes["n"] == PROMPT]
    decode = [s for s in report.sites if s.shapes["n"] == 1]
    assert len(prefill) == 2 and {s.variant for s in prefill} == {"causal"}, str(report)
    assert decode and {s.variant for s in decode} <= {"dense", "causal"}, str(report)
    if cache == "dynamic":  # the cache grows: one dynamic decode graph, specialised per length
        notes = " ".join(n for s in decode for n in s.notes)
        assert "dynamic graph: specialised for sizes" in notes, str(report)
        assert len(report.sites) <= 6, str(report)  # per layer: prefill, first decode step, dynamic decode


def test_rewrite_compile_of_a_module_keeps_the_module_api():
    model = _llama("sdpa")
    compiled = rewrite.compile(model)
    ids = _prompt()["input_ids"]
    torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert compiled.config is model.config
    assert set(compiled.state_dict()) == {f"_orig_mod.{k}" for k in model.state_dict()}
    assert compiled.to(torch.float64) is compiled and model.lm_head.weight.dtype == torch.float64
    assert compiled.get_input_embeddings() is model.get_input_embeddings()  # a model method, wrapped


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v

    def run_twice(self, x):  # a method of the model that calls it, as generate() does
        return self(x) + self(x)


def test_a_model_method_runs_the_rewritten_forward_of_a_hooked_model():
    """A forward set on the instance (an accelerate-style hook) is the one compiled; it is put back after."""
    model = _Attention().eval()
    original_forward = model.forward

    def hooked_forward(x):
        return 2 * original_forward(x)

    model.forward = hooked_forward
    report = Report()
    compiled = compile_module(model, make_backend(Options(), report))
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(compiled.run_twice(x), 4 * original_forward(x), atol=1e-5, rtol=1e-4)  # hook ran
    assert model.forward is hooked_forward  # put back
    assert [s.variant for s in report.sites] == ["dense"] and report.sites[0].ran == {"sdpa": 2}, str(report)


def test_generate_with_default_options_runs_plain_sdpa_sites_as_direct_calls():
    """By default (no counts) a site that is one plain SDPA call is that aten call in the rewritten graph
    (passes/direct.py): here HF's SDPA attention with no padding; tokens as eager's."""
    model = _llama("sdpa")
    want = _generate(model, "dynamic")
    report = Report()
    got = _generate(compile_module(model, make_backend(Options(), report)), "dynamic")
    assert torch.equal(got, want), (got, want)
    assert report.sites and all(s.rewritten for s in report.sites), str(report)
    assert any(s.direct for s in report.sites), [(s.variant, s.notes) for s in report.sites]
