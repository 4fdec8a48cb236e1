"""Sequential runner: train a stream of tasks stage by stage, checkpoint and evaluate after each.

``run_sequence`` is the one library call behind ``trace-transfer finetune``. Its layout on disk::

    OUT/run.json              the run's identity (model, stages, method, options, config); resume checks it
    OUT/stage_0/eval.json     scores of the base model on every task, then stage_0/COMPLETE
    OUT/stage_k/              HF model dir (safetensors) + tokenizer + stage.json + eval.json, then COMPLETE
    OUT/results.json          R, AA/BWT/FWT, forgetting, per-stage losses, provenance (rewritten after each stage)
    OUT/results.md            the accuracy matrix as a markdown table

Training returns results and the report draws them: ``trace_transfer.report.plots.plot_run(OUT)``
writes ``OUT/accuracy_matrix.png`` from ``results.json`` (``finetune --plot`` calls it).

Under ``torchrun``/``deepspeed`` (``deepspeed_config``) every rank trains; rank 0 alone writes every
file above, while the other ranks wait for it (an error on rank 0 is raised on every rank rather than
leaving them at the next collective). Under ZeRO-3 each stage starts from the previous checkpoint loaded
straight into each rank's partitions (``train.ds.load_partitioned``: built under ``zero.Init``, streamed
in tensor by tensor; the method's prepare, CoreSet checks and sparse deltas work on the empty
placeholders), and each stage, of every method, is saved by streaming it from the
still-sharded engine (``train.ds.save_consolidated``; LoRA adapters merged into their weights tensor by
tensor), so no rank holds the whole model while starting, training or saving a stage. Every rank takes
part in the evaluation after each stage, of the base model or the stage's saved checkpoint, loaded in
the evaluation dtype (``dtype``: bf16 on GPUs that support it, else fp32): when it fits every rank's GPU (weights x 1.2 against the free memory),
each rank loads it whole and scores a share of every task's batches, merged into the single-process
scores; otherwise rank 0 alone loads it across the visible GPUs (``device_map="auto"``) and scores
everything while the others wait for the scores (``trace_transfer.evaluation.distributed.evaluate_checkpoint``;
each stage's eval.json records the placement). Without ``deepspeed_config`` the runner is
single-process and refuses to start under a multi-process launcher, where every rank would train its
own copy and write the same files; it evaluates on ``device`` (the base model spread over the GPUs
like the ``eval`` command when it does not fit one), optionally generating with vLLM
(``eval_backend="vllm"``, reading each stage's checkpoint directory).

A stage is *complete* only when its checkpoint, its eval row and — written last, atomically — its
``COMPLETE`` marker exist. ``resume=True`` discards anything after the last complete stage and
continues from that stage's checkpoint. Every stage starts by loading the previous stage's
checkpoint from disk and reseeding with ``cfg.seed + k``, so an uninterrupted run and a run killed
and resumed take exactly the same path and give bit-identical weights and scores.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
import random
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from trace_transfer._version import versions
from trace_transfer.checkpoint import check_output, write_json_atomic, write_text_atomic
from trace_transfer.errors import ArtifactNotFoundError, ConfigError
from trace_transfer.evaluation.continual import continual_metrics, format_matrix_markdown
from trace_transfer.train.loop import TrainConfig, train
from trace_transfer.train.methods import MethodOptions, PrepareContext, RunPlan, Stage, get_method

__all__ = ["run_sequence", "RunResult", "Stage", "MethodOptions", "completed_stages"]

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
RESULTS_FORMAT = "trace-transfer/results"
# Test hook: "K:N" hard-kills the process (SIGKILL, no cleanup) after optimizer step N of stage K,
# the way an OOM kill or a pre-empted node would; "K:save" while stage K's checkpoint is being saved
# (written to its temp dir, not yet renamed). Used by the resume and fault tests.
KILL_ENV = "TRACE_TRANSFER_KILL_AT"


@dataclass
class RunResult:
    """What ``run_sequence`` returns (the same content as ``results.json``)."""

    out_dir: Path
    results: dict[str, Any]
    rank: int = 0  # the process's rank under torchrun/DeepSpeed: only rank 0 wrote anything

    @property
    def R(self) -> list[list[float]]:
        return self.results["R"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.results["metrics"]


def _stage_dir(out: Path, k: int) -> Path:
    return out / f"stage_{k}"


def completed_stages(out_dir: str | os.PathLike) -> list[int]:
    """Indices ``0..k`` of consecutive complete stages (marker present) in ``out_dir``."""
    out, done = Path(out_dir), []
    k = 0
    while (_stage_dir(out, k) / MARKER).exists():
        done.append(k)
        k += 1
    return done


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must not be the reason a run fails
        pass


def _identity(model_ref: str, stages: Sequence[Stage], method: str, options: MethodOptions, cfg: TrainConfig,
              eval_limit: int | None, deepspeed_config: str | None, monitor: Sequence[str]) -> dict[str, Any]:
    # Left out on purpose: device, the evaluation dtype and backend. They say how a stage is run and
    # scored, not what is trained; runs written before --dtype existed hold no such key and must still
    # resume, and a run may resume on another machine (a CPU fp32 run continued on a bf16 GPU). Each
    # stage's eval.json records the dtype, placement and backend it was scored with.
    return {
        "monitor": list(monitor),
        "model": str(model_ref),
        "stages": [{"task": s.task, "coreset": s.coreset} for s in stages],
        "method": method,
        "method_options": options.to_dict(),
        "config": cfg.identity(),  # without execution-only settings (checkpointing): a resume may change them
        "eval_limit": eval_limit,
        "deepspeed_config": str(deepspeed_config) if deepspeed_config else None,
        "input_sha256": _input_hashes(stages, options, monitor),
    }


def _check_resume(out: Path, identity: dict[str, Any], resume: bool) -> list[int]:
    import json

    run_json = out / "run.json"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory path for the run")
    check_output(out, force=True, what="run directory")  # under a file or read-only: fail before any work
    if not run_json.exists():
        # A fresh run writes only into a new or empty directory: whatever is there was not made by
        # this run, so it is neither removed nor overwritten. Hidden files (a pipeline step's
        # .attempt) are never touched, so they do not count.
        present = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
        if present:
            shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
            raise ConfigError(f"--out {out} is not empty ({shown}) and holds no run.json, so it is not a run to "
                              f"resume; choose a new --out (nothing was changed)")
        return []
    if not resume:
        raise ConfigError(
            f"{out} already holds a run ({len(completed_stages(out))} completed stage(s)); pass --resume to "
            f"continue it or choose a new --out"
        )
    try:
        previous = json.loads(run_json.read_text())["identity"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: {run_json} is not a run.json written by finetune ({exc}); choose a new --out") from exc
    done = completed_stages(out)
    diffs = [k for k in identity if previous.get(k) != identity[k]]
    if diffs:
        raise ConfigError(
            f"--resume: {out} was started with different settings; resume with the original ones or use a new --out",
            [f"{k}: was {previous.get(k)!r}, now {identity[k]!r}" for k in diffs],
        )
    return done


def _discard_incomplete(out: Path, keep_upto: int, n_stages: int) -> None:
    """Remove this run's stage directories after the last complete one (a killed stage's partial output).

    Only what this run writes is touched: ``stage_<k>`` and the ``.stage_<k>.*`` temp dirs of an
    interrupted checkpoint write, for the stages ``k`` of this run. Anything else in ``out`` stays.
    """
    ours = range(keep_upto + 1, n_stages + 1)
    for p in out.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith("stage_") and p.name[6:].isdigit() and int(p.name[6:]) in ours:
            shutil.rmtree(p)
        elif p.name.startswith(".stage_") and p.name.split(".")[1][6:].isdigit() \
                and int(p.name.split(".")[1][6:]) in ours:
            shutil.rmtree(p)


def _load_coresets(stages: Sequence[Stage], options: MethodOptions, model: torch.nn.Module, needed: bool):
    from trace_transfer.coreset import CoreSet

    cores = [CoreSet.load(s.coreset) if (needed and s.coreset) else None for s in stages]
    general = CoreSet.load(options.general_coreset) if options.general_coreset else None
    for c in [*cores, general]:
        if c is not None:
            c.check_fits(model)
    return cores, general


def _check_coresets_fit(model_ref: str, stages: Sequence[Stage], options: MethodOptions, needed: bool) -> None:
    """Load every CoreSet and check it against the model's parameters (built on the meta device from
    its config, no weights) before the run directory is claimed or the base model is evaluated."""
    paths = [s.coreset for s in stages if needed and s.coreset]
    paths += [options.general_coreset] if options.general_coreset else []
    if not paths or not Path(model_ref).is_dir():
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from trace_transfer.coreset import CoreSet

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_ref))
    for path in paths:
        CoreSet.load(path).check_fits(model)


def _input_hashes(stages: Sequence[Stage], options: MethodOptions, monitor: Sequence[str]) -> dict[str, str]:
    """sha256 of every input file named by path (CoreSets, task specs): --resume compares content, so a
    file replaced between a kill and the resume is caught, not silently trained on."""
    from trace_transfer.checkpoint import file_sha256

    files = [s.coreset for s in stages if s.coreset] + [s.task for s in stages] + list(monitor)
    files += [options.general_coreset] if options.general_coreset else []
    return {str(f): file_sha256(f) for f in files if f and Path(f).is_file()}


def _coreset_summary(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    from trace_transfer.coreset import CoreSet

    cs = CoreSet.load(path)
    keep = ("strategy", "task", "tasks", "ratio", "granularity", "budget", "alpha", "beta", "seed", "preset")
    return {"path": str(path), "selected_params": cs.num_selected(), "total_params": cs.num_total(),
            **{k: cs.metadata[k] for k in keep if k in cs.metadata}}


def _tokenized(tokenizer, examples: list[Any], seq_len: int) -> list[dict[str, Any]]:
    from trace_transfer.data import tokenize_examples

    return tokenize_examples(tokenizer, examples, seq_len)


def _batch_fn(features: list[dict[str, Any]], batch_size: int, pad_id: int, seed: int) -> Callable[[int], Any]:
    """``epoch -> batches``: a fresh permutation per epoch from ``seed`` (and nothing else)."""
    from trace_transfer.data import collate

    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(features), generator=g).tolist()
        # Full batches only (equal-sized steps); a dataset smaller than one batch is one batch.
        n_full = max(1, len(order) // batch_size)
        for b in range(n_full):
            yield collate([features[j] for j in order[b * batch_size : (b + 1) * batch_size]], pad_id)

    return batches


def _evaluate_all(model, tokenizer, tasks, eval_limit, eval_batch_size, **extra: Any) -> dict[str, Any]:
    """``{task: {score, metric, n, higher_is_better}}`` from this process alone (``extra``: the vLLM
    backend's ``backend``/``checkpoint``)."""
    from trace_transfer.evaluation.metrics import evaluate

    return _score_rows({t.name: evaluate(model, tokenizer, t, limit=eval_limit, batch_size=eval_batch_size, **extra)
                        for t in tasks}, tasks)


def _score_rows(results: dict[str, Any], tasks) -> dict[str, Any]:
    """eval.json's ``{task: {score, metric, n, higher_is_better}}`` for ``tasks`` out of ``{name: EvalResult}``."""
    return {t.name: {"score": results[t.name].score, "metric": results[t.name].metric, "n": results[t.name].n,
                     "higher_is_better": results[t.name].higher_is_better} for t in tasks}


def _stage_extras(tmp: Path, k: int, stage_info: dict[str, Any]) -> None:
    """stage.json into a stage's finished temp dir, just before it is renamed into place."""
    write_json_atomic(tmp / "stage.json", stage_info)
    if os.environ.get(KILL_ENV) == f"{k}:save":  # test hook: die with the checkpoint written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)


def _save_checkpoint(model, tokenizer, out: Path, k: int, stage_info: dict[str, Any]) -> Path:
    """HF directory (safetensors + tokenizer) written to a temp dir, then renamed into place."""
    final = _stage_dir(out, k)
    if final.exists():
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".stage_{k}.", dir=out))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _stage_extras(tmp, k, stage_info)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _save_checkpoint_streaming(model, tokenizer, out: Path, k: int, stage_info: dict[str, Any]) -> None:
    """Collective (every rank calls it): stage k's HF directory streamed from a ZeRO-3-sharded model one
    tensor at a time, rank 0 writing; same files and the same temp-dir-then-rename as ``_save_checkpoint``."""
    from trace_transfer.train.ds import save_consolidated

    save_consolidated(model, _stage_dir(out, k), tokenizer,
                      before_publish=lambda tmp: _stage_extras(tmp, k, stage_info))


