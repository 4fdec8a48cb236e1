"""One registry shape: the generic :class:`Registry`, and for every registry built on it, a plug-in
registered from user code that the library then uses end to end (tiny inputs)."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import trace_transfer.registry as registry_module
from trace_transfer.errors import ConfigError
from trace_transfer.registry import Registry


@pytest.fixture
def reg():
    r = Registry("widget", cli_hint="--widget", how_to_add="or register your own with register_widget")
    r.register("alpha", 1, description="the first", kind="greek")
    r.register("beta", 2)
    return r


# --------------------------------------------------------------------------------------------------
# The generic Registry
# --------------------------------------------------------------------------------------------------


def test_lookup_description_info_and_order(reg):
    assert reg.get("alpha") == 1 and reg.entry("alpha").info == {"kind": "greek"}
    assert reg.names() == ["alpha", "beta"] == list(reg) and len(reg) == 2 and "beta" in reg
    assert reg.describe() == {"alpha": "the first", "beta": "int([x]) -> integer"}  # falls back to the docstring
    assert reg.where(lambda e: e.info.get("kind") == "greek") == ["alpha"]


def test_duplicate_name_is_refused_unless_replace(reg):
    with pytest.raises(ConfigError, match="'alpha' is already registered; pick another name or pass replace=True"):
        reg.register("alpha", 3)
    assert reg.get("alpha") == 1
    reg.register("alpha", 3, replace=True)
    assert reg.get("alpha") == 3 and reg.names() == ["alpha", "beta"]  # replacing keeps the position


def test_unknown_name_suggests_the_closest_and_lists_all(reg):
    with pytest.raises(ConfigError) as e:
        reg.get("alpah")
    assert str(e.value) == ("unknown widget 'alpah' (--widget); did you mean 'alpha'? choose one of: alpha, beta; "
                            "or register your own with register_widget")
    assert "did you mean" not in reg.unknown("zzz") and "choose one of: alpha, beta" in reg.unknown("zzz")
    assert "(none registered)" in Registry("gadget").unknown("x")


@pytest.mark.parametrize("bad", ["Upper", "", "with space", "1st", None])
def test_malformed_names_are_refused(reg, bad):
    with pytest.raises(ConfigError, match="lower-case"):
        reg.register(bad, 0)


def test_decorator_validate_and_unregister():
    def must_be_callable(name, obj):
        if not callable(obj):
            raise ConfigError(f"{name}: not callable")

    r = Registry("hook", validate=must_be_callable)

    @r.register("double")
    def double(x):
        """Twice x."""
        return 2 * x

    assert r.get("double")(3) == 6 and r.describe() == {"double": "Twice x."}
    with pytest.raises(ConfigError, match="x: not callable"):
        r.register("x", 5)
    assert "x" not in r  # a refused object leaves no entry behind
    assert r.unregister("double") is double and len(r) == 0
    with pytest.raises(ConfigError, match="unknown hook 'double'"):
        r.unregister("double")


def test_module_docstring_example_runs():
    assert doctest.testmod(registry_module).failed == 0


# --------------------------------------------------------------------------------------------------
# Each registry: a user plug-in, used by the library
# --------------------------------------------------------------------------------------------------


def test_user_strategy_scores_end_to_end(tmp_path):
    from scoring.test_scoring import LAYER_NAMES, make_probe

    from trace_transfer.scoring import STRATEGIES, register_strategy, score

    @register_strategy("test-last-tensor", description="the last tensor scores highest")
    class LastTensor:
        min_tasks = 1

        def check(self, run):
            pass

        def unit_scores(self, run):
            return [{n: torch.full((run.layouts[n].num_units(run.shapes[n]),), float(i), dtype=torch.float64)
                     for i, n in enumerate(run.names)} for _ in run.probes]

    try:
        d, _ = make_probe(tmp_path, "math", 0)
        cs = score([d], "test-last-tensor", 0.1, tmp_path / "out", granularity="tensor")["math"]
        assert cs.names() == [LAYER_NAMES[-1]] and cs.metadata["strategy"] == "test-last-tensor"
        assert STRATEGIES.describe()["test-last-tensor"] == "the last tensor scores highest"
        with pytest.raises(ConfigError, match="lacks check, unit_scores"):
            register_strategy("test-broken")(type("Broken", (), {"min_tasks": 1}))
        with pytest.raises(ConfigError, match="did you mean 'test-last-tensor'"):
            score([d], "test-last-tensr", 0.05)
    finally:
        STRATEGIES.unregister("test-last-tensor")


def test_user_training_method_runs_end_to_end(tiny_llama, tmp_path):
    from trace_transfer.checkpoint import open_checkpoint
    from trace_transfer.train.loop import TrainConfig
    from trace_transfer.train.methods import METHODS, Prepared, RunPlan, Stage, register_method
    from trace_transfer.train.runner import run_sequence

    @register_method
    class HeadOnly:
        """Fine-tune the LM head alone."""

        name = "test-head-only"

        def check(self, stages, options):
            return []

        def plan(self, stages):
            return [RunPlan(index=i + 1, tasks=(i,)) for i in range(len(stages))]

        def examples(self, run, per_task, options, rng):
            return [ex for t in run.tasks for ex in per_task[t]]

        def prepare(self, model, run, ctx):
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith("lm_head"))
            return Prepared(model=model, info={"trainable": "lm_head"})

    try:
        cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=4, seq_len=32, warmup_ratio=0.0)
        res = run_sequence(tiny_llama, [Stage("synthetic:math?n_train=8&n_eval=2")], "test-head-only", tmp_path / "r",
                           cfg, eval_limit=2)
        before = dict(open_checkpoint(tiny_llama).iter_tensors())
        after = dict(open_checkpoint(res.out_dir / "stage_1").iter_tensors())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == {"lm_head.weight"}, changed
        assert METHODS.describe()["test-head-only"] == "Fine-tune the LM head alone."
    finally:
        METHODS.unregister("test-head-only")


def test_user_layer_mapper_maps_end_to_end():
    from trace_transfer.cka import map_layers, register_layer_mapper
    from trace_transfer.cka.layermap import LAYER_MAPPERS

    @register_layer_mapper("test-reverse", description="first to last")
    def reverse(sim):
        return sim.shape[1] - 1 - np.arange(sim.shape[0])

    try:
        assert map_layers(np.eye(3), method="test-reverse").forward == {0: 2, 1: 1, 2: 0}
        with pytest.raises(ConfigError, match="must be a function"):
            register_layer_mapper("test-not-fn", 3)
        with pytest.raises(ConfigError, match="or register your own with register_layer_mapper"):
            map_layers(np.eye(3), method="test-revrse")
    finally:
        LAYER_MAPPERS.unregister("test-reverse")


def test_user_merge_method_merges_end_to_end(tmp_path):
    from trace_transfer.checkpoint import open_checkpoint
    from trace_transfer.surgery.merge import MERGE_METHODS, merge_models, register_merge_method

    models = []
    for i in range(2):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": torch.full((3, 2), float(i + 1))}, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
        models.append(d)

    @register_merge_method("test-max", help="element-wise maximum")
    def elementwise_max(job, opts, stats):
        return torch.stack(job.tensors).amax(0)

    try:
        merge_models(models, tmp_path / "out", "test-max")
        assert torch.equal(open_checkpoint(tmp_path / "out").get("w"), torch.full((3, 2), 2.0))
        assert MERGE_METHODS.entry("test-max").info == {"coresets": "optional"}
    finally:
        MERGE_METHODS.unregister("test-max")


def test_user_metric_evaluates_end_to_end():
    from types import SimpleNamespace

    from trace_transfer.data import Example
    from trace_transfer.evaluation import EvalResult, evaluate, register_metric
    from trace_transfer.registry import METRICS

    @register_metric("test-count")
    def count(model, tokenizer, examples, *, batch_size, **options):
        return EvalResult(score=float(len(examples)), metric="test-count", n=len(examples))

    task = SimpleNamespace(name="t", spec=SimpleNamespace(metric="test-count", generation=None),
                           eval_examples=lambda limit=None: [Example("a", "b")] * 3)
    try:
        assert evaluate(None, None, task).score == 3.0  # the metric alone decides what it needs
    finally:
        METRICS.unregister("test-count")


# --------------------------------------------------------------------------------------------------
# The pipeline's method table
# --------------------------------------------------------------------------------------------------

TINY = {
    "source": {"build": {"arch": "llama", "layers": 2, "hidden": 32}},
    "target": {"build": {"arch": "qwen3", "layers": 3, "hidden": 48}},
    "tasks": ["synthetic:math", "synthetic:medical"],
}


class _PlanOnly:
    """A StepRunner that records the steps a pipeline plans and runs none of them."""

    def __init__(self, run_dir, force=(), on_event=None, **_ignored):  # families=, only=: StepRunner options
        from trace_transfer.pipeline.steps import StepRecord

        self._record = StepRecord
        self.run_dir = run_dir
        self.records = {}
        self.depends = {}
        self.say = on_event or (lambda msg: None)

    def selected(self, name):  # as under --only without the report: the plan is all we want
        return False

    def step(self, name, params, fn, depends=(), resumable=False):
        self.depends[name] = list(depends)
        self.records[name] = self._record(name, self.run_dir / name, "0", True, 0.0)
        return self.records[name]


def _plan(cfg, tmp_path, monkeypatch) -> dict[str, list[str]]:
    import trace_transfer.pipeline.run as run_module

    planned = {}

    def runner(*a, **kw):
        planned["r"] = _PlanOnly(*a, **kw)
        return planned["r"]

    monkeypatch.setattr(run_module, "StepRunner", runner)
    run_module.run_pipeline(cfg, tmp_path / "run")
    return planned["r"].depends


def test_pipeline_plans_steps_from_the_method_table(tmp_path, monkeypatch):
    from trace_transfer.pipeline.config import load_pipeline

    cfg = load_pipeline({**TINY, "methods": ["full", "trace-lf", "general-core"],
                         "training": {"lr": 1e-3, "lr_sweep": [1e-4]}})
    deps = _plan(cfg, tmp_path, monkeypatch)
    assert "cka" not in deps and not any(s.startswith("probe/source") for s in deps)  # nothing to transfer
    assert deps["cores/target-lf"] == ["probe/target/math", "probe/target/medical"]
    assert deps["finetune/trace-lf/seed0"] == ["models/target", "cores/target-lf"]
    assert deps["finetune/general-core/seed0"] == ["models/target", "cores/target-general"]
    assert "finetune/full@0.0001/seed0" in deps and "finetune/trace-lf@0.0001/seed0" not in deps  # lr_sweep: full only


def test_summary_compares_against_the_tables_baselines():
    from trace_transfer.pipeline.methods import PIPELINE_METHODS
    from trace_transfer.report.summary import summarise

    assert PIPELINE_METHODS.where(lambda e: e.obj.baseline) == ["full", "joint", "lora", "replay"]

    def run(aa):
        return {"tasks": ["a"], "R": [[0.0], [aa]], "metrics": {"aa": aa}}

    results = {"full": [run(0.2)], "mine": [run(0.5)], "trace-lf": [run(0.4)]}
    assert summarise(None, results)["best_baseline"] == "full"
    s = summarise(None, results, baselines=["mine"])  # e.g. a user method registered with baseline=True
    assert s["best_baseline"] == "mine" and s["methods"]["trace-lf"]["delta_vs_best_baseline"] == pytest.approx(-0.1)


def test_user_pipeline_method_is_planned_and_validated(tmp_path, monkeypatch):
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.pipeline.methods import PIPELINE_METHODS, register_pipeline_method

    register_pipeline_method("test-transfer-random", runner="trace", cores="transfer", strategy="random")
    register_pipeline_method("test-bad-refs", runner="no-such-runner", cores="target", strategy="no-such-strategy")
    try:
        deps = _plan(load_pipeline({**TINY, "methods": ["test-transfer-random"]}), tmp_path, monkeypatch)
        assert deps["cores/source-random"] == ["probe/source/math", "probe/source/medical"]
        # transfer reads the target model too: budgets are sized on it, and refine picks units on it
        assert set(deps["cores/transfer-random"]) == {"cores/source-random", "layermap", "models/target"}
        assert deps["finetune/test-transfer-random/seed0"] == ["models/target", "cores/transfer-random"]
        assert not any(s.startswith("probe/target") for s in deps)
        # every problem of the config's methods at once, before any work
        with pytest.raises(ConfigError) as e:
            load_pipeline({**TINY, "methods": ["test-bad-refs", "trace-cs", "ful"], "launch": {}})
        msg = str(e.value)
        assert "unknown method 'no-such-runner'" in msg and "unknown scoring strategy 'no-such-strategy'" in msg
        assert "trace-cs scores with 'cs', which needs at least 3 tasks" in msg
        assert "unknown pipeline method 'ful' (methods:); did you mean 'full'?" in msg
    finally:
        PIPELINE_METHODS.unregister("test-transfer-random")
        PIPELINE_METHODS.unregister("test-bad-refs")


def test_pipeline_method_entries_are_checked_when_registered():
    from trace_transfer.pipeline.methods import register_pipeline_method

    with pytest.raises(ConfigError, match="exactly when the method trains CoreSets"):
        register_pipeline_method("test-x", runner="trace", cores="target")
    with pytest.raises(ConfigError, match="needs `runner`"):
        register_pipeline_method("test-x")
    with pytest.raises(ConfigError, match="unknown field.*strategey"):
        register_pipeline_method("test-x", runner="full", strategey="lf")
    with pytest.raises(ConfigError, match="already registered"):
        register_pipeline_method("full", runner="full")
