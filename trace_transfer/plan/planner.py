"""``plan(...)``: every step of a pipeline config, with its memory, FLOPs, time range and verdict.

The steps are the ones ``trace-transfer run`` executes (``pipeline/run.py``): warm-start probes of the
source and/or target per task (launched under ``launch.deepspeed`` like fine-tuning, the global batch
split over the ranks, else one process in fp32 + AdamW; plus the Fisher pass and its accumulator:
:func:`~trace_transfer.plan.estimate.probe_memory`), scoring (host), CKA capture of both models
(inference), transfer (configs only), fine-tuning per method (DeepSpeed as ``launch:`` says, else one
process) and the evaluation after each stage (inference). What a method trains comes from the
pipeline's method table (``pipeline/methods.py``) and the ``scoring:`` section.

The verdict tries, in order, what a user would try: the step as configured; ZeRO-3 over the GPUs
given; + gradient checkpointing; + optimizer offload; + parameter offload; then more GPUs. The first
that fits is the verdict ("fits", "needs ZeRO-3", "needs grad ckpt", "needs offload (optimizer)",
"needs offload (optimizer+params)", "needs N more GPUs").

"As configured" includes the config's gradient checkpointing (``training.gradient_checkpointing`` for
fine-tuning, ``probe.gradient_checkpointing`` for the probes): with it on, the verdict uses the
checkpointed activations; with it off, a step that fits once it is on says "fits only with
training.gradient_checkpointing: true" (the key to set). Pretraining has no such key: it runs without,
and the ladder suggests it as a change. The ladder suggests checkpointing only where it lowers the
peak (a probe's writes hold no activations).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trace_transfer.errors import ConfigError
from trace_transfer.plan.estimate import (
    DS_DEFAULTS,
    Setup,
    Trainable,
    fits,
    forward_flops,
    inference_memory,
    probe_memory,
    time_range,
    train_flops,
    train_memory,
    with_,
)
from trace_transfer.plan.hardware import Hardware
from trace_transfer.plan.shapes import ModelShape, config_roots, find_config, model_shape, tiny_shape

if TYPE_CHECKING:
    from trace_transfer.pipeline.config import ModelSpec, PipelineConfig

CKPT_KEY = "training.gradient_checkpointing"  # the pipeline key that turns checkpointing on for fine-tuning
PROBE_CKPT_KEY = "probe.gradient_checkpointing"  # ... and for the warm-start probes
BATCH_KEY = "probe.batch_size"  # the global batch the ranks share (the only Setup.global_batch is the probe's)
SCOPE = ("layers",)  # the pipeline scores the decoder layers' tensors (scoring's default scope)
MAX_GPUS = 4096
CKA_MAX_LENGTH = 512  # capture's truncation: an upper bound on a probe text's tokens
EVAL_NEW_TOKENS = 256  # generation budget assumed per evaluation item (an upper bound for most tasks)


# How a step's memory is counted: (shape, what it trains, setup, hardware) -> train_memory's dict.
Memory = Callable[[ModelShape, Trainable, Setup, Hardware], dict[str, Any]]


@dataclass
class StepPlan:
    """One step (or a group of identical ones: ``count``) of the pipeline."""

    name: str
    kind: str  # train | inference | host | config
    model: str
    setup: str
    trains: str = "-"
    gradient_checkpointing: bool = False  # what the config runs the step with (train steps)
    checkpointing_key: str | None = None  # the config key that sets it; None: the step has none
    trainable_params: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    fits_as_configured: bool = True
    verdict: str = "fits"
    suggestion: str | None = None
    suggestion_memory: dict[str, Any] | None = None
    flops: float | None = None
    seconds: tuple[float, float] | None = None
    count: int = 1
    methods: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # DeepSpeed variants over the same GPUs
    deepspeed: str | None = None  # the DeepSpeed JSON the step is launched with (launch.deepspeed or an override)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["seconds"] = list(self.seconds) if self.seconds else None
        return d


@dataclass
class Plan:
    name: str
    hardware: Hardware
    models: dict[str, ModelShape]
    steps: list[StepPlan]
    assumptions: list[str]

    def to_dict(self) -> dict[str, Any]:
        hw = self.hardware
        return {
            "format": "trace-transfer/plan", "format_version": 1, "pipeline": self.name,
            "hardware": {"gpu": hw.gpu.name, "gpu_memory": hw.memory, "gpus_per_node": hw.gpus_per_node,
                         "nodes": hw.nodes, "host_memory_per_node": hw.host_memory, "bf16_peak_flops": hw.gpu.bf16_flops,
                         "mfu": list(hw.mfu), "usable_fraction": hw.usable, "overhead_per_gpu": hw.overhead},
            "models": {side: m.to_dict() for side, m in self.models.items()},
            "steps": [s.to_dict() for s in self.steps],
            "assumptions": self.assumptions,
        }


# --------------------------------------------------------------------------------------------------
# What each method trains
# --------------------------------------------------------------------------------------------------


def _scope_tensors(shape: ModelShape) -> list[int]:
    return sorted((t.numel for t in shape.tensors if t.group in SCOPE), reverse=True)


def core_trainable(shape: ModelShape, ratio: float, granularity: str, budget: str, masking: str) -> Trainable:
    """What a CoreSet of ``ratio`` at ``granularity`` leaves trainable (before scoring: bounds)."""
    sizes = _scope_tensors(shape)
    scope = sum(sizes)
    pct = f"{ratio:.0%}" if ratio * 100 == round(ratio * 100) else f"{ratio:.1%}"
    if granularity == "tensor":
        if budget == "tensors":
            k = math.floor(ratio * len(sizes))
            top = sum(sizes[:k])
            return Trainable(f"tensor {pct}", top, top, note=f"{k} of {len(sizes)} tensors in scope; upper bound: the "
                             f"{k} largest ({top / shape.params:.1%} of the model; a random pick averages "
                             f"{ratio * scope / shape.params:.1%})")
        n = int(ratio * scope)
        return Trainable(f"tensor {pct}", n, n, note="whole tensors up to the parameter budget")
    k = int(ratio * scope)
    if masking == "sparse":
        idx = 4 * k if granularity == "element" else 4 * k // max(1, shape.hidden)
        transient = sizes[0] if granularity == "element" and sizes else 0
        # Rows/heads/columns compute only δ's slice of the weight gradient; an element core builds the
        # full weight and its full gradient (one tensor at a time).
        wgrad = sum(t.numel for t in shape.tensors if t.group in SCOPE and len(t.shape) >= 2) \
            if granularity == "element" else k
        return Trainable(f"{granularity} {pct} sparse", k, wgrad, extra_params=k, index_bytes=idx,
                         transient_params=transient, note="sparse masking: δ + int32 indices only")
    dense = scope
    return Trainable(f"{granularity} {pct} dense", dense, dense,
                     note="dense masking: every tensor in scope that holds a core unit stays trainable "
                          "(assumed: all of them, 1.00x full FT state as measured)")


def coreset_trainable(shape: ModelShape, path: str | Path, masking: str) -> Trainable:
    """Exact counts from a scored CoreSet of the model: tensors wholly core train whole; a partly-core
    tensor trains whole under dense masking, as δ (+ int32 indices) under sparse masking — where at
    most half of it is core, as ``apply_coreset``'s ``auto`` does."""
    from trace_transfer.coreset import SUFFIX, CoreSet
    from trace_transfer.errors import ModelMismatchError

    cs = CoreSet.load(path)
    sizes = {t.name: t for t in shape.tensors}
    grad = wgrad = extra = index = transient = 0
    for name in cs.names():
        t = sizes.get(name)
        if t is None or tuple(cs.shape(name)) != t.shape:
            raise ModelMismatchError(f"CoreSet {path}: tensor {name!r} {list(cs.shape(name))} is not in "
                                     f"{shape.ref} with that shape; plan with the CoreSet of this model")
        n, matrix = cs.num_selected(name), len(t.shape) >= 2
        element = cs.granularity(name) == "element"
        if n == t.numel or masking == "dense" or (masking == "auto" and n > t.numel // 2):
            grad += t.numel
            wgrad += t.numel if matrix else 0
        else:
            grad, extra = grad + n, extra + n
            index += 4 * (n if element else max(1, n // max(1, t.numel // t.shape[0])))
            wgrad += (t.numel if element else n) if matrix else 0
            transient = max(transient, t.numel if element else 0)
    label = f"coreset {Path(path).name.removesuffix(SUFFIX)}"
    return Trainable(label, grad, wgrad, extra_params=extra, index_bytes=index, transient_params=transient,
                     note=f"exact, from {path}: {cs.num_selected():,} core parameters ({cs.ratio():.2%}) in "
                          f"{len(cs.names())} tensors, masking {masking}")


def method_trainable(entry: Any, shape: ModelShape, cfg: PipelineConfig, masking: str) -> Trainable:
    """``entry`` is a :class:`~trace_transfer.pipeline.methods.PipelineMethod`."""
    s = cfg.scoring
    everything = Trainable("full", shape.params, shape.matmul_params)
    if entry.trainer == "cpi-ft":
        return Trainable("full", shape.params, shape.matmul_params, note="CPI-FT's per-task full fine-tuning")
    if entry.strategy is not None:
        return core_trainable(shape, s.ratio, s.granularity, s.budget, masking)
    if entry.general_core:
        core = core_trainable(shape, s.ratio, s.granularity, s.budget, "dense")
        if s.granularity != "tensor":
            return Trainable("complement", shape.params, shape.matmul_params,
                             note="freezing a finer-than-tensor core masks gradients: every tensor stays trainable")
        sizes = sorted(_scope_tensors(shape))
        frozen = sum(sizes[: math.floor(s.ratio * len(sizes))]) if s.budget == "tensors" else core.grad_params
        return Trainable("complement", shape.params - frozen, shape.matmul_params - frozen,
                         note="everything but the general core (upper bound: the core's smallest tensors)")
    if entry.runner == "lora":
        r = 8
        n = sum(r * (t.shape[0] + t.shape[1]) for t in shape.tensors if t.group == "layers" and len(t.shape) == 2)
        return Trainable(f"lora r{r}", n, n, extra_params=n, note="r=8 on every linear layer but the LM head")
    return everything


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------


def _train_verdict(shape: ModelShape, tr: Trainable, configured: Setup, hw: Hardware,
                   memory: Memory = train_memory) -> tuple[str, Setup, dict]:
    """The first rung of the ladder that fits; the verdict names every change it took (checkpointing
    only where the config does not already run with it). ``memory`` counts a setup (a probe's phases)."""
    changes: list[str] = []
    base = configured
    if configured.engine == "single" or configured.zero < 3:
        base = Setup("deepspeed", zero=3, world=hw.world, bf16=True, micro_batch=configured.micro_batch,
                     seq_len=configured.seq_len, buffers=configured.buffers, checkpointing=configured.checkpointing,
                     global_batch=configured.global_batch)
        changes.append(f"ZeRO-3 x{hw.world}")
    ckpt = [] if configured.checkpointing else ["grad ckpt"]
    # Checkpointing is only suggested where it lowers the peak: a probe's Fisher pass never checkpoints.
    helps = configured.checkpointing or memory(shape, tr, with_(base, checkpointing=True), hw)["total"] < \
        memory(shape, tr, base, hw)["total"]
    ckpt = ckpt if helps else []
    ladder = [(list(changes), base),
              ([*changes, *ckpt], with_(base, checkpointing=helps)),
              ([*changes, *ckpt, "offload opt"], with_(base, checkpointing=helps, offload_optimizer=True)),
              ([*changes, *ckpt, "offload opt+param"], with_(base, checkpointing=helps, offload_optimizer=True,
                                                             offload_param=True))]
    for needed, setup in ladder:
        mem = memory(shape, tr, setup, hw)
        if needed and fits(mem, hw):
            return "needs " + " + ".join(needed), setup, mem
    for on in ((True,) if configured.checkpointing else (False, True)):
        # Per-GPU memory under ZeRO-3 only falls as GPUs are added: bisect for the fewest that fit.
        def attempt(n: int) -> tuple[Setup, dict, bool]:
            setup, more = with_(base, world=n, checkpointing=on), hw.with_world(n)
            mem = memory(shape, tr, setup, more)
            return setup, mem, fits(mem, more)

        if not attempt(MAX_GPUS)[2]:
            continue
        lo, hi = hw.world + 1, MAX_GPUS
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if attempt(mid)[2] else (mid + 1, hi)
        batch = ""
        if base.global_batch:
            # The ranks share the global batch evenly (probe_launch_problems refuses the rest): the fewest
            # GPUs that fit and divide it, else the fewest that fit, with the batch to change.
            whole = next((n for n in range(lo, base.global_batch + 1) if base.global_batch % n == 0
                          and attempt(n)[2]), None)
            if whole is not None:
                lo = whole
            else:
                batch = f"; {BATCH_KEY} {base.global_batch} must become a multiple of {lo}"
        setup, mem, _ = attempt(lo)
        needed = [f"ZeRO-3 x{lo}", *(ckpt if on else [])]
        return f"needs {lo - hw.world} more GPUs ({' + '.join(needed)}{batch})", setup, mem
    setup = ladder[-1][1]
    return "does not fit: lower micro-batch or seq_len", setup, memory(shape, tr, setup, hw)


def _train_step(name: str, shape: ModelShape, tr: Trainable, configured: Setup, hw: Hardware,
                tokens: float | None, count: int, methods: list[str] | None = None,
                ckpt_key: str | None = None, memory: Memory = train_memory,
                flops: Callable[[Setup], float] | None = None) -> StepPlan:
    """``configured.checkpointing`` is what the config runs; ``ckpt_key`` the key that turns it on (None:
    the step has no such key, so checkpointing can only be a suggested change). ``memory`` counts a
    setup and ``flops`` the step's FLOPs under the chosen one (default: training on ``tokens``)."""
    mem = memory(shape, tr, configured, hw)
    ok = fits(mem, hw)
    with_ckpt = with_(configured, checkpointing=True)
    ckpt_mem = memory(shape, tr, with_ckpt, hw)
    if ok:
        verdict, chosen, chosen_mem = "fits", configured, mem
    elif ckpt_key and not configured.checkpointing and fits(ckpt_mem, hw):
        # The only change is a key in the same config: say which, not a generic "needs grad ckpt".
        verdict, chosen, chosen_mem = f"fits only with {ckpt_key}: true", with_ckpt, ckpt_mem
    else:
        verdict, chosen, chosen_mem = _train_verdict(shape, tr, configured, hw, memory)
    setup = configured.describe() + (" + grad ckpt" if configured.checkpointing else "")
    step = StepPlan(name, "train", shape.ref, setup, trains=tr.label, trainable_params=tr.grad_params,
                    gradient_checkpointing=configured.checkpointing, checkpointing_key=ckpt_key,
                    memory=mem, fits_as_configured=ok, verdict=verdict, count=count, methods=list(methods or []))
    if not ok:
        step.suggestion = chosen.describe() + (" + grad ckpt" if chosen.checkpointing else "")
        step.suggestion_memory = chosen_mem
        if chosen.checkpointing and not configured.checkpointing and not verdict.startswith("fits only"):
            step.notes.append(f"grad ckpt: set {ckpt_key}: true" if ckpt_key else
                              "grad ckpt: the config has no key for this step; run it by hand with "
                              "--gradient-checkpointing")
    if tr.note:
        step.notes.append(tr.note)
    step.options = _zero_options(shape, tr, configured, hw, memory)
    if tokens:
        step.flops = flops(chosen) if flops else train_flops(shape, tr, tokens, configured.seq_len, chosen.checkpointing)
        step.seconds = time_range(step.flops, chosen.world if chosen.engine == "deepspeed" else 1, hw)
    else:
        step.notes.append("time: the number of training examples is unknown offline (pass --examples)")
    return step


def _zero_options(shape: ModelShape, tr: Trainable, configured: Setup, hw: Hardware,
                  memory: Memory = train_memory) -> dict[str, dict[str, Any]]:
    """Per-GPU and host memory of every ZeRO stage and offload variant on ``hw``, with and without
    gradient checkpointing (the JSON's ``options``: pick your own trade-off)."""
    base = Setup("deepspeed", world=hw.world, micro_batch=configured.micro_batch, seq_len=configured.seq_len,
                 buffers=configured.buffers, global_batch=configured.global_batch)
    variants = {f"zero{z}": with_(base, zero=z) for z in (0, 1, 2, 3)}
    variants["zero3+offload_opt"] = with_(base, zero=3, offload_optimizer=True)
    variants["zero3+offload_opt+param"] = with_(base, zero=3, offload_optimizer=True, offload_param=True)
    out = {}
    for name, setup in variants.items():
        for ckpt in (False, True):
            mem = memory(shape, tr, with_(setup, checkpointing=ckpt), hw)
            out[name + ("+ckpt" if ckpt else "")] = {"per_gpu": mem["total"], "host_per_node": mem["host_per_node"],
                                                     "fits": fits(mem, hw)}
    return out


def _inference_step(name: str, shapes: list[ModelShape], batch: int, prompt: int, new: int, items: int | None,
                    hw: Hardware, loglik: bool, count: int = 1) -> StepPlan:
    worst = max(shapes, key=lambda s: s.params)
    gpus = 1
    mem = inference_memory(worst, batch, prompt, new, 1, hw, loglik)
    ok = fits(mem, hw)
    while not fits(mem, hw) and gpus < MAX_GPUS:
        gpus += 1
        mem = inference_memory(worst, batch, prompt, new, gpus, hw, loglik)
    if not fits(mem, hw):  # the transients stay on one GPU however many hold the layers
        verdict = "does not fit: lower the batch size"
    elif ok:
        verdict = "fits"
    else:
        verdict = f"needs {gpus} GPUs (device_map)" if gpus <= hw.world else f"needs {gpus - hw.world} more GPUs"
    step = StepPlan(name, "inference", " + ".join(s.ref for s in shapes), "1 GPU bf16", memory=mem,
                    fits_as_configured=ok, verdict=verdict, count=count)
    if not ok:
        step.suggestion = f"device_map over {gpus} GPUs"
        step.memory = inference_memory(worst, batch, prompt, new, 1, hw, loglik)
        step.suggestion_memory = mem
    if items:
        flops = sum(forward_flops(s, items * (prompt + new), prompt + new) for s in shapes)
        lo, hi = time_range(flops, gpus, hw)
        # Generation is bound by reading the weights once per new token, not by FLOPs.
        decode = sum(new * math.ceil(items / batch) * 2 * s.params / (gpus * hw.gpu.hbm_bandwidth) for s in shapes)
        step.flops, step.seconds = flops, (lo + decode, hi + 2 * decode)
    return step


# --------------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------------


def resolve_shape(spec: ModelSpec, side: str, base_dir: Path, roots: list[Path]) -> ModelShape:
    if spec.build is not None:
        b = spec.build
        return tiny_shape(b.arch, b.layers, b.hidden, b.heads, b.kv_heads, b.tokenizer,
                          f"built {b.arch} {b.layers}x{b.hidden}")
    return model_shape(find_config(spec.model, base_dir, roots), spec.model)


def _deepspeed_setup(path: Path, world: int, micro_batch: int, seq_len: int, precision: str) -> Setup:
    try:
        conf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"launch.deepspeed: cannot read {path}: {exc}") from exc
    zero = conf.get("zero_optimization", {}) or {}
    bf16 = conf.get("bf16", {}).get("enabled", False)
    bf16 = precision != "fp32" if bf16 == "auto" else bool(bf16)
    buffers = {k: int(zero.get(k, v)) for k, v in DS_DEFAULTS.items()}
    off = lambda key: (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    return Setup("deepspeed", zero=int(zero.get("stage", 0)), offload_optimizer=off("offload_optimizer"),
                 offload_param=off("offload_param"), world=world, bf16=bf16, micro_batch=micro_batch,
                 seq_len=seq_len, buffers=buffers)


def _ds_path(cfg: PipelineConfig, base_dir: Path, *keys: str) -> Path:
    """The DeepSpeed JSON of the launched step ``keys`` name (``LaunchSpec.deepspeed_for``)."""
    path = Path(cfg.launch.deepspeed_for(*keys))
    return path if path.is_absolute() else base_dir / path


def count_examples(task: str, examples: dict[str, int], default: int | None) -> int | None:
    """Training examples of ``task``: ``--examples`` first, then a synthetic task's own count."""
    key = Path(task).stem if not task.startswith("synthetic:") else task
    for k in (task, key, Path(task).name):
        if k in examples:
            return examples[k]
    if default is not None:
        return default
    if task.startswith("synthetic:"):
        from trace_transfer.data import load_task

        return len(load_task(task).train_examples())
    return None


def plan(cfg: PipelineConfig, hw: Hardware, *, base_dir: Path | None = None, configs: list[Path] | tuple = (),
         examples: dict[str, int] | None = None, default_examples: int | None = None,
         eval_items: int | None = None, masking: str | None = None, coresets: list[str | Path] | tuple = ()) -> Plan:
    """Plan every step of ``cfg`` on ``hw`` from the models' configs alone.

    Args:
        cfg: a validated pipeline config (:func:`~trace_transfer.pipeline.config.load_pipeline`).
        hw: the machines (:class:`~trace_transfer.plan.hardware.Hardware`).
        base_dir: resolves the config's relative paths (its directory).
        configs: roots where a hub id ``org/name`` has ``org/name/config.json`` (offline look-up).
        examples: training examples per task (by task file stem, path or ``synthetic:`` name).
        default_examples: examples of a task missing from ``examples``.
        eval_items: evaluation items per task when ``eval.limit`` is null.
        masking: ``dense`` / ``sparse`` for finer-than-tensor cores (default: the config's, else
            ``apply_coreset``'s ``auto``: sparse up to half a tensor).
        coresets: scored CoreSets of the target; the core methods' row then counts exactly what the
            largest of them trains instead of bounds from the ratio.

    Returns:
        A :class:`Plan`; ``Plan.to_dict()`` is the ``--json`` output.

    Example:
        >>> from trace_transfer.pipeline.config import load_pipeline
        >>> p = plan(load_pipeline("examples/pipelines/paper-llama3-8b-to-qwen3-32b.yaml"),
        ...          Hardware(gpus_per_node=8), configs=["examples/paper_models"])
    """
    from trace_transfer.pipeline.methods import resolve

    base_dir = Path(base_dir or Path.cwd())
    roots = config_roots(list(configs))
    examples = examples or {}
    masking = requested = masking or getattr(cfg.training, "masking", None) or "auto"
    if masking == "auto":  # apply_coreset's rule: sparse where at most half of a tensor is core
        masking = "sparse" if cfg.scoring.ratio <= 0.5 else "dense"
    shapes = {"source": resolve_shape(cfg.source, "source", base_dir, roots),
              "target": resolve_shape(cfg.target, "target", base_dir, roots)}
    methods = resolve(cfg.methods)
    tasks = [*cfg.tasks, *([cfg.general_task] if any(m.general_core for _, m in methods) else [])]
    ctx = _Context(cfg, hw, shapes, methods, {t: count_examples(t, examples, default_examples) for t in tasks},
                   base_dir)
    exact = max((coreset_trainable(shapes["target"], c, requested) for c in coresets), key=lambda t: t.grad_params,
                default=None)
    steps = [*_pretrain_steps(ctx), *_probe_steps(ctx), *_score_steps(ctx), *_transfer_steps(ctx),
             *_finetune_steps(ctx, masking, exact, base_dir), _eval_step(ctx, eval_items)]
    assumptions = [
        "memory: model states (ZeRO paper accounting) + activations (Korthikanti et al. 2022, per-layer, "
        "redone for RMSNorm/SwiGLU/GQA with SDPA attention) + ZeRO buffers + "
        f"{hw.overhead / 2**30:.0f} GiB runtime overhead; fits = at most {hw.usable:.0%} of GPU memory",
        "tokens: every example counted at the full seq_len (an upper bound: batches pad to their longest example)",
        f"time: FLOPs / (GPUs x bf16 peak x MFU {hw.mfu[0]:.0%}-{hw.mfu[1]:.0%}); offload's host-side optimizer "
        "step is not modelled",
        f"finer-than-tensor cores: masking '{masking}' (the config's, or apply_coreset's 'auto': sparse up to "
        "half a tensor); the other masking is listed too, marked 'not configured'",
        "host: under ZeRO-3 each rank streams the checkpoint into its partitions one tensor at a time "
        "(train.ds.load_partitioned); under ZeRO-1/2 every rank loads the whole model (checkpoint dtype) first",
    ]
    return Plan(cfg.name, hw, shapes, steps, assumptions)


@dataclass
class _Context:
    cfg: PipelineConfig
    hw: Hardware
    shapes: dict[str, ModelShape]
    methods: list[tuple[str, Any]]  # (name, PipelineMethod)
    examples: dict[str, int | None]  # training examples per task, None where unknown
    base_dir: Path = field(default_factory=Path.cwd)  # resolves launch.deepspeed and launch.hostfile

    def needs(self, what: str) -> bool:
        if what == "general":
            return any(m.general_core for _, m in self.methods)
        return any(m.cores == what for _, m in self.methods)


def _full(shape: ModelShape) -> Trainable:
    return Trainable("full", shape.params, shape.matmul_params)


def _pretrain_steps(ctx: _Context) -> list[StepPlan]:
    """Models built and pretrained in the run (tiny configs): one process, fp32."""
    out = []
    for side in ("source", "target"):
        p = getattr(ctx.cfg, side).pretrain
        if p is not None:
            setup = Setup("single", micro_batch=p.batch_size, seq_len=p.seq_len, bf16=False)
            out.append(_train_step(f"pretrain {side}", ctx.shapes[side], _full(ctx.shapes[side]), setup, ctx.hw,
                                   p.steps * p.batch_size * p.seq_len, 1))
    return out


def _probe_sides(ctx: _Context) -> list[tuple[str, list[str]]]:
    cfg = ctx.cfg
    target = (list(cfg.tasks) if ctx.needs("target") else []) + ([cfg.general_task] if ctx.needs("general") else [])
    return [(side, tasks) for side, tasks in (("source", list(cfg.tasks) if ctx.needs("transfer") else []),
                                              ("target", target)) if tasks]


def _probe_setup(ctx: _Context, side: str) -> tuple[Setup, list[str]]:
    """How the pipeline runs a probe of ``side``: under ``launch.deepspeed`` launched on ``nnodes x
    nproc_per_node`` ranks (``probe --deepspeed``), the ZeRO stage read from its JSON (the side's
    ``launch.deepspeed_overrides``, else ``launch.deepspeed``) as for fine-tuning, each rank taking
    ``probe.batch_size / world`` of the global batch; else one process, fp32 weights + AdamW, bf16 autocast
    where the GPU has it. ``probe.gradient_checkpointing`` either way."""
    from trace_transfer.pipeline.launch import launch_world, probe_override_keys

    cfg, pr = ctx.cfg, ctx.cfg.probe
    notes = []
    if cfg.launch.deepspeed:
        world = launch_world(cfg.launch, ctx.base_dir)
        # The probe's precision is TrainConfig's default ("auto": bf16 where the GPU has it).
        setup = _deepspeed_setup(_ds_path(cfg, ctx.base_dir, *probe_override_keys(side)), world, pr.batch_size,
                                 pr.seq_len, "auto")
        if world != ctx.hw.world:
            notes.append(f"launched on the config's {world} ranks (launch.nnodes x nproc_per_node), not the "
                         f"{ctx.hw.world} GPUs planned for")
    else:
        setup = Setup("single", micro_batch=pr.batch_size, seq_len=pr.seq_len, bf16=True)
    # global_batch: the ranks share probe.batch_size, also in the ZeRO-3 setups the ladder suggests.
    return with_(setup, checkpointing=pr.gradient_checkpointing, global_batch=pr.batch_size), notes


def _probe_steps(ctx: _Context) -> list[StepPlan]:
    """Warm-start probes of every parameter, then the Fisher pass and the writes (:func:`probe_memory`)."""
    from trace_transfer.pipeline.launch import probe_override_keys

    pr = ctx.cfg.probe

    def memory(shape: ModelShape, tr: Trainable, s: Setup, hw: Hardware) -> dict[str, Any]:
        return probe_memory(shape, s, hw)  # the pipeline's probes keep the per-element Fisher (the default)

    out = []
    for side, tasks in _probe_sides(ctx):
        setup, notes = _probe_setup(ctx, side)
        shape, full = ctx.shapes[side], _full(ctx.shapes[side])
        counts = [_probe_tokens(pr, ctx.examples[t]) for t in tasks]
        tokens = max(counts, key=sum) if all(counts) else None

        def flops(chosen: Setup, shape=shape, full=full, tokens=tokens) -> float:
            # Under checkpointing the warm start and the Fisher pass (probe.fisher.eval_checkpointing) recompute.
            return train_flops(shape, full, tokens[0], pr.seq_len, chosen.checkpointing) + \
                train_flops(shape, full, tokens[1], pr.seq_len, chosen.checkpointing)

        step = _train_step(f"probe {side} x{len(tasks)}", shape, full, setup, ctx.hw, sum(tokens) if tokens else None,
                           len(tasks), ckpt_key=PROBE_CKPT_KEY, memory=memory, flops=flops)
        mem = step.memory
        phases = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in mem["phases"].items())
        peak = f"peak in the {mem['phase']} phase ({phases} GiB/GPU)"
        if mem["phase"] == "fisher":
            peak += f": the Fisher pass keeps a {mem['per_gpu']['fisher'] / 2**30:.1f} GiB fp32 accumulator"
        step.notes += [*notes, peak, f"disk per probe: delta + Fisher {8 * shape.params / 2**30:.0f} GiB "
                       f"(+ {4 * shape.params / 2**30:.0f} GiB θ0 while it runs)"]
        if ctx.cfg.launch.deepspeed:
            step.deepspeed = ctx.cfg.launch.deepspeed_for(*probe_override_keys(side))
        out.append(step)
    return out


def _score_steps(ctx: _Context) -> list[StepPlan]:
    """Scoring streams Δ and Fisher of every task probed on a side, on the host."""
    out = []
    n_tasks = len(ctx.cfg.tasks)
    for side in [s for s, need in (("source", "transfer"), ("target", "target")) if ctx.needs(need)]:
        sh = ctx.shapes[side]
        read = 8 * sh.params * n_tasks
        host = _score_host(sh, ctx.cfg.scoring.granularity, n_tasks)
        step = StepPlan(f"score {side}", "host", sh.ref, "host", memory={"per_gpu": {}, "total": 0,
                                                                         "host_per_node": host},
                        seconds=(read / 2e9, read / 0.5e9))
        step.notes.append(f"reads {read / 2**30:.0f} GiB of delta + Fisher per strategy; time: disk-bound at "
                          "2-0.5 GB/s")
        out.append(step)
    return out


def _transfer_steps(ctx: _Context) -> list[StepPlan]:
    if not ctx.needs("transfer"):
        return []
    src, tgt = ctx.shapes["source"], ctx.shapes["target"]
    return [_inference_step("cka (both models)", [src, tgt], 8, CKA_MAX_LENGTH, 0, ctx.cfg.layer_map.max_probes,
                            ctx.hw, loglik=True),
            StepPlan("transfer (configs)", "config", f"{src.ref} -> {tgt.ref}", "host",
                     memory={"per_gpu": {}, "total": 0, "host_per_node": 0},
                     notes=["configs and CoreSets only: seconds, no weights"])]


def _finetune_steps(ctx: _Context, masking: str, exact: Trainable | None, base_dir: Path) -> list[StepPlan]:
    """One row per distinct trainable set and DeepSpeed config (methods training the same thing under the
    same config share it; a method's ``launch.deepspeed_overrides`` entry gives it its own setup)."""
    cfg, t, tgt = ctx.cfg, ctx.cfg.training, ctx.shapes["target"]
    setups: dict[str | None, Setup] = {}

    def configured(method: str) -> tuple[str | None, Setup]:
        ds = cfg.launch.deepspeed_for(method) if cfg.launch.deepspeed else None
        if ds not in setups:
            setup = (_deepspeed_setup(_ds_path(cfg, base_dir, method), ctx.hw.world, t.batch_size, t.seq_len,
                                      t.precision) if ds else
                     Setup("single", micro_batch=t.batch_size, seq_len=t.seq_len, bf16=t.precision != "fp32"))
            setups[ds] = with_(setup, checkpointing=t.gradient_checkpointing)
        return ds, setups[ds]

    rows: dict[tuple[str, str | None], tuple[Trainable, list[str]]] = {}
    for name, entry in ctx.methods:
        ds, _ = configured(name)
        if exact is not None and entry.strategy is not None:
            rows.setdefault((exact.label, ds), (exact, []))[1].append(name)
            continue
        tr = method_trainable(entry, tgt, cfg, masking)
        rows.setdefault((tr.label, ds), (tr, []))[1].append(name)
        if tr.label.endswith((" dense", " sparse")):  # also show what the other masking would need
            other = method_trainable(entry, tgt, cfg, "dense" if masking == "sparse" else "sparse")
            other = replace(other, note=f"{other.note} (not configured: training.masking is {masking!r})")
            rows.setdefault((other.label, ds), (other, []))[1].append(name)
    stage_examples = [ctx.examples[x] for x in cfg.tasks]
    split = {label for label, _ in rows if sum(lb == label for lb, _ in rows) > 1}
    steps = []
    for (label, ds), (tr, names) in rows.items():
        setup = setups[ds]
        ranks = setup.world if setup.engine == "deepspeed" else 1
        if t.max_steps:
            tokens = t.max_steps * t.batch_size * t.grad_accum * ranks * t.seq_len * len(cfg.tasks)
        elif all(stage_examples):
            tokens = t.epochs * sum(stage_examples) * t.seq_len
        else:
            tokens = None
        # Methods of one trainable set under two configs: each row names its config.
        name = f"ft {label}" + (f" [{Path(ds).name}]" if label in split and ds else "")
        step = _train_step(name, tgt, tr, setup, ctx.hw, tokens, len(cfg.seeds), names, CKPT_KEY)
        step.deepspeed = ds
        steps.append(step)
    return steps


def _eval_step(ctx: _Context, eval_items: int | None) -> StepPlan:
    """Evaluation after every stage (and before the first), on the target."""
    e, n_tasks = ctx.cfg.eval, len(ctx.cfg.tasks)
    items = e.limit if e.limit is not None else eval_items
    ev = _inference_step("eval per stage", [ctx.shapes["target"]], e.batch_size, ctx.cfg.training.seq_len,
                         EVAL_NEW_TOKENS, items * n_tasks if items else None, ctx.hw, loglik=True, count=n_tasks + 1)
    if not items:
        ev.notes.append("time: eval.limit is null (full test sets); pass --eval-items N for a time estimate")
    return ev


def _probe_tokens(pr: Any, n_examples: int | None) -> tuple[float, float] | None:
    """Tokens of the warm start and of the Fisher pass (one forward + backward per token each)."""
    if pr.max_steps:
        steps = pr.max_steps
    elif n_examples:
        n = min(n_examples, pr.max_examples) if pr.max_examples else n_examples
        steps = math.ceil(pr.epochs * n / pr.batch_size)
    else:
        return None
    fisher = pr.fisher_batches or steps
    return steps * pr.batch_size * pr.seq_len, fisher * pr.batch_size * pr.seq_len


def _score_host(shape: ModelShape, granularity: str, n_tasks: int) -> int:
    """Unit scores (fp32) of every unit in scope for every task, plus a streamed tensor (Δ and Fisher)."""
    if granularity == "element":
        units = shape.params_in(SCOPE)
    elif granularity == "tensor":
        units = len(_scope_tensors(shape))
    else:
        units = sum(t.shape[0] if len(t.shape) >= 2 else 1 for t in shape.tensors if t.group in SCOPE)
    return 4 * units * n_tasks + 2 * 4 * shape.largest_tensor
