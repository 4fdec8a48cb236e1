"""Shared session fixtures: tiny real HF model directories, built once per test session.

They are random-weight models (no pretraining) — cheap to build (well under a second) and enough
for every test that needs a loadable checkpoint, a tokenizer and real parameter names. Tests must
treat them as read-only (copy before modifying).
"""

from __future__ import annotations

import pytest
import torch

from trace_transfer.models import build_tiny_model


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_worker():
    # CI runs two xdist workers on two cores: intra-op threads beyond one per worker only contend.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Llama, char tokenizer, 2 layers, hidden 32, 4 heads / 2 KV heads (~31k parameters)."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", layers=2, hidden=32, heads=4,
                            kv_heads=2, tokenizer="char", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """Qwen3 (q_norm/k_norm), byte-level BPE tokenizer (384 tokens), 2 layers, hidden 48."""
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3", layers=2, hidden=48, heads=4,
                            kv_heads=2, tokenizer="bpe", seed=0)


# Aliases under the *_dir names some test modules use.
@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_qwen3):
    return tiny_qwen3