def _kill_hook(stage: int) -> Callable[[int, float], None] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    if spec.endswith(":save"):
        return None  # handled in _save_checkpoint
    k, n = (int(x) for x in spec.split(":"))
    if k != stage:
        return None

    def on_step(step: int, loss: float) -> None:
        if step + 1 >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def _as_stage(s: Stage | tuple[str, str | None] | str) -> Stage:
    return s if isinstance(s, Stage) else Stage(s) if isinstance(s, str) else Stage(*s)


def _validate(meth, method: str, stages: list[Stage], options: MethodOptions,
              deepspeed_config: str | os.PathLike | None) -> None:
    """Every problem with the inputs at once, before any process group, file or model is touched."""
    problems = meth.check(stages, options)
    if not stages:
        problems.append("no stages: give at least one --stage TASK")
    names = [s.task for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"task(s) {dupes} appear in more than one stage; each task is one column of R")
    for s in stages:
        if s.coreset and not Path(s.coreset).exists():
            problems.append(f"CoreSet file not found: {s.coreset} (stage {s.task})")
    if options.general_coreset and not Path(options.general_coreset).exists():
        problems.append(f"general CoreSet file not found: {options.general_coreset}")
    if deepspeed_config and not Path(deepspeed_config).exists():
        problems.append(f"DeepSpeed config not found: {deepspeed_config}")
    if deepspeed_config and getattr(meth, "deepspeed_refusal", None):
        problems.append(meth.deepspeed_refusal)
    if problems:
        raise ConfigError(f"cannot run method {method!r}", problems)


