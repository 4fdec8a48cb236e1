"""``trace-transfer run``: the small-to-large pipeline as content-addressed steps.

The run directory mirrors the pipeline's data flow (models -> probes -> cores -> CKA, layer map and
transfer -> fine-tuning -> report)::

    models/{source,target}[-pretrained]   built / pretrained models (or the given hub id / dir)
    probe/{source,target}/<task>          warm-start Δ + Fisher per task
    cores/{source,target}-{lf,cs,random}  one CoreSet per task
    cores/target-general                  general-core protection's core (LF on the general task)
    cka, layermap                         CKA matrix, layer map
    cores/transfer-{lf,cs}                source CoreSets mapped onto the target
    finetune/<method>[@lr]/seed<k>        the sequential runner's output (results.json)
    report                                summary table, markdown + HTML report, plots

Every step is skipped when its inputs are unchanged (see ``steps.py``), so an interrupted or
extended run resumes, and ``--force STEP`` redoes one step (and, through hashes, what depends on it).
Which probes, CoreSets and transfers a run needs follows from its methods' entries in the method
table (``methods.py``), never from their names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trace_transfer.pipeline.config import ModelSpec, PipelineConfig, probe_hash_params, resolve_monitor
from trace_transfer.pipeline.launch import REFINE_OVERRIDE_KEYS, probe_override_keys
from trace_transfer.pipeline.methods import GENERAL_CORE_STRATEGY, PIPELINE_METHODS, PipelineMethod
from trace_transfer.pipeline.steps import STEP_FAMILIES, StepRunner, stable_hash
from trace_transfer.train.config import TrainConfig

logger = logging.getLogger(__name__)

GENERAL_CORES = "cores/target-general"


@dataclass
class PipelineResult:
    run_dir: Path
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # method label -> per-seed results
    artifacts: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _task_key(task: str) -> str:
    """The task's name made file-safe: probes record it and ``score`` names each CoreSet after it, so
    the fine-tuning step must look CoreSets up by the same name (for a YAML spec its ``name:``, not
    its path)."""
    from trace_transfer.coreset import SUFFIX
    from trace_transfer.data import load_task
    from trace_transfer.scoring import coreset_filename

    return coreset_filename(load_task(task).name).removesuffix(SUFFIX)


def _resolve_tasks(cfg: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """Task files relative to the config's directory, as ``load_pipeline`` checks them (a path that
    only exists relative to the working directory is kept as given)."""

    def resolve(t: str) -> str:
        return str(base_dir / t) if not t.startswith("synthetic:") and (base_dir / t).exists() else t

    return cfg.model_copy(update={"tasks": [resolve(t) for t in cfg.tasks],
                                  "general_task": resolve(cfg.general_task),
                                  "monitor": [resolve_monitor(m, base_dir) for m in cfg.monitor]})


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str | os.PathLike,
    *,
    force: tuple[str, ...] = (),
    base_dir: Path | None = None,
    say: Callable[[str], None] | None = None,
    only: tuple[str, ...] = (),
    runner: Any = None,
) -> PipelineResult:
    """Run every step of ``cfg`` under ``run_dir`` and return the collected results.

    Args:
        cfg: a validated :class:`PipelineConfig` (see :func:`load_pipeline`).
        run_dir: the run directory; reusing it resumes.
        force: step names (or prefixes such as ``probe``) to redo even if done.
        base_dir: resolves relative paths in the config (default: current directory).
        say: progress callback (one line per event).
        only: run only these steps (names or prefixes); the others must be done or stay pending.
        runner: a step runner to use instead of a new ``StepRunner`` (``launch.DryRunner``: the dry run,
            which checks nothing that needs this machine, runs nothing and writes nothing).
    """
    from trace_transfer.data import load_task
    from trace_transfer.evaluation.code_exec import check_tasks_consent

    from trace_transfer.devices import resolve_device

    dry = runner is not None and getattr(runner, "dry", False)
    if not dry:  # a dry run prints commands for the cluster: its GPUs and consent are the cluster's
        resolve_device(cfg.launch.device)  # a missing GPU is refused before the run directory is claimed
    base_dir = Path(base_dir or Path.cwd())
    cfg = _resolve_tasks(cfg, base_dir)
    if not dry:
        check_tasks_consent([load_task(t) for t in cfg.tasks])  # before step 1, not at the first evaluation
    runner = runner or StepRunner(Path(run_dir), force=force, on_event=say, families=STEP_FAMILIES, only=only)
    plan = _Plan(cfg, runner, base_dir, PipelineResult(Path(run_dir)), {name: PIPELINE_METHODS.get(name) for name in cfg.methods})
    plan.source = _model_step(runner, "source", cfg.source, base_dir, device=cfg.launch.device)   # 1. models
    plan.target = _model_step(runner, "target", cfg.target, base_dir, device=cfg.launch.device)
    probe_steps = _probe_steps(plan)                                                              # 2. probes
    _score_steps(plan, probe_steps)                                                               # 3. scoring
    _transfer_steps(plan)                                                                         # 4. CKA, layer map, transfer
    _finetune_steps(plan)                                                                         # 5. fine-tuning
    return _report_step(plan, dry)                                                                # 6. report


@dataclass
class _Plan:
    """What the pipeline's phases share: the config, the step runner and what earlier phases made."""

    cfg: PipelineConfig
    runner: Any
    base_dir: Path
    out: PipelineResult
    methods: dict[str, Any]
    source: Any = None  # (model ref, model step or None) per side
    target: Any = None
    core_dirs: dict[str, str] = field(default_factory=dict)  # core key -> step name

    def strategies_for(self, side: str) -> list[str]:
        """Which CoreSets to score on each side; transferred ones start on the source."""
        if side == "source":
            return sorted({m.core_key.removeprefix("transfer-") for m in self.methods.values() if m.cores == "transfer"})
        return sorted({m.strategy for m in self.methods.values() if m.cores == "target"})

    @property
    def needs_general(self) -> bool:
        return any(m.general_core for m in self.methods.values())


