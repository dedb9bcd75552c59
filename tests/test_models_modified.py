"""Real model code with score modifiers and merged-batch views: Hugging Face Gemma 2 (soft-capping,
sliding and global layers), Bloom (ALiBi through ``baddbmm`` on ``[B·H, N, D]`` then a view to
``[B, H, N, M]``), Falcon with ALiBi, and timm's Swin V2 (cosine attention with a learned per-head
scale, shifted windows whose mask is added through a ``[B·nW, …] → [B, nW, …]`` view). Tiny, random,
built from configs (never downloaded). Each must equal eager and report every attention module
rewritten, with the modifier where the model has one.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from eager_cases import compiled, double, inputs, same_as_eager

import rewrite

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VOCAB, SEQ = 128, 17
FP32 = {"atol": 1e-4, "rtol": 1e-4}


pytestmark = pytest.mark.usefixtures("fresh_dynamo_no_grad")


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _all_rewritten(report, count: int, modifier: str | None = None):
    assert len(report.sites) == count, str(report)
    for site in report.sites:
        assert site.rewritten, f"left alone: {site.reason}\n{report}"
        if modifier is not None:
            assert site.score_mod and modifier in site.score_mod, site.score_mod
    return report.sites


def _same(model, **kw):
    eager = model(**kw)
    out = rewrite.compile(model)(**kw)
    eager = getattr(eager, "last_hidden_state", eager)
    out = getattr(out, "last_hidden_state", out)
    torch.testing.assert_close(out, eager, **FP32)


def test_gemma2_softcapped_sliding_and_global_layers():
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, intermediate_size=128, vocab_size=VOCAB, attn_implementation="eager",
                          sliding_window=8, attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = Gemma2Model(config).eval()
    ids = _ids()
    _same(model, input_ids=ids)
    sites = _all_rewritten(rewrite.inspect(model, input_ids=ids), 2, modifier="tanh")
    # the sliding layer's window runs on the neighborhood kernel's tiles, the modifier generated into them
    assert [s.variant for s in sites] == ["neighborhood", "causal"], [s.variant for s in sites]
    assert any("neighborhood kernel's tiles" in n for n in sites[0].notes), sites[0].notes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemma2_sliding_layer_with_padding_runs_on_the_window_tiles(backend):
    """With an attention mask the sliding window lives in Hugging Face's 4-D mask (implied by its
    position-only part): the tiles come from the window, the mask is applied inside them."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, intermediate_size=128, vocab_size=VOCAB, attn_implementation="eager",
                          sliding_window=6, attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = Gemma2Model(config).eval()
    ids = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, 20:] = 0
    eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = rewrite.compile(model, backend=backend)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, eager, **FP32)
    sites = _all_rewritten(rewrite.inspect(model, input_ids=ids, attention_mask=mask, backend=backend), 2, "tanh")
    assert [s.variant for s in sites] == ["neighborhood", "causal"], [s.variant for s in sites]
    if backend == "triton":
        assert any("triton neighborhood tiles" in r for r in sites[0].ran), sites[0].ran


def test_bloom_alibi_through_baddbmm_and_a_split_view():
    from transformers import BloomConfig, BloomModel

    torch.manual_seed(0)
    model = BloomModel(BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=VOCAB)).eval()
    ids = _ids(1)
    _same(model, input_ids=ids)
    sites = _all_rewritten(rewrite.inspect(model, input_ids=ids), 2)
    assert all("baddbmm" in s.spelling for s in sites), [s.spelling for s in sites]
    # Bloom's ALiBi counts positions through the attention mask (cumsum): not positions alone, so it
    # stays a (small, [B·H, 1, M]) tensor bias, and the site says why
    assert all(any("built from positions but stays a tensor" in n for n in s.notes) for s in sites), \
        [s.notes for s in sites]


def test_falcon_with_alibi():
    from transformers import FalconConfig, FalconModel

    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, alibi=True,
                          new_decoder_architecture=False, multi_query=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = FalconModel(config).eval()
    ids = _ids(2)
    _same(model, input_ids=ids)
    sites = _all_rewritten(rewrite.inspect(model, input_ids=ids), 2)
    from transformers.models.falcon import modeling_falcon
    if "alibi" in inspect.signature(modeling_falcon.FalconAttention.forward).parameters:
        # (transformers < 5.25) as Bloom's: positions counted through the attention mask, a tensor
        # bias added on the scores, with the reason
        assert all(any("built from positions but stays a tensor" in n and "not positions alone" in n
                       for n in s.notes) for s in sites), [s.notes for s in sites]
    else:
        # (5.25) the bias folded into the mask, masked_fill(alibi / √d, mask < −1, min): the causal
        # keep is proven on its own and the tensor is applied inside the causal tiles
        assert all(s.variant == "causal" and any("constant fill outside a lifted keep" in n for n in s.notes)
                   for s in sites), [(s.variant, s.notes) for s in sites]


