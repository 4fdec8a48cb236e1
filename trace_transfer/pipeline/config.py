"""The declarative pipeline config (``trace-transfer run PIPELINE.yaml``).

Strict, frozen pydantic models: a misspelled key is an error naming the key and the valid ones, and
:func:`load_pipeline` reports *every* problem at once (schema, missing files, unknown methods, models
without a rule) before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trace_transfer.errors import ConfigError
from trace_transfer.pipeline.methods import method_problems, resolve


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSpec(_Strict):
    """Build a tiny model from a config instead of loading one (demo, tests)."""

    arch: str = Field(description="model family, e.g. llama, qwen3")
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    tokenizer: Literal["char", "bpe"] = "char"
    seed: int = 0


class PretrainSpec(_Strict):
    """Pretrain the built model on the base-skill mixture so there is something to forget."""

    task: str = "synthetic:general"
    steps: int = 2400
    batch_size: int = 32
    lr: float = 1e-3
    seq_len: int = 64


class ModelSpec(_Strict):
    model: str | None = Field(None, description="hub id or local directory")
    build: TinyModelSpec | None = None
    pretrain: PretrainSpec | None = None
    rules: str | None = Field(None, description="rule file for this model (default: found by model_type)")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.model is None) == (self.build is None):
            raise ValueError("give exactly one of 'model' (hub id / directory) or 'build' (a tiny model spec)")
        return self


class ProbeSpec(_Strict):
    max_steps: int = 0
    epochs: float = 1.0
    lr: float = 2e-5
    batch_size: int = 8
    seq_len: int = 1024
    fisher: Literal["batch", "per-sample"] = "batch"
    fisher_batches: int = Field(0, ge=0, description="mini-batches for the Fisher; 0 = one pass over the probe data")
    max_examples: int = Field(0, ge=0, description="probe on the first N training examples of each task; 0 = all "
                              "(cap it for large sets such as synthetic:general's 80k)")


class ScoringSpec(_Strict):
    ratio: float = Field(0.05, gt=0, le=1)
    granularity: Literal["tensor", "row", "column", "head", "element"] = "row"
    budget: Literal["tensors", "params"] = "params"
    alpha: float = 0.5
    beta: float = 0.5


class LayerMapSpec(_Strict):
    probes: str = "general"
    method: Literal["argmax", "monotone", "hungarian", "relative-depth"] = "monotone"
    variant: Literal["linear", "debiased", "rbf"] = "debiased"
    pooling: Literal["mean", "last"] = "mean"
    max_probes: int = 512
    bootstrap: int = 50


class TrainingSpec(_Strict):
    lr: float = 2e-5
    epochs: float = 3.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seq_len: int = 1024
    lr_sweep: list[float] = Field(default_factory=list, description="extra learning rates for `full`")
    replay_share: float = 0.1
    isolation: Literal["none", "strict"] = "none"


class LaunchSpec(_Strict):
    """How the target's fine-tuning steps run. With ``deepspeed`` set, each method x seed step is
    launched as ``torchrun --nproc_per_node N -m trace_transfer finetune --deepspeed CONFIG``; the
    rest of the pipeline runs in the calling process."""

    deepspeed: str | None = Field(None, description="DeepSpeed JSON config for target training")
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) per fine-tuning launch")


class EvalSpec(_Strict):
    limit: int | None = 200
    batch_size: int = 64


class PipelineConfig(_Strict):
    name: str = "run"
    source: ModelSpec
    target: ModelSpec
    tasks: list[str] = Field(min_length=1)
    general_task: str = "synthetic:general"
    probe: ProbeSpec = ProbeSpec()
    scoring: ScoringSpec = ScoringSpec()
    layer_map: LayerMapSpec = LayerMapSpec()
    training: TrainingSpec = TrainingSpec()
    launch: LaunchSpec = LaunchSpec()
    eval: EvalSpec = EvalSpec()
    methods: list[str] = Field(default_factory=lambda: ["full", "trace-lf", "transfer-lf"])
    seeds: list[int] = Field(default_factory=lambda: [0])


def _format_pydantic(err: ValidationError, path: Path | None, valid_by_loc: dict[tuple, list[str]]) -> list[str]:
    problems = []
    where = f"{path}: " if path else ""
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = tuple(e["loc"][:-1])
            valid = valid_by_loc.get(parent)
            hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
            problems.append(f"{where}unknown key '{loc}'{hint}")
        else:
            problems.append(f"{where}'{loc}': {e['msg']}")
    return problems


def _valid_keys(model: type[BaseModel], prefix: tuple = ()) -> dict[tuple, list[str]]:
    out = {prefix: list(model.model_fields)}
    for name, f in model.model_fields.items():
        ann = f.annotation
        for candidate in getattr(ann, "__args__", (ann,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out.update(_valid_keys(candidate, prefix + (name,)))
    return out


def load_pipeline(source: str | Path | dict[str, Any], base_dir: Path | None = None) -> PipelineConfig:
    """Parse and validate a pipeline config; raise one ConfigError listing every problem.

    Relative paths in the config are resolved against the config file's directory.
    """
    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"pipeline config not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        base_dir = base_dir or path.parent
    else:
        raw = dict(source)
    base_dir = base_dir or Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: top level must be a mapping of keys to values")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid pipeline config:", _format_pydantic(err, path, _valid_keys(PipelineConfig))) from None
    problems = semantic_problems(cfg, base_dir)
    if problems:
        raise ConfigError(f"invalid pipeline config{f' {path}' if path else ''}:", problems)
    return cfg


def semantic_problems(cfg: PipelineConfig, base_dir: Path) -> list[str]:
    """Checks beyond the schema: methods, files, tasks, rules. Collected, not raised one by one."""
    problems = []
    problems += method_problems(cfg.methods, num_tasks=len(cfg.tasks), deepspeed=bool(cfg.launch.deepspeed))
    for t in [*cfg.tasks, cfg.general_task]:
        if not t.startswith("synthetic:") and not (base_dir / t).exists() and not Path(t).exists():
            problems.append(f"tasks: task file {t!r} does not exist (relative to {base_dir})")
    for side in ("source", "target"):
        spec: ModelSpec = getattr(cfg, side)
        if spec.model and _looks_local(spec.model) and not _resolve(spec.model, base_dir).exists():
            problems.append(f"{side}.model: directory {spec.model!r} does not exist")
        if spec.rules and not _resolve(spec.rules, base_dir).exists():
            problems.append(f"{side}.rules: rule file {spec.rules!r} does not exist")
    if any(m.cores == "transfer" for _, m in resolve(cfg.methods)):
        for side in ("source", "target"):
            problems += _rule_problems(side, getattr(cfg, side), base_dir)
    if cfg.launch.nproc_per_node > 1 and not cfg.launch.deepspeed:
        problems.append("launch.nproc_per_node > 1 needs launch.deepspeed (a plain multi-process run would "
                        "train one copy per process)")
    if cfg.launch.deepspeed and not _resolve(cfg.launch.deepspeed, base_dir).exists():
        problems.append(f"launch.deepspeed: config {cfg.launch.deepspeed!r} does not exist")
    if cfg.layer_map.probes not in ("general", "math", "code", "medical") and not _resolve(
        cfg.layer_map.probes, base_dir
    ).exists() and not cfg.layer_map.probes.startswith("hf:"):
        problems.append(f"layer_map.probes: probe file {cfg.layer_map.probes!r} does not exist")
    return problems


def _rule_problems(side: str, spec: ModelSpec, base_dir: Path) -> list[str]:
    """Transfer maps tensors by role, so both models need a rule file; find out before any training."""
    from trace_transfer.errors import RuleError
    from trace_transfer.rules import find_rules

    if spec.build is not None:
        from trace_transfer.models import _resolve_arch

        try:
            _, arch = _resolve_arch(spec.build.arch)
        except ConfigError as exc:
            return [f"{side}.build.arch: {exc}"]
        config: dict[str, Any] = {"model_type": arch.model_type}
    else:
        local = _resolve(spec.model, base_dir)
        if not (local / "config.json").is_file():
            return []  # a hub id: its config is only known once downloaded; transfer checks it then
        import json

        config = json.loads((local / "config.json").read_text())
    rules = str(_resolve(spec.rules, base_dir)) if spec.rules else None
    if rules and not Path(rules).exists():
        return []  # reported above
    try:
        find_rules(config, rules)
    except RuleError as exc:
        return [f"{side}: {exc}"]
    return []


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") != 1


def _resolve(ref: str, base_dir: Path) -> Path:
    p = Path(ref).expanduser()
    return p if p.is_absolute() else base_dir / p
