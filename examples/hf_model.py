"""A Hugging Face model (random weights from a config, nothing downloaded), compiled and inspected.

    python examples/hf_model.py
"""

import time

import torch
import transformers

import rewrite


def main():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (2, 512))
    mask = torch.ones_like(ids)
    mask[1, 400:] = 0  # a padded second sequence
    report = rewrite.inspect(model, ids, attention_mask=mask)
    print(report)
    fast = rewrite.compile(model)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = fast(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for name, fn in (("eager", model), ("rewritten", fast)):
            fn(ids, attention_mask=mask)
            t = time.perf_counter()
            fn(ids, attention_mask=mask)
            print(f"{name}: {(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