def _check_eval_backend(name: str, model_ref: str | os.PathLike, deepspeed_config) -> str:
    """The per-stage evaluation's generation backend, refused (one ConfigError line) before anything is
    claimed: vLLM absent, under DeepSpeed, or handed a base model it cannot read from a directory."""
    from trace_transfer.evaluation.vllm_backend import check_backend

    name = check_backend(name, distributed=deepspeed_config is not None)
    if name == "vllm" and not Path(model_ref).is_dir():
        raise ConfigError(f"--eval-backend vllm reads the weights from a directory, and the base model {str(model_ref)!r} "
                          f"is not a local directory; save it to one first (trace-transfer build-model or "
                          f"save_pretrained), or use --eval-backend hf")
    return name


def _open_out_dir(out: Path, identity: dict[str, Any], resume: bool, ranks: _Ranks,
                  n_stages: int) -> tuple[list[int], str]:
    """Check ``out`` against ``identity``; on rank 0 write run.json (fresh run) or drop a killed stage's leftovers.

    Returns the complete stages and the start time.
    """
    done = _check_resume(out, identity, resume)
    resuming = resume and (out / "run.json").exists()
    # A resumed run keeps its run.json (same identity, checked above) and its start time.
    started = (_read_json(out / "run.json").get("started") if resuming else None) \
        or _dt.datetime.now(_dt.timezone.utc).isoformat()
    ranks.on_main("creating the run directory", lambda: out.mkdir(parents=True, exist_ok=True))
    # Every rank has read OUT before rank 0 changes it (else a slower rank sees the fresh run.json).
    ranks.barrier()

    def prepare_out() -> None:
        if resuming:  # a fresh run found nothing of its own to discard
            _discard_incomplete(out, done[-1] if done else -1, n_stages)
        else:
            write_json_atomic(out / "run.json", {"identity": identity, "started": started, "versions": versions()})

    ranks.on_main("preparing the run directory", prepare_out)
    return done, started


