"""A model's shape from its config alone: every named tensor's size, built on the meta device.

``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` creates every parameter with its
shape and dtype but no storage, so a 32B model "builds" in about a second and no memory. The tensor
list is the model's own (tied embeddings counted once, Qwen3's q_norm/k_norm, biases where the config
has them), so the planner never hard-codes an architecture's parameter formula.

Hub ids resolve offline: a local directory, then each ``configs`` root laid out as
``<root>/<org>/<name>/config.json`` (``examples/paper_models`` ships the paper's three models that
way), then the Hugging Face cache (``local_files_only``). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from trace_transfer.errors import ArtifactNotFoundError

CONFIGS_ENV = "TRACE_TRANSFER_MODEL_CONFIGS"


@dataclass(frozen=True)
class TensorShape:
    name: str
    shape: tuple[int, ...]
    group: str  # scope group: layers, embeddings, lm_head, final_norm, other

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ModelShape:
    """Sizes the estimates need. ``ref`` is what the pipeline names the model by."""

    ref: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    checkpoint_bytes: int  # bytes per parameter of the saved checkpoint (torch_dtype / dtype)
    tensors: tuple[TensorShape, ...]

    @cached_property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def params_in(self, groups: tuple[str, ...]) -> int:
        return sum(t.numel for t in self.tensors if t.group in groups)

    @cached_property
    def matmul_params(self) -> int:
        """Weights that multiply every token: all ≥2-D tensors but the input embedding (a lookup); a tied
        LM head still multiplies, so its matrix counts once more."""
        n = sum(t.numel for t in self.tensors if len(t.shape) >= 2 and t.group != "embeddings")
        return n + (self.vocab * self.hidden if self.tied else 0)

    @cached_property
    def layer_params(self) -> int:
        """Parameters of the largest decoder layer (ZeRO-3 gathers one such layer at a time)."""
        per: dict[str, int] = {}
        for t in self.tensors:
            if t.group == "layers":
                key = _layer_key(t.name)
                per[key] = per.get(key, 0) + t.numel
        return max(per.values(), default=0)

    @cached_property
    def largest_tensor(self) -> int:
        return max((t.numel for t in self.tensors), default=0)

    @cached_property
    def qk_norm(self) -> bool:
        return any(t.name.endswith(("q_norm.weight", "k_norm.weight")) for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "model_type": self.model_type, "params": self.params, "tensors": len(self.tensors),
                "layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "intermediate": self.intermediate, "vocab": self.vocab,
                "tied_embeddings": self.tied, "layer_params": self.layer_params}


def _layer_key(name: str) -> str:
    from trace_transfer.coreset import split_layer

    layer, _ = split_layer(name)
    return str(layer)


def config_roots(extra: list[str | os.PathLike] | tuple = ()) -> list[Path]:
    """The ``--configs`` roots, then those of ``$TRACE_TRANSFER_MODEL_CONFIGS`` (os.pathsep-separated)."""
    env = [p for p in os.environ.get(CONFIGS_ENV, "").split(os.pathsep) if p]
    return [Path(p).expanduser() for p in [*extra, *env]]


def find_config(ref: str, base_dir: Path | None = None, roots: list[Path] | tuple = ()) -> dict[str, Any]:
    """The ``config.json`` of ``ref`` (a model directory, a config file, or a hub id), read offline."""
    candidates = [Path(ref).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.insert(0, base_dir / ref)
    candidates += [Path(root).expanduser() / ref for root in roots]
    for c in candidates:
        f = c / "config.json" if c.is_dir() else c
        if f.is_file() and f.suffix == ".json":
            return json.loads(f.read_text())
    try:  # a model downloaded earlier sits in the hub cache
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(ref, local_files_only=True).to_dict()
    except (OSError, ValueError):
        pass
    searched = ", ".join(str(r) for r in roots) or "none"
    raise ArtifactNotFoundError(
        f"no config.json for model {ref!r} offline (searched the path itself, --configs roots [{searched}] and the "
        f"Hugging Face cache); pass --configs DIR where DIR/{ref}/config.json exists (the paper's models: "
        f"--configs examples/paper_models), or download the model's config.json once"
    )


def model_shape(config: dict[str, Any], ref: str | None = None) -> ModelShape:
    """Build ``config`` on the meta device and read off every tensor's shape (no weights, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trace_transfer.scoring.granularity import scope_group

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "transformers_version"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    tensors = tuple(TensorShape(n, tuple(p.shape), scope_group(n)) for n, p in model.named_parameters())
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    hidden = _first(text, "hidden_size", "n_embd")
    heads = _first(text, "num_attention_heads", "n_head")
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return ModelShape(
        ref=ref or config.get("_name_or_path") or model_type,
        model_type=model_type,
        layers=_first(text, "num_hidden_layers", "n_layer"),
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=_first(text, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        vocab=text.vocab_size,
        tied=bool(getattr(hf, "tie_word_embeddings", False)),
        checkpoint_bytes={"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4),
        tensors=tensors,
    )


def tiny_shape(arch: str, layers: int, hidden: int, heads: int, kv_heads: int, tokenizer: str, ref: str) -> ModelShape:
    """The shape of a pipeline's ``build:`` model, as ``build_tiny_model`` would make it."""
    from trace_transfer.models import build_tokenizer, tiny_config

    vocab = len(build_tokenizer(tokenizer))
    config = tiny_config(arch, layers, hidden, heads, kv_heads, vocab_size=vocab).to_dict()
    config["torch_dtype"] = "float32"  # build_tiny_model saves float32 weights
    return model_shape(config, ref)


def _first(cfg: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            return v
    return default
