"""The declarative pipeline config (``trace-transfer run PIPELINE.yaml``).

Strict, frozen pydantic models (:class:`trace_transfer.config.StrictModel`): a misspelled key is an
error naming its ``file:line``, the closest valid key and all valid ones, and :func:`load_pipeline`
reports *every* problem at once (schema, missing files, unknown methods, models without a rule)
before any work starts.

Each setting is declared once. The probe and training sections are generated from the library's
config dataclasses (:class:`~trace_transfer.probe.ProbeConfig`,
:class:`~trace_transfer.train.config.TrainConfig`), so their types, defaults, choices, bounds and help
are those of the library; choices of the other sections are the library's constants and registries,
imported, never copied. ``tests/test_settings.py`` checks the sections that map onto a function's
keyword arguments instead of a dataclass (scoring, layer map, pretraining, tiny models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trace_transfer.cka import POOLINGS, available_layer_mappers, resolve_variant
from trace_transfer.config import StrictModel, help_of, located, read_yaml, spec_model, validate_tree
from trace_transfer.devices import DTYPES, DeviceConfig
from trace_transfer.errors import ConfigError
from trace_transfer.refine.config import RefineConfig
from trace_transfer.pipeline.methods import method_problems, resolve
from trace_transfer.probe.config import ProbeConfig
from trace_transfer.scoring import BUDGETS, GRANULARITIES, PRESETS
from trace_transfer.train.config import MethodOptions, TrainConfig


class TinyModelSpec(StrictModel):
    """Build a tiny model from a config instead of loading one (demo, tests):
    ``trace_transfer.models.build_tiny_model``, the same defaults."""

    arch: str = Field(description="model family, e.g. llama, qwen3")
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    tokenizer: Literal["char", "bpe"] = "char"
    seed: int = 0


class PretrainSpec(StrictModel):
    """Pretrain the built model on the base-skill mixture so there is something to forget
    (``trace_transfer.train.pretrain.pretrain``; the same defaults)."""

    task: str = "synthetic:general"
    steps: int = 2400
    batch_size: int = 32
    lr: float = 1e-3
    seq_len: int = 48


class ModelSpec(StrictModel):
    model: str | None = Field(None, description="hub id or local directory")
    build: TinyModelSpec | None = None
    pretrain: PretrainSpec | None = None
    rules: str | None = Field(None, description="rule file for this model (default: found by model_type)")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.model is None) == (self.build is None):
            raise ValueError("give exactly one of 'model' (hub id / directory) or 'build' (a tiny model spec)")
        return self


# The keys (and so the step hashes of existing runs) stay those the pipeline always had; only where
# they are declared moved. gradient_checkpointing is TrainConfig.execution_only(): how a probe runs, not
# what it computes, so probe_hash_params leaves it out of every step hash that holds the probe section.
ProbeSpec = spec_model("ProbeSpec", [
    (TrainConfig, ["max_steps", "epochs", "lr", "batch_size", "seq_len"]),
    (ProbeConfig, ["fisher", "fisher_batches", "max_examples"]),
    (TrainConfig, ["gradient_checkpointing"]),
], doc="The warm-start probe of every task (``ProbeConfig``; its ``train`` part flattened).")


def probe_hash_params(probe: Any) -> dict[str, Any]:
    """The ``probe:`` section as step hashes hold it: without the execution-only keys (checkpointing),
    so switching one reruns nothing and runs from before the key keep their hashes."""
    return probe.model_dump(exclude=TrainConfig.execution_only())


class ScoringSpec(StrictModel):
    """Core-set selection (``trace_transfer.scoring.score``); unset keys take ``score``'s defaults."""

    ratio: float = Field(0.05, gt=0, le=1, description="share of the budget to select, in (0, 1]")
    granularity: Literal[GRANULARITIES] = Field("row", description="unit of selection")  # type: ignore[valid-type]
    budget: Literal[BUDGETS] = Field("params", description="what ratio counts: units (tensors) or parameters")  # type: ignore[valid-type]
    preset: Literal[PRESETS] | None = Field(None, description="paper = the official TRACE code's settings (fixes "  # type: ignore[valid-type]
                                            "granularity, budget, scope, alpha, beta)")
    scope: str | None = Field(None, description="groups that compete, e.g. 'layers,embeddings' or 'all' "
                                                "(default: layers)")
    alpha: float = Field(0.5, description="LF weight of the L2 term")
    beta: float = Field(0.5, description="LF weight of the Fisher term")

    @model_validator(mode="after")
    def _preset_fixes_options(self) -> ScoringSpec:
        fixed = sorted(k for k in self.model_fields_set & {"granularity", "budget", "scope", "alpha", "beta"}
                       if getattr(self, k) is not None)
        if self.preset is not None and fixed:
            raise ValueError(f"preset {self.preset!r} fixes {', '.join(fixed)}; drop them or the preset")
        return self

    def score_options(self) -> dict[str, Any]:
        """Keyword arguments for ``score`` beyond the ratio: only what the config sets, so ``score``
        (or the preset) decides the rest."""
        return self.model_dump(include=self.model_fields_set - {"ratio"}, exclude_none=True)