@dataclass
class _Run:
    """One run's fixed settings and the results gathered so far (``results.json`` is written from them)."""

    model_ref: str
    stages: list[Stage]
    method: str
    meth: Any
    out: Path
    cfg: TrainConfig
    options: MethodOptions
    identity: dict[str, Any]
    started: str
    deepspeed_config: str | os.PathLike | None
    ranks: _Ranks
    say: Callable[[str], None]
    eval_limit: int | None
    eval_batch_size: int
    tasks: list[Any] = field(default_factory=list)
    monitored: list[Any] = field(default_factory=list)
    tokenizer: Any = None
    rows: list[list[float]] = field(default_factory=list)
    monitor_rows: list[list[float]] = field(default_factory=list)
    directions: dict[str, bool] = field(default_factory=dict)  # task -> higher_is_better, from its evaluations
    stage_records: list[dict[str, Any]] = field(default_factory=list)
    # Where models load: the resolved --device without DeepSpeed (DeepSpeed places them itself).
    device: str = "cpu"
    device_spec: str = "auto"  # --device as given: inference_device_map spreads a big model only under auto
    # The per-stage evaluation: the dtype its weights load in (resolved --dtype; training keeps fp32
    # weights) and the generation backend (hf | vllm). Neither is in the run's identity (see _identity).
    eval_dtype: str = "float32"
    eval_backend: str = "hf"

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def monitor_names(self) -> list[str]:
        return [t.name for t in self.monitored]

    def replay(self, done: list[int]) -> None:
        """Take the rows and stage records of what an interrupted run already completed."""
        task_names, monitor_names = self.task_names, self.monitor_names
        for k in done:
            ev = _read_json(_stage_dir(self.out, k) / "eval.json")
            self.directions.update({n: ev["scores"][n].get("higher_is_better", True) for n in task_names})
            self.rows.append([ev["scores"][n]["score"] for n in task_names])
            self.monitor_rows.append([ev["monitor"][n]["score"] for n in monitor_names])
            if k > 0:
                self.stage_records.append(_read_json(_stage_dir(self.out, k) / "stage.json"))
        if done:
            self.say(f"resuming {self.out}: stages 0..{done[-1]} complete")

    def evaluate_into(self, model, k: int, spread: bool = False) -> None:
        """Score stage ``k`` (0: the base model) on every task and monitored task, write its eval.json and
        then its COMPLETE marker, and keep its row.

        ``spread=False``: this process scores ``model`` alone (single-process runs, or rank 0 inside
        ``on_main``), first cast in place to the evaluation dtype (the caller is done with it: stage
        k+1 starts from the checkpoint on disk). ``spread=True`` is collective, for DeepSpeed runs where
        every rank calls it: ``model`` is ignored and stage k's checkpoint is loaded in the evaluation
        dtype, either whole on every rank, each scoring a share of every task's batches, or by rank 0
        alone across the visible GPUs when it does not fit one
        (:func:`trace_transfer.evaluation.distributed.evaluate_checkpoint`). eval.json records which
        (``evaluation``: placement, dtype, backend).
        """
        checkpoint = self.model_ref if k == 0 else str(_stage_dir(self.out, k))
        if spread:
            from trace_transfer.evaluation.distributed import evaluate_checkpoint

            results, placement = evaluate_checkpoint(checkpoint, self.tokenizer, [*self.tasks, *self.monitored],
                                                     dtype=self.eval_dtype, limit=self.eval_limit,
                                                     batch_size=self.eval_batch_size)
            scores, watched = _score_rows(results, self.tasks), _score_rows(results, self.monitored)
            dtype = self.eval_dtype
        else:
            if self.eval_dtype and next(model.parameters()).dtype != getattr(torch, self.eval_dtype):
                # The same values as loading the saved (fp32) stage in that dtype, without a second copy.
                model = model.to(getattr(torch, self.eval_dtype))
            placement = "device-map" if getattr(model, "hf_device_map", None) else "whole"
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            # vLLM reads the weights from disk: the stage's saved checkpoint holds exactly these.
            extra = {"backend": "vllm", "checkpoint": checkpoint} if self.eval_backend == "vllm" else {}
            scores = _evaluate_all(model, self.tokenizer, self.tasks, self.eval_limit, self.eval_batch_size, **extra)
            watched = _evaluate_all(model, self.tokenizer, self.monitored, self.eval_limit, self.eval_batch_size,
                                    **extra)
        del model  # this copy goes now, before the next stage loads its own
        if self.eval_backend == "vllm":
            from trace_transfer.evaluation.vllm_backend import release_engines

            release_engines()  # the engine would otherwise hold its GPU share through the next stage's training
        how = {"placement": placement, "dtype": dtype, "backend": self.eval_backend}

        def write() -> None:
            _stage_dir(self.out, k).mkdir(parents=True, exist_ok=True)
            write_json_atomic(_stage_dir(self.out, k) / "eval.json",
                              {"stage": k, "scores": scores, "monitor": watched, "evaluation": how})
            # The marker goes last: only now is the stage complete for --resume.
            marker = "stage 0 (base) evaluated\n" if k == 0 else f"stage {k} complete\n"
            write_text_atomic(_stage_dir(self.out, k) / MARKER, marker)

        if spread:
            self.ranks.on_main(f"writing stage {k}'s scores", write)
        else:
            write()
        self.monitor_rows.append([watched[n]["score"] for n in self.monitor_names])
        self.rows.append([scores[n]["score"] for n in self.task_names])
        self.directions.update({n: scores[n]["higher_is_better"] for n in self.task_names})

    def evaluate_base(self) -> None:
        """Row 0. Under DeepSpeed a collective (every rank scores a share of the base model's batches, or
        rank 0 alone across the GPUs); alone, loaded as the ``eval`` command does (spread over the
        visible GPUs under ``--device auto`` when it does not fit one)."""
        from trace_transfer.models import inference_device_map, load_model

        _seed_everything(self.cfg.seed)
        self.say("evaluating the base model on every task")
        if self.ranks.distributed:
            self.evaluate_into(None, 0, spread=True)
        else:
            spread = inference_device_map(self.model_ref, self.device_spec, self.eval_dtype)
            self.evaluate_into(load_model(self.model_ref, dtype=self.eval_dtype, device=self.device,
                                          device_map=spread), 0)

    def evaluate_saved_stage(self, k: int) -> None:
        """Collective (DeepSpeed): every rank takes part in scoring stage k's saved checkpoint (see
        :meth:`evaluate_into`); rank 0 writes its eval row and results.json."""
        self.evaluate_into(None, k, spread=True)
        self.ranks.on_main(f"writing the results of stage {k}", self.write_results)

    def run_stage(self, plan: RunPlan, n_plans: int, per_task_examples: list[list[Any]]) -> None:
        """Train one stage from the previous stage's checkpoint on disk, then save and evaluate it (rank 0)."""
        from trace_transfer.data import pad_id_of

        k, cfg, task_names = plan.index, self.cfg, self.task_names
        seed = cfg.seed + k
        _seed_everything(seed)
        # Always start from the checkpoint on disk: a resumed run then takes the very same path.
        model = _load_stage_start(self.model_ref if k == 1 else str(_stage_dir(self.out, k - 1)), self.device,
                                  self.deepspeed_config, cfg)
        cores, general = _load_coresets(self.stages, self.options, model, needed=(self.method == "trace"))
        ctx = PrepareContext(stages=self.stages, coresets=cores, general_coreset=general, options=self.options,
                             weight_decay=cfg.weight_decay)
        examples = self.meth.examples(plan, per_task_examples, self.options, random.Random(seed))
        features = _tokenized(self.tokenizer, examples, cfg.seq_len)
        prepared = self.meth.prepare(model, plan, ctx)
        stage_cfg = cfg
        if cfg.max_steps > 0 and plan.steps_factor != 1:
            stage_cfg = replace(cfg, max_steps=cfg.max_steps * plan.steps_factor)
        label = "+".join(task_names[t] for t in plan.tasks)
        self.say(f"stage {k}/{n_plans} ({self.method}, {label}): {len(examples)} examples, "
                 f"{prepared.info.get('trainable_params', '?')} trainable parameters")
        batches = _batch_fn(features, stage_cfg.batch_size, pad_id_of(self.tokenizer), seed)

        def stage_record(result) -> dict[str, Any]:
            record = {
                "stage": k,
                "tasks": [task_names[t] for t in plan.tasks],
                "coreset": self.stages[plan.tasks[0]].coreset if len(plan.tasks) == 1 else None,
                "seed": seed,
                "num_examples": len(examples),
                "train": result.to_dict(),
                "method_info": prepared.info,
                "config": stage_cfg.to_dict(),
                "device": self.device if self.deepspeed_config is None else "deepspeed",
            }
            self.stage_records.append(record)
            return record

        def trained(record: dict[str, Any]) -> None:
            self.say(f"stage {k}: loss {record['train']['first_loss']:.4f} -> {record['train']['last_loss']:.4f}; "
                     f"evaluating")

        if self.deepspeed_config is not None:
            # Collective, and no rank ever holds the whole model: every rank trains its shard, the stage
            # is streamed to disk from the still-sharded engine (rank 0 writes, tensor by tensor), the
            # shards are released, and the stage is evaluated from its checkpoint, which is also where
            # stage k+1 starts. The method's finish() is not needed: the save folds sparse deltas and
            # merges LoRA adapters into their base weights itself, one tensor at a time.
            def save(engine, result) -> None:
                _save_checkpoint_streaming(prepared.model, self.tokenizer, self.out, k, stage_record(result))

            _train_deepspeed(prepared, batches, stage_cfg, self.deepspeed_config, _kill_hook(k), save=save)
            del model, prepared  # an empty shell by now; dropping it lets go of the engine's last references
            gc.collect()

            trained(self.stage_records[-1])
            self.evaluate_saved_stage(k)
            return

        result = train(prepared.model, batches, stage_cfg, params=prepared.params,
                       on_step=_kill_hook(k), after_step=prepared.after_step)
        model = prepared.finish(prepared.model)
        for p in model.parameters():
            p.requires_grad_(True)
        record = stage_record(result)

        def save_and_evaluate() -> None:
            _save_checkpoint(model, self.tokenizer, self.out, k, record)
            trained(record)
            self.evaluate_into(model, k)
            self.write_results()

        # The next stage loads this checkpoint on every rank: all wait until rank 0 has written it.
        self.ranks.on_main(f"saving and evaluating stage {k}", save_and_evaluate)

    def write_results(self) -> dict[str, Any]:
        return _write_results(self.out, self.identity, self.stages, self.task_names, self.rows, self.stage_records,
                              self.started, monitor=(self.monitor_names, self.monitor_rows),
                              higher_is_better=[self.directions.get(n, True) for n in self.task_names])


