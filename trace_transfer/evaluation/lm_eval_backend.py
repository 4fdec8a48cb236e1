"""lm-evaluation-harness as an evaluation backend: ``lm-eval:<task>`` references scored on the model in
memory, their results landing in the same ``EvalResult`` (and so the same R matrix and report).

``evaluate(model, tok, "lm-eval:gsm8k")`` wraps the live model and tokenizer in lm-eval's ``HFLM``
(``pretrained=<model instance>``: nothing is reloaded or copied) and calls ``lm_eval.simple_evaluate``
on the one task, with fixed seeds and no bootstrap. A local task YAML is found through a
``TaskManager`` whose include path is the YAML's directory. The result's ``details`` record the
lm-eval version, the sha256 of the task's resolved config (what lm-eval ran: prompt template,
filters, metrics, few-shot setting) and every metric/filter pair the task produced.

The prompt is tokenized the way our own metrics do: a BOS token is prepended exactly when the
tokenizer adds one itself (``add_bos_token``), so a task scored both ways sees the same tokens.

lm-eval is an optional extra (``pip install 'trace-transfer[lm-eval]'``).

Example:
    >>> r = evaluate(model, tok, "lm-eval:tests/evaluation/data/lm_eval_add.yaml?metric=exact_match")
    >>> r.score, r.details["lm_eval_version"], r.details["task_config_sha256"]
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from trace_transfer.errors import ConfigError

__all__ = ["evaluate_lm_eval", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'trace-transfer[lm-eval]'"
_NOT_METRICS = ("alias", "name", "sample_len", " ")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness, which is not installed ({e}); {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return bos is not None and bool(ids) and ids[0] == bos


def _pick(results: dict[str, Any], task: str, metric: str | None, filt: str | None) -> str:
    """The ``"metric,filter"`` key to report: as asked, else the first metric with filter ``none`` (else its first)."""
    keys = [k for k in results if "," in k and "_stderr" not in k]
    if metric is None:
        if not keys:
            raise ConfigError(f"lm-eval task {task!r} produced no metric")
        metric = keys[0].split(",", 1)[0]
    wanted = [k for k in keys if k.split(",", 1)[0] == metric and (filt is None or k.split(",", 1)[1] == filt)]
    if not wanted:
        raise ConfigError(f"lm-eval task {task!r} has no result {metric},{filt or '*'}; "
                          f"choose ?metric=...&filter=... from: {', '.join(keys)}")
    return next((k for k in wanted if k.endswith(",none")), wanted[0]) if filt is None else wanted[0]


def evaluate_lm_eval(model, tokenizer, task, limit: int | None = None, batch_size: int = 32, *,
                     per_example: bool = False) -> dict[str, Any]:
    """Score ``model`` on an :class:`trace_transfer.data.lm_eval_ref.LmEvalTask` through lm-eval.

    ``evaluate`` (``metrics``) wraps the fields in an ``EvalResult``; they come back as a dict so this
    module does not import ``metrics`` (which imports it).

    Args:
        task: the parsed ``lm-eval:`` reference (``load_task("lm-eval:...")``).
        limit: the first ``limit`` documents of the task's evaluation split (lm-eval's ``limit``).
        batch_size: HFLM batch size.
        per_example: keep lm-eval's per-document samples (``filtered_resps``, target, metric values).

    Returns:
        ``EvalResult`` fields: ``metric`` = ``"<metric>,<filter>"``, lm-eval provenance in ``details``.

    Raises:
        ConfigError: lm-eval is not installed (with the install command), the task is unknown to
            lm-eval, or it has no such metric/filter (the available ones are listed).
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    opts = task.options
    # A local YAML needs no index of lm-eval's thousands of shipped tasks (building it takes seconds).
    manager = (TaskManager(include_path=str(task.yaml.resolve().parent), include_defaults=False) if task.yaml
               else TaskManager())
    if task.task not in manager.all_tasks:
        raise ConfigError(f"lm-eval knows no task {task.task!r} (from {task.ref!r}); "
                          f"list them with `lm-eval ls tasks`, or give a task YAML path")
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=_adds_bos(tokenizer))
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[task.task], task_manager=manager, limit=limit, num_fewshot=opts.get("num_fewshot"),
            bootstrap_iters=0, log_samples=per_example, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
            fewshot_random_seed=0,
        )
    finally:
        model.train(was_training)
    results = out["results"][task.task]
    key = _pick(results, task.task, opts.get("metric"), opts.get("filter"))
    metric = key.split(",", 1)[0]
    config = out.get("configs", {}).get(task.task, {})
    n = out.get("n-samples", {}).get(task.task, {}).get("effective") or results.get("sample_len") or 0
    samples = None
    if per_example:
        samples = [{"doc_id": s.get("doc_id"), "target": s.get("target"), "filtered_resps": s.get("filtered_resps"),
                    **{m: s.get(m) for m in (metric,) if m in s}} for s in out.get("samples", {}).get(task.task, [])]
    return dict(
        score=float(results[key]), metric=key, n=int(n),
        higher_is_better=bool(out.get("higher_is_better", {}).get(task.task, {}).get(metric, True)),
        per_example=samples,
        details={
            "task": task.name, "backend": "lm-eval", "lm_eval_task": task.task, "task_ref": task.ref,
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "task_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "num_fewshot": out.get("n-shot", {}).get(task.task),
            "all_metrics": {k: v for k, v in results.items() if "," in k and not isinstance(v, str)},
        },
    )
