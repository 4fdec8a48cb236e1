"""models.load_model's device_map, input_device and the rule that picks a device map for inference
(issue 12.2), with the GPUs faked: CI has none."""

from __future__ import annotations

import types

import pytest
import torch

from trace_transfer.errors import ConfigError
from trace_transfer.models import (
    build_tiny_model,
    inference_device_map,
    input_device,
    load_model,
    planned_model_bytes,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("dm") / "qwen3", layers=2, hidden=32, heads=4,
                            kv_heads=2)


@pytest.fixture
def fake_gpus(monkeypatch):
    """``set(free bytes per GPU)``: that many CUDA devices are 'visible' with that much free memory."""

    def install(*free: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(free))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (free[i], 80 * 2**30))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    return install


def test_planned_bytes_come_from_the_config_alone(tiny_dir):
    n = sum(p.numel() for p in load_model(tiny_dir).parameters())
    assert planned_model_bytes(tiny_dir, "float32") == 4 * n
    assert planned_model_bytes(tiny_dir, torch.bfloat16) == 2 * n
    assert planned_model_bytes(tiny_dir) == 4 * n  # the checkpoint's own dtype (float32 here)
    assert planned_model_bytes("no-such-org/no-such-model-offline") is None


def test_a_model_that_fits_one_gpu_stays_whole(tiny_dir, fake_gpus):
    need = planned_model_bytes(tiny_dir, "float32")
    fake_gpus(10 * need, 10 * need)
    assert inference_device_map(tiny_dir, "auto", "float32") is None


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_a_model_larger_than_one_gpu_is_spread_under_device_auto(tiny_dir, fake_gpus, gpus):
    need = planned_model_bytes(tiny_dir, "float32")
    fake_gpus(*[need] * gpus)  # the weights fit, but not with the 20 % inference margin
    assert inference_device_map(tiny_dir, "auto", "float32") == "auto"
    assert inference_device_map(tiny_dir, "auto", "bfloat16") is None  # half the bytes: fits again


def test_an_explicit_device_or_no_gpu_never_gets_a_device_map(tiny_dir, fake_gpus):
    fake_gpus(1, 1)
    for device in ("cpu", "cuda", "cuda:1"):
        assert inference_device_map(tiny_dir, device, "float32") is None
    fake_gpus()
    assert inference_device_map(tiny_dir, "auto", "float32") is None


def test_disk_offload_needs_a_folder(tiny_dir):
    with pytest.raises(ConfigError, match="offload_folder"):
        load_model(tiny_dir, device_map={"": "disk"})


def test_device_map_auto_on_a_cpu_only_machine_loads_whole_on_the_cpu(tiny_dir):
    model = load_model(tiny_dir, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"} and input_device(model) == torch.device("cpu")
    assert not model.training


def test_input_device_is_the_embeddings_or_the_maps_first_accelerator():
    emb = torch.nn.Embedding(4, 2, device="meta")  # offloaded: weights only appear inside the hook
    stub = types.SimpleNamespace(get_input_embeddings=lambda: emb, hf_device_map={"embed": "disk", "layers.0": 1,
                                                                                     "layers.1": 2})
    assert input_device(stub) == torch.device("cuda:1")
    stub.hf_device_map = {"embed": "cpu", "layers.0": "disk"}
    assert input_device(stub) == torch.device("cpu")
    plain = torch.nn.Module()
    plain.w = torch.nn.Parameter(torch.zeros(1))
    assert input_device(plain) == torch.device("cpu")  # no embedding, no map: the first parameter's


def test_eval_and_cka_ask_the_rule_with_the_users_device(tiny_dir, monkeypatch):
    """`eval`/`cka` (and the pipeline steps that call them) load through inference_device_map with the
    --device as given, and a returned map reaches from_pretrained."""
    import trace_transfer.models as models
    from trace_transfer.cka import compute_cka
    from trace_transfer.evaluation import evaluate_model

    asked = []

    def rule(ref, device, dtype):
        asked.append(device)
        return "auto"  # on this CPU-only machine accelerate places everything on the CPU

    monkeypatch.setattr(models, "inference_device_map", rule)
    res = evaluate_model(str(tiny_dir), ["synthetic:math"], limit=2, batch_size=2, device="auto")
    assert res["scores"]["math"]["n"] == 2
    cka = compute_cka(str(tiny_dir), str(tiny_dir), ["one probe.", "two probes", "three, four", "five six"],
                      variant="linear", device="auto")
    assert cka.matrix.shape == (2, 2)
    assert asked == ["auto"] * 3
