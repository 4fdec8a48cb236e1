"""Pipeline config validation and the content-addressed step runner."""

import json

import pytest
import yaml

from trace_transfer.errors import ConfigError
from trace_transfer.pipeline.config import load_pipeline
from trace_transfer.pipeline.steps import StepRunner

GOOD = {
    "source": {"build": {"arch": "llama"}},
    "target": {"build": {"arch": "qwen3"}},
    "tasks": ["synthetic:math", "synthetic:medical", "synthetic:code"],
    "methods": ["full", "trace-lf", "transfer-cs"],
}


def test_good_config_parses(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(GOOD))
    cfg = load_pipeline(p)
    assert cfg.scoring.ratio == 0.05 and cfg.layer_map.variant == "debiased"


def test_all_problems_reported_at_once(tmp_path):
    bad = {
        **GOOD,
        "scoring": {"ratoi": 0.1},
        "training": {"lr": "fast"},
        "methods": ["full", "magic"],
        "tasks": ["missing.yaml", "synthetic:math"],
    }
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_pipeline(p)
    msg = str(e.value)
    # one formatter for every YAML (trace_transfer.config): file:line, a suggestion and the valid keys
    assert f"{p}:" in msg and "scoring: unknown key 'ratoi'; did you mean 'ratio'? Valid keys: ratio," in msg
    assert "training.lr" in msg
    # schema errors stop before semantic checks; fix them and the semantic ones all appear together
    bad2 = {**GOOD, "methods": ["full", "magic", "transfer-cs"], "tasks": ["missing.yaml", "synthetic:math"],
            "launch": {"deepspeed": "nope.json"}}
    p.write_text(yaml.safe_dump(bad2))
    with pytest.raises(ConfigError) as e:
        load_pipeline(p)
    msg = str(e.value)
    assert "magic" in msg and "missing.yaml" in msg and "nope.json" in msg
    assert "at least 3 tasks" in msg  # transfer-cs with 2 tasks


def test_model_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one"):
        load_pipeline({**GOOD, "source": {"model": "a/b", "build": {"arch": "llama"}}})


def test_steps_skip_when_inputs_unchanged(tmp_path):
    calls = []

    def make(tag):
        def fn(d):
            calls.append(tag)
            (d / "out.txt").write_text(tag)
            return {"tag": tag}
        return fn

    r = StepRunner(tmp_path)
    r.step("a", {"x": 1}, make("a"))
    r.step("b", {}, make("b"), depends=["a"])
    r2 = StepRunner(tmp_path)
    assert r2.step("a", {"x": 1}, make("a")).skipped
    assert r2.step("b", {}, make("b"), depends=["a"]).skipped
    assert calls == ["a", "b"]
    # a changed parameter redoes the step and, through the dependency hash, its consumers
    r3 = StepRunner(tmp_path)
    assert not r3.step("a", {"x": 2}, make("a2")).skipped
    assert not r3.step("b", {}, make("b2"), depends=["a"]).skipped
    assert json.loads((tmp_path / "b" / "step.json").read_text())["result"] == {"tag": "b2"}
    # --force redoes one step by name
    r4 = StepRunner(tmp_path, force=("b",))
    assert r4.step("a", {"x": 2}, make("a3")).skipped
    assert not r4.step("b", {}, make("b3"), depends=["a"]).skipped


def test_interrupted_step_is_redone(tmp_path):
    def boom(d):
        (d / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StepRunner(tmp_path).step("a", {}, boom)
    rec = StepRunner(tmp_path).step("a", {}, lambda d: {"ok": True})
    assert not rec.skipped and not (rec.dir / "partial").exists()


def test_models_without_a_rule_are_reported_before_training(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "my_new_arch", "architectures": ["X"]}))
    bad = {**GOOD, "source": {"model": "./m"}, "target": {"build": {"arch": "no-such-family"}}}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_pipeline(p)
    msg = str(e.value)
    assert "my_new_arch" in msg and "rules init" in msg  # says how to draft the missing rule
    assert "no-such-family" in msg
    # without a transfer method no rule is needed
    p.write_text(yaml.safe_dump({**bad, "target": {"build": {"arch": "qwen3"}}, "methods": ["full"]}))
    assert load_pipeline(p).source.model == "./m"