def _probe_steps(plan: _Plan) -> dict[str, list[str]]:
    """One probe per side x task. Under ``launch.deepspeed`` each is launched like a fine-tuning step
    (``trace-transfer probe --deepspeed`` on every rank): its hash then holds the launch, as theirs does
    (runs without DeepSpeed keep their hashes), and a partial launch is kept for its relaunch. The launch
    in the hash holds the DeepSpeed config the probe runs with (``launch.deepspeed_overrides``)."""
    cfg, runner = plan.cfg, plan.runner
    launched = bool(cfg.launch.deepspeed)
    sides = []
    if plan.strategies_for("source"):
        sides.append(("source", plan.source))
    if plan.strategies_for("target") or plan.needs_general:
        sides.append(("target", plan.target))
    probe_steps: dict[str, list[str]] = {}
    for side, (model_ref, model_step) in sides:
        probe_params = probe_hash_params(cfg.probe)  # checkpointing left out: how it runs
        if launched:
            probe_params["launch"] = cfg.launch.step_params(*probe_override_keys(side))
        tasks = list(cfg.tasks) if plan.strategies_for(side) else []
        if side == "target" and plan.needs_general:
            tasks.append(cfg.general_task)
        for task in tasks:
            name = f"probe/{side}/{_task_key(task)}"
            runner.step(name, {"task": task, "model": model_ref, **probe_params},
                        _probe_fn(model_ref, task, cfg, seed=cfg.seeds[0], say=runner.say, base_dir=plan.base_dir,
                                  side=side),
                        depends=_deps(model_step), resumable=launched)
            probe_steps.setdefault(side, []).append(name)
    return probe_steps


def _score_steps(plan: _Plan, probe_steps: dict[str, list[str]]) -> None:
    cfg, runner = plan.cfg, plan.runner
    for side in ("source", "target"):
        task_probes = [p for p in probe_steps.get(side, []) if not p.endswith("/" + _task_key(cfg.general_task))]
        for key in plan.strategies_for(side):  # a strategy, or strategy-granularity for a source scored differently
            strategy, _, granularity = key.partition("-")
            name = f"cores/{side}-{key}"
            runner.step(name, {"strategy": strategy, **cfg.scoring.model_dump(exclude_none=True), "seed": cfg.seeds[0],
                               **({"granularity": granularity} if granularity else {})},
                        _score_fn([runner.records[p].dir for p in task_probes], strategy, cfg, granularity or None),
                        depends=task_probes)
            plan.core_dirs[f"{side}-{key}"] = name
    if plan.needs_general:
        gp = f"probe/target/{_task_key(cfg.general_task)}"
        runner.step(GENERAL_CORES, {"strategy": GENERAL_CORE_STRATEGY, **cfg.scoring.model_dump(exclude_none=True)},
                    _score_fn([runner.records[gp].dir], GENERAL_CORE_STRATEGY, cfg), depends=[gp])


def _transfer_steps(plan: _Plan) -> None:
    cfg, runner, source, target = plan.cfg, plan.runner, plan.source, plan.target
    transfers = {m.core_key: m for m in plan.methods.values() if m.cores == "transfer"}
    cheap = {m.core_key: m for m in plan.methods.values() if m.cores == "cheap"}
    if plan.strategies_for("source"):
        lm = cfg.layer_map
        runner.step("cka", {**lm.model_dump(), "source": source[0], "target": target[0]},
                    _cka_fn(source[0], target[0], lm, plan.base_dir, cfg.launch),
                    depends=_deps(source[1]) + _deps(target[1]))
        runner.step("layermap", {"method": lm.method, "bootstrap": lm.bootstrap, "seed": cfg.seeds[0],
                                 "fallback": lm.fallback},
                    _layermap_fn(runner.records["cka"].dir, lm), depends=["cka"])
        plan.out.artifacts["cka"] = runner.records["cka"].dir
        plan.out.artifacts["layermap"] = runner.records["layermap"].dir / "layer_map.json"
        for key in plan.strategies_for("source"):
            name, spec = f"cores/transfer-{key}", transfers[f"transfer-{key}"]
            src_cores = plan.core_dirs[f"source-{key}"]
            runner.step(name, {"ratio": cfg.scoring.ratio, "source_rules": cfg.source.rules,
                               "target_rules": cfg.target.rules,
                               **({"refine": cfg.refine.model_dump(), "probe": probe_hash_params(cfg.probe),
                                   **_refine_launch_params(cfg)} if spec.refine else {})},
                        _transfer_fn(runner.records[src_cores].dir, cfg, source[0], target[0],
                                     runner.records["layermap"].dir / "layer_map.json", plan.base_dir, spec.refine,
                                     runner.say),
                        depends=[src_cores, "layermap"] + _deps(target[1]), resumable=spec.refine and _launched(cfg))
            plan.core_dirs[f"transfer-{key}"] = name
    for key in cheap:  # source-free: the same cheap pass, top ratio over the whole target
        runner.step(f"cores/{key}", {"refine": cfg.refine.model_dump(), "probe": probe_hash_params(cfg.probe),
                                     **cfg.scoring.model_dump(exclude_none=True), **_refine_launch_params(cfg)},
                    _cheap_fn(cfg, target[0], plan.base_dir, runner.say), depends=_deps(target[1]),
                    resumable=_launched(cfg))
        plan.core_dirs[key] = f"cores/{key}"


