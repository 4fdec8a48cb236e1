"""Pretrain a (tiny) model on the base-skill mixture, so that there is something to forget.

Why: continual-learning methods can only be compared on a model that *knows* things (README,
"What the method does here": the regime the built-in stream is built for).
A randomly initialised tiny model knows nothing; a model pretrained here to mastery of
``synthetic:general`` (copy, sort, fact recall, 1-digit addition, code tracing) is the base of the
built-in stream, whose domain tasks are new formats over exactly these skills.

This is plain full causal-LM SFT (loss on responses) with AdamW and a cosine schedule with warm-up,
through the shared training step in :mod:`trace_transfer.train.loop`. The output is an HF model
directory (weights, config, tokenizer) plus ``trace_transfer.json`` with the provenance of the base
model, the training settings, the loss curve and per-skill accuracy at the end.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trace_transfer._version import versions
from trace_transfer.checkpoint import write_json_atomic
from trace_transfer.models import PROVENANCE_FILE, _atomic_dir, _check_writable, load_model, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["pretrain", "PretrainResult"]


@dataclass
class PretrainResult:
    out_dir: Path
    steps: int
    losses: list[float]
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def final_loss(self) -> float | None:
        """Mean of the last 50 step losses (one step is noisy)."""
        tail = self.losses[-50:]
        return sum(tail) / len(tail) if tail else None


def pretrain(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str = "synthetic:general",
    steps: int = 2400,
    batch_size: int = 32,
    lr: float = 1e-3,
    seq_len: int = 48,
    seed: int = 0,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.01,
    eval_limit: int | None = 250,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    device: str = "auto",
) -> PretrainResult:
    """Full fine-tuning of ``model_dir`` on ``task``; writes the trained HF directory to ``out_dir``.

    Args:
        model_dir: hub id or model directory (e.g. from :func:`trace_transfer.models.build_tiny_model`).
        out_dir: output directory (written atomically; must be new or empty unless ``overwrite``).
        task: task reference; the default base mixture is what the built-in domain tasks build on.
        steps, batch_size, lr, seq_len, warmup_ratio, weight_decay: optimisation (AdamW, cosine).
            The defaults take a d=128–192, 4-layer char-level Llama to mastery of every skill.
        seed: data order.
        eval_limit: evaluation examples per score at the end (None: the whole eval split; 0: skip).
            For ``synthetic:general`` one score per skill is reported, as ``general-<skill>``.
        progress: ``(stage, done, total)`` callback.
        device: ``auto`` (CUDA when available) | ``cpu`` | ``cuda[:i]``; weights stay fp32, the forward
            pass runs under bf16 autocast where the device supports it.

    Returns:
        :class:`PretrainResult` (also recorded in ``out_dir/trace_transfer.json``).

    Raises:
        ArtifactNotFoundError / ArtifactError: bad ``model_dir`` or occupied ``out_dir``.
        ConfigError: bad task reference.

    Example:
        >>> build_tiny_model("llama", "tiny", layers=4, hidden=128)
        >>> pretrain("tiny", "base", steps=2400)
    """
    from trace_transfer.data import collate, load_task, pad_id_of, tokenize_examples
    from trace_transfer.devices import resolve_device
    from trace_transfer.train.loop import TrainConfig, train
    from trace_transfer.evaluation.code_exec import check_tasks_consent

    out_dir = Path(out_dir)
    the_task = load_task(task)
    check_tasks_consent([the_task])  # scored after training: refuse now, before touching --out
    where = resolve_device(device)  # before --out is touched: a missing GPU costs nothing
    _check_writable(out_dir, overwrite)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32, device=where)
    cfg = TrainConfig(lr=lr, max_steps=steps, batch_size=batch_size, seq_len=seq_len, warmup_ratio=warmup_ratio,
                      weight_decay=weight_decay, seed=seed, precision="auto")
    features = tokenize_examples(tokenizer, the_task.train_examples(), seq_len)
    if not features:
        from trace_transfer.errors import TaskError

        raise TaskError(f"task {the_task.name!r} has no training examples")
    pad = pad_id_of(tokenizer)

    def batches(epoch: int):
        # A fresh permutation per epoch from (seed, epoch) only: reruns see the same data order.
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(features), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([features[i] for i in order[start : start + batch_size]], pad)

    torch.manual_seed(seed)
    report = progress or (lambda *_: None)
    result = train(model, batches, cfg, steps=steps, on_step=lambda s, _loss: report("pretrain", s + 1, steps))
    scores = _final_scores(model, tokenizer, the_task, eval_limit) if eval_limit != 0 else {}

    base_prov = _read_provenance(model_dir)
    provenance = {
        "kind": "pretrained",
        "base_model": str(model_dir),
        "base_provenance": base_prov,
        "task": task,
        "train": cfg.to_dict() | {"steps": result.steps, "n_examples": len(features)},
        "loss": {"first": result.losses[0] if result.losses else None,
                 "final_mean50": sum(result.losses[-50:]) / max(1, len(result.losses[-50:])),
                 "every_50": result.losses[::50]},
        "scores": scores,
        "seconds": round(result.seconds, 2),
        "device": where,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    # Keep the architecture facts of a tiny base at the top level, where tools look for them.
    for key in ("arch", "model_type", "sizes", "tokenizer", "num_parameters"):
        if key in base_prov:
            provenance[key] = base_prov[key]
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / PROVENANCE_FILE, provenance)
    logger.info("pretrained %s for %d steps in %.0fs; scores %s", model_dir, result.steps, result.seconds, scores)
    return PretrainResult(out_dir=out_dir, steps=result.steps, losses=result.losses, seconds=result.seconds,
                          scores=scores)


def _read_provenance(model_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(model_dir) / PROVENANCE_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _final_scores(model, tokenizer, task, limit: int | None) -> dict[str, float]:
    """Accuracy at the end; per skill for the synthetic mixture (what later stages may erode)."""
    from trace_transfer.data import load_task
    from trace_transfer.data.synthetic import SKILLS
    from trace_transfer.evaluation.metrics import evaluate

    if task.spec.data.synthetic == "general" and not task.spec.data.params.get("skills"):
        refs = [f"synthetic:general?skills={s}" for s in SKILLS]
    else:
        refs = [task.ref]
    scores = {}
    for ref in refs:
        t = load_task(ref)
        scores[t.name] = round(float(evaluate(model, tokenizer, t, limit=limit).score), 4)
    return scores
