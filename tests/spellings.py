"""A catalogue of softmax-attention spellings, written as people write them in PyTorch.

Each entry is a `Spelling`: a plain torch function or an nn.Module instance (the spelled
code itself lives in ``tests/spelling_fns.py``), the layout its arguments take, the mask
variant a recogniser should report ("dense" or "causal"), and ``make_inputs(shape)`` which
builds real random inputs for one `Shape` and the float64 reference output
(``tests/reference.py``) in the spelling's own output layout.

Rules the catalogue keeps:
- inputs are ``torch.randn`` from a seeded ``torch.Generator`` (never zeros), so a wrong
  kernel cannot pass by accident;
- the expected variant is "causal" only where the causal structure is built inside the
  function (tril / triu / arange / a registered tril buffer / ``is_causal=True``); a mask
  or bias that arrives as a tensor argument counts as "dense";
- spellings whose eager semantics give NaN on a fully-masked row (softmax of all -inf) are
  fed such rows (``empty_rows="nan"``); SDPA on the CPU returns zeros there
  (``empty_rows="zero"``); spellings where a fully-masked row is not meaningful in low
  precision (finite fill values added to scores) never get one (``empty_rows=None``).

``tests/test_spelling_catalogue.py`` checks every entry against the reference without the
rewriter, so the catalogue itself is known to be attention.

This file holds the catalogue itself (``SPELLINGS``, ``BY_NAME``); the types, runners and shape
draws are in ``tests/spelling_cases.py`` and the input builders in ``tests/spelling_inputs.py``.
The names tests use are re-exported here, so they import everything from ``spellings``.
"""

from __future__ import annotations

import torch
from spelling_cases import (
    Case,
    Shape,
    Spelling,
    as_float64,
    case_for,
    first_output,
    fixed_shapes,
    run_eager_float64,
    shape_strategy,
)
from spelling_fns import (
    DropoutModuleAttention,
    GPT2BufferAttention,
    NanoGPTBufferAttention,
    SoftmaxModuleAttention,
    baddbmm_beta0,
    baddbmm_bias,
    bias_add,
    bmm_flat,
    bmm_reshape_inside,
    causal_arange,
    causal_tril_bool,
    causal_tril_float_eq0,
    causal_triu_additive,
    causal_triu_masked_fill,
    dropout_eval_functional,
    einsum_bhnd,
    einsum_bnhd,
    einsum_bqhd,
    einsum_ellipsis,
    einsum_flat,
    einsum_k_pretransposed,
    explicit_exp_amax,
    explicit_exp_max_values,
    explicit_exp_no_max,
    explicit_normalise_after,
    gqa_grouped_einsum,
    gqa_llama_repeat_kv,
    gqa_repeat_interleave,
    heads_after_sequence,
    hf_bert_minus_10000,
    hf_finfo_min_padding,
    k_pretransposed,
    lengths_padding,
    masked_fill_finfo_min,
    masked_fill_neg_inf,
    matmul_operator,
    mqa_expand,
    mT_functional_softmax,
    no_scale,
    scale_on_q,
    scale_on_q_and_k,
    sdpa_dropout_zero,
    sdpa_enable_gqa,
    sdpa_heads_after_sequence,
    sdpa_is_causal,
    sdpa_mask,
    sdpa_plain,
    sdpa_scale,
    softmax_float_cast,
    softmax_fp32_dtype,
    torch_matmul_divide,
    where_neg_inf,
)
from spelling_inputs import (
    baddbmm_bias_case,
    bias_case,
    causal_case,
    finfo_fill_case,
    gpt2_buffer_case,
    hf_padding_case,
    keep_case,
    lengths_case,
    merged_heads_case,
    mha_case,
    neg_inf_additive_case,
    plain_case,
    sdpa_bool_case,
    sdpa_float_case,
    sdpa_float_neg_inf_case,
)

__all__ = ["BY_NAME", "SPELLINGS", "Case", "Shape", "Spelling", "as_float64", "case_for", "first_output",
           "fixed_shapes", "run_eager_float64", "shape_strategy"]


# ---------------------------------------------------------------------------- catalogue


def _S(name, fn, layout, variant, make, **kw) -> Spelling:
    return Spelling(name=name, fn=fn, layout=layout, expected_variant=variant, make_inputs=make, **kw)


BHND = "q [B,H,N,D], k [B,Hkv,M,D], v [B,Hkv,M,Dv] -> [B,H,N,Dv]"
BNHD = "q [B,N,H,D], k [B,M,H,D], v [B,M,H,Dv] -> [B,N,H,Dv]"
FLAT = "q [B*H,N,D], k [B*H,M,D], v [B*H,M,Dv] -> [B*H,N,Dv]"
KT = "q [B,H,N,D], kT [B,H,D,M], v [B,H,M,Dv] -> [B,H,N,Dv]"