def test_falcon_multi_query_without_alibi():
    """One key head broadcast by the matmul ([B, 1, M, D] against [B, H, N, D]) and a [B, 1, N, M]
    mask: the query heads become batch atoms (K, V broadcast) rather than rows the mask lacks."""
    from transformers import FalconConfig, FalconModel

    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, alibi=False,
                          attn_implementation="eager")
    torch.manual_seed(0)
    model = FalconModel(config).eval()
    ids = _ids(5)
    _same(model, input_ids=ids)
    sites = _all_rewritten(rewrite.inspect(model, input_ids=ids), 2)
    assert all(s.variant == "causal" and s.gqa for s in sites), [(s.variant, s.gqa) for s in sites]


def test_gpt_neo_global_and_local_layers_with_padding():
    """GPT-Neo selects its (banded) causal buffer with finfo.min, then adds the padding mask over it:
    removed scores are finfo.min + mask. Left padding empties the first rows of one sequence."""
    from transformers import GPTNeoConfig, GPTNeoModel

    config = GPTNeoConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=VOCAB, window_size=5,
                          attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                          attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPTNeoModel(config).eval()
    ids = _ids(6)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :6] = 0
    mask[1, 13:] = 0
    _same(model, input_ids=ids, attention_mask=mask)
    sites = _all_rewritten(rewrite.inspect(model, input_ids=ids, attention_mask=mask), 2)
    assert all(any("fill + bias" in n for n in s.notes) for s in sites), [s.notes for s in sites]
    assert [s.variant for s in sites] == ["causal", "neighborhood"], [s.variant for s in sites]  # the local window


def test_swin_v2_cosine_attention_with_shifted_windows():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    model = SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 1),
                              num_heads=(2, 4), num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rewrite.compile(model)(x), model(x), **FP32)
    sites = _all_rewritten(rewrite.inspect(model, x), 3, modifier="L0")
    assert sum("+bias → +bias" in s.spelling for s in sites) == 1  # the shifted block adds its window mask


def test_cait_class_attention_rewritten_and_talking_heads_reported():
    """CaiT: its class-attention blocks (one query, the class token, over every token) are rewritten;
    its talking-heads blocks (scores mixed across heads by a linear before and after the softmax) are
    reported, left as written, with the reason (they used to give no site at all)."""
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              depth_token_only=2, embed_dim=64, num_heads=4, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(rewrite.compile(model)(x), model(x), **FP32)
    report = rewrite.inspect(model, x)
    assert len(report.sites) == 4, str(report)
    cls = [s for s in report.sites if "blocks_token_only" in s.location]
    talking = [s for s in report.sites if "blocks_token_only" not in s.location]
    assert len(cls) == 2 and all(s.rewritten and s.shapes.get("n") == 1 for s in cls), str(report)
    assert len(talking) == 2 and all(not s.rewritten and "talking-heads" in s.reason for s in talking), str(report)


def test_longformer_sliding_chunks_are_reported_with_the_ops_that_stopped_them():
    """Longformer's banded attention, built from chunked as_strided views and diagonal padding, is not
    recognised; each layer is now a site left alone that names the ops, not silence."""
    from transformers import LongformerConfig, LongformerModel

    config = LongformerConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                              vocab_size=VOCAB, attention_window=[8, 8], pad_token_id=1)
    torch.manual_seed(0)
    model = LongformerModel(config).eval()
    ids = torch.randint(2, VOCAB, (2, 32), generator=torch.Generator().manual_seed(9))
    report = rewrite.inspect(model, input_ids=ids)
    assert len(report.sites) == 2 and not any(s.rewritten for s in report.sites), str(report)
    assert all("cannot follow" in s.reason and "slice_scatter" in s.reason for s in report.sites), str(report)


def router(h, w, experts):
    """Self-attention, then a mixture-of-experts router over its output: a softmax over a linear layer
    (fed, further back, by the attention's products) mixing expert outputs."""
    x = torch.softmax(h @ h.transpose(-1, -2) / 4.0, dim=-1) @ h
    gates = torch.softmax(torch.nn.functional.linear(x, w), dim=-1)
    return torch.einsum("bne,bnef->bnf", gates, experts)


def test_a_router_softmax_is_not_reported_as_attention():
    gen = torch.Generator().manual_seed(2)
    h, w = torch.randn(2, 9, 16, generator=gen), torch.randn(4, 16, generator=gen)
    experts = torch.randn(2, 9, 4, 8, generator=gen)
    report = rewrite.inspect(router, h, w, experts)
    assert len(report.sites) == 1 and report.sites[0].rewritten, str(report)  # the attention, not the router