class LayerMapSpec(StrictModel):
    """CKA between source and target layers and the layer map built from it."""

    probes: str = Field("general", description="shipped probe set (general, math, code, medical), a file, or hf:<id>")
    method: str = Field("monotone", description="layer mapper (trace_transfer.cka.available_layer_mappers())")
    variant: str = Field("debiased", description="CKA variant (trace_transfer.cka.VARIANTS) or an alias "
                                                 "such as debiased = linear-debiased")
    pooling: Literal[POOLINGS] = Field("mean", description="how a probe text's tokens pool into one vector")  # type: ignore[valid-type]
    max_probes: int = Field(512, ge=1, description="probe texts used")
    bootstrap: int = Field(50, ge=0, description="probe resamples for each row's stability; 0 = skip")
    fallback: Literal["relative-depth", "none"] = Field(
        "relative-depth", description="map to use when the CKA is not informative (layer_map.json's verdict): "
                                      "relative-depth, or none to keep the CKA map anyway")

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, v: str) -> str:
        resolve_variant(v)  # raises naming the variants and aliases; the value stays as written
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        known = available_layer_mappers()
        if v not in known:
            raise ValueError(f"unknown layer mapper {v!r}; choose one of {', '.join(known)}")
        return v


RefineSpec = spec_model("RefineSpec", [(RefineConfig, ["signal", "batches", "steps"])],
                        doc="The cheap target pass that picks units inside transferred budgets (transfer-lf/cs) "
                            "or globally (cheap-lf); lr, batch size and sequence length are the probe's.")


TrainingSpec = spec_model("TrainingSpec", [
    (TrainConfig, ["lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
                   "precision", "seq_len", "gradient_checkpointing"]),
    (MethodOptions, ["replay_share", "isolation", "lisa_layers", "lisa_interval"]),
], defaults={"epochs": 3.0},  # fine-tuning a stage, not a 1-epoch warm-start probe
    extra={"lr_sweep": (list[float], Field(default_factory=list, description="extra learning rates for `full`"))},
    doc="Fine-tuning of every method x seed on the target (``TrainConfig`` and ``MethodOptions``).")


_DEVICE_DEFAULTS = DeviceConfig()


