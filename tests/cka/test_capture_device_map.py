"""CKA capture and evaluation on a model dispatched by a device map (issue 12.2), on the CPU.

A GPU-less CI cannot spread a model over GPUs, but the code path is the same: accelerate's hooks move
each layer's weights (here from an offload folder on disk, or from CPU offload) and activations, and
the capture must feed inputs to the embedding's device and pool each layer where its output lies.
So a tiny model split over ``cpu`` and ``disk`` must give exactly the plain model's features and scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trace_transfer.cka.capture import capture_pooled_activations
from trace_transfer.evaluation import evaluate
from trace_transfer.models import build_tiny_model, input_device, load_model, load_tokenizer

TEXTS = ["The quick brown fox.", "x = 3 + 4", "Short.", "Another probe text, a little longer than the rest."]
# The embedding and the second decoder layer live on disk (weights on `meta` until their hook loads them).
SPLIT = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_model("llama", tmp_path_factory.mktemp("dm") / "llama", layers=2, hidden=32, heads=4,
                            kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def plain_and_split(tiny_dir, tmp_path_factory):
    plain = load_model(tiny_dir)
    split = load_model(tiny_dir, device_map=SPLIT, offload_folder=tmp_path_factory.mktemp("offload"))
    return plain, split, load_tokenizer(tiny_dir)


def test_the_split_model_is_really_dispatched(plain_and_split):
    _, split, _ = plain_and_split
    assert split.hf_device_map == SPLIT
    assert split.model.embed_tokens.weight.device.type == "meta"  # offloaded: the naive lookup would say meta
    assert input_device(split) == torch.device("cpu")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_capture_on_a_dispatched_model_equals_the_plain_model(plain_and_split, pooling):
    plain, split, tok = plain_and_split
    a = capture_pooled_activations(plain, tok, TEXTS, batch_size=3, pooling=pooling)
    b = capture_pooled_activations(split, tok, TEXTS, batch_size=3, pooling=pooling)
    assert a.shape == b.shape == (2, len(TEXTS), 32)
    np.testing.assert_array_equal(a, b)


def test_exact_match_evaluation_on_a_dispatched_model_equals_the_plain_model(plain_and_split):
    plain, split, tok = plain_and_split
    a = evaluate(plain, tok, "synthetic:math", limit=6, batch_size=4, per_example=True, max_new_tokens=6)
    b = evaluate(split, tok, "synthetic:math", limit=6, batch_size=4, per_example=True, max_new_tokens=6)
    assert a.metric == "exact_match"
    assert a.score == b.score
    assert a.per_example == b.per_example


def test_choice_loglikelihoods_on_a_dispatched_model_equals_the_plain_model(plain_and_split):
    from trace_transfer.evaluation.metrics import choice_loglikelihoods

    plain, split, tok = plain_and_split
    choices = ["4", "5", "def"]
    assert choice_loglikelihoods(plain, tok, "2+2=", choices) == choice_loglikelihoods(split, tok, "2+2=", choices)