# ---- the split view, written by hand --------------------------------------------------------------
def merged_heads_with_padding(q, k, v, pad):
    """[B·H, N, D] operands (Bloom's layout), the scores viewed as [B, H, N, M] for a padding mask."""
    b, h = pad.shape[0], q.shape[0] // pad.shape[0]
    s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    s = s.view(b, h, q.shape[1], k.shape[1]).masked_fill(~pad[:, None, None, :], float("-inf"))
    w = torch.softmax(s, -1).view(b * h, q.shape[1], k.shape[1])
    return torch.bmm(w, v)


def heads_outer_split(q, k, v, pad):
    """[B·H, …] viewed as [H, B, …] (factors 3 and 2 of 6) and masked along the inner factor."""
    b, h = pad.shape[0], q.shape[0] // pad.shape[0]
    s = torch.bmm(q, k.transpose(1, 2))
    s = s.view(h, b, q.shape[1], k.shape[1]).masked_fill(~pad[None, :, None, :], float("-inf"))
    return torch.bmm(torch.softmax(s, -1).view(b * h, q.shape[1], k.shape[1]), v)


def crossing_view(q, k, v):
    """A view whose factors cross the batch and query axes ([B·H, N, M] → [B·H·N/2, 2, M]): the rows
    are no longer one axis; whatever the rewriter decides, the result is eager's."""
    s = torch.bmm(q, k.transpose(1, 2))
    bh, n, m = s.shape
    w = torch.softmax(s.view(bh * n // 2, 2, m), -1).view(bh, n, m)
    return torch.bmm(w, v)


def mqa_broadcast_with_padding(q, k, v, pad_bias):
    """MQA by broadcasting in the matmul, a [B, 1, N, M] additive bias (Falcon's mask layout)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s + pad_bias, -1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_broadcast_key_heads_with_a_bias_over_batch_only(backend):
    gen = torch.Generator().manual_seed(6)
    q, k, v = inputs(gen, 2, 4, 1, 13, 21, 16, torch.float32)
    pad_bias = torch.randn(2, 1, 13, 21, generator=gen)
    pad_bias[1, ..., 15:] = float("-inf")
    pad_bias[0, 0, 4, 2:] = float("-inf")
    fn, report = compiled(mqa_broadcast_with_padding, backend)
    out = fn(q, k, v, pad_bias)
    assert report.sites and report.sites[0].rewritten and report.sites[0].gqa, str(report)
    same_as_eager(out, mqa_broadcast_with_padding(*double((q, k, v, pad_bias))), torch.float32, "MQA + padding")


def mqa_with_a_per_head_bias(q, k, v, head_bias):
    """MQA by broadcasting, a [1, H, 1, M] bias: it holds the heads but not the query positions."""
    return torch.softmax(q @ k.transpose(-1, -2) + head_bias, -1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_broadcast_key_heads_with_a_per_head_bias(backend):
    gen = torch.Generator().manual_seed(7)
    q, k, v = inputs(gen, 2, 4, 1, 13, 21, 16, torch.float32)
    head_bias = torch.randn(1, 4, 1, 21, generator=gen)
    fn, report = compiled(mqa_with_a_per_head_bias, backend)
    out = fn(q, k, v, head_bias)
    assert report.sites and report.sites[0].rewritten, str(report)
    same_as_eager(out, mqa_with_a_per_head_bias(*double((q, k, v, head_bias))), torch.float32, "MQA + head bias")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_view_that_splits_the_merged_batch(backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (t.squeeze(0) for t in inputs(gen, 1, 6, 6, 19, 23, 16, torch.float32))  # B·H = 6: B 2, H 3
    pad = torch.rand(2, 23, generator=gen) > 0.3
    pad[:, 0] = True
    fn, report = compiled(merged_heads_with_padding, backend)
    out = fn(q, k, v, pad)
    assert report.sites and report.sites[0].rewritten, str(report)
    same_as_eager(out, merged_heads_with_padding(*double((q, k, v)), pad), torch.float32, "split view")

    # the same merged axis split the other way round ([H, B], B ≠ H): the mask then varies along the
    # inner factor; memory order decides, whatever the names
    fn, report = compiled(heads_outer_split, backend)
    out = fn(q, k, v, pad)
    assert report.sites and report.sites[0].rewritten, str(report)
    same_as_eager(out, heads_outer_split(*double((q, k, v)), pad), torch.float32, "split [H, B]")

    q, k, v = (t.squeeze(0) for t in inputs(gen, 1, 6, 6, 20, 23, 16, torch.float32))
    fn, report = compiled(crossing_view, backend)
    out = fn(q, k, v)
    assert report.sites and (report.sites[0].rewritten or report.sites[0].reason), str(report)
    same_as_eager(out, crossing_view(*double((q, k, v))), torch.float32, "crossing view")