def _finetune_steps(plan: _Plan) -> None:
    """Every method x learning rate x seed on the target."""
    cfg, runner, target = plan.cfg, plan.runner, plan.target
    for method, spec in plan.methods.items():
        lrs = [cfg.training.lr] + (list(cfg.training.lr_sweep) if spec.lr_sweep else [])
        core_step = plan.core_dirs[spec.core_key] if spec.core_key else None
        deps = _deps(target[1]) + _deps(core_step) + ([GENERAL_CORES] if spec.general_core else [])
        for lr in lrs:
            label = method if lr == cfg.training.lr else f"{method}@{lr:g}"
            for seed in cfg.seeds:
                name = f"finetune/{label}/seed{seed}"
                params = {"method": method, "lr": lr, "seed": seed, "tasks": cfg.tasks,
                          "training": _training_params(cfg, spec), "eval": cfg.eval.step_params(),
                          "launch": cfg.launch.step_params(method), **_monitor_params(cfg, spec)}
                rec = runner.step(name, params, _finetune_fn(spec, lr, seed, cfg, target[0], runner, core_step,
                                                             plan.base_dir, method), depends=deps, resumable=True)
                plan.out.results.setdefault(label, []).append(_read_results(rec.dir))


# Settings only one runner method reads: they stay out of the other methods' step hashes, so adding
# them changed no existing run's hashes and changing them reruns only that method.
_METHOD_ONLY_TRAINING = {"lisa_layers": "lisa", "lisa_interval": "lisa"}


def _training_params(cfg: PipelineConfig, spec: PipelineMethod) -> dict[str, Any]:
    only_others = {k for k, runner in _METHOD_ONLY_TRAINING.items() if spec.runner != runner}
    # How a step runs, not what it computes (checkpointing): out of every step hash, so switching it reruns nothing.
    return cfg.training.model_dump(exclude=only_others | TrainConfig.execution_only())


def _monitors(cfg: PipelineConfig, spec: PipelineMethod) -> list[str]:
    """The monitored tasks a fine-tuning step evaluates (CPI-FT's trainer takes none yet)."""
    return list(cfg.monitor) if spec.trainer != "cpi-ft" else []


def _monitor_params(cfg: PipelineConfig, spec: PipelineMethod) -> dict[str, Any]:
    """``monitor`` in a step's hash only when set: runs without it keep the hashes they always had."""
    monitors = _monitors(cfg, spec)
    return {"monitor": monitors} if monitors else {}


def _report_step(plan: _Plan, dry: bool) -> PipelineResult:
    cfg, runner, out = plan.cfg, plan.runner, plan.out
    report_deps = [n for n in runner.records if n.startswith(("finetune/", "cores/", "layermap"))]
    if dry:
        runner.step("report", {"methods": cfg.methods, "seeds": cfg.seeds}, None, depends=report_deps)
        return out
    if not runner.selected("report"):  # --only without the report: the summary needs every result
        return out
    from trace_transfer.report.summary import summarise

    out.summary = summarise(cfg, out.results, baselines=PIPELINE_METHODS.where(lambda e: e.obj.baseline))
    _add_target_costs(out.summary, plan.methods, plan.core_dirs, runner, cfg)
    if "layermap" in runner.records:
        import json

        lm_file = runner.records["layermap"].dir / "layer_map.json"
        out.summary["layer_map"] = {k: v for k, v in json.loads(lm_file.read_text()).items() if k in ("method", "verdict")}
    rec = runner.step("report", {"methods": cfg.methods, "seeds": cfg.seeds},
                      _report_fn(cfg, runner, out), depends=report_deps)
    out.artifacts["report"] = rec.dir
    return out


# --------------------------------------------------------------------------------------------------
# Step bodies. Each returns a function of the step directory that writes the artifact there.
# --------------------------------------------------------------------------------------------------


def _deps(step: str | None) -> list[str]:
    return [step] if step else []


