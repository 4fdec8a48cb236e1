"""Per-task metrics and ``evaluate(model, tokenizer, task)``.

Four metrics ship, each registered by name with :func:`register_metric` (a task spec names one):

* ``exact_match`` — greedy generation (batched, left padding, ``max_new_tokens``, stops at EOS and
  at the spec's stop strings), the prediction and the reference both passed through the spec's
  answer-extraction regex (first capture group if it has one), whitespace-stripped, compared as
  strings. A prediction without a regex match is wrong.
* ``multiple_choice`` — log-likelihood of each choice as a continuation of the prompt; the argmax
  is the prediction. ``normalization``: ``"sum"`` (default; the raw log-likelihood, lm-eval's
  ``acc``), ``"mean"`` (mean per continuation token) or ``"char"`` (divided by the number of
  characters of the choice, lm-eval's ``acc_norm``-style correction for length). Choices are scored
  without an EOS after them.
* ``code_exec`` — greedy completion, cut at the HumanEval stop sequences, run with the example's
  tests in the sandbox under a timeout (:mod:`trace_transfer.evaluation.code_exec`); pass@1. Runs
  only with ``allow_code_exec=True`` or ``TRACE_TRANSFER_ALLOW_CODE_EXEC=1``; the isolation used is
  in ``details["sandbox"]``.
* ``perplexity`` — ``exp`` of the mean negative log-likelihood over *response* tokens of all
  examples (token-weighted), tokenised exactly like training (response + EOS), so it equals
  ``exp(eval loss)``. Lower is better (``EvalResult.higher_is_better`` is False).

Prompts are tokenised exactly as in training (``trace_transfer.data.tokenize_examples`` puts the
prompt first and computes loss on the response only), so a model is asked the same way it was taught.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trace_transfer.errors import ConfigError, TaskError
from trace_transfer.models import input_device
from trace_transfer.evaluation.sharding import contiguous_split, current_shard, map_batches
from trace_transfer.registry import METRICS

__all__ = [
    "EvalResult",
    "evaluate",
    "register_metric",
    "available_metrics",
    "generate",
    "choice_loglikelihoods",
    "extract_answer",
    "evaluate_model",
]

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Score of one model on one task.

    ``score`` is in [0, 1] for accuracy-like metrics and a perplexity (>= 1) for ``perplexity``.
    ``per_example`` holds, per evaluated example, what was predicted and whether it was right.
    """

    score: float
    metric: str
    n: int
    higher_is_better: bool = True
    per_example: list[dict[str, Any]] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_examples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_examples:
            d.pop("per_example")
        return d

    # Dict-style access so callers written against ``dict(score=..., metric=..., n=...)`` keep working.
    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


MetricFn = Callable[..., EvalResult]


def register_metric(name: str, fn: MetricFn | None = None, *, description: str = ""):
    """Register ``fn(model, tokenizer, examples, *, batch_size, **options) -> EvalResult`` as ``name``.

    Usable as a decorator (``@register_metric("bleu")``) or a call. ``options`` are the metric
    settings of the task spec (regex, max_new_tokens, normalization, timeout, ...).

    Raises:
        ConfigError: ``name`` is malformed or already registered.
    """
    return METRICS.register(name, fn, description=description)


def available_metrics() -> list[str]:
    return sorted(METRICS.names())


# --------------------------------------------------------------------------------------------------
# Tokenisation shared with training
# --------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str, with_special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=with_special)["input_ids"])


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt tokens the way training builds them: special prefix (BOS) included, no suffix."""
    ids = _encode(tokenizer, prompt, True)
    # Tokenizers that append EOS as a special suffix would make the model read "end" before answering.
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id and len(ids) > 1:
        plain = _encode(tokenizer, prompt, False)
        if not plain or plain[-1] != tokenizer.eos_token_id:
            ids = ids[:-1]
    return ids


def _pair_ids(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of prompt + continuation and the index where the continuation starts.

    Prompt and continuation are encoded separately, as ``tokenize_examples`` does for training (a BPE
    merge across the boundary would score tokens the model never saw at that position).
    """
    p = _prompt_ids(tokenizer, prompt)
    return p + _encode(tokenizer, continuation, False), len(p)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