def _start_run(model_ref: str, stages: list[Stage], method: str, meth, out: Path, cfg: TrainConfig,
               options: MethodOptions, resume: bool, deepspeed_config, progress, monitor: Sequence[str],
               eval_limit: int | None, eval_batch_size: int, device: str = "cpu", dtype: str = "auto",
               eval_backend: str = "hf") -> tuple[_Run, list[int]]:
    """Join the process group (DeepSpeed), claim ``out`` and load the tasks: the run's context and its done stages."""
    from trace_transfer.data import load_task
    from trace_transfer.evaluation.code_exec import check_tasks_consent
    from trace_transfer.models import check_model_dir, load_tokenizer

    from trace_transfer.devices import resolve_device, resolve_dtype

    where = resolve_device(device) if deepspeed_config is None else "cpu"  # refused before OUT is claimed
    # The evaluation dtype: auto is bf16 where the evaluation runs on a GPU that supports it, else fp32
    # (CPU runs keep scoring the fp32 weights training leaves, bit for bit as before --dtype existed).
    eval_where = where if deepspeed_config is None else ("cuda" if torch.cuda.is_available() else "cpu")
    eval_dtype = resolve_dtype(dtype, eval_where)
    ranks = _Ranks(deepspeed_config is not None)
    say = (progress or (lambda msg: logger.info(msg))) if ranks.main else _quiet
    identity = _identity(model_ref, stages, method, options, cfg, eval_limit,
                         str(deepspeed_config) if deepspeed_config else None, monitor)
    # Every input is checked before the run directory is claimed or anything trains: a code_exec task
    # without consent, task data that cannot be read, a broken model, a CoreSet that does not fit.
    tasks, monitored = [load_task(s.task) for s in stages], [load_task(m) for m in monitor]
    check_tasks_consent(tasks + monitored)
    for t in tasks:
        t.train_examples()  # loads (and caches) the rows: a bad data file fails here, not after the base eval
    if Path(model_ref).is_dir():
        check_model_dir(model_ref)
    tokenizer = load_tokenizer(model_ref)
    _check_coresets_fit(model_ref, stages, options, needed=(method == "trace"))
    done, started = _open_out_dir(out, identity, resume, ranks, len(meth.plan(stages)))
    run = _Run(model_ref, stages, method, meth, out, cfg, options, identity, started, deepspeed_config, ranks,
               say, eval_limit, eval_batch_size)
    run.tasks, run.monitored, run.tokenizer, run.device = tasks, monitored, tokenizer, where
    run.device_spec, run.eval_dtype, run.eval_backend = device, eval_dtype, eval_backend
    return run, done


