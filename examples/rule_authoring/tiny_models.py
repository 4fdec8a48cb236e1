"""Tiny random-weight BLOOM and OLMo 2 checkpoints, built from their configs (no download).

    python examples/rule_authoring/tiny_models.py            # writes ./tiny-bloom and ./tiny-olmo2

Only the tensor names and shapes matter for a rule file; 2 layers and width 64 keep them tiny.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

CONFIGS = {
    # BloomConfig names its sizes n_layer / n_head (num_hidden_layers / num_attention_heads are aliases).
    "bloom": dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4),
    "olmo2": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False),
}


def build(model_type: str, out_dir: str | Path) -> torch.nn.Module:
    """Save a tiny ``model_type`` model to ``out_dir`` and return it."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return model


if __name__ == "__main__":
    for model_type in sys.argv[1:] or CONFIGS:
        model = build(model_type, f"tiny-{model_type}")
        print(f"tiny-{model_type}: {type(model).__name__}")
        for name, p in model.named_parameters():
            if ".1." not in name:  # layer 0 stands for every layer
                print(f"  {name:55s} {tuple(p.shape)}")
