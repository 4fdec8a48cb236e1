"""Compare a BLOOM rule file's q/k/v slices of query_key_value with BLOOM's own split.

    python examples/rule_authoring/check_bloom_qkv.py my_rules/bloom.yaml tiny-bloom

`rules check` verifies that the fused parts add up; it cannot know their order. This does: it
projects a random input through the rows the rule assigns to attn_q / attn_k / attn_v and through
BloomAttention._reshape, the model's own split, and compares.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

from trace_transfer.rules import Slot, load_rules, model_spec, resolve


def check(rules_path: str, model_dir: str) -> bool:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    res = resolve(load_rules(rules_path), model_spec(model))
    attn = model.transformer.h[0].self_attention
    hidden = model.config.hidden_size
    x = torch.randn(1, 3, hidden)
    all_ok = True
    with torch.no_grad():
        q, k, v = attn._reshape(attn.query_key_value(x))  # each [batch, heads, seq, head_dim]
        for role, ref in zip(("attn_q", "attn_k", "attn_v"), (q, k, v)):
            w, b = res.slots[Slot(role, "weight", 0)], res.slots[Slot(role, "bias", 0)]
            ours = x @ attn.query_key_value.weight[w.index()].T + attn.query_key_value.bias[b.index()]
            ok = torch.allclose(ours, ref.transpose(1, 2).reshape(1, 3, hidden), atol=1e-6)
            all_ok &= ok
            print(f"{role}: rows {w.ranges} -> {'matches the model' if ok else 'DIFFERS from the model'}")
    return all_ok


if __name__ == "__main__":
    sys.exit(0 if check(sys.argv[1], sys.argv[2]) else 1)