def _model_step(runner: StepRunner, side: str, spec: ModelSpec, base_dir: Path,
                device: str = "auto") -> tuple[str, str | None]:
    """Return (model reference, producing step name or None for a given hub id / dir)."""
    if spec.model is not None:
        local = Path(spec.model).expanduser()
        if not local.is_absolute() and (base_dir / local).exists():
            return str((base_dir / local).resolve()), None
        return spec.model, None
    build = spec.build

    def build_fn(d: Path) -> dict[str, Any]:
        from trace_transfer.models import build_tiny_model

        build_tiny_model(build.arch, d / "model", layers=build.layers, hidden=build.hidden, heads=build.heads,
                         kv_heads=build.kv_heads, tokenizer=build.tokenizer, seed=build.seed)
        return {"model": "model"}

    name = f"models/{side}"
    runner.step(name, build.model_dump(), build_fn)
    model_dir, step = runner.records[name].dir / "model", name
    if spec.pretrain is not None:
        pre = spec.pretrain

        def pretrain_fn(d: Path) -> dict[str, Any]:
            from trace_transfer.train.pretrain import pretrain

            res = pretrain(model_dir, d / "model", task=pre.task, steps=pre.steps, batch_size=pre.batch_size,
                           lr=pre.lr, seq_len=pre.seq_len, seed=build.seed, progress=_every_tenth(runner.say),
                           device=device)
            return {"model": "model", "final_loss": res.final_loss, "scores": res.scores, "seconds": res.seconds}

        step = f"models/{side}-pretrained"
        runner.step(step, pre.model_dump(), pretrain_fn, depends=[name])
        model_dir = runner.records[step].dir / "model"
    return str(model_dir), step


def _every_tenth(say: Callable[[str], None], quiet_for: float = 0.0) -> Callable[[str, int, int | None], None]:
    """A ``(stage, done, total)`` progress callback: a line with rate and ETA every 10% of a long loop,
    and at least every 30 s (under load 10% of pretraining took minutes); ``quiet_for``: seconds a
    stage runs before its first line (probes and short stages stay one line each)."""
    from trace_transfer.report.console import ProgressLines

    return ProgressLines(say, indent="       ", max_interval=30.0, quiet_for=quiet_for)


# A probe or fine-tuning stage shorter than this prints no progress lines (the step's [done] line says
# how long it took).
_QUIET_SECONDS = 5.0


def _probe_settings(cfg: PipelineConfig, seed: int) -> dict[str, Any]:
    """The ``ProbeConfig.from_flat`` keywords of a pipeline probe, in process or launched."""
    return {**cfg.probe.model_dump(), "seed": seed, "device": cfg.launch.device}


def _ds_file(cfg: PipelineConfig, base_dir: Path | None, *keys: str) -> str | None:
    """The DeepSpeed config a launched step named by ``keys`` runs with, relative paths resolved against the
    config's directory; None: the step runs in this process."""
    ds = cfg.launch.deepspeed_for(*keys)
    return str(Path(base_dir or Path.cwd()) / ds) if cfg.launch.deepspeed and ds else None


def _probe_fn(model_ref: str, task: str, cfg: PipelineConfig, seed: int, say: Callable[[str], None] = logger.info,
              base_dir: Path | None = None, side: str = "target"):
    ds = _ds_file(cfg, base_dir, *probe_override_keys(side))

    def fn(d: Path) -> dict[str, Any]:
        if ds:
            # The target may not fit one device: every rank runs `probe --deepspeed` (probe_deepspeed).
            info = _launch_distributed(d, fn.launch_args(d), cfg, say, done=_probe_done, what="probe")
            train = info.get("train", {})
            return {"task": info["task"], "steps": train.get("steps"), "first_loss": train.get("first_loss"),
                    "final_loss": train.get("last_loss"), "launched": "torchrun"}
        from trace_transfer.probe import ProbeConfig, probe

        res = probe(model_ref, task, d, ProbeConfig.from_flat(**_probe_settings(cfg, seed)),
                    progress=_every_tenth(say, quiet_for=_QUIET_SECONDS))
        return {"task": res.task, "steps": res.steps, "first_loss": res.first_loss, "final_loss": res.final_loss}

    if ds:
        def launch_args(d: Path) -> list[str]:
            """What every rank runs (the dry run prints it behind its launcher)."""
            from trace_transfer.pipeline.launch import launch_world, probe_args

            return probe_args(d, model_ref, task, _probe_settings(cfg, seed), ds, launch_world(cfg.launch, base_dir))

        fn.launch_args = launch_args  # type: ignore[attr-defined]
        fn.deepspeed = ds  # type: ignore[attr-defined]
    return fn


def _probe_done(d: Path) -> dict[str, Any] | None:
    """A launched probe's ``probe.json``: written last, so present only when the probe is complete."""
    import json

    f = d / "probe.json"
    return json.loads(f.read_text()) if f.exists() else None


def _score_fn(probe_dirs: list[Path], strategy: str, cfg: PipelineConfig, granularity: str | None = None):
    def fn(d: Path) -> dict[str, Any]:
        from trace_transfer.scoring import score

        s = cfg.scoring
        opts = s.score_options()
        if granularity:  # e.g. whole tensors for transfer-lf-tensor, counted in parameters like the rest
            opts.update(granularity=granularity, budget=opts.get("budget") or "params")
        cores = score(probe_dirs, strategy, s.ratio, d, **opts, seed=cfg.seeds[0])
        return {"coresets": {t: c.num_selected() for t, c in cores.items()}}

    return fn