def run_sequence(
    model_ref: str | os.PathLike,
    stages: Sequence[Stage | tuple[str, str | None] | str],
    method: str,
    out_dir: str | os.PathLike,
    cfg: TrainConfig | None = None,
    eval_limit: int | None = None,
    resume: bool = False,
    deepspeed_config: str | os.PathLike | None = None,
    *,
    options: MethodOptions | None = None,
    eval_batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
    monitor: Sequence[str] = (),
    device: str = "auto",
    dtype: str = "auto",
    eval_backend: str = "hf",
) -> RunResult:
    """Train ``stages`` in order with ``method``; checkpoint and evaluate every task after each stage.

    Args:
        model_ref: HF model id or directory (the base model, evaluated as row 0 of R).
        stages: ``Stage(task, coreset)`` (or ``(task, coreset)`` tuples, or bare task refs).
        method: a registered method (``trace``, ``full``, ``lora``, ``joint``, ``replay``, ``general-core``).
        out_dir: run directory (see the module docstring for its layout).
        cfg: optimisation settings (a fresh optimizer and schedule per stage); stage k uses seed ``cfg.seed + k``.
        eval_limit: evaluate the first ``eval_limit`` examples of each task (None = all).
        resume: continue after the last complete stage of an interrupted run in ``out_dir``.
        deepspeed_config: a DeepSpeed JSON config; training then goes through
            ``trace_transfer.train.ds.deepspeed_train`` (launch under ``torchrun``/``deepspeed``).
        options: method options (isolation, replay share, general CoreSet, LoRA rank).
        progress: called with one-line status messages.
        monitor: tasks that are evaluated at every row but never trained (e.g. ``synthetic:general``,
            to watch general ability erode); reported as ``results["monitor"]``, not part of R.
        device: ``auto`` (CUDA when available) | ``cpu`` | ``cuda[:i]``: where every stage trains and
            evaluates without DeepSpeed (fp32 weights, bf16 autocast per ``cfg.precision``); ignored
            under DeepSpeed, which places each rank's shard on its own GPU.
        dtype: ``auto`` | ``bf16`` | ``fp16`` | ``fp32``: the dtype the evaluation after each stage loads
            (or casts) the weights in; ``auto`` is bf16 on a CUDA device that supports it, else fp32.
            Training is unaffected (fp32 weights). Recorded in each stage's eval.json, not part of the
            run's identity: a resume may change it (e.g. on another machine).
        eval_backend: ``hf`` | ``vllm``: the generation backend of the per-stage evaluation. vLLM (not
            installed by any extra) reads stage k's checkpoint directory, so ``model_ref`` must then be
            a local directory; refused under DeepSpeed (see ``evaluation/vllm_backend.py``).

    Returns:
        :class:`RunResult` with ``R`` and the continual metrics (also in ``out_dir/results.json``).
        Figures are the report's job: ``trace_transfer.report.plots.plot_run(out_dir)``.

    Raises:
        ConfigError: unknown method, missing CoreSets, a task repeated, ``out_dir`` holding a
            different run (or any run without ``resume``), an unknown dtype, or ``eval_backend="vllm"``
            where vLLM is absent, under DeepSpeed or with a hub id as the model.
        ModelMismatchError: a CoreSet does not fit the model.

    Example:
        >>> run_sequence("tiny", [Stage("synthetic:math", "cores/math.coreset.safetensors"), ...],
        ...              "trace", "runs/trace", TrainConfig(lr=3e-4, max_steps=150, batch_size=32))
    """
    # 1. Validate everything, before joining a process group or touching OUT.
    cfg = cfg or TrainConfig(epochs=3.0)
    options = options or MethodOptions()
    stages = [_as_stage(s) for s in stages]
    meth = get_method(method)
    _validate(meth, method, stages, options, deepspeed_config)
    eval_backend = _check_eval_backend(eval_backend, model_ref, deepspeed_config)

    run, done = _start_run(str(model_ref), stages, method, meth, Path(out_dir), cfg, options, resume,
                           deepspeed_config, progress, monitor, eval_limit, eval_batch_size, device, dtype,
                           eval_backend)
    ranks, out = run.ranks, run.out
    plans = meth.plan(stages)

    # A finished run resumed: nothing to do, and nothing on disk is rewritten.
    finished = _read_json(out / "results.json") if (out / "results.json").exists() else {}
    if resume and all(p.index in done for p in plans) and 0 in done and finished.get("complete"):
        return RunResult(out_dir=out, results=finished, rank=ranks.rank)

    # 2. Replay the stages an interrupted run finished; evaluate the base model unless that is done.
    run.replay(done)
    if 0 not in done:
        run.evaluate_base()  # under DeepSpeed every rank scores its share; rank 0 writes

    # 3. Run the remaining stages, one at a time (each writes results.json when it is complete).
    per_task_examples: list[list[Any]] | None = None
    for plan in plans:
        if plan.index in done:
            continue
        if per_task_examples is None:
            per_task_examples = [list(t.train_examples()) for t in run.tasks]
        run.run_stage(plan, len(plans), per_task_examples)

    # 4. Write the final results (rank 0); the other ranks read them back.
    results = ranks.on_main("writing the results", run.write_results)
    if not ranks.main:
        results = _read_json(out / "results.json")
    return RunResult(out_dir=out, results=results, rank=ranks.rank)


