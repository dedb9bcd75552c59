"""Real model code: Hugging Face GPT-2, BERT, Llama (GQA) and a timm ViT, tiny and random.

Built from configs (never downloaded): 2 layers, hidden 64, 4 heads, vocab 128, 17 tokens.
In eval mode under no_grad, ``rewrite.compile(model)`` must equal eager and
``rewrite.inspect`` must find one rewritten site per layer with the right mask variant.
"""

from __future__ import annotations

import pytest
import torch

import rewrite

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

LAYERS, HIDDEN, HEADS, VOCAB, SEQ = 2, 64, 4, 128, 17
FP32 = {"atol": 1e-4, "rtol": 1e-4}


pytestmark = pytest.mark.usefixtures("fresh_dynamo_no_grad")


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _check_sites(report, variant: str, *, gqa: bool = False) -> None:
    assert len(report.sites) == LAYERS, f"expected one site per layer:\n{report}"
    for site in report.sites:
        assert site.rewritten, f"left alone: {site.reason}\n{report}"
        assert site.variant == variant, f"variant {site.variant!r}, expected {variant!r}\n{report}"
        assert site.gqa == gqa


def _gpt2(attn_implementation: str):
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2Model(config).eval()


def test_gpt2_eager_attention():
    model = _gpt2("eager")
    ids = _ids()
    eager = model(input_ids=ids).last_hidden_state
    out = rewrite.compile(model)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, eager, **FP32)
    _check_sites(rewrite.inspect(model, input_ids=ids), "causal")


def test_gpt2_sdpa_attention():
    model = _gpt2("sdpa")
    ids = _ids(seed=1)
    eager = model(input_ids=ids).last_hidden_state
    out = rewrite.compile(model)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, eager, **FP32)
    _check_sites(rewrite.inspect(model, input_ids=ids), "causal")


def test_bert_with_padding_mask():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = _ids(seed=2)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -5:] = 0  # row 1 is padded at the end
    eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = rewrite.compile(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, eager, **FP32)
    _check_sites(rewrite.inspect(model, input_ids=ids, attention_mask=mask), "dense")


def test_llama_gqa():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    ids = _ids(seed=3)
    eager = model(input_ids=ids, use_cache=False).last_hidden_state
    out = rewrite.compile(model)(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(out, eager, **FP32)
    _check_sites(rewrite.inspect(model, input_ids=ids, use_cache=False), "causal", gqa=True)


@pytest.mark.parametrize("fused", [False, True], ids=["explicit_softmax", "sdpa"])
def test_timm_vit(fused):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
        depth=LAYERS, embed_dim=HIDDEN, num_heads=HEADS,
    ).eval()  # fmt: skip
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    eager = model(x)
    out = rewrite.compile(model)(x)
    torch.testing.assert_close(out, eager, **FP32)
    _check_sites(rewrite.inspect(model, x), "dense")


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padding"])
def test_mistral_sliding_window(padded):
    """Mistral's sliding window (eager attention) is proven a causal 1-D neighborhood and runs
    on the sparse path; with a padding mask the run-time part is applied inside the tiles."""
    from transformers import MistralConfig, MistralModel

    config = MistralConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=5,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralModel(config).eval()
    ids = _ids(seed=5)
    kw = {"input_ids": ids, "use_cache": False}
    if padded:
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, :4] = 0  # left padding: rows of padded queries keep no key at all
        kw["attention_mask"] = mask
    eager = model(**kw).last_hidden_state
    out = rewrite.compile(model)(**kw).last_hidden_state
    torch.testing.assert_close(out, eager, **FP32, equal_nan=True)
    report = rewrite.inspect(model, **kw)
    _check_sites(report, "neighborhood", gqa=True)
    for site in report.sites:
        assert "neighborhood(grid=(17,), window=(4,)" in site.mask and "causal=(True,)" in site.mask, site.mask
        assert site.density == pytest.approx(sum(min(i + 1, 5) for i in range(SEQ)) / SEQ**2)