def _cka_fn(source: str, target: str, lm, base_dir: Path, launch):
    def fn(d: Path) -> dict[str, Any]:
        from trace_transfer.cka import compute_cka

        probes = lm.probes
        if (base_dir / probes).exists():
            probes = str(base_dir / probes)
        res = compute_cka(source, target, probes, d, variant=lm.variant, pooling=lm.pooling,
                          max_probes=lm.max_probes, progress=False, device=launch.device, dtype=launch.dtype)
        return {"shape": list(res.matrix.shape)}

    return fn


def _layermap_fn(cka_dir: Path, lm):
    def fn(d: Path) -> dict[str, Any]:
        from trace_transfer.cka import CKAResult
        from trace_transfer.cka import map_layers
        from trace_transfer.cka.layermap import LayerMap

        m = map_layers(CKAResult.load(cka_dir), lm.method, bootstrap=lm.bootstrap)
        if not m.informative and lm.fallback == "relative-depth":
            # Flat CKA (independently trained small models): its map is noise, relative depth is not.
            cka_map = m
            m = LayerMap.relative_depth(cka_map.num_source_layers, cka_map.num_target_layers)
            m.verdict, m.provenance["cka_map"] = cka_map.verdict, cka_map.to_dict()
        m.save(d / "layer_map.json")
        return {"forward": {str(k): v for k, v in m.forward.items()}}

    return fn


def _refine_config(cfg: PipelineConfig, **extra: Any):
    """The refine pass of a pipeline: signal, batches and steps from ``refine:``, the rest as the probe."""
    from trace_transfer.refine import RefineConfig

    p = cfg.probe
    return RefineConfig(**cfg.refine.model_dump(), lr=p.lr, batch_size=p.batch_size, seq_len=p.seq_len,
                        max_examples=p.max_examples, seed=cfg.seeds[0], device=cfg.launch.device, **extra)


def _native_probe(cfg: PipelineConfig):
    """What a native probe of one task costs under this config (for the refine provenance)."""
    from trace_transfer.probe import ProbeConfig

    return ProbeConfig.from_flat(**cfg.probe.model_dump(), seed=cfg.seeds[0])


def _launched(cfg: PipelineConfig) -> bool:
    """Whether the refine passes run under ``launch.deepspeed`` (one launch per task) or in this process."""
    return bool(cfg.launch.deepspeed)


def _refine_launch_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The launch in a refine step's hash, as a probe's: nothing without DeepSpeed (those keep their hashes)."""
    return {"launch": cfg.launch.step_params(*REFINE_OVERRIDE_KEYS)} if _launched(cfg) else {}


def _launch_refine(d: Path, args: list[str], cfg: PipelineConfig, say: Callable[[str], None], out: Path,
                   task: str) -> int:
    """One task's ``refine --deepspeed`` launch (skipped once ``out`` exists); the native probe's cost the
    in-process pass records is filled in, so the summary's target cost reads the same; returns the passes."""
    from trace_transfer.coreset import CoreSet

    _launch_distributed(d, args, cfg, say, done=lambda _d: {} if out.exists() else None, what="refine")
    cs = CoreSet.load(out)
    cost = cs.metadata.get("cost", {})
    if cost.get("native") is None:
        from trace_transfer.data import load_task
        from trace_transfer.refine import native_probe_cost

        # As refine() counts: the task's training examples up to the probe's max_examples.
        n = len(list(load_task(task).train_examples())[: cfg.probe.max_examples or None])
        native = native_probe_cost(_native_probe(cfg), n)
        cost["native"] = native
        fb = native["forward_backward"]
        cost["relative_to_native"] = cost["forward_backward"] / fb if fb else None
        cs.metadata["cost"] = cost
        cs.save(out)
    return cost["forward_backward"]


def _refine_launcher(fn: Any, cfg: PipelineConfig, target: str, base_dir: Path,
                     tasks: Callable[[Path], list[tuple[str, Path, Path | None, list[list[str]]]]], **extra: Any) -> Any:
    """Give ``fn`` (a refine step body) the launch attributes the dry run reads: one launch per task of
    ``tasks(d)`` = ``(task, CoreSet path, budgets or None, one-process commands before its launch)``."""
    from dataclasses import asdict

    ds = _ds_file(cfg, base_dir, *REFINE_OVERRIDE_KEYS)

    def launch_args_of(d: Path) -> list[tuple[list[list[str]], list[str]]]:
        from trace_transfer.pipeline.launch import refine_args

        settings = asdict(_refine_config(cfg, **extra))
        return [(before, refine_args(out, target, task, settings, ds, budgets))
                for task, out, budgets, before in tasks(d)]

    fn.launches = launch_args_of  # type: ignore[attr-defined]
    fn.launch_args = lambda d: launch_args_of(d)[0][1]  # type: ignore[attr-defined]
    fn.deepspeed = ds  # type: ignore[attr-defined]
    return fn