# --------------------------------------------------------------------------------------------------
# Generation and log-likelihood primitives
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    stop: Sequence[str] = (),
    backend: str = "hf",
    checkpoint: str | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), cut at EOS and at ``stop`` strings.

    Prompts are sorted by length inside the call so batches carry little padding; results come back
    in input order. HF ``generate`` runs with its KV cache (``use_cache=True`` is passed explicitly: a
    checkpoint saved with ``use_cache: false``, as gradient-checkpointed training leaves it, would
    otherwise re-encode the whole sequence at every new token). Inside
    :func:`trace_transfer.evaluation.sharding.sharded` each rank generates its share of the batches and
    every rank gets all continuations back.

    ``backend="vllm"`` generates with vLLM instead (optional extra, see
    :mod:`trace_transfer.evaluation.vllm_backend`). vLLM reads the weights from disk: ``checkpoint``
    names the directory holding exactly ``model``'s weights (or ``model`` is that directory's path).
    """
    from trace_transfer.evaluation.vllm_backend import check_backend

    encoded = [_prompt_ids(tokenizer, p) for p in prompts]
    if check_backend(backend) == "vllm":
        from trace_transfer.evaluation.vllm_backend import generate_vllm

        # vLLM batches continuously by itself: each rank hands it its whole share at once.
        where = checkpoint if checkpoint is not None else model
        texts = map_batches(len(prompts), contiguous_split(len(prompts), _world()),
                            lambda idx: generate_vllm(where, tokenizer, [encoded[i] for i in idx],
                                                      max_new_tokens=max_new_tokens))
        return [_cut(t, stop) for t in texts]
    device = input_device(model)  # the embedding's device: right for device_map-dispatched models too
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))

    def run(idx: list[int]) -> list[str]:
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        texts = []
        for row in range(len(idx)):
            new = gen[row, width:].tolist()
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            texts.append(_cut(tokenizer.decode(new, skip_special_tokens=True), stop))
        return texts

    was_training = model.training
    model.eval()
    try:
        return map_batches(len(prompts), _chunks(order, batch_size), run)
    finally:
        model.train(was_training)


def _cut(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def _chunks(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches one process runs, in order: every rank plans the same ones and runs its share."""
    order = list(order)
    return [order[s : s + batch_size] for s in range(0, len(order), max(1, batch_size))]


def _world() -> int:
    shard = current_shard()
    return shard.world if shard is not None else 1


@torch.no_grad()
def _continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[tuple[float, int]]:
    """``(sum of log p(continuation tokens | prompt), number of continuation tokens)`` per pair."""
    device = input_device(model)  # the embedding's device: right for device_map-dispatched models too
    pad = _pad_id(tokenizer)
    encoded = [_pair_ids(tokenizer, p, c) for p, c in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i][0]))

    def run(idx: list[int]) -> list[tuple[float, int]]:
        width = max(len(encoded[i][0]) for i in idx)
        # Right padding: causal attention means pads after a sequence never influence it.
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i][0]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        outs = []
        for row, i in enumerate(idx):
            seq, start_c = encoded[i]
            targets = torch.tensor(seq[start_c:], dtype=torch.long, device=device)
            # logits at position t predict token t+1
            lp = logp[row, start_c - 1 : len(seq) - 1].gather(-1, targets[:, None]).sum()
            outs.append((float(lp), len(targets)))
        return outs

    was_training = model.training
    model.eval()
    try:
        return map_batches(len(pairs), _chunks(order, batch_size), run)
    finally:
        model.train(was_training)


def choice_loglikelihoods(
    model, tokenizer, prompt: str, choices: Sequence[str], normalization: str = "sum", batch_size: int = 32
) -> list[float]:
    """Score of each choice as a continuation of ``prompt`` (see the module docstring for ``normalization``)."""
    raw = _continuation_logprobs(model, tokenizer, [(prompt, c) for c in choices], batch_size)
    return [_normalize(lp, n, c, normalization) for (lp, n), c in zip(raw, choices)]