class LaunchSpec(StrictModel):
    """Where and how the steps run. ``device``/``dtype`` apply to every step that runs a model (the
    ``--device``/``--dtype`` of the commands, declared once in :class:`~trace_transfer.devices.DeviceConfig`).
    With ``deepspeed`` set, each method x seed step is launched as
    ``torchrun --nproc_per_node N -m trace_transfer finetune --deepspeed CONFIG``, and each probe as
    ``... probe --deepspeed CONFIG`` (``probe.batch_size`` split over the ranks); the rest of the
    pipeline runs in the calling process. ``deepspeed_overrides`` gives some of those launches their own
    CONFIG (optimizer offload for the methods that train every parameter, say), by method or probe side. Across nodes (``nnodes`` > 1 with ``rdzv_endpoint``, or a
    DeepSpeed ``hostfile``) the launches are the cluster's to start: ``trace-transfer run CONFIG --dry-run``
    prints them (see ``examples/slurm``)."""

    deepspeed: str | None = Field(None, description="DeepSpeed JSON config for target training")
    deepspeed_overrides: dict[str, str] = Field(default_factory=dict, description=(
        "a DeepSpeed JSON config per step kind, instead of launch.deepspeed for those steps: keys are methods of "
        "this config (full, joint, replay, cpi-ft, trace-lf, ...) or probe (every launched probe), probe/source, "
        "probe/target (one side's probes, before probe; probe/target also sets the launched refine passes); "
        "e.g. {full: ds_zero3_offload.json} gives optimizer "
        "offload to the methods that train every parameter only"))
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) per fine-tuning launch")
    device: str = Field(_DEVICE_DEFAULTS.device, pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description=help_of(DeviceConfig, "device"))
    dtype: Literal[DTYPES] = Field(_DEVICE_DEFAULTS.dtype, description=help_of(DeviceConfig, "dtype"))  # type: ignore[valid-type]
    nnodes: int = Field(1, ge=1, description="nodes per fine-tuning launch (torchrun --nnodes)")
    node_rank: int | None = Field(None, ge=0, description="this node's rank (torchrun --node_rank); unset: the "
                                                           "dry-run prints $NODE_RANK for the cluster script to fill")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (torchrun --rdzv_endpoint); "
                                                        "needed with nnodes > 1")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile ('host slots=N' per line): launch with the "
                                                   "deepspeed launcher across its hosts instead of torchrun")

    def multi_node(self) -> bool:
        """True when a launch spans several nodes: the cluster starts it, not the pipeline."""
        return self.nnodes > 1 or self.hostfile is not None

    def deepspeed_for(self, *keys: str) -> str | None:
        """The DeepSpeed config a launched step runs with, as written: that of the first of ``keys`` (a
        method name; ``probe/<side>``, then ``probe``, for a probe: ``launch.probe_override_keys``) that
        ``deepspeed_overrides`` names, else ``deepspeed``."""
        return next((self.deepspeed_overrides[k] for k in keys if k in self.deepspeed_overrides), self.deepspeed)

    def step_params(self, *keys: str) -> dict[str, Any]:
        """The keys that decide a launched step's result (its hash), ``keys`` naming the step as for
        :meth:`deepspeed_for`: the DeepSpeed config it runs with and the processes. Where it ran does not
        count, and the overrides of other steps are not in it, so every step without an override keeps the
        hash it always had."""
        return {**self.model_dump(include={"deepspeed", "nproc_per_node"}), "deepspeed": self.deepspeed_for(*keys)}

    def deepspeed_configs(self) -> dict[str, str]:
        """Every DeepSpeed config a launch may use, by the key that sets it (``deepspeed`` first)."""
        return {**({"deepspeed": self.deepspeed} if self.deepspeed else {}),
                **{f"deepspeed_overrides.{k}": v for k, v in self.deepspeed_overrides.items()}}


class EvalSpec(StrictModel):
    """The evaluation after every stage of every fine-tuning step (``finetune --eval-limit/--eval-batch-size/
    --eval-backend``). Its weights load in ``launch.dtype``."""

    limit: int | None = Field(200, description="evaluation examples per task; null = all")
    batch_size: int = Field(64, ge=1, description="examples per evaluation batch")
    backend: Literal["hf", "vllm"] = Field("hf", description=(
        "generation backend of the finetune steps' evaluation: hf | vllm (optional, pip install vllm; reads each "
        "stage's checkpoint; not under launch.deepspeed; the cpi-ft method evaluates with hf)"))

    def step_params(self) -> dict[str, Any]:
        """The keys in a fine-tuning step's hash: the backend is left out, as ``launch`` leaves out device
        and dtype (how a step is scored, not what it trains), so existing step hashes stay what they were."""
        return self.model_dump(exclude={"backend"})

    def problems(self, launch: LaunchSpec) -> list[str]:
        """Why this evaluation cannot run under ``launch`` (``run --check``): vLLM absent, or under DeepSpeed."""
        if self.backend == "hf":
            return []
        from trace_transfer.evaluation.vllm_backend import check_backend

        try:
            check_backend(self.backend, distributed=bool(launch.deepspeed))
        except ConfigError as exc:
            return [f"eval.backend: {exc}"]
        return []