def _cheap_fn(cfg: PipelineConfig, target: str, base_dir: Path | None = None, say: Callable[[str], None] = logger.info):
    s = cfg.scoring
    extra = {"ratio": s.ratio, **({"granularity": s.granularity} if s.granularity else {})}

    def fn(d: Path) -> dict[str, Any]:
        from trace_transfer.refine import refine
        from trace_transfer.scoring import coreset_filename

        passes = {}
        if _launched(cfg):
            # The whole target may not fit one device: each task's pass is a `refine --deepspeed` launch.
            for (_, args), (task, out, _b, _c) in zip(fn.launches(d), tasks(d)):
                passes[task] = _launch_refine(d, args, cfg, say, out, task)
            return {"forward_backward": passes, "launched": "torchrun"}
        for task in cfg.tasks:
            cs, cost = refine(target, task, None, _refine_config(cfg, **extra), native=_native_probe(cfg))
            cs.save(d / coreset_filename(cs.metadata["task"]))
            passes[task] = cost["forward_backward"]
        return {"forward_backward": passes}

    def tasks(d: Path):
        from trace_transfer.scoring import coreset_filename

        return [(task, d / coreset_filename(_task_key(task)), None, []) for task in cfg.tasks]

    if _launched(cfg):
        _refine_launcher(fn, cfg, target, Path(base_dir or Path.cwd()), tasks, **extra)
    return fn


def _transfer_fn(src_dir: Path, cfg: PipelineConfig, source: str, target: str, layer_map: Path, base_dir: Path,
                 refine_units: bool = False, say: Callable[[str], None] = logger.info):
    def fn(d: Path) -> dict[str, Any]:
        if refine_units:
            return _transfer_and_refine(d, src_dir, cfg, source, target, layer_map, base_dir,
                                        fn.launches(d) if _launched(cfg) else None, say)
        from trace_transfer.checkpoint import write_json_atomic
        from trace_transfer.coreset import SUFFIX, CoreSet
        from trace_transfer.transfer import transfer

        kw = _transfer_rules(cfg, base_dir)
        counts = {}
        for f in sorted(src_dir.glob("*" + SUFFIX)):
            # Without refine a method trains what transfer alone gives: whole tensors map exactly; finer
            # units fall back to the profile ablation (a CoreSet; budgets need refine to become one).
            cs, report = transfer(CoreSet.load(f), source, target, layer_map, ratio=cfg.scoring.ratio,
                                  carry="profile", **kw)
            cs.save(d / f.name)
            write_json_atomic(d / f.name.replace(SUFFIX, ".report.json"), report.to_dict()
                              if hasattr(report, "to_dict") else vars(report))
            counts[f.name] = cs.num_selected()
        return {"coresets": counts}

    if refine_units and _launched(cfg):
        _refine_launcher(fn, cfg, target, base_dir, lambda d: _refine_files(d, src_dir, cfg, source, target, layer_map,
                                                                           base_dir))
    return fn


def _transfer_rules(cfg: PipelineConfig, base_dir: Path) -> dict[str, str]:
    """``transfer``'s rule-file keywords from the config (relative to its directory)."""
    return {**({"source_rules": str(base_dir / cfg.source.rules)} if cfg.source.rules else {}),
            **({"target_rules": str(base_dir / cfg.target.rules)} if cfg.target.rules else {})}


def _refine_files(d: Path, src_dir: Path, cfg: PipelineConfig, source: str, target: str, layer_map: Path,
                  base_dir: Path) -> list[tuple[str, Path, Path, list[list[str]]]]:
    """Per task of a transfer-and-refine step: (task, its CoreSet, its budgets, the `trace-transfer transfer`
    line that writes the budgets and report as this step does, which the dry run prints before the launch)."""
    from trace_transfer.coreset import SUFFIX
    from trace_transfer.scoring import coreset_filename
    from trace_transfer.transfer import BUDGETS_SUFFIX

    out = []
    for task in cfg.tasks:
        name = coreset_filename(_task_key(task))
        budgets = d / name.replace(SUFFIX, BUDGETS_SUFFIX)
        # The rule files the in-process transfer is pinned to (source_rules/target_rules), as the same flags.
        rules = [a for k, r in _transfer_rules(cfg, base_dir).items() for a in (f"--{k.replace('_', '-')}", r)]
        line = ["trace-transfer", "transfer", "--coreset", str(src_dir / name), "--source", source, "--target", target,
                "--layer-map", str(layer_map), "--ratio", repr(cfg.scoring.ratio), "--carry", "budget", *rules,
                "--out", str(budgets), "--report", str(d / name.replace(SUFFIX, ".report.json")), "--force"]
        out.append((task, d / name, budgets, [line]))
    return out


