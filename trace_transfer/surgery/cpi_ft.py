"""CPI-FT (Core Parameter Isolation Fine-Tuning, EMNLP 2025, arXiv 2508.21741) as one library call.

The five steps, each a library piece that can also be run on its own:

1. **Independent fine-tuning per task** (the sequential runner, method ``full``, one stage) and each
   task's **core region**: the parameters with the largest update magnitude ``|θ_task − θ_0|``
   (:func:`core_regions`; per element by default, as the paper — any scoring granularity works; the
   paper's budget is p = 1%). Selection goes through :func:`trace_transfer.scoring.scorer.score` with the
   built-in ``magnitude`` strategy (``trace_transfer.scoring.strategies``), so budgets, granularities,
   tie-breaking and streaming are the same as TRACE's.
2. **Task clustering** by core-region overlap (:func:`trace_transfer.surgery.clustering.cluster_tasks`).
3. **Transplantation** of each task's core elements from its fine-tuned model into one backbone, and
4. **SLERP fusion** of the non-core elements across the task models — both in one streaming pass
   (:func:`trace_transfer.surgery.merge.merge_models`, ``transplant`` with ``fill="slerp"``);
   where cores collide, the task whose element moved furthest from the base wins (``collision="update"``).
5. **Pipeline SFT** of the merged model with core regions frozen (``apply_coreset(mode="freeze-core")``)
   through the sequential runner, built-in method ``cpi-ft-sft`` (``trace_transfer.train.methods``).
   Tasks are trained group by group (groups in order of their first task, tasks in input order
   within a group):

   * ``sft="sequence"`` (default): one stage per task, so the accuracy matrix ``R`` is ``(T+1)×T``
     exactly like every other method's and AA/BWT/FWT line up with TRACE and the baselines;
   * ``sft="groups"``: one stage per group on the group's tasks' data mixed (the paper's "pipelined
     SFT with mixed-task data"); ``R`` then has one row per group (AA only, like ``joint``).

   ``freeze="all"`` (default, as the issue specifies) keeps every task's core frozen in every stage;
   ``freeze="prior"`` (the paper's wording: "freezing core regions from prior tasks") freezes only
   the cores of tasks trained in earlier stages.

Under ``torchrun``/``deepspeed`` (``deepspeed_config``) every rank takes part in the training steps 1
and 5 (ZeRO shards them; the runner saves and evaluates on rank 0); the steps in between (core
regions, clustering, transplant + SLERP, the frozen CoreSets) and the results run on rank 0 alone
while the other ranks wait, and a failure there is raised on every rank. Only rank 0 writes files.

Evaluation is the runner's: ``OUT/results.json`` has the runner's shape; row 0 of ``R`` is the
**base model** (as for every other method), rows 1.. are after each SFT stage; the merged model
before SFT and each task's single-task fine-tuned score are recorded under ``cpi_ft``.

Layout of ``OUT``::

    cpi_ft.json          identity + provenance (resume checks it)
    ft/<task>/           step 1: runner run (stage_0 = base eval, stage_1 = the task's FT model)
    cores/               step 1: <task>.coreset.safetensors (Δ files are temporary unless keep_deltas)
    clusters.json        step 2 (``report.plots.plot_cpi_ft(OUT)`` draws overlap.png from it)
    merged/              steps 3+4: HF model dir + surgery.json (collisions per tensor)
    frozen/              step 5: the frozen CoreSet of every SFT stage
    sft/                 step 5: runner run from merged/
    results.json, results.md   (``plot_cpi_ft`` also draws accuracy_matrix.png from results.json)

Example:
    >>> res = cpi_ft("tiny", ["synthetic:math", "synthetic:medical", "synthetic:code"], "runs/cpi",
    ...              CpiFtConfig(ratio=0.01), ft_cfg=TrainConfig(lr=3e-4, max_steps=150, batch_size=32))
    >>> res.metrics["aa"], res.results["cpi_ft"]["groups"]
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from trace_transfer._version import versions
from trace_transfer.checkpoint import ShardedWriter, write_json_atomic, write_text_atomic
from trace_transfer.coreset import SUFFIX, CoreSet
from trace_transfer.errors import ConfigError
from trace_transfer.scoring import coreset_filename, score
from trace_transfer.surgery._modeldir import check_same_tensors, open_model
from trace_transfer.surgery.clustering import CLUSTER_METHODS, cluster_tasks
from trace_transfer.surgery.merge import MERGE_COLLISION_RULES, MergeOptions, merge_models
from trace_transfer.surgery.modes import FREEZE_MODES, SFT_MODES
from trace_transfer.train.loop import TrainConfig
from trace_transfer.train.methods import Stage, get_method
from trace_transfer.train.runner import RunResult, _Ranks

__all__ = ["cpi_ft", "CpiFtConfig", "CpiFtResult", "core_regions", "SFT_MODES", "FREEZE_MODES"]

logger = logging.getLogger(__name__)

SFT_METHOD = "cpi-ft-sft"  # the runner method of step 5, built into trace_transfer.train.methods


# --------------------------------------------------------------------------------------------------
# Step 1b: core regions = largest update magnitude (the built-in ``magnitude`` scoring strategy)
# --------------------------------------------------------------------------------------------------


def core_regions(
    base: str | Path,
    tuned: dict[str, str | Path],
    out_dir: str | Path,
    *,
    ratio: float = 0.01,
    granularity: str = "element",
    scope: str = "all",
    keep_deltas: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, CoreSet]:
    """Each task's core region: the ``ratio`` share of parameters its fine-tuning moved the most.

    Args:
        base: the model all tasks were fine-tuned from (model dir).
        tuned: ``{task name: fine-tuned model dir}``.
        out_dir: where ``<task>.coreset.safetensors`` go (and ``deltas/<task>/`` with ``keep_deltas``).
        ratio: share of the parameters in scope per task (paper: 0.01).
        granularity: ``element`` (paper) | ``row`` | ``column`` | ``head`` | ``tensor``.
        scope: tensor groups that compete (``all`` or e.g. ``layers,embeddings``).

    Returns:
        ``{task: CoreSet}`` (saved in ``out_dir``; scores = update magnitudes where stored).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rb = open_model(base, "base model")
    deltas = out / "deltas"
    dirs = []
    for task, path in tuned.items():
        rt = open_model(path, f"fine-tuned model of {task}")
        names = check_same_tensors([(f"base ({base})", rb), (f"{task} ({path})", rt)])
        d = deltas / _safe(task)
        with ShardedWriter(d, "delta", metadata={"task": task, "kind": "fine-tuning update (tuned - base)"}) as w:
            for name in names:
                w.add(name, rt.get(name).to(torch.float32) - rb.get(name).to(torch.float32))
        write_json_atomic(d / "probe.json", {"task": task, "model": str(base), "tuned": str(path),
                                             "tensors": names, "kind": "cpi-ft update", "versions": versions()})
        dirs.append(d)
    try:
        cores = score(dirs, strategy="magnitude", ratio=ratio, out_dir=out, granularity=granularity,
                      scope=scope, progress=progress)
    finally:
        if not keep_deltas:
            shutil.rmtree(deltas, ignore_errors=True)
    return cores




