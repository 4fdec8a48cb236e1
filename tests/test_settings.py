"""Each setting is declared once: the config dataclasses are the source; the pipeline spec and the click
options are generated from them or, where a section maps onto a function's keywords, checked equal
here. Plus the one error formatter every YAML shares (file:line, did-you-mean)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest

from trace_transfer.config import click_options, help_of, parse_yaml, validate_tree
from trace_transfer.errors import ConfigError
from trace_transfer.probe.config import FISHER_AT, FISHER_MODES, ProbeConfig
from trace_transfer.train.config import PRECISIONS, SCHEDULERS, MethodOptions, TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "trace_transfer"


def _option(command: click.Command, name: str) -> click.Option:
    for p in command.params:
        if p.name == name:
            return p
    raise AssertionError(f"{command.name} has no option for {name!r}")


def _choices(ann) -> tuple:
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
        return typing.get_args(args[0])
    assert typing.get_origin(ann) is typing.Literal, ann
    return typing.get_args(ann)


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


# --------------------------------------------------------------------------------------------------
# The dataclasses themselves
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TrainConfig, ProbeConfig])
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_probe_config_contains_a_train_config_instead_of_copying_it():
    probe_fields = {f.name for f in dataclasses.fields(ProbeConfig)}
    assert not probe_fields & {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = ProbeConfig.from_flat(lr=1e-3, max_steps=5, fisher="per-sample", seed=3)
    assert cfg == ProbeConfig(train=TrainConfig(lr=1e-3, max_steps=5, seed=3), fisher="per-sample")
    with pytest.raises(ConfigError) as err:  # both parts' problems at once
        ProbeConfig.from_flat(lr=0, scheduler="step", fisher="diag")
    assert len(err.value.problems) == 3 and "scheduler='step'" in str(err.value)
    assert tuple(FISHER_MODES) == dataclasses.fields(ProbeConfig)[1].metadata["choices"]


def test_settings_load_without_torch():
    code = ("import sys; import trace_transfer.config, trace_transfer.probe.config, trace_transfer.train.config; "
            "import trace_transfer.cli.probe; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------------
# Pipeline spec == dataclasses (generated) and == library functions (checked)
# --------------------------------------------------------------------------------------------------


def test_pipeline_probe_and_training_sections_are_the_dataclass_fields():
    from trace_transfer.pipeline.config import ProbeSpec, TrainingSpec
    from trace_transfer.train.methods import MethodOptions

    sources = {n: c for c in (TrainConfig, ProbeConfig, MethodOptions) for n in (f.name for f in dataclasses.fields(c))}
    deliberate = {("TrainingSpec", "epochs"): 3.0}  # a fine-tuning stage runs 3 epochs, the probe 1
    for spec in (ProbeSpec, TrainingSpec):
        for name, info in spec.model_fields.items():
            if name == "lr_sweep":  # a pipeline-only setting: several `full` runs
                continue
            f = next(x for x in dataclasses.fields(sources[name]) if x.name == name)
            assert info.description == f.metadata["help"], (spec.__name__, name)
            assert info.default == deliberate.get((spec.__name__, name), _default(f)), (spec.__name__, name)
            if "choices" in f.metadata:
                assert _choices(info.annotation) == tuple(f.metadata["choices"]), name
    assert _choices(TrainingSpec.model_fields["precision"].annotation) == PRECISIONS


def test_pipeline_scoring_section_matches_score():
    from trace_transfer.pipeline.config import ScoringSpec
    from trace_transfer.scoring import BUDGETS, GRANULARITIES, PRESETS, score

    params = inspect.signature(score).parameters
    assert set(ScoringSpec.model_fields) - {"ratio"} <= set(params), "every scoring key is a score() keyword"
    assert ScoringSpec.model_fields["ratio"].default == params["ratio"].default
    assert _choices(ScoringSpec.model_fields["granularity"].annotation) == tuple(GRANULARITIES)
    assert _choices(ScoringSpec.model_fields["budget"].annotation) == tuple(BUDGETS)
    assert _choices(ScoringSpec.model_fields["preset"].annotation) == tuple(PRESETS)
    # Unset keys are not passed, so score() (or its preset) decides: the spec's defaults only document them.
    assert ScoringSpec().score_options() == {}
    assert ScoringSpec(preset="paper", scope=None).score_options() == {"preset": "paper"}
    with pytest.raises(ValueError, match="fixes granularity"):
        ScoringSpec(preset="paper", granularity="row")


def test_pipeline_layer_map_section_matches_cka():
    from trace_transfer.cka import POOLINGS, VARIANTS, available_layer_mappers, compute_cka, map_layers, resolve_variant
    from trace_transfer.pipeline.config import LayerMapSpec

    for v in VARIANTS:  # rbf-debiased included: the spec imports the variants, it does not list them
        assert LayerMapSpec(variant=v).variant == v
    with pytest.raises(ValueError, match="rbf-debiased"):
        LayerMapSpec(variant="cosine")
    for m in available_layer_mappers():
        LayerMapSpec(method=m)
    assert _choices(LayerMapSpec.model_fields["pooling"].annotation) == tuple(POOLINGS)
    cka_params, map_params = inspect.signature(compute_cka).parameters, inspect.signature(map_layers).parameters
    assert resolve_variant(LayerMapSpec().variant)[0] == cka_params["variant"].default
    assert LayerMapSpec().pooling == cka_params["pooling"].default
    assert LayerMapSpec().method == map_params["method"].default


def test_pipeline_model_sections_match_their_functions():
    from trace_transfer.models import build_tiny_model
    from trace_transfer.pipeline.config import PretrainSpec, TinyModelSpec
    from trace_transfer.train.pretrain import pretrain

    for spec, fn in ((TinyModelSpec, build_tiny_model), (PretrainSpec, pretrain)):
        params = inspect.signature(fn).parameters
        for name, info in spec.model_fields.items():
            assert name in params, (spec.__name__, name)
            if params[name].default is not inspect.Parameter.empty:
                assert info.default == params[name].default, (spec.__name__, name)


# --------------------------------------------------------------------------------------------------
# Click options == dataclasses
# --------------------------------------------------------------------------------------------------

# (command, dataclass, fields, deliberate default differences)
_CLI = [
    ("probe", TrainConfig, ["epochs", "max_steps", "lr", "batch_size", "seq_len", "precision", "seed"], {}),
    ("probe", ProbeConfig, ["fisher", "fisher_at", "fisher_batches", "fisher_elements", "max_examples", "device"], {}),
    ("finetune", TrainConfig, ["epochs", "max_steps", "lr", "batch_size", "grad_accum", "seq_len", "weight_decay",
                               "scheduler", "warmup_ratio", "precision", "seed"], {"epochs": 3.0}),
    ("cpi-ft", TrainConfig, ["epochs", "max_steps", "lr", "batch_size", "grad_accum", "seq_len", "weight_decay",
                             "scheduler", "warmup_ratio", "precision", "seed"], {"epochs": 3.0}),
    ("finetune", MethodOptions, ["lisa_layers", "lisa_interval"], {}),
]


@pytest.mark.parametrize("command,cls,names,deliberate", _CLI, ids=[f"{c[0]}-{c[1].__name__}" for c in _CLI])
def test_click_options_match_the_dataclass(command, cls, names, deliberate):
    from trace_transfer.cli import main

    cmd = main.commands[command]
    for name in names:
        f = next(x for x in dataclasses.fields(cls) if x.name == name)
        opt = _option(cmd, name)
        assert opt.default == deliberate.get(name, _default(f)), (command, name)
        if "choices" in f.metadata:
            assert tuple(opt.type.choices) == tuple(f.metadata["choices"]), (command, name)
    generated = {name for name in names if (_option(cmd, name).help or "").rstrip(".") == help_of(cls, name).rstrip(".")}
    # Options with command-specific wording (cpi-ft's "Step 1: ...", finetune's "Stage k uses seed + k")
    # keep their own help; everything else is generated from the dataclass.
    assert generated >= set(names) - {"epochs", "max_steps", "lr", "seed"}, set(names) - generated


def _function(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# Commands that are one library call: every option named like a keyword of the call has its default.
_CALLS = [("score", "trace_transfer.scoring.score"), ("cka", "trace_transfer.cka.compute_cka"),
          ("map-layers", "trace_transfer.cka.map_layers"), ("pretrain", "trace_transfer.train.pretrain.pretrain"),
          ("tiny-model", "trace_transfer.models.build_tiny_model")]


@pytest.mark.parametrize("command,function", _CALLS, ids=[c for c, _ in _CALLS])
def test_click_options_match_the_library_call(command, function):
    from trace_transfer.cli import main

    params = inspect.signature(_function(function)).parameters
    shared = [o for o in main.commands[command].params
              if isinstance(o, click.Option) and o.name in params and not o.required and not o.is_flag]
    assert len(shared) >= 3, [o.name for o in shared]
    for opt in shared:
        default = params[opt.name].default
        if default is not inspect.Parameter.empty:
            assert opt.default == default, (command, opt.name, opt.default, default)


def test_cli_choices_are_the_library_constants():
    from trace_transfer.cka import POOLINGS, VARIANTS
    from trace_transfer.cli import main
    from trace_transfer.scoring import BUDGETS, GRANULARITIES, PRESETS

    expect = {("score", "granularity"): GRANULARITIES, ("score", "budget"): BUDGETS, ("score", "preset"): PRESETS,
              ("cka", "variant"): VARIANTS, ("cka", "pooling"): POOLINGS}
    for (command, name), values in expect.items():
        assert tuple(_option(main.commands[command], name).type.choices) == tuple(values), (command, name)


def test_finetune_method_options_match():
    from trace_transfer.cli import main
    from trace_transfer.train.methods import MethodOptions

    cmd = main.commands["finetune"]
    for name in ("isolation", "replay_share", "lora_r", "lora_alpha"):
        f = next(x for x in dataclasses.fields(MethodOptions) if x.name == name)
        assert _option(cmd, name).default == f.default, name
    assert tuple(_option(cmd, "isolation").type.choices) == _field_meta(MethodOptions, "isolation")["choices"]


def _field_meta(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata


def test_click_options_generator():
    @click.command()
    @click_options(ProbeConfig, ["fisher", "fisher_elements", "fisher_batches"])
    def cmd(fisher, fisher_elements, fisher_batches):
        click.echo(f"{fisher} {fisher_elements} {fisher_batches}")

    from click.testing import CliRunner

    assert [p.name for p in cmd.params] == ["fisher", "fisher_elements", "fisher_batches"]
    assert CliRunner().invoke(cmd, []).output.strip() == "batch True 0"
    res = CliRunner().invoke(cmd, ["--fisher", "per-sample", "--no-fisher-elements", "--fisher-batches", "4"])
    assert res.output.strip() == "per-sample False 4"
    assert CliRunner().invoke(cmd, ["--fisher", "diag"]).exit_code == 2
    assert tuple(_option(cmd, "fisher").type.choices) == tuple(FISHER_MODES) and FISHER_AT == ("probe", "base")
    assert SCHEDULERS == tuple(_field_meta(TrainConfig, "scheduler")["choices"])


# --------------------------------------------------------------------------------------------------
# One error formatter: file:line and did-you-mean for every YAML
# --------------------------------------------------------------------------------------------------

_PIPELINE = """\
name: typo
source: {build: {arch: llama}}
target: {build: {arch: qwen3}}
tasks: [synthetic:math]
scoring:
  ratio: 0.1
  granularty: row