def _transfer_and_refine(d: Path, src_dir: Path, cfg: PipelineConfig, source: str, target: str, layer_map: Path,
                         base_dir: Path, launches: list | None = None,
                         say: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Per task: the source CoreSet -> per-slot budgets on the target -> units chosen there by refine
    (in this process, or under ``launch.deepspeed`` one ``refine --deepspeed`` launch per task reading the
    budgets file saved here first: ``launches``)."""
    from trace_transfer.coreset import SUFFIX
    from trace_transfer.refine import refine
    from trace_transfer.scoring import coreset_filename
    from trace_transfer.transfer import BUDGETS_SUFFIX, transfer

    kw = _transfer_rules(cfg, base_dir)
    passes = {}
    for i, task in enumerate(cfg.tasks):
        name = coreset_filename(_task_key(task))
        if launches is None or not (d / name).exists():  # else this task's launch is done (a relaunch, the cluster's)
            budgets, report = transfer(src_dir / name, source, target, layer_map, ratio=cfg.scoring.ratio,
                                       carry="budget", **kw)
            budgets.save(d / name.replace(SUFFIX, BUDGETS_SUFFIX))
            report.save(d / name.replace(SUFFIX, ".report.json"))
        if launches is not None:
            passes[task] = _launch_refine(d, launches[i][1], cfg, say, d / name, task)
            continue
        cs, cost = refine(target, task, budgets, _refine_config(cfg), native=_native_probe(cfg))
        cs.save(d / name)
        passes[task] = cost["forward_backward"]
    return {"forward_backward": passes, **({"launched": "torchrun"} if launches is not None else {})}


def _add_target_costs(summary: dict[str, Any], methods: dict, core_dirs: dict[str, str], runner: StepRunner,
                      cfg: PipelineConfig) -> None:
    """Each method's forward+backward passes on the target per task, relative to a native probe's.

    A native probe costs its warm-start steps (x grad_accum) plus its Fisher batches; ``trace-*``
    methods pay that (1.0), transferred whole tensors and random cores nothing (0.0), refined
    CoreSets what their provenance records. Baselines choose no cores (None)."""
    from trace_transfer.coreset import SUFFIX, CoreSet

    costs = {}
    for name, spec in methods.items():
        if spec.cores == "none":
            cost = None
        elif spec.cores == "target":
            cost = 0.0 if spec.strategy == "random" else 1.0
        elif not spec.refine:
            cost = 0.0
        else:
            rel = [CoreSet.load(f).metadata.get("cost", {}).get("relative_to_native")
                   for f in sorted(runner.records[core_dirs[spec.core_key]].dir.glob("*" + SUFFIX))]
            rel = [r for r in rel if r is not None]
            cost = sum(rel) / len(rel) if rel else None
        costs[name] = cost
    for label, entry in summary["methods"].items():
        entry["target_cost"] = costs.get(label.split("@")[0])
    summary["conventions"]["target_cost"] = ("forward+backward passes on the target per task to choose the cores, "
                                             "relative to a native probe (warm-start steps x grad_accum + Fisher batches)")


def _finetune_inputs(spec: PipelineMethod, lr: float, seed: int, cfg: PipelineConfig, runner: StepRunner,
                     core_step: str | None):
    """(stages, method options, training config) of one method x seed fine-tuning step."""
    from trace_transfer.coreset import SUFFIX
    from trace_transfer.train.config import TrainConfig
    from trace_transfer.train.methods import MethodOptions, Stage

    t = cfg.training
    stages = []
    for task in cfg.tasks:
        coreset = None
        if core_step:
            coreset = str(runner.records[core_step].dir / (_task_key(task) + SUFFIX))
        stages.append(Stage(task, coreset))
    opts = MethodOptions(isolation=t.isolation, replay_share=t.replay_share, lisa_layers=t.lisa_layers,
                         lisa_interval=t.lisa_interval)
    if spec.general_core:
        gdir = runner.records[GENERAL_CORES].dir
        # `score` names the CoreSet after the task; the glob finds it as written (a dry run has none yet).
        found = next(gdir.glob("*" + SUFFIX), None) if gdir.is_dir() else None
        opts = replace(opts, general_coreset=str(found or gdir / (_task_key(cfg.general_task) + SUFFIX)))
    train_cfg = TrainConfig(lr=lr, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
                            grad_accum=t.grad_accum, warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay,
                            precision=t.precision, seq_len=t.seq_len, seed=seed,
                            gradient_checkpointing=t.gradient_checkpointing)
    return stages, opts, train_cfg


def _finetune_fn(spec: PipelineMethod, lr: float, seed: int, cfg: PipelineConfig, target: str, runner: StepRunner,
                 core_step: str | None, base_dir: Path, method: str | None = None):
    ds = _ds_file(cfg, base_dir, *([method] if method else []))

    def fn(d: Path) -> dict[str, Any]:
        from trace_transfer.train.runner import run_sequence

        stages, opts, train_cfg = _finetune_inputs(spec, lr, seed, cfg, runner, core_step)
        if spec.trainer == "cpi-ft" and not ds:
            from trace_transfer.surgery.cpi_ft import CpiFtConfig, cpi_ft

            res = cpi_ft(target, list(cfg.tasks), d, CpiFtConfig(), ft_cfg=train_cfg, eval_limit=cfg.eval.limit,
                         eval_batch_size=cfg.eval.batch_size, resume=True,
                         progress=lambda msg: runner.say(f"       {msg}"), device=cfg.launch.device,
                         dtype=cfg.launch.dtype)
        elif ds:
            # DeepSpeed needs one process per GPU: launch the fine-tuning step (finetune, or the whole of
            # cpi-ft) under torchrun, while the pipeline itself (probes, scoring, CKA, transfer, report)
            # stays one process.
            results = _launch_distributed(d, fn.launch_args(d), cfg, runner.say)
            _prune_checkpoints(d)
            return {"aa": results["metrics"]["aa"] if results.get("metrics") else None, "launched": "torchrun"}
        else:
            from trace_transfer.train.methods import counting_steps, watch_steps

            # The runner reports stages, not steps: each stage's steps as lines with rate and ETA.
            with watch_steps(counting_steps(_every_tenth(runner.say, quiet_for=_QUIET_SECONDS), train_cfg.max_steps)):
                res = run_sequence(target, stages, spec.runner, d, train_cfg, eval_limit=cfg.eval.limit,
                                   deepspeed_config=ds, options=opts, eval_batch_size=cfg.eval.batch_size,
                                   resume=True, progress=lambda msg: runner.say(f"       {msg}"),
                                   device=cfg.launch.device, dtype=cfg.launch.dtype,
                                   eval_backend=cfg.eval.backend, monitor=_monitors(cfg, spec))
        _prune_checkpoints(d)
        return {"aa": res.results["metrics"]["aa"] if res.results.get("metrics") else None}

    if ds:
        def launch_args(d: Path) -> list[str]:
            """What every rank runs (the dry run prints it behind its launcher)."""
            from trace_transfer.pipeline.launch import cpi_ft_args, finetune_args

            stages, opts, train_cfg = _finetune_inputs(spec, lr, seed, cfg, runner, core_step)
            if spec.trainer == "cpi-ft":
                return cpi_ft_args(d, target, list(cfg.tasks), train_cfg, ds, cfg)
            return finetune_args(d, target, stages, spec.runner, opts, train_cfg, ds, cfg)

        fn.launch_args = launch_args  # type: ignore[attr-defined]
        fn.deepspeed = ds  # type: ignore[attr-defined]
    return fn


def _finetune_done(d: Path) -> dict[str, Any] | None:
    """A launched fine-tuning's ``results.json`` once it says ``complete`` (a partial one resumes)."""
    import json

    done = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {}
    return done if done.get("complete") else None


def _launch_distributed(d: Path, args: list[str], cfg: PipelineConfig, say: Callable[[str], None],
                        done: Callable[[Path], dict[str, Any] | None] = _finetune_done,
                        what: str = "fine-tuning") -> dict[str, Any]:
    """Run ``trace-transfer finetune --deepspeed`` (``args``; or ``probe``, with its ``done`` reader) on
    ``launch.nproc_per_node`` local processes and return what ``done(d)`` reads once it has finished.

    The command line is written to ``.launch.sh`` and the ranks' output to ``.launch.log`` in the step
    directory (hidden: ``finetune`` refuses an --out holding files it did not write), so a failed launch
    can be rerun by hand; ``--resume`` makes a rerun of the step continue
    after its last complete stage. A launch across nodes is the cluster's (``run --dry-run`` prints
    it): this only records its finished results.
    """
    import shlex
    import socket
    import subprocess
    import sys

    from trace_transfer.errors import TraceTransferError
    from trace_transfer.pipeline.launch import launch_argv

    finished = done(d)
    if finished is not None:  # launched already (by the cluster, or before an interruption)
        return finished
    if cfg.launch.multi_node():
        raise TraceTransferError(f"{d.name}: this {what} runs across {cfg.launch.nnodes} node(s); start its "
                                 f"launch on the cluster with the commands `trace-transfer run CONFIG --dry-run` "
                                 f"prints (see examples/slurm), then rerun to record it")
    with socket.socket() as sock:  # a free port for the rendezvous of this launch
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = launch_argv(cfg.launch, args, run_id=d.name, python=sys.executable, port=port)
    script, log_file = d / ".launch.sh", d / ".launch.log"
    script.write_text(shlex.join(argv) + "\n")
    say(f"       torchrun x{cfg.launch.nproc_per_node}: {script} (log: {log_file})")
    with log_file.open("a") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise TraceTransferError(f"distributed {what} failed (exit {proc.returncode}); command in "
                                 f"{script}, log {log_file}; its end:\n{tail}")
    finished = done(d)
    if finished is None:
        raise TraceTransferError(f"distributed {what} exited 0 but left no complete result in {d}; see {log_file} "
                                 f"and rerun the step")
    return finished


def _prune_checkpoints(run_dir: Path) -> None:
    """Keep only the last stage's weights: the pipeline compares methods by their results, and a
    dozen methods x seeds x stages of checkpoints would fill a disk for a real target."""
    stages = sorted((p for p in run_dir.glob("stage_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for p in stages[:-1]:
        for w in p.glob("*.safetensors"):
            w.unlink()


def _read_results(d: Path) -> dict[str, Any]:
    import json

    f = d / "results.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _report_fn(cfg: PipelineConfig, runner: StepRunner, out: PipelineResult):
    def fn(d: Path) -> dict[str, Any]:
        from trace_transfer.report.report import write_report

        paths = write_report(d, cfg, out.summary, out.results, {n: r.dir for n, r in runner.records.items()})
        return {"files": [str(p.relative_to(d)) for p in paths], "hash": stable_hash(out.summary)}

    return fn
