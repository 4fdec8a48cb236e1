"""Task specs (strict YAML, all problems at once), loading local data through `datasets`, formatting,
tokenisation with response-only loss, collation and loaders."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from trace_transfer.data import (
    IGNORE_INDEX,
    Example,
    TaskSpec,
    collate,
    load_task,
    load_task_spec,
    make_dataloader,
    tokenize_examples,
)
from trace_transfer.errors import ArtifactNotFoundError, ConfigError, TaskError
from trace_transfer.models import load_tokenizer

ROWS = [{"q": f"what is {i}+1?", "a": str(i + 1), "topic": "arith"} for i in range(20)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_spec(tmp_path, spec, name="task.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec))
    return p


# ---------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------


def test_jsonl_with_template_and_held_out_fraction(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    p = write_spec(tmp_path, {
        "name": "arith", "data": "d.jsonl",  # shorthand, relative to the spec file
        "template": "Q: {q}\nA:", "fields": {"response": "a"},
        "splits": {"eval_fraction": 0.25, "seed": 3}, "metric": "exact_match",
        "generation": {"max_new_tokens": 4},
    })
    task = load_task(p)
    train, ev = task.train_examples(), task.eval_examples()
    assert len(train) == 15 and len(ev) == 5
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in ev})
    assert ev[0].prompt.startswith("Q: what is") and ev[0].prompt.endswith("\nA:")
    assert task.spec.metric.name == "exact_match" and task.spec.generation.max_new_tokens == 4
    # the held-out draw is a function of the seed alone
    assert [e.prompt for e in load_task(p).eval_examples()] == [e.prompt for e in ev]
    assert task.eval_examples(limit=2) == ev[:2]


def test_separate_split_files_csv(tmp_path):
    import csv

    for split, rows in (("train", ROWS[:12]), ("eval", ROWS[12:])):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["q", "a", "topic"])
            w.writeheader()
            w.writerows(rows)
    p = write_spec(tmp_path, {
        "name": "arith", "data": {"files": {"train": "train.csv", "eval": "eval.csv"}},
        "splits": {"train": "train", "eval": "eval"}, "fields": {"prompt": "q", "response": "a"},
        "metric": {"name": "exact_match", "regex": "(\\d+)"}, "max_eval_samples": 5,
    })
    task = load_task(p)
    assert len(task.train_examples()) == 12 and len(task.eval_examples()) == 5
    assert task.train_examples()[0] == Example(prompt="what is 0+1?", response="1",
                                               meta={"task": "arith", "index": 0})


def test_parquet_multiple_choice_and_code_fields(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "options": ["x", "y", "z"], "label": i % 3, "sol": "pass",
             "test": "def check(f): pass", "fn": "f"} for i in range(10)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mc.parquet"))
    p = write_spec(tmp_path, {
        "name": "mc", "data": {"path": str(tmp_path / "mc.parquet")}, "splits": {"eval_fraction": 0.5},
        "fields": {"prompt": "question", "response": "sol", "choices": "options", "answer": "label"},
        "metric": {"name": "multiple_choice", "normalization": "mean"},
    })
    ex = load_task(p).eval_examples()[0]
    assert ex.choices == ["x", "y", "z"] and isinstance(ex.answer, int)
    p2 = write_spec(tmp_path, {
        "name": "code", "data": {"path": str(tmp_path / "mc.parquet")}, "splits": {"eval_fraction": 0.5},
        "fields": {"prompt": "question", "response": "sol", "tests": "test", "entry_point": "fn"},
        "metric": {"name": "code_exec", "timeout": 2},
    }, "code.yaml")
    ex = load_task(p2).eval_examples()[0]
    assert ex.tests == "def check(f): pass" and ex.meta["entry_point"] == "f"


def test_every_problem_is_reported_at_once_naming_file_and_keys(tmp_path):
    p = write_spec(tmp_path, {
        "name": "bad", "data": {"path": "x.jsonl", "synthetic": "math"}, "promt": "oops",
        "fields": {"prompt": "q", "respnse": "a"}, "splits": {"eval": "test", "eval_fraction": 0.1},
        "metric": {"name": "exact_mach"}, "generation": {"max_new_tokens": 0},
    })
    with pytest.raises(ConfigError) as err:
        load_task(p)
    msg = str(err.value)
    assert str(p) in msg
    # one formatter for every YAML (trace_transfer.config): file:line, the key, a suggestion, the valid keys
    assert f"{p}:" in msg and "<top>: unknown key 'promt'. Valid keys: name, description, data" in msg
    assert "fields: unknown key 'respnse'; did you mean 'response'? Valid keys: prompt, response, messages" in msg
    assert "exactly one of path, files, synthetic" in msg
    assert "either eval (a split name) or eval_fraction" in msg
    assert "unknown metric 'exact_mach'; valid:" in msg and "exact_match" in msg
    assert "generation.max_new_tokens" in msg
    assert len(err.value.problems) >= 6


def test_metric_options_belong_to_their_metric(tmp_path):
    p = write_spec(tmp_path, {"name": "t", "data": "d.jsonl", "metric": {"name": "perplexity", "regex": "x"}})
    with pytest.raises(ConfigError, match="metric.regex: not an option of perplexity"):
        load_task(p)


def test_missing_required_keys_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="<top>: required key 'data' is missing"):
        load_task(write_spec(tmp_path, {"name": "t", "metric": "exact_match"}))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="is a mapping"):
        load_task(tmp_path / "list.yaml")


def test_missing_files_and_columns_are_actionable(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="task file .* does not exist"):
        load_task(tmp_path / "nope.yaml")
    task = load_task(write_spec(tmp_path, {"name": "t", "data": "nothere.jsonl", "metric": "exact_match"}))
    with pytest.raises(ArtifactNotFoundError, match="nothere.jsonl does not exist"):
        task.train_examples()
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    task = load_task(write_spec(tmp_path, {"name": "t", "data": "d.jsonl", "template": "{question}",
                                           "fields": {"response": "ans"}, "metric": "exact_match"}))
    with pytest.raises(TaskError) as err:
        task.train_examples()
    assert "columns: a, q, topic" in str(err.value) and "{question}" in str(err.value) and "'ans'" in str(err.value)
    task = load_task(write_spec(tmp_path, {"name": "t", "data": "d.jsonl", "fields": {"prompt": "q", "response": "a"},
                                           "splits": {"eval": "test"}, "metric": "exact_match"}))
    with pytest.raises(TaskError, match="available splits: train"):
        task.eval_examples()


def test_unused_split_file_is_flagged(tmp_path):
    p = write_spec(tmp_path, {"name": "t", "data": {"files": {"train": "a.jsonl", "test": "b.jsonl"}},
                              "metric": "exact_match"})
    with pytest.raises(ConfigError, match="data.files.test: this split is not used"):
        load_task(p)


def test_spec_is_frozen():
    spec = load_task("synthetic:math").spec
    assert isinstance(spec, TaskSpec)
    with pytest.raises(Exception):
        spec.name = "x"


# ---------------------------------------------------------------------------------------------------
# Chat messages
# ---------------------------------------------------------------------------------------------------

CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
                      {"role": "assistant", "content": f"ok {i}"}]} for i in range(6)]


def test_chat_plain_join_without_template(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "c.jsonl", CHAT)
    p = write_spec(tmp_path, {"name": "chat", "data": "c.jsonl", "fields": {"messages": "messages"},
                              "splits": {"eval_fraction": 0.5}, "metric": "exact_match"})
    ex = load_task(p, tokenizer=load_tokenizer(tiny_llama)).train_examples()[0]  # no chat template: plain
    assert ex.prompt.startswith("system: be brief\nuser: hi ") and ex.prompt.endswith("\nassistant: ")
    assert ex.response.startswith("ok ")


def test_chat_uses_the_tokenizers_template(tmp_path, tiny_llama):
    write_jsonl(tmp_path / "c.jsonl", CHAT)
    p = write_spec(tmp_path, {"name": "chat", "data": "c.jsonl", "fields": {"messages": "messages"},
                              "splits": {"eval_fraction": 0.5}, "metric": "exact_match"})
    tok = load_tokenizer(tiny_llama)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex = load_task(p).bind(tok).train_examples()[0]
    # BOS is left to the tokenizer (it adds one when encoding), so the text must not carry a second
    assert ex.prompt.startswith("<system>be brief<user>hi ") and ex.prompt.endswith("<assistant>")
    assert ex.meta["chat_template"] is True


def test_chat_and_prompt_fields_conflict(tmp_path):
    p = write_spec(tmp_path, {"name": "c", "data": "c.jsonl", "fields": {"messages": "m", "prompt": "q"},
                              "metric": "exact_match"})
    with pytest.raises(ConfigError, match="chat data takes prompt and response from the messages"):
        load_task(p)


# ---------------------------------------------------------------------------------------------------
# Tokenisation, collation, loaders
# ---------------------------------------------------------------------------------------------------


def test_loss_only_on_response_and_eos(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    [f] = tokenize_examples(tok, [Example("sum 3 4=", "7")], seq_len=32)
    assert f["input_ids"] == [tok.bos_token_id] + tok("sum 3 4=", add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("7"), tok.eos_token_id]
    assert f["labels"] == [IGNORE_INDEX] * 9 + [tok.convert_tokens_to_ids("7"), tok.eos_token_id]


def test_prompt_tokens_match_what_generation_conditions_on(tiny_qwen3):
    # evaluation encodes the prompt alone (with specials): training must put exactly those ids first
    tok = load_tokenizer(tiny_qwen3)
    ex = Example("dx abc?", "xyz")
    [f] = tokenize_examples(tok, [ex], seq_len=32)
    prompt = tok(ex.prompt)["input_ids"]
    assert f["input_ids"][: len(prompt)] == prompt
    assert f["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert tok.decode(f["input_ids"][len(prompt):], skip_special_tokens=True) == "xyz"


def test_truncation_drops_the_oldest_prompt_tokens_keeps_bos(tiny_llama, caplog):
    tok = load_tokenizer(tiny_llama)
    [f] = tokenize_examples(tok, [Example("abcdefghij", "XY")], seq_len=8)
    assert len(f["input_ids"]) == 8
    assert f["input_ids"][0] == tok.bos_token_id
    assert tok.decode(f["input_ids"], skip_special_tokens=True) == "ghijXY"  # BOS + 4 prompt chars + X, Y, EOS
    assert sum(lab != IGNORE_INDEX for lab in f["labels"]) == 3  # X, Y, EOS
    [g] = tokenize_examples(tok, [Example("ab", "0123456789")], seq_len=6)
    assert len(g["input_ids"]) == 6 and g["labels"][:2] == [IGNORE_INDEX] * 2  # response cut at the end
    assert "truncated" in caplog.text
    with pytest.raises(ConfigError, match="seq_len"):
        tokenize_examples(tok, [Example("a", "b")], seq_len=2)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_ids_labels_and_mask(side):
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0, padding_side=side)
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (2, 3)
    if side == "right":
        assert out["input_ids"][1].tolist() == [8, 0, 0] and out["attention_mask"][1].tolist() == [1, 0, 0]
        assert out["labels"][1].tolist() == [8, -100, -100]
    else:
        assert out["input_ids"][1].tolist() == [0, 0, 8] and out["attention_mask"][1].tolist() == [0, 0, 1]
        assert out["labels"][1].tolist() == [-100, -100, 8]
    with pytest.raises(ConfigError):
        collate(batch, 0, padding_side="middle")


def test_dataloader_is_deterministic_per_seed(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    examples = load_task("synthetic:code?n_train=40").train_examples()

    def order(seed):
        return [b["input_ids"].tolist() for b in make_dataloader(tok, examples, 32, 8, shuffle=True, seed=seed)]

    assert order(1) == order(1) and order(1) != order(2)
    first = next(iter(make_dataloader(tok, examples, 32, 8, shuffle=False)))
    assert set(first) == {"input_ids", "attention_mask", "labels"} and first["input_ids"].shape[0] == 8