def _quiet(msg: str) -> None:
    pass


class _Ranks:
    """Rank awareness for DeepSpeed runs: every rank trains and evaluates a share; rank 0 alone writes."""

    def __init__(self, distributed: bool):
        import torch.distributed as dist

        self.distributed = False
        self.rank = 0
        if not distributed:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
                int(os.environ.get("WORLD_SIZE", "1"))
            if world > 1:
                raise ConfigError(
                    f"launched as {world} processes (torchrun/deepspeed) without a DeepSpeed config: the plain "
                    f"training loop is single-process, so every rank would train its own copy and write the same "
                    f"files; pass --deepspeed CONFIG (deepspeed_config=...) or run one process"
                )
            return
        if not dist.is_initialized():
            import deepspeed

            deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
        self.distributed = True
        self.rank = dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and hold the other ranks until it has finished (None there).

        A failure on rank 0 is raised on every rank: the others would otherwise wait at the next
        collective until the process group's timeout.
        """
        value, error = None, None
        if self.main:
            try:
                value = fn()
            except BaseException as exc:  # re-raised below, after the other ranks have heard of it
                error = exc
        if self.distributed:
            import torch.distributed as dist

            status = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(status, src=0)
            if status[0] is not None and not self.main:
                raise RuntimeError(f"rank 0 failed while {what}: {status[0]}")
        if error is not None:
            raise error
        return value


def _load_stage_start(ref: str, device: str, deepspeed_config, cfg: TrainConfig) -> torch.nn.Module:
    """The model a stage starts from. Under a ZeRO-3 config it is loaded partitioned (collective: every
    rank calls it): built under ``zero.Init`` and streamed in tensor by tensor, so a rank holds its
    partition plus about two tensors, never the whole model (``train.ds.load_partitioned``; every
    method's prepare works on the empty placeholders). Otherwise it is loaded whole on ``device``."""
    from trace_transfer.models import load_model

    if deepspeed_config is not None:
        import torch.distributed as dist

        from trace_transfer.train.ds import load_ds_config, load_partitioned, zero_stage

        conf = load_ds_config(deepspeed_config, cfg, dist.get_world_size() if dist.is_initialized() else 1)
        if zero_stage(conf) == 3:
            return load_partitioned(ref, conf)
    return load_model(ref, device=device)


def _train_deepspeed(prepared, batches, cfg, deepspeed_config, on_step, save=None):
    """Train under DeepSpeed; with ``save(engine, result)`` the model is saved from the sharded engine
    and then released on every rank (nothing returned in memory), else handed back unsharded."""
    try:
        from trace_transfer.train.ds import deepspeed_train
    except ImportError as exc:
        raise ArtifactNotFoundError(
            "--deepspeed needs trace_transfer.train.ds and the deepspeed package: pip install 'trace-transfer[deepspeed]'"
        ) from exc
    return deepspeed_train(prepared.model, batches, cfg, deepspeed_config, params=prepared.params,
                           on_step=on_step, after_step=prepared.after_step, unshard=save is None,
                           before_teardown=save)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def _write_results(out: Path, identity, stages, task_names, rows, stage_records, started,
                   monitor: tuple[list[str], list[list[float]]] = ([], []),
                   higher_is_better: list[bool] | None = None) -> dict[str, Any]:
    complete = len(rows) - 1 == (1 if identity["method"] == "joint" else len(stages))
    metrics = continual_metrics(rows, higher_is_better) if len(rows) >= 2 else None
    labels = ["before"] + [
        f"after {'+'.join(r['tasks'])}" for r in stage_records
    ]
    results = {
        "format": RESULTS_FORMAT,
        "complete": complete,
        "tasks": task_names,
        "row_labels": labels,
        "R": rows,
        "metrics": metrics,
        "monitor": {"tasks": monitor[0], "rows": monitor[1]} if monitor[0] else None,
        "per_stage": [
            {"stage": r["stage"], "tasks": r["tasks"], "seed": r["seed"], "steps": r["train"]["steps"],
             "first_loss": r["train"]["first_loss"], "last_loss": r["train"]["last_loss"],
             "losses": r["train"]["losses"], "seconds": r["train"]["seconds"], "method_info": r["method_info"]}
            for r in stage_records
        ],
        "provenance": {
            **identity,
            "coresets": [_coreset_summary(s.coreset) for s in stages],
            "general_coreset": _coreset_summary(identity["method_options"].get("general_coreset")),
            "seeds": {"base": identity["config"]["seed"], "stage_k": "config.seed + k"},
            "versions": versions(),
            "started": started,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        },
    }
    write_json_atomic(out / "results.json", results)
    md = [f"# {identity['method']} on {' → '.join(task_names)}", ""]
    md.append(format_matrix_markdown(rows, task_names, labels))
    if metrics is not None:
        def f(v):
            return "n/a" if v is None else f"{v:+.3f}" if v < 0 or v > 0 else "0.000"

        md += ["", f"AA {f(metrics['aa'])} · BWT {f(metrics['bwt'])} · FWT {f(metrics['fwt'])} · "
               f"mean forgetting {f(metrics['mean_forgetting'])}",
               "", "BWT = 1/(T-1) Σ_{j<T} (R[T][j] − R[j][j]); FWT = 1/(T-1) Σ_{j≥2} (R[j−1][j] − R[0][j])."]
    if monitor[0]:
        md += ["", "Monitored (evaluated, never trained):", "",
               format_matrix_markdown(monitor[1], monitor[0], labels[: len(monitor[1])])]
    write_text_atomic(out / "results.md", "\n".join(md) + "\n")
    return results
