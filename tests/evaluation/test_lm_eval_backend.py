"""lm-eval backend: a local lm-eval task over a shipped jsonl, scored through lm-evaluation-harness on the
in-memory model, equals our own exact_match on the same items (skipped when lm-eval is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_transfer.data import load_task
from trace_transfer.errors import ConfigError, TaskError

DATA = Path(__file__).parent / "data" / "lm_eval_add.jsonl"
MAX_NEW = 6

LM_EVAL_YAML = """task: tt_add_em
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_new}
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "(\\\\S+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

# Our side of the same task: the same prompts, the same greedy budget, the same extraction (first run of
# non-space characters; lm-eval's regex filter answers "[invalid]" where ours answers None: both wrong).
OUR_YAML = """name: add_em
data: {{files: {{eval: {data}}}}}
splits: {{train: eval, eval: eval}}
fields: {{prompt: prompt, response: answer}}
metric: {{name: exact_match, regex: '(\\S+)'}}
generation: {{max_new_tokens: {max_new}}}
"""


def test_reference_parsing_and_refusals(tmp_path):
    t = load_task("lm-eval:gsm8k?metric=exact_match&filter=strict-match&num_fewshot=5")
    assert t.name == "lm-eval:gsm8k" and t.options == {"metric": "exact_match", "filter": "strict-match", "num_fewshot": 5}
    with pytest.raises(ConfigError, match="unknown option 'metrc'"):
        load_task("lm-eval:gsm8k?metrc=acc")
    with pytest.raises(TaskError, match="not trained on"):
        t.train_examples()


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import sys

    from trace_transfer.evaluation import evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'trace-transfer\[lm-eval\]'"):
        evaluate(object(), None, "lm-eval:gsm8k")


@pytest.mark.slow
def test_local_lm_eval_task_equals_our_exact_match(tiny_llama, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'trace-transfer[lm-eval]'")
    from trace_transfer.evaluation import evaluate
    from trace_transfer.evaluation.metrics import generate
    from trace_transfer.models import load_model, load_tokenizer

    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    # A random-weight model answers nothing right: make every other reference its own greedy answer, so
    # the two backends must agree on a score that is neither 0 nor 1.
    preds = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=MAX_NEW)
    for i, (r, p) in enumerate(zip(rows, preds)):
        if i % 2 == 0 and p.split():
            r["answer"] = p.split()[0]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lm_eval_task.yaml").write_text(LM_EVAL_YAML.format(data=data, max_new=MAX_NEW))
    (tmp_path / "ours.yaml").write_text(OUR_YAML.format(data=data, max_new=MAX_NEW))

    theirs = evaluate(model, tok, f"lm-eval:{tmp_path / 'lm_eval_task.yaml'}?metric=exact_match", per_example=True)
    ours = evaluate(model, tok, load_task(str(tmp_path / "ours.yaml")), per_example=True)
    assert 0 < ours.score < 1
    assert theirs.score == pytest.approx(ours.score) and theirs.n == ours.n == len(rows)
    assert theirs.metric == "exact_match,first-word"
    per_doc = sorted(theirs.per_example, key=lambda s: s["doc_id"])
    assert [bool(s["exact_match"]) for s in per_doc] == [r["correct"] for r in ours.per_example]
    assert theirs.details["lm_eval_version"] and len(theirs.details["task_config_sha256"]) == 64


def test_metric_and_filter_are_picked_by_name():
    from trace_transfer.evaluation.lm_eval_backend import _pick

    results = {"alias": "t", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": "N/A",
               "exact_match,none": 0.25, "acc,none": 0.75}
    assert _pick(results, "t", None, None) == "exact_match,none"
    assert _pick(results, "t", "exact_match", "strict-match") == "exact_match,strict-match"
    assert _pick(results, "t", "acc", None) == "acc,none"
    with pytest.raises(ConfigError, match="exact_match,strict-match"):
        _pick(results, "t", "f1", None)