def _normalize(logprob: float, n_tokens: int, choice: str, how: str) -> float:
    if how == "sum":
        return logprob
    if how in ("mean", "token"):
        return logprob / max(1, n_tokens)
    if how == "char":
        return logprob / max(1, len(choice))
    raise ConfigError(f"multiple_choice normalization {how!r}: expected 'sum', 'mean' or 'char'")


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer inside ``text``: first capture group of ``pattern`` (or the whole match); ``text``
    stripped when there is no pattern; ``None`` when the pattern does not match."""
    if not pattern:
        return text.strip()
    m = re.search(pattern, text)
    if m is None:
        return None
    return (m.group(1) if m.groups() else m.group(0)).strip()


# --------------------------------------------------------------------------------------------------
# The four built-in metrics
# --------------------------------------------------------------------------------------------------


def _reference(ex) -> str:
    ans = getattr(ex, "answer", None)
    return str(ans) if ans is not None else ex.response


@register_metric("exact_match")
def exact_match(
    model, tokenizer, examples, *, batch_size: int = 32, regex: str | None = None, max_new_tokens: int | None = None,
    stop: Sequence[str] = (), ignore_case: bool = False, backend: str = "hf", checkpoint: str | None = None,
    **_: Any,
) -> EvalResult:
    if max_new_tokens is None:
        # Long enough for the longest reference plus slack; char-level references are short.
        longest = max((len(_encode(tokenizer, _reference(e), False)) for e in examples), default=1)
        max_new_tokens = min(256, longest + 8)
    preds = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, stop=stop, backend=backend, checkpoint=checkpoint)
    rows, correct = [], 0
    for ex, pred in zip(examples, preds):
        got = extract_answer(pred, regex)
        ref = extract_answer(_reference(ex), regex)
        if ref is None:  # reference not in the extracted format: compare to the stripped reference
            ref = _reference(ex).strip()
        ok = got is not None and (got.lower() == ref.lower() if ignore_case else got == ref)
        correct += ok
        rows.append({"prompt": ex.prompt, "prediction": pred, "extracted": got, "reference": ref, "correct": bool(ok)})
    n = len(examples)
    return EvalResult(score=correct / n if n else 0.0, metric="exact_match", n=n, per_example=rows,
                      details={"max_new_tokens": max_new_tokens, "regex": regex})


@register_metric("multiple_choice")
def multiple_choice(
    model, tokenizer, examples, *, batch_size: int = 32, normalization: str = "sum", **_: Any
) -> EvalResult:
    pairs, spans = [], []
    for ex in examples:
        choices = list(getattr(ex, "choices", None) or [])
        if len(choices) < 2:
            raise TaskError(f"multiple_choice example needs >= 2 choices, got {choices!r} (prompt {ex.prompt[:60]!r})")
        spans.append((len(pairs), len(choices)))
        pairs.extend((ex.prompt, c) for c in choices)
    raw = _continuation_logprobs(model, tokenizer, pairs, batch_size)
    rows, correct = [], 0
    for ex, (s, k) in zip(examples, spans):
        choices = list(ex.choices)
        scores = [_normalize(lp, n, c, normalization) for (lp, n), c in zip(raw[s : s + k], choices)]
        pred = max(range(k), key=lambda i: scores[i])
        gold = _gold_index(ex, choices)
        correct += pred == gold
        rows.append({"prompt": ex.prompt, "scores": scores, "prediction": pred, "answer": gold, "correct": pred == gold})
    n = len(examples)
    return EvalResult(score=correct / n if n else 0.0, metric="multiple_choice", n=n, per_example=rows,
                      details={"normalization": normalization})


def _gold_index(ex, choices: list[str]) -> int:
    ans = getattr(ex, "answer", None)
    if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(choices):
        return ans
    if isinstance(ans, str):
        if ans in choices:
            return choices.index(ans)
        if ans.strip().isdigit() and 0 <= int(ans) < len(choices):
            return int(ans)
    if ex.response in choices:
        return choices.index(ex.response)
    raise TaskError(
        f"multiple_choice example: answer {ans!r} is neither a choice index nor one of {choices!r} "
        f"(prompt {ex.prompt[:60]!r}); set `answer` to the index or the text of the right choice"
    )


@register_metric("code_exec")
def code_exec(
    model, tokenizer, examples, *, batch_size: int = 32, max_new_tokens: int = 256, timeout: float = 5.0,
    workers: int = 2, stop: Sequence[str] | None = None, allow_code_exec: bool | None = None,
    sandbox: str | None = None, backend: str = "hf", checkpoint: str | None = None, **_: Any,
) -> EvalResult:
    from trace_transfer.evaluation.code_exec import (
        HUMANEVAL_STOP,
        build_program,
        require_code_exec_consent,
        run_programs,
        sandbox_isolation,
        truncate_completion,
    )

    # Consent and a working sandbox before generating: a refusal should not cost a generation pass.
    require_code_exec_consent(allow_code_exec)
    isolation = sandbox_isolation(sandbox)
    stops = tuple(stop) if stop is not None else HUMANEVAL_STOP
    missing = [i for i, e in enumerate(examples) if not getattr(e, "tests", None)]
    if missing:
        raise TaskError(f"code_exec needs `tests` on every example; example {missing[0]} has none")
    raw = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                   batch_size=batch_size, backend=backend, checkpoint=checkpoint)
    completions = [truncate_completion(c, stops) for c in raw]
    programs = [
        build_program(e.prompt, c, e.tests, (getattr(e, "meta", None) or {}).get("entry_point"))
        for e, c in zip(examples, completions)
    ]
    # Running a program does not depend on its batch: split them evenly over the ranks.
    results = map_batches(len(programs), contiguous_split(len(programs), _world()),
                          lambda idx: run_programs([programs[i] for i in idx], timeout=timeout, workers=workers,
                                                   allow_code_exec=True, sandbox=sandbox))
    rows = [{"prompt": e.prompt, "completion": c, "status": r.status, "correct": r.passed}
            for e, c, r in zip(examples, completions, results)]
    n = len(examples)
    passed = sum(r.passed for r in results)
    return EvalResult(score=passed / n if n else 0.0, metric="code_exec", n=n, per_example=rows,
                      details={"timeout": timeout, "max_new_tokens": max_new_tokens,
                               "timeouts": sum(r.status == "timeout" for r in results),
                               "sandbox": isolation.to_dict()})


@register_metric("perplexity")
def perplexity(model, tokenizer, examples, *, batch_size: int = 32, seq_len: int = 1 << 20, **_: Any) -> EvalResult:
    from trace_transfer.data import tokenize_examples

    features = tokenize_examples(tokenizer, examples, seq_len)
    raw = _label_logprobs(model, tokenizer, features, batch_size)
    nll = -sum(lp for lp, _ in raw)
    tokens = sum(n for _, n in raw)
    ppl = math.exp(nll / tokens) if tokens else float("nan")
    rows = [{"prompt": e.prompt, "nll": -lp, "tokens": n} for e, (lp, n) in zip(examples, raw)]
    return EvalResult(score=ppl, metric="perplexity", n=len(examples), higher_is_better=False, per_example=rows,
                      details={"tokens": tokens, "mean_nll": nll / tokens if tokens else None})


@torch.no_grad()
def _label_logprobs(model, tokenizer, features, batch_size: int) -> list[tuple[float, int]]:
    """Sum of log p over labelled positions (labels != -100) and their count, per feature."""
    from trace_transfer.data import IGNORE_INDEX, collate

    device = input_device(model)  # the embedding's device: right for device_map-dispatched models too

    def run(idx: list[int]) -> list[tuple[float, int]]:
        batch = collate([features[i] for i in idx], _pad_id(tokenizer))
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        labels = batch["labels"][:, 1:].to(device)
        keep = labels != IGNORE_INDEX
        tok_lp = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * keep
        return [(float(tok_lp[row].sum()), int(keep[row].sum())) for row in range(labels.shape[0])]

    was_training = model.training
    model.eval()
    try:
        return map_batches(len(features), _chunks(range(len(features)), batch_size), run)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _metric_of(task) -> tuple[str, dict[str, Any]]:
    """``(metric name, options)`` from a task spec; accepts a plain name or a settings object/dict."""
    spec = getattr(task, "spec", None)
    metric = getattr(spec, "metric", None) if spec is not None else None
    if metric is None:
        metric = getattr(task, "metric", None)
    if metric is None:
        raise TaskError(f"task {getattr(task, 'name', task)!r} names no metric; set `metric:` in its spec")
    if isinstance(metric, str):
        name, opts = metric, {}
    else:
        d = metric.model_dump() if hasattr(metric, "model_dump") else dict(metric)
        name = d.pop("name", None) or d.pop("type", None) or d.pop("kind", None)
        opts = {k: v for k, v in d.items() if v is not None}
    gen = getattr(spec, "generation", None) if spec is not None else None
    if gen is not None:
        g = gen.model_dump() if hasattr(gen, "model_dump") else dict(gen)
        for k, v in g.items():
            if v is not None:
                opts.setdefault(k, v)
    return name, opts


def evaluate(
    model, tokenizer, task, limit: int | None = None, batch_size: int = 32, *, per_example: bool = False, **overrides: Any
) -> EvalResult:
    """Score ``model`` on ``task``'s evaluation split with the metric its spec names.

    Args:
        task: a :class:`trace_transfer.data.Task` (or anything with ``.name``, ``.spec.metric`` and
            ``.eval_examples(limit)``), or a task reference string (``synthetic:math``, a YAML path).
        limit: evaluate the first ``limit`` examples only (deterministic order).
        batch_size: prompts per forward/generate call.
        per_example: keep per-example predictions in the result.
        overrides: metric options that win over the spec (e.g. ``max_new_tokens=16``).

    Returns:
        :class:`EvalResult` (``score``, ``metric``, ``n``, ``higher_is_better``, ``per_example``).

    Raises:
        ConfigError: the spec names a metric that is not registered.
        TaskError: the task has no evaluation examples or they lack what the metric needs.

    Example:
        >>> r = evaluate(model, tok, load_task("synthetic:math"), limit=100)
        >>> r.score, r.metric, r.n
    """
    if isinstance(task, str):
        from trace_transfer.data import load_task

        task = load_task(task)
    if getattr(task, "backend", None) == "lm-eval":  # lm-eval:<task> refs
        from trace_transfer.evaluation.lm_eval_backend import evaluate_lm_eval

        return EvalResult(**evaluate_lm_eval(model, tokenizer, task, limit=limit, batch_size=batch_size,
                                             per_example=per_example))
    name, opts = _metric_of(task)
    opts.update(overrides)
    if name not in METRICS:
        raise ConfigError(f"task {task.name!r}: {METRICS.unknown(name)}")
    if name == "code_exec":
        from trace_transfer.evaluation.code_exec import require_code_exec_consent

        require_code_exec_consent(opts.get("allow_code_exec"), what=f"task {task.name!r} (metric code_exec)")
    examples = list(task.eval_examples(limit=limit) if limit is not None else task.eval_examples())
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise TaskError(f"task {task.name!r} has no evaluation examples")
    result = METRICS.get(name)(model, tokenizer, examples, batch_size=batch_size, **opts)
    result.details.setdefault("task", task.name)
    if not per_example:
        result.per_example = None
    return result


def evaluate_model(
    model_ref: str,
    task_refs: Sequence[str],
    limit: int | None = None,
    batch_size: int = 32,
    out: str | None = None,
    per_example: bool = False,
    device: str = "auto",
    dtype: str | None = "auto",
    backend: str = "hf",
) -> dict[str, Any]:
    """Load a model (HF id or directory) and score it on several tasks; optionally write JSON.

    ``backend``: ``hf`` (HF generate) or ``vllm`` (optional, for the generation metrics; see
    :mod:`trace_transfer.evaluation.vllm_backend`), checked before anything loads.

    ``device`` (``auto``/``cpu``/``cuda[:i]``) and ``dtype`` (``auto``/``bf16``/``fp16``/``fp32``; None
    keeps the checkpoint's) go through :mod:`trace_transfer.devices`; scores are computed in fp32.

    Returns:
        ``{"model", "scores": {task: EvalResult.to_dict()}, "limit", "versions", "created"}`` —
        also written atomically to ``out`` when given.
    """
    import datetime as _dt

    from trace_transfer._version import versions
    from trace_transfer.checkpoint import write_json_atomic
    from trace_transfer.data import load_task
    from trace_transfer.models import inference_device_map, load_model, load_tokenizer

    from trace_transfer.evaluation.code_exec import check_tasks_consent

    from trace_transfer.devices import resolve_device, resolve_dtype

    from trace_transfer.evaluation.vllm_backend import check_backend

    where = resolve_device(device)  # a missing GPU (or vLLM) is refused before anything loads
    backend = check_backend(backend)
    # Only a non-default backend is passed on (a registered metric need not know the options); vLLM is
    # told where the weights just loaded live.
    extra = {"backend": backend, "checkpoint": str(model_ref)} if backend != "hf" else {}
    weights = resolve_dtype(dtype, where) if dtype is not None else None
    tasks = [(ref, load_task(ref)) for ref in task_refs]
    check_tasks_consent([t for _, t in tasks])  # before the model loads: a refusal should cost nothing
    model = load_model(model_ref, dtype=weights, device=where,
                       device_map=inference_device_map(model_ref, device, weights))  # spread if > 1 GPU
    tokenizer = load_tokenizer(model_ref)
    scores = {}
    for ref, task in tasks:
        scores[task.name] = evaluate(model, tokenizer, task, limit=limit, batch_size=batch_size,
                                     per_example=per_example, **extra).to_dict(with_examples=per_example)
        scores[task.name]["task_ref"] = ref
    result = {"model": str(model_ref), "scores": scores, "limit": limit, "batch_size": batch_size, "backend": backend,
              "device": where, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "versions": versions(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    if out:
        write_json_atomic(out, result)
    return result