SPELLINGS: list[Spelling] = [
    # operators and layouts
    _S("matmul_operator", matmul_operator, BHND, "dense", plain_case()),
    _S("torch_matmul_divide", torch_matmul_divide, BHND, "dense", plain_case()),
    _S("mT_functional_softmax", mT_functional_softmax, BHND, "dense", plain_case()),
    _S("permute_softmax_module", SoftmaxModuleAttention(), BHND, "dense", plain_case()),
    _S("k_pretransposed", k_pretransposed, KT, "dense", plain_case(k_transposed=True)),
    _S("scale_on_q", scale_on_q, BHND, "dense", plain_case()),
    _S("scale_on_q_and_k", scale_on_q_and_k, BHND, "dense", plain_case()),
    _S("no_scale", no_scale, BHND, "dense", plain_case(q_std=0.125, scale=lambda s: 1.0)),
    _S("bmm_flat", bmm_flat, FLAT, "dense", plain_case("flat")),
    _S("bmm_reshape_inside", bmm_reshape_inside, BHND, "dense", plain_case()),
    _S("baddbmm_bias", baddbmm_bias, FLAT + " + bias [B*H,N,M]", "dense", baddbmm_bias_case),
    _S("baddbmm_beta0", baddbmm_beta0, FLAT, "dense", plain_case("flat")),
    _S("einsum_bhnd", einsum_bhnd, BHND, "dense", plain_case()),
    _S("einsum_bnhd", einsum_bnhd, BNHD, "dense", plain_case("bnhd")),
    _S("einsum_bqhd", einsum_bqhd, BNHD, "dense", plain_case("bnhd")),
    _S("einsum_flat", einsum_flat, FLAT, "dense", plain_case("flat")),
    _S("einsum_ellipsis", einsum_ellipsis, BHND, "dense", plain_case()),
    _S("einsum_k_pretransposed", einsum_k_pretransposed, KT, "dense", plain_case(k_transposed=True)),
    _S("heads_after_sequence", heads_after_sequence, BNHD, "dense", plain_case("bnhd")),
    _S(
        "merged_heads",
        None,
        "q [B,N,H*D], k [B,M,H*D], v [B,M,H*Dv] -> [B,N,H*Dv]",
        "dense",
        merged_heads_case,
    ),
    # softmax written otherwise
    _S("softmax_fp32_dtype", softmax_fp32_dtype, BHND, "dense", plain_case(), tags=("fp32_cast",)),
    _S("softmax_float_cast", softmax_float_cast, BHND, "dense", plain_case(), tags=("fp32_cast",)),
    _S("explicit_exp_amax", explicit_exp_amax, BHND, "dense", plain_case()),
    _S("explicit_exp_max_values", explicit_exp_max_values, BHND, "dense", plain_case()),
    _S("explicit_exp_no_max", explicit_exp_no_max, BHND, "dense", plain_case()),
    _S("explicit_normalise_after", explicit_normalise_after, BHND, "dense", plain_case()),
    _S("dropout_eval_functional", dropout_eval_functional, BHND, "dense", plain_case()),
    _S("dropout_module_eval", DropoutModuleAttention().eval(), BHND, "dense", plain_case()),
    # additive biases and masks given as tensors
    _S("bias_bhnm", bias_add, BHND + " + bias [B,H,N,M]", "dense", bias_case(lambda s: (s.B, s.H, s.N, s.M))),
    _S("bias_b11m", bias_add, BHND + " + bias [B,1,1,M]", "dense", bias_case(lambda s: (s.B, 1, 1, s.M))),
    _S("bias_nm", bias_add, BHND + " + bias [N,M]", "dense", bias_case(lambda s: (s.N, s.M))),
    _S(
        "additive_neg_inf_mask",
        bias_add,
        BHND + " + 0/-inf [B,1,N,M]",
        "dense",
        neg_inf_additive_case,
        empty_rows="nan",
    ),
    _S(
        "hf_finfo_min_padding",
        hf_finfo_min_padding,
        BHND + " + attention_mask [B,M] 1/0",
        "dense",
        hf_padding_case(lambda dt: torch.finfo(dt).min),
    ),
    _S(
        "hf_bert_minus_10000",
        hf_bert_minus_10000,
        BHND + " + attention_mask [B,M] 1/0",
        "dense",
        hf_padding_case(lambda dt: -10000.0),
    ),
    _S(
        "masked_fill_neg_inf",
        masked_fill_neg_inf,
        BHND + " + keep [B,1,N,M] bool",
        "dense",
        keep_case(lambda s: (s.B, 1, s.N, s.M)),
        empty_rows="nan",
    ),
    _S(
        "masked_fill_finfo_min",
        masked_fill_finfo_min,
        BHND + " + masked_out [B,1,N,M] bool",
        "dense",
        finfo_fill_case,
    ),
    _S(
        "where_neg_inf",
        where_neg_inf,
        BHND + " + keep [B,H,N,M] bool",
        "dense",
        keep_case(lambda s: (s.B, s.H, s.N, s.M)),
        empty_rows="nan",
    ),
    _S(
        "lengths_padding",
        lengths_padding,
        BHND + " + lengths [B] int64",
        "dense",
        lengths_case,
        empty_rows="nan",
    ),
    # causal structure built in the graph
    _S("causal_tril_bool", causal_tril_bool, BHND, "causal", causal_case, square=True),
    _S("causal_tril_float_eq0", causal_tril_float_eq0, BHND, "causal", causal_case, square=True),
    _S("causal_triu_masked_fill", causal_triu_masked_fill, BHND, "causal", causal_case, square=True),
    _S("causal_triu_additive", causal_triu_additive, BHND, "causal", causal_case, square=True),
    _S("causal_arange", causal_arange, BHND, "causal", causal_case),
    _S("causal_gpt2_buffer", GPT2BufferAttention(), BHND, "causal", gpt2_buffer_case, square=True),
    _S("causal_nanogpt_buffer", NanoGPTBufferAttention(), BHND, "causal", causal_case, square=True),
    # GQA / MQA
    _S("gqa_repeat_interleave", gqa_repeat_interleave, BHND, "dense", plain_case(), kv_heads="group"),
    _S(
        "gqa_llama_repeat_kv",
        gqa_llama_repeat_kv,
        BHND,
        "dense",
        plain_case(),
        kv_heads="group",
        tags=("fp32_cast",),
    ),
    _S("mqa_expand", mqa_expand, BHND, "dense", plain_case(), kv_heads="one"),
    _S("gqa_grouped_einsum", gqa_grouped_einsum, BHND, "dense", plain_case(), kv_heads="group"),
    # F.scaled_dot_product_attention
    _S("sdpa_plain", sdpa_plain, BHND, "dense", plain_case()),
    _S(
        "sdpa_bool_mask",
        sdpa_mask,
        BHND + " + keep [B,1,N,M] bool",
        "dense",
        sdpa_bool_case,
        empty_rows="zero",
    ),
    _S("sdpa_float_mask", sdpa_mask, BHND + " + bias [B,H,N,M]", "dense", sdpa_float_case),
    _S(
        "sdpa_float_neg_inf_mask",
        sdpa_mask,
        BHND + " + 0/-inf [B,1,N,M]",
        "dense",
        sdpa_float_neg_inf_case,
        empty_rows="zero",
    ),
    _S("sdpa_is_causal", sdpa_is_causal, BHND, "causal", causal_case),
    _S("sdpa_scale", sdpa_scale, BHND, "dense", plain_case(scale=lambda s: 0.3)),
    _S("sdpa_enable_gqa", sdpa_enable_gqa, BHND, "dense", plain_case(), kv_heads="group"),
    _S("sdpa_dropout_zero", sdpa_dropout_zero, BHND, "dense", plain_case()),
    _S("sdpa_heads_after_sequence", sdpa_heads_after_sequence, BNHD, "dense", plain_case("bnhd")),
    # nn.MultiheadAttention (eval); the callable is a module built per case
    _S(
        "mha_batch_first",
        None,
        "x [B,N,E], kv [B,M,E] -> [B,N,E]",
        "dense",
        mha_case(batch_first=True, need_weights=False, key_padding=False, attn_mask=False),
        same_dv=True,
    ),
    _S(
        "mha_seq_first_need_weights",
        None,
        "x [N,B,E], kv [M,B,E] -> [N,B,E]",
        "dense",
        mha_case(batch_first=False, need_weights=True, key_padding=False, attn_mask=False),
        same_dv=True,
    ),
    _S(
        "mha_key_padding_mask",
        None,
        "x [B,N,E], kv [B,M,E], key_padding_mask [B,M] -> [B,N,E]",
        "dense",
        mha_case(batch_first=True, need_weights=False, key_padding=True, attn_mask=False),
        same_dv=True,
    ),
    _S(
        "mha_attn_mask_need_weights",
        None,
        "x [B,N,E], kv [B,M,E], attn_mask [N,M] float -> [B,N,E]",
        "dense",
        mha_case(batch_first=True, need_weights=True, key_padding=False, attn_mask=True),
        same_dv=True,
    ),
]

BY_NAME: dict[str, Spelling] = {s.name: s for s in SPELLINGS}
assert len(BY_NAME) == len(SPELLINGS), "duplicate spelling names"