training:
  lr: fast
"""


def test_pipeline_yaml_errors_name_file_line_and_the_closest_key(tmp_path):
    from trace_transfer.pipeline.config import load_pipeline

    p = tmp_path / "pipe.yaml"
    p.write_text(_PIPELINE)
    with pytest.raises(ConfigError) as err:
        load_pipeline(p)
    msg = str(err.value)
    assert f"{p}:7: scoring: unknown key 'granularty'; did you mean 'granularity'? Valid keys: ratio, granularity" in msg
    assert f"{p}:9: training.lr: Input should be a valid number" in msg and "(got 'fast')" in msg
    assert len(err.value.problems) == 2  # all at once


def test_pipeline_semantic_problems_and_duplicates_have_lines_too(tmp_path):
    from trace_transfer.pipeline.config import load_pipeline

    p = tmp_path / "pipe.yaml"
    p.write_text(_PIPELINE.replace("  granularty: row\n", "").replace("lr: fast", "lr: 0.1")
                 + "methods: [full, magic]\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(p)
    assert f"{p}:9: methods: unknown pipeline method 'magic'" in str(err.value)
    p.write_text(_PIPELINE.replace("  granularty: row\n", "  ratio: 0.2\n").replace("lr: fast", "lr: 0.1"))
    with pytest.raises(ConfigError, match=r"pipe.yaml:7: duplicate key 'ratio'"):
        load_pipeline(p)


def test_a_misspelled_method_is_reported_with_schema_problems(tmp_path):
    from trace_transfer.pipeline.config import load_pipeline

    p = tmp_path / "pipe.yaml"
    p.write_text(_PIPELINE + "methods: [full, fulll]\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(p)
    assert len(err.value.problems) == 3 and f"{p}:10: methods: unknown pipeline method 'fulll'" in str(err.value)
    assert "did you mean 'full'" in str(err.value)


def test_task_yaml_errors_name_file_line_and_the_closest_key(tmp_path):
    from trace_transfer.data import load_task

    p = tmp_path / "task.yaml"
    p.write_text("name: t\ndata: {path: rows.jsonl}\nfields:\n  prompt: q\n  reponse: a\nmetric: exact_match\n"
                 "max_eval_sample: 10\n")
    with pytest.raises(ConfigError) as err:
        load_task(p)
    msg = str(err.value)
    assert f"{p}:5: fields: unknown key 'reponse'; did you mean 'response'? Valid keys: prompt, response" in msg
    assert f"{p}:7: <top>: unknown key 'max_eval_sample'; did you mean 'max_eval_samples'?" in msg


def test_formatter_without_a_file():
    from trace_transfer.pipeline.config import ScoringSpec

    with pytest.raises(ConfigError) as err:
        validate_tree(ScoringSpec, {"ration": 0.1}, what="scoring section")
    assert str(err.value).splitlines()[1] == ("  - <top>: unknown key 'ration'; did you mean 'ratio'? Valid keys: "
                                              + ", ".join(ScoringSpec.model_fields))
    tree, problems = parse_yaml("a: 1\nb:\n  - x\n  - y\n", "mem.yaml")
    assert tree == {"a": 1, "b": ["x", "y"]} and problems == []
    with pytest.raises(ConfigError, match=r"mem.yaml:2: not valid YAML"):
        parse_yaml("a: [1\nb: 2\n", "mem.yaml")


# --------------------------------------------------------------------------------------------------
# Constants are imported, never mirrored
# --------------------------------------------------------------------------------------------------


def test_no_mirrored_constants_in_the_package():
    """The CoreSet suffix is written once (coreset.SUFFIX); no `# mirrors X` copies."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "# mirrors" in text:
            offenders.append(f"{path}: '# mirrors' copy")
        tree = ast.parse(text)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and node.value.endswith(".coreset.safetensors") and " " not in node.value
                    and path.name != "format.py"):  # a file-name literal, not prose in a message
                offenders.append(f"{path}:{node.lineno}: {node.value!r}; use trace_transfer.coreset.SUFFIX")
    assert not offenders, "\n".join(offenders)