class PipelineConfig(StrictModel):
    name: str = "run"
    source: ModelSpec
    target: ModelSpec
    tasks: list[str] = Field(min_length=1)
    general_task: str = "synthetic:general"
    probe: ProbeSpec = ProbeSpec()  # type: ignore[valid-type]
    scoring: ScoringSpec = ScoringSpec()
    layer_map: LayerMapSpec = LayerMapSpec()
    refine: RefineSpec = RefineSpec()  # type: ignore[valid-type]
    training: TrainingSpec = TrainingSpec()  # type: ignore[valid-type]
    launch: LaunchSpec = LaunchSpec()
    eval: EvalSpec = EvalSpec()
    methods: list[str] = Field(default_factory=lambda: ["full", "trace-lf", "transfer-lf"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    monitor: list[str] = Field(default_factory=list, description=(
        "tasks evaluated after every stage of every fine-tuning step but never trained (finetune --monitor): "
        "synthetic:general, a task YAML, lm-eval:<task> or lm-eval:<task.yaml>; reported apart from R "
        "(the cpi-ft method evaluates none yet)"))


def load_pipeline(source: str | Path | dict[str, Any], base_dir: Path | None = None) -> PipelineConfig:
    """Parse and validate a pipeline config; raise one ConfigError listing every problem.

    Relative paths in the config are resolved against the config file's directory. Problems in a
    file name its ``file:line``.
    """
    path, problems = None, []
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"pipeline config not found: {path}")
        raw, problems = read_yaml(path)
        base_dir = base_dir or path.parent
    else:
        raw = dict(source)
    base_dir = base_dir or Path.cwd()
    try:
        cfg = validate_tree(PipelineConfig, raw, path, what="pipeline config", problems=problems)
    except ConfigError as exc:
        # The other checks need a valid config; the methods list rarely depends on the rest, so one run
        # still names a misspelled method next to a misspelled key.
        more = ([located(p, raw, path) for p in [*_raw_method_problems(raw), *_raw_file_problems(raw, base_dir)]]
                if isinstance(raw, dict) else [])
        more = [p for p in more if p not in exc.problems]
        if not more:
            raise
        problems = [*exc.problems, *more]
        raise ConfigError(f"invalid pipeline config{f' {path}' if path else ''} ({len(problems)} problem(s)):",
                          problems) from None
    semantic = [located(p, raw, path) for p in semantic_problems(cfg, base_dir)]
    if semantic:
        raise ConfigError(f"invalid pipeline config{f' {path}' if path else ''}:", semantic)
    return cfg


def _raw_method_problems(raw: dict[str, Any]) -> list[str]:
    methods, tasks, launch = raw.get("methods"), raw.get("tasks"), raw.get("launch")
    if not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
        return []
    return method_problems(methods, num_tasks=len(tasks) if isinstance(tasks, list) else 10**9,
                           deepspeed=bool(launch.get("deepspeed")) if isinstance(launch, dict) else False)


def _raw_file_problems(raw: dict[str, Any], base_dir: Path) -> list[str]:
    """The file checks of :func:`semantic_problems` that need no valid config: missing task files and
    model directories are reported next to schema errors, not only after those are fixed."""
    problems = []
    tasks = raw.get("tasks")
    for t in tasks if isinstance(tasks, list) else []:
        if isinstance(t, str) and not t.startswith("synthetic:") and not (base_dir / t).exists() and not Path(t).exists():
            problems.append(f"tasks: task file {t!r} does not exist (relative to {base_dir})")
    monitor = raw.get("monitor")
    if isinstance(monitor, list) and all(isinstance(m, str) for m in monitor):
        problems += monitor_problems(monitor, base_dir)
    for side in ("source", "target"):
        spec = raw.get(side)
        model = spec.get("model") if isinstance(spec, dict) else None
        if isinstance(model, str) and _looks_local(model) and not _resolve(model, base_dir).exists():
            problems.append(f"{side}.model: directory {model!r} does not exist")
    return problems


def semantic_problems(cfg: PipelineConfig, base_dir: Path) -> list[str]:
    """Checks beyond the schema: methods, files, tasks, rules. Collected, not raised one by one."""
    problems = []
    problems += method_problems(cfg.methods, num_tasks=len(cfg.tasks), deepspeed=bool(cfg.launch.deepspeed))
    for t in [*cfg.tasks, cfg.general_task]:
        if not t.startswith("synthetic:") and not (base_dir / t).exists() and not Path(t).exists():
            problems.append(f"tasks: task file {t!r} does not exist (relative to {base_dir})")
    problems += monitor_problems(cfg.monitor, base_dir)
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
    problems += _override_problems(cfg, base_dir)
    problems += _multi_node_problems(cfg.launch, base_dir)
    from trace_transfer.pipeline.launch import (  # builds on these specs
        finetune_launch_problems, probe_launch_problems, refine_launch_problems)

    problems += probe_launch_problems(cfg, base_dir)
    problems += [p for p in refine_launch_problems(cfg, base_dir) if p.split(":")[0] not in {
        q.split(":")[0] for q in problems}]  # one line per key: the probes' batch refusal covers refine's
    problems += finetune_launch_problems(cfg, base_dir)
    problems += cfg.eval.problems(cfg.launch)
    if cfg.layer_map.probes not in ("general", "math", "code", "medical") and not _resolve(
        cfg.layer_map.probes, base_dir
    ).exists() and not cfg.layer_map.probes.startswith("hf:"):
        problems.append(f"layer_map.probes: probe file {cfg.layer_map.probes!r} does not exist")
    return problems


def monitor_file(ref: str) -> str | None:
    """The file a ``monitor:`` entry names, if any: a task YAML, or the YAML inside ``lm-eval:<file>?...``
    (an lm-eval task name such as ``lm-eval:gsm8k`` and ``synthetic:`` tasks name none)."""
    if ref.startswith("synthetic:"):
        return None
    if ref.startswith("lm-eval:"):
        body = ref[len("lm-eval:"):].partition("?")[0]
        return body if body.endswith((".yaml", ".yml")) else None
    return ref


def resolve_monitor(ref: str, base_dir: Path) -> str:
    """A ``monitor:`` entry with its file made relative to the config's directory (as tasks are), when
    it exists there; otherwise as written."""
    file = monitor_file(ref)
    if file is None or Path(file).is_absolute() or not (base_dir / file).exists():
        return ref
    return ref.replace(file, str(base_dir / file), 1)


def monitor_problems(monitor: list[str], base_dir: Path) -> list[str]:
    """Monitored tasks whose file is missing (relative to the config's directory or the working one)."""
    problems = []
    for i, ref in enumerate(monitor):
        file = monitor_file(ref)
        if file and not (base_dir / file).exists() and not Path(file).exists():
            problems.append(f"monitor.{i}: task file {file!r} does not exist (relative to {base_dir})")
    return problems


def _override_problems(cfg: PipelineConfig, base_dir: Path) -> list[str]:
    """``launch.deepspeed_overrides``: only beside ``launch.deepspeed`` (it swaps the config of steps that
    are launched), keyed by this config's methods or the probe keys, naming files that exist."""
    from trace_transfer.pipeline.launch import PROBE_OVERRIDE, probe_override_keys  # builds on these specs

    overrides = cfg.launch.deepspeed_overrides
    if not overrides:
        return []
    problems = []
    if not cfg.launch.deepspeed:
        problems.append("launch.deepspeed_overrides: needs launch.deepspeed (the overrides replace it for some "
                        "steps; without it no step is launched); set launch.deepspeed or drop the overrides")
    valid = [*cfg.methods, PROBE_OVERRIDE, *probe_override_keys("source")[:1], *probe_override_keys("target")[:1]]
    for key, file in overrides.items():
        if key not in valid:
            problems.append(f"launch.deepspeed_overrides.{key}: {key!r} is neither a method of this config nor a "
                            f"probe key; valid keys: {', '.join(valid)}")
        if not _resolve(file, base_dir).exists():
            problems.append(f"launch.deepspeed_overrides.{key}: config {file!r} does not exist (relative to {base_dir})")
    return problems


def _multi_node_problems(launch: LaunchSpec, base_dir: Path) -> list[str]:
    """A multi-node launch needs DeepSpeed, one rendezvous, and a hostfile that exists."""
    problems = []
    if launch.multi_node() and not launch.deepspeed:
        problems.append("launch.nnodes: a multi-node launch needs launch.deepspeed (each node trains a shard)")
    if launch.nnodes > 1 and launch.hostfile is None and not launch.rdzv_endpoint:
        problems.append("launch.rdzv_endpoint: nnodes > 1 needs the rendezvous host:port (e.g. node0:29500), "
                        "or a launch.hostfile for the deepspeed launcher")
    if launch.node_rank is not None and launch.node_rank >= launch.nnodes:
        problems.append(f"launch.node_rank: {launch.node_rank} is not below nnodes ({launch.nnodes})")
    if launch.hostfile and not _resolve(launch.hostfile, base_dir).exists():
        problems.append(f"launch.hostfile: {launch.hostfile!r} does not exist")
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
