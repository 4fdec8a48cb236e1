"""Optional vLLM backend for the generation metrics (``exact_match``, ``code_exec``).

Asked for with ``backend="vllm"`` (``evaluate(..., backend="vllm")``, ``evaluate_model(...,
backend="vllm")``); the default ``hf`` backend is HF ``generate`` (batched, left-padded, KV cache).
vLLM is never imported unless asked for, and asking for it where it is not installed is one
:class:`~trace_transfer.errors.ConfigError` line with the install command, raised before any model
loads. It is not a dependency of any extra: its CUDA/torch pins are the user's choice.

What differs from ``hf``:

* vLLM reads the weights from disk, so it is handed a checkpoint directory (``checkpoint=`` of the
  generation metrics, which ``evaluate_model`` sets to the directory it loaded). An in-memory model is
  never mapped back to a directory by its ``name_or_path``: after training that names the weights it
  started from, and vLLM would silently score those.
* Prompts go in as the very token ids the ``hf`` path feeds (``_prompt_ids``), outputs come back as
  token ids decoded with our tokenizer and cut at EOS and stop strings the same way. Greedy decoding
  in vLLM's kernels can still differ from HF's in the last bits, so scores agree closely, not bit for bit.
* Log-likelihood metrics (``multiple_choice``, ``perplexity``) always use the HF model.

In the fine-tuning runner (``finetune --eval-backend vllm``, the pipeline's ``eval: backend:``) each
stage's evaluation hands vLLM that stage's saved checkpoint directory (the base model's directory for
row 0), and the engine is released (:func:`release_engines`) before the next stage trains. Under a
torchrun/DeepSpeed launch it is refused (``check_backend(..., distributed=True)``): ``vllm.LLM`` built
inside a process group larger than its own tensor parallelism stops with "world size does not match",
and running it on rank 0 alone would need a separate process this package does not manage. Score the
saved stages afterwards with ``trace-transfer eval --backend vllm`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trace_transfer.errors import ConfigError

__all__ = ["BACKENDS", "INSTALL_HINT", "check_backend", "generate_vllm", "release_engines"]

BACKENDS = ("hf", "vllm")
INSTALL_HINT = "pip install vllm"
# Share of GPU memory vLLM may claim for weights + KV cache: the HF model (needed by the log-likelihood
# metrics) sits on the same GPU, so vLLM's default of 0.9 would not fit next to it.
GPU_MEMORY_ENV = "TRACE_TRANSFER_VLLM_GPU_MEMORY"
_DEFAULT_GPU_MEMORY = 0.5

_engine: dict[str, Any] = {}  # the last engine, by checkpoint directory: starting vLLM costs seconds


def check_backend(name: str | None, *, distributed: bool = False) -> str:
    """``hf`` | ``vllm`` -> the backend name, importing vLLM only when it is asked for.

    ``distributed``: the caller runs under a multi-process launch (torchrun/DeepSpeed), where vLLM is
    refused (see the module docstring).

    Raises:
        ConfigError: an unknown backend, ``vllm`` under a multi-process launch, or ``vllm`` where vLLM
            is not installed.
    """
    name = (name or "hf").strip().lower()
    if name not in BACKENDS:
        raise ConfigError(f"generation backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "vllm" and distributed:
        raise ConfigError("the vllm evaluation backend does not run inside a torchrun/DeepSpeed launch (vLLM refuses "
                          "a process group larger than its own tensor parallelism); use the hf backend there, and "
                          "score the saved stages afterwards with trace-transfer eval --backend vllm")
    if name == "vllm":
        _import_vllm()
    return name


def release_engines() -> None:
    """Drop the cached vLLM engine and return its GPU memory to the allocator (the fine-tuning runner
    calls it after each stage's evaluation, before the next stage trains). A no-op when none is held."""
    if not _engine:
        return
    import gc

    _engine.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"the vllm generation backend needs vLLM, which is not installed here ({exc}); "
                          f"{INSTALL_HINT}, or use the default backend hf") from None
    return vllm


def _model_dir(checkpoint: Any) -> str:
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ConfigError("the vllm backend reads the weights from a checkpoint directory, and it was handed an "
                          "in-memory model: pass checkpoint=DIR (the directory holding exactly these weights), or "
                          "use backend hf")
    if not (Path(checkpoint) / "config.json").is_file():
        raise ConfigError(f"the vllm backend reads the weights from a checkpoint directory, and {str(checkpoint)!r} "
                          f"is not one (no config.json); save the model there first, or use backend hf")
    return str(Path(checkpoint).resolve())


def generate_vllm(checkpoint: Any, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompt_ids`` from vLLM on the weights in directory ``checkpoint``,
    decoded with ``tokenizer`` and cut at EOS."""
    vllm = _import_vllm()
    path = _model_dir(checkpoint)
    if path not in _engine:
        _engine.clear()  # one engine at a time: the previous stage's would hold its GPU memory
        share = float(os.environ.get(GPU_MEMORY_ENV, _DEFAULT_GPU_MEMORY))
        _engine[path] = vllm.LLM(model=path, tokenizer=path, seed=0, gpu_memory_utilization=share)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False)
    outputs = _engine[path].generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    eos = tokenizer.eos_token_id
    texts = []
    for o in outputs:
        new = list(o.outputs[0].token_ids)
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts
