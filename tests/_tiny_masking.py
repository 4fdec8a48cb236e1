"""Tiny Llama models, batches and CoreSets at every granularity, shared by the masking, HF Trainer,
verify-frozen and DeepSpeed tests (kept here, not in conftest.py, so the DeepSpeed worker script can
import it too)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import torch

from trace_transfer.coreset import ELEMENT, CoreSet, UnitLayout

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 32, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
GRANULARITIES = ("tensor", "row", "column", "head", "element")
# ZeRO-3 for the 2-rank CPU scripts: every parameter partitioned (no persistence threshold), no prefetch.
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_prefetch_bucket_size": 0},
         "steps_per_print": 1000, "wall_clock_breakdown": False}


def tiny_llama(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model


def batches_fn(n: int = 4, batch_size: int = 4, seq_len: int = 12, seed: int = 0):
    """``epoch -> list of batches`` as trace_transfer.train.loop.train wants; a fixed tiny data set
    whose sequences repeat a pattern, so the loss visibly goes down in a few steps."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
        ids = (start + torch.arange(seq_len)) % VOCAB
        data.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return lambda epoch: data


def coreset_at(model: torch.nn.Module, granularity: str, share: float = 0.3, seed: int = 0) -> CoreSet:
    """A random CoreSet of one granularity: every other matrix partly core (or, for "tensor", every
    third tensor wholly core), some tensors with no core element at all."""
    g = torch.Generator().manual_seed(seed)
    masks, layouts = {}, {}
    names = [n for n, _ in model.named_parameters()]
    for i, (name, p) in enumerate(model.named_parameters()):
        if granularity == "tensor":
            if i % 3 == 0:
                masks[name], layouts[name] = torch.tensor([True]), UnitLayout()
            continue
        if p.dim() != 2 or i % 2:
            continue
        if granularity == "row":
            layout = UnitLayout.rows()
        elif granularity == "column":
            layout = UnitLayout.columns()
        elif granularity == "head":
            if "self_attn" not in name:
                continue
            layout = UnitLayout.heads(HEAD_DIM, axis=1 if "o_proj" in name else 0)
        else:
            layout = ELEMENT
        n_units = layout.num_units(tuple(p.shape))
        m = torch.rand(n_units, generator=g) < share
        m[0] = True  # at least one core unit and at least one frozen one
        m[-1] = False
        masks[name], layouts[name] = m, layout
    assert masks, (granularity, names)
    return CoreSet.from_unit_masks(masks, layouts, model, metadata={"task": f"test-{granularity}"})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def run_two_cpu_ranks(script, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node=2`` with DeepSpeed on CPU (gloo); skips the
    calling test when torchrun or the C++ compiler DeepSpeed needs on CPU is missing."""
    import pytest

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("DeepSpeed on CPU compiles a small C++ op: no compiler found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", str(script), *args]
    # generous: the first run on a machine compiles DeepSpeed's CPU comm op (~1-2 min on 2 cores)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