# --------------------------------------------------------------------------------------------------
# The whole method
# --------------------------------------------------------------------------------------------------


@dataclass
class CpiFtConfig:
    """CPI-FT settings (training settings are the ``TrainConfig`` of steps 1 and 5)."""

    ratio: float = field(default=0.01, metadata={"help": "core region per task, share of parameters (paper: 0.01)"})
    granularity: str = field(default="element", metadata={"help": "core-region granularity (paper: element)"})
    scope: str = field(default="all", metadata={"help": "tensor groups the core regions compete in"})
    tau: float = field(default=0.1, metadata={"help": "Jaccard threshold connecting two tasks (paper: 0.1)"})
    cluster_method: str = field(default="components", metadata={"help": "components (paper) | louvain"})
    collision: str = field(default="update", metadata={"help": "transplant collision rule (update: largest move wins)"})
    per_row: bool = field(default=False, metadata={"help": "SLERP one angle per row instead of per tensor"})
    sft: str = field(default="sequence", metadata={"help": "sequence: one SFT stage per task | groups: per group, mixed"})
    freeze: str = field(default="all", metadata={"help": "all: every core frozen in every stage | prior: earlier stages' cores"})
    keep_deltas: bool = field(default=False, metadata={"help": "keep the per-task update files (full-size)"})

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.ratio <= 1:
            problems.append(f"ratio {self.ratio}: must be in (0, 1] (paper: 0.01)")
        if not 0 <= self.tau <= 1:
            problems.append(f"tau {self.tau}: must be in [0, 1] (paper: 0.1)")
        for key, value, valid in (("cluster_method", self.cluster_method, CLUSTER_METHODS),
                                  ("collision", self.collision, MERGE_COLLISION_RULES),
                                  ("sft", self.sft, SFT_MODES), ("freeze", self.freeze, FREEZE_MODES)):
            if value not in valid:
                problems.append(f"{key}={value!r} is not one of {', '.join(valid)}")
        if problems:
            raise ConfigError("invalid CPI-FT settings", problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CpiFtResult(RunResult):
    """What :func:`cpi_ft` returns (the content of ``OUT/results.json``): the runner's result shape,
    so CPI-FT lines up with the sequential methods, plus ``results["cpi_ft"]`` (groups, collisions)."""


def cpi_ft(
    model: str | Path,
    tasks: Sequence[str],
    out_dir: str | Path,
    config: CpiFtConfig | None = None,
    *,
    ft_cfg: TrainConfig | None = None,
    sft_cfg: TrainConfig | None = None,
    eval_limit: int | None = None,
    eval_batch_size: int = 32,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    deepspeed_config: str | Path | None = None,
) -> CpiFtResult:
    """Run CPI-FT end to end (see the module docstring) and evaluate it like the sequential runner.

    Args:
        model: base model (local dir or HF id; an id is saved to ``OUT/base`` first).
        tasks: task references (``synthetic:math``, a task YAML, ...), at least two.
        out_dir: run directory.
        config: :class:`CpiFtConfig`.
        ft_cfg: training settings of step 1 (per-task fine-tuning). sft_cfg: of step 5 (default: ft_cfg).
        eval_limit, eval_batch_size: evaluation settings (as the runner's).
        resume: continue an interrupted run in ``out_dir`` (steps already complete are kept).
        progress: called with one-line status messages.
        device: where steps 1 and 5 train and evaluate (``auto``/``cpu``/``cuda[:i]``, as ``run_sequence``).
        dtype: the weights' dtype when steps 1 and 5 evaluate (``auto``/``bf16``/``fp16``/``fp32``, as
            ``run_sequence``; auto = bf16 on CUDA, else fp32). Training keeps fp32 weights.
        deepspeed_config: a DeepSpeed JSON config: steps 1 and 5 train under it on every rank of a
            ``torchrun``/``deepspeed`` launch (collective: call this on every rank); ``device`` is then ignored.

    Returns:
        :class:`CpiFtResult` (``R`` with the base model as row 0, metrics, ``cpi_ft`` details; its
        ``rank`` says which process returned it).

    Raises:
        ConfigError: fewer than two tasks, a task repeated, bad settings, ``out_dir`` holding another
            run (or any run without ``resume``), a DeepSpeed config that does not exist, or a
            multi-process launch without one.
    """
    from trace_transfer.train.runner import run_sequence

    cfg = config or CpiFtConfig()
    ft_cfg = ft_cfg or TrainConfig(epochs=3.0)
    sft_cfg = sft_cfg or ft_cfg
    refs = [str(t) for t in tasks]
    names = _task_names(refs)
    out = Path(out_dir)
    ds = str(deepspeed_config) if deepspeed_config else None
    identity = {"model": str(model), "tasks": refs, "config": cfg.to_dict(), "ft": ft_cfg.identity(),
                "sft": sft_cfg.identity(), "eval_limit": eval_limit, "deepspeed_config": ds}
    if ds and not Path(ds).is_file():  # before joining a process group: a typo should fail fast, not hang peers
        raise ConfigError(f"DeepSpeed config not found: {ds}")
    _check_identity(out, identity, resume)
    # Joins the process group under DeepSpeed; without it, refuses a multi-process launch (every rank
    # would run the whole recipe and write the same files).
    ranks = _Ranks(ds is not None)
    say = (progress or (lambda msg: logger.info(msg))) if ranks.main else (lambda msg: None)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat()
    ranks.barrier()  # every rank has checked OUT before rank 0 writes the marker a slower rank would see
    ranks.on_main("writing cpi_ft.json", lambda: write_json_atomic(
        out / "cpi_ft.json", {"identity": identity, "started": started, "versions": versions()}))
    base = Path(_on_main_shared(ranks, "saving the base model", lambda: str(_local_base(model, out, say))))
    common = {"eval_limit": eval_limit, "eval_batch_size": eval_batch_size, "device": device, "dtype": dtype,
              "deepspeed_config": ds}

    # Step 1: independent fine-tuning per task (collective under DeepSpeed), then core regions.
    for ref, name in zip(refs, names):
        say(f"[1/5] fine-tuning {name} on its own")
        run_dir = out / "ft" / _safe(name)
        run_sequence(base, [Stage(ref)], "full", run_dir, ft_cfg, resume=_started(run_dir), **common)
    tuned = {n: out / "ft" / _safe(n) / "stage_1" for n in names}
    core_files = {n: out / "cores" / coreset_filename(n) for n in names}

    # Steps 1b-4 and the frozen CoreSets of step 5 read and write files only: rank 0 alone.
    kept: dict[str, Any] = {}  # rank 0's objects that the results need

    def analyse() -> dict[str, Any]:
        cores = _cores_of_run(base, tuned, core_files, cfg, say)

        # Step 2: clustering.
        clusters = cluster_tasks({n: cores[n] for n in names}, tau=cfg.tau, method=cfg.cluster_method)
        clusters.provenance["inputs"] = {n: str(p) for n, p in core_files.items()}
        clusters.save(out / "clusters.json")
        say(f"[2/5] {len(clusters.groups)} group(s): " + " | ".join(", ".join(g) for g in clusters.groups))

        # Steps 3+4: transplant cores, SLERP the rest, in one streaming pass.
        say("[3-4/5] transplanting core regions and SLERP-fusing the rest")
        merge = merge_models([tuned[n] for n in names], out / "merged", "transplant",
                             coresets=[core_files[n] for n in names], base=base,
                             options=MergeOptions(fill="slerp", collision=cfg.collision, per_row=cfg.per_row))
        order = [n for g in clusters.groups for n in g]
        stages, frozen_info = _sft_stages(order, clusters.groups, cores, dict(zip(names, refs)), cfg, out / "frozen")
        kept.update(cores=cores, clusters=clusters, merge=merge, frozen_info=frozen_info)
        return {"order": order, "stages": [[s.task, s.coreset] for s in stages]}

    plan = _on_main_shared(ranks, "finding core regions, clustering and merging", analyse)
    order, stages = plan["order"], [Stage(t, c) for t, c in plan["stages"]]

    # Step 5: pipeline SFT with core regions frozen (collective under DeepSpeed).
    say(f"[5/5] pipeline SFT ({cfg.sft}, freeze {cfg.freeze}): " + " -> ".join(order))
    sft = run_sequence(out / "merged", stages, SFT_METHOD, out / "sft", sft_cfg, resume=_started(out / "sft"),
                       **common)

    def finish() -> dict[str, Any]:
        """Results in the runner's shape, row 0 = the base model."""
        paths = {"ft": {n: str(tuned[n]) for n in names}, "cores": {n: str(p) for n, p in core_files.items()},
                 "clusters": str(out / "clusters.json"), "merged": str(out / "merged"), "sft": str(out / "sft")}
        results = _cpi_results(out, sft, stages, order, kept["clusters"], {n: kept["cores"][n] for n in names},
                               kept["merge"], kept["frozen_info"], cfg, paths)
        results["provenance"] = {**results.get("provenance", {}), "cpi_ft": identity, "base_model": str(base),
                                 "started": started, "versions": versions(),
                                 "written": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        _write_results(out, results, order)
        return results

    results = ranks.on_main("writing the results", finish)
    if not ranks.main:  # the other ranks return what rank 0 wrote
        results = json.loads((out / "results.json").read_text())
    return CpiFtResult(out, results, rank=ranks.rank)


def _on_main_shared(ranks: _Ranks, what: str, fn: Callable[[], Any]) -> Any:
    """``fn`` on rank 0 while the other ranks wait (a failure raised on every rank, as ``on_main``), and
    its result (plain data: strings, lists, dicts) returned on every rank."""
    value = ranks.on_main(what, fn)
    if ranks.distributed:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _cores_of_run(base: Path, tuned: dict[str, Path], core_files: dict[str, Path], cfg: CpiFtConfig,
                  say: Callable[[str], None]) -> dict[str, CoreSet]:
    """Step 1b, or its result when a resumed run already has it (same identity, so the same cores)."""
    if all(f.exists() for f in core_files.values()):
        return {n: CoreSet.load(f) for n, f in core_files.items()}
    say(f"[1/5] core regions: top {cfg.ratio:g} of parameters by update magnitude ({cfg.granularity})")
    for f in core_files.values():  # what a killed scoring pass of this run left; never the user's files
        f.unlink(missing_ok=True)
    out = next(iter(core_files.values())).parent
    return core_regions(base, tuned, out, ratio=cfg.ratio, granularity=cfg.granularity, scope=cfg.scope,
                        keep_deltas=cfg.keep_deltas)


def _task_names(refs: list[str]) -> list[str]:
    """The tasks' names, after every check that needs no training: count, code-exec consent, repeats."""
    from trace_transfer.data import load_task
    from trace_transfer.evaluation.code_exec import check_tasks_consent

    if len(refs) < 2:
        raise ConfigError(f"CPI-FT needs at least two tasks (--task, repeated), got {len(refs)}")
    loaded = [load_task(r) for r in refs]
    check_tasks_consent(loaded)  # before any training, not at the first evaluation
    names = [t.name for t in loaded]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"task(s) {dupes} given more than once; each task is one column of R")
    return names


def _cpi_results(out: Path, sft: RunResult, stages: list[Stage], order: list[str], clusters, cores: dict[str, CoreSet],
                 merge, frozen_info: list[dict[str, Any]], cfg: CpiFtConfig, paths: dict[str, Any]) -> dict[str, Any]:
    """The SFT run's results with row 0 replaced by the base model, plus the CPI-FT details."""
    from trace_transfer.evaluation.continual import continual_metrics

    base_row = [_eval_score(out / "ft" / _safe(n) / "stage_0", n) for n in order]
    single = {n: _eval_score(out / "ft" / _safe(n) / "stage_1", n) for n in order}
    totals = merge.totals()
    results = dict(sft.results)
    R = [base_row] + [list(r) for r in sft.R[1:]]
    n_runs = len(get_method(SFT_METHOD).plan(stages))
    results.update({
        "R": R,
        "row_labels": ["before (base)"] + list(results.get("row_labels", [])[1:]),
        "metrics": continual_metrics(R) if len(R) >= 2 else None,
        "complete": len(R) - 1 == n_runs,
        "method": "cpi-ft",
        "cpi_ft": {
            "groups": clusters.groups,
            "jaccard": clusters.matrix,
            "jaccard_names": clusters.names,
            "row_after_merge": list(sft.R[0]),
            "single_task_ft": single,
            "core_params": {n: cs.num_selected() for n, cs in cores.items()},
            "collisions": {"total": totals["collisions"], "conflicts": totals["conflicts"],
                           "per_tensor": {k: v["collisions"] for k, v in merge.collisions().items()}},
            "frozen": frozen_info,
            "config": cfg.to_dict(),
            "paths": paths,
        },
    })
    return results


def _sft_stages(order, groups, cores, ref_of, cfg: CpiFtConfig, frozen_dir: Path):
    """The SFT stream and the frozen CoreSet of each run (one file per run: the runner groups stages by file)."""
    runs = [[n] for n in order] if cfg.sft == "sequence" else [list(g) for g in groups]
    union_all = _union([cores[n] for n in order])
    stages, info, trained = [], [], []
    frozen_dir.mkdir(parents=True, exist_ok=True)
    for k, run in enumerate(runs, start=1):
        if cfg.freeze == "all":
            frozen = union_all
        else:
            frozen = _union([cores[n] for n in trained]) if trained else _empty_like(union_all)
        frozen.metadata.update({"task": f"cpi-ft frozen, run {k}", "strategy": f"cpi-ft freeze={cfg.freeze}",
                                "frozen_tasks": list(order) if cfg.freeze == "all" else list(trained)})
        target = frozen_dir / f"run_{k}{SUFFIX}"
        # A resumed run keeps the files its SFT run started with (same identity, same content; the
        # runner checks their hashes): rewriting them would only change their timestamps.
        path = target if target.exists() else frozen.save(target)
        stages += [Stage(ref_of[n], str(path)) for n in run]
        info.append({"run": k, "tasks": run, "frozen_params": frozen.num_selected(), "coreset": str(path)})
        trained += run
    return stages, info


def _union(sets: list[CoreSet]) -> CoreSet:
    acc = sets[0]
    for cs in sets[1:]:
        acc = acc | cs
    return acc


def _empty_like(cs: CoreSet) -> CoreSet:
    return CoreSet.from_unit_masks({}, {}, {n: cs.shape(n) for n in cs.all_names()})


def _eval_score(stage_dir: Path, task: str) -> float:
    return float(json.loads((stage_dir / "eval.json").read_text())["scores"][task]["score"])


def _write_results(out: Path, results: dict[str, Any], order: list[str]) -> None:
    from trace_transfer.evaluation.continual import format_matrix_markdown

    write_json_atomic(out / "results.json", results)
    R, labels, c = results["R"], results["row_labels"], results["cpi_ft"]
    md = [f"# cpi-ft on {' → '.join(order)}", "",
          "groups: " + " | ".join(", ".join(g) for g in c["groups"]), "",
          format_matrix_markdown(R, order, labels), "",
          "after transplant + SLERP, before SFT: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(order, c["row_after_merge"])),
          "single-task fine-tuning: " + ", ".join(f"{n} {c['single_task_ft'][n]:.3f}" for n in order)]
    m = results["metrics"]
    if m is not None:
        def f(v):
            return "n/a" if v is None else f"{v:+.3f}"

        md += ["", f"AA {m['aa']:.3f} · BWT {f(m['bwt'])} · FWT {f(m['fwt'])} · mean forgetting {f(m['mean_forgetting'])}"]
    write_text_atomic(out / "results.md", "\n".join(md) + "\n")


def _check_identity(out: Path, identity: dict[str, Any], resume: bool) -> None:
    marker = out / "cpi_ft.json"
    if not marker.exists():
        if out.exists() and any(out.iterdir()) and not resume:
            raise ConfigError(f"{out} is not empty; choose a new --out")
        return
    if not resume:
        raise ConfigError(f"{out} already holds a CPI-FT run; pass --resume to continue it or choose a new --out")
    previous = json.loads(marker.read_text())["identity"]
    diffs = [k for k in identity if previous.get(k) != identity[k]]
    if diffs:
        raise ConfigError(f"--resume: {out} was started with different settings; resume with the original ones "
                          f"or use a new --out", [f"{k}: was {previous.get(k)!r}, now {identity[k]!r}" for k in diffs])


def _local_base(model: str | Path, out: Path, say: Callable[[str], None]) -> Path:
    """The base model as a local dir (the update magnitudes and the merge read its tensors)."""
    if Path(model).is_dir():
        return Path(model)
    target = out / "base"
    if not (target / "config.json").exists():
        from trace_transfer.models import load_model, load_tokenizer

        say(f"saving {model} to {target} (steps 1 and 3 read the base weights from disk)")
        load_model(str(model)).save_pretrained(target)
        load_tokenizer(str(model)).save_pretrained(target)
    return target


def _started(run_dir: Path) -> bool:
    """Resume a step's runner run only where one was started (its run.json exists), else start it fresh."""
    return (run_dir / "run.json").exists()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "task"
