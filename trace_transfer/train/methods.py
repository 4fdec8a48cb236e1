"""Training methods of the sequential runner, each registered once with :func:`register_method`.

A method decides three things and nothing else; the runner owns data, seeds, the training loop,
checkpoints and evaluation, so methods cannot drift apart in those (torchtune's lesson):

1. ``plan(stages)`` — which training runs happen and on which tasks' data (one per stage, or one
   joint run over all tasks);
2. ``examples(run, per_task, options, rng)`` — the training examples of a run (replay mixes in a
   share of earlier tasks);
3. ``prepare(model, run, ctx)`` — what is trainable in a run and how the model is restored
   afterwards (masks removed, LoRA adapters merged).

Built-in methods:

* ``full``      sequential full fine-tuning.
* ``trace``     TRACE selective activation: stage k updates only its CoreSet ``C_k`` (masked
                gradients, no decay on frozen elements); cores may overlap and are re-trained when
                they reappear. ``isolation="strict"`` trains ``C_k \\ (C_1 ∪ … ∪ C_{k-1})`` instead.
* ``lora``      sequential LoRA with peft (paper: r=8, α=16, all linear layers except the LM head,
                lr 2e-5). **Adapters are merged into the weights after every stage**, and the next
                stage trains fresh adapters on the merged model.
* ``joint``     one run over all tasks mixed (multi-task upper reference); with ``max_steps`` it takes
                ``max_steps × T`` steps, so it sees as many examples as the sequential stream.
* ``replay``    DMT-style: stage k trains on task k plus ``ceil(share × |D_j|)`` examples sampled from
                each earlier task j (``replay_share``, default 0.1, relative to each earlier task's
                training set).
* ``general-core`` freeze a CoreSet scored on general data (``general_coreset``) in every stage and
                fine-tune its complement ("Selective Parameter Optimization").
* ``lisa``      LISA layerwise sampling: ``lisa_layers`` random transformer layers trainable at a time,
                redrawn every ``lisa_interval`` steps; embeddings, head and final norm always train.
* ``cpi-ft-sft`` CPI-FT step 5 (``trace_transfer.surgery.cpi_ft``): every stage freezes the CoreSet named by
                its ``Stage.coreset`` and trains the rest; consecutive stages naming the same file form
                one run over their tasks' data mixed (a CPI-FT group).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trace_transfer.errors import ConfigError
from trace_transfer.registry import Registry
from trace_transfer.train.config import MethodOptions  # declared with the other settings: loads without torch

__all__ = [
    "Stage",
    "RunPlan",
    "Prepared",
    "PrepareContext",
    "MethodOptions",
    "Method",
    "METHODS",
    "register_method",
    "get_method",
    "available_methods",
    "watch_steps",
    "counting_steps",
]


@dataclass(frozen=True)
class Stage:
    """One stage of a stream: a task reference and, for ``trace``, the stage's CoreSet file."""

    task: str
    coreset: str | None = None


@dataclass(frozen=True)
class RunPlan:
    """One training run: ``index`` (1-based row of R it produces) over the data of ``tasks``
    (indices into the stream) for ``steps_factor`` × the configured ``max_steps``."""

    index: int
    tasks: tuple[int, ...]
    steps_factor: int = 1


@dataclass
class Prepared:
    """What ``prepare`` hands the training loop.

    ``params``: parameter groups (None = every parameter with ``requires_grad``). ``after_step``:
    called after each optimizer step. ``finish(model) -> model``: undo masks / merge adapters and
    return the plain model to checkpoint. ``info``: provenance (trainable counts, ...).
    """

    model: torch.nn.Module
    params: list[Any] | None = None
    after_step: Callable[[], None] | None = None
    finish: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrepareContext:
    """Everything ``prepare`` may need about the stream (CoreSets already loaded and checked)."""

    stages: Sequence[Stage]
    coresets: Sequence[Any]  # CoreSet | None per stage
    general_coreset: Any  # CoreSet | None
    options: MethodOptions
    weight_decay: float


class Method(Protocol):
    """A training method. It may also set ``deepspeed_refusal`` (a one-line reason) when it cannot run
    under DeepSpeed; the runner then refuses ``deepspeed_config`` before anything starts."""

    name: str

    def check(self, stages: Sequence[Stage], options: MethodOptions) -> list[str]: ...
    def plan(self, stages: Sequence[Stage]) -> list[RunPlan]: ...
    def examples(self, run: RunPlan, per_task: Sequence[list[Any]], options: MethodOptions, rng: random.Random) -> list[Any]: ...
    def prepare(self, model: torch.nn.Module, run: RunPlan, ctx: PrepareContext) -> Prepared: ...


def _check_method(name: str, obj: Any) -> None:
    for hook in ("check", "plan", "examples", "prepare"):
        if not callable(getattr(obj, hook, None)):
            raise ConfigError(f"method {name!r} lacks `{hook}`; see trace_transfer.train.methods.Method")


METHODS: Registry[Method] = Registry("method", cli_hint="--method", validate=_check_method,
                                     how_to_add="or register your own with register_method")


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Register a training method under ``method.name`` (unique). Returns it (usable as a decorator
    on a class whose instances need no arguments).

    Raises:
        ConfigError: no string ``name``, the name is taken (``replace=True`` overrides on purpose),
            or a hook of :class:`Method` is missing.
    """
    obj = method() if isinstance(method, type) else method
    name = getattr(obj, "name", None)
    if not name or not isinstance(name, str):
        raise ConfigError(f"a method needs a non-empty string `name`, got {name!r}")
    METHODS.register(name, obj, replace=replace)
    return method


# Set by watch_steps: called with each run's plan when the method prepares it; returns a callable for
# every optimizer step of that run (or None).
StepWatcher = Callable[[RunPlan], Callable[[], None] | None]
_STEP_WATCHER: ContextVar[StepWatcher | None] = ContextVar("trace_transfer_step_watcher", default=None)


@contextlib.contextmanager
def watch_steps(watcher: StepWatcher) -> Iterator[None]:
    """See every optimizer step of the methods prepared inside the block (progress of a caller of the
    sequential runner, which reports stages but not steps): ``watcher(run)`` is called as a run
    starts and the callable it returns after each of the run's optimizer steps, after the method's
    own ``after_step``. Nothing else about the method changes.

    Example:
        >>> with watch_steps(lambda run: lambda: print("step of run", run.index)):
        ...     run_sequence(model, stages, "full", out, cfg)
    """
    token = _STEP_WATCHER.set(watcher)
    try:
        yield
    finally:
        _STEP_WATCHER.reset(token)


def counting_steps(tick: Callable[[str, int, int | None], None], max_steps: int) -> StepWatcher:
    """A :func:`watch_steps` watcher that reports ``("stage K training", done, total)`` to a progress
    callback (``ProgressLines``, the CLI's bars); ``total`` is ``max_steps`` x the run's steps factor,
    or None when the steps follow from epochs (known only inside the loop)."""

    def start(run: RunPlan) -> Callable[[], None]:
        total = max_steps * run.steps_factor if max_steps > 0 else None
        done = [0]

        def step() -> None:
            done[0] += 1
            tick(f"stage {run.index} training", done[0], total)

        return step

    return start


class _Watched:
    """A method whose prepared runs also call the active step watcher (see :func:`watch_steps`)."""

    def __init__(self, method: Method, watcher: StepWatcher):
        self._method, self._watcher = method, watcher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def prepare(self, model, run, ctx):
        prepared = self._method.prepare(model, run, ctx)
        on_step, own = self._watcher(run), prepared.after_step
        if on_step is not None:
            def after_step() -> None:
                if own is not None:
                    own()
                on_step()

            prepared.after_step = after_step
        return prepared


def get_method(name: str) -> Method:
    """The registered method ``name`` (inside :func:`watch_steps`, one that also reports its steps)."""
    method, watcher = METHODS.get(name), _STEP_WATCHER.get()
    return method if watcher is None else _Watched(method, watcher)


def available_methods() -> list[str]:
    return METHODS.names()


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def _sequential_plan(stages: Sequence[Stage]) -> list[RunPlan]:
    return [RunPlan(index=i + 1, tasks=(i,)) for i in range(len(stages))]


def _own_examples(run: RunPlan, per_task: Sequence[list[Any]], options: MethodOptions, rng: random.Random) -> list[Any]:
    return [ex for t in run.tasks for ex in per_task[t]]


def _train_everything(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _numel(p: torch.nn.Parameter) -> int:
    # A ZeRO-3 placeholder (a model loaded partitioned) is empty: its real size is ds_numel.
    return getattr(p, "ds_numel", None) or p.numel()


def _count_trainable(model: torch.nn.Module) -> dict[str, int]:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}


def _masked(model: torch.nn.Module, coreset: Any, mode: str, weight_decay: float, info: dict[str, Any],
            masking: str = "auto") -> Prepared:
    from trace_transfer.train.masking import apply_coreset

    handle = apply_coreset(model, coreset, mode=mode, masking=masking)

    def finish(m: torch.nn.Module) -> torch.nn.Module:
        handle.remove()
        return m

    return Prepared(model=model, params=handle.param_groups(weight_decay), after_step=handle.after_step,
                    finish=finish, info={**info, **handle.summary()})


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


class Full:
    name = "full"

    def check(self, stages, options):
        return []

    plan = staticmethod(_sequential_plan)
    examples = staticmethod(_own_examples)

    def prepare(self, model, run, ctx):
        _train_everything(model)
        return Prepared(model=model, info=_count_trainable(model))


class Trace:
    name = "trace"

    def check(self, stages, options):
        return [
            f"stage {i + 1} ({s.task}) has no CoreSet: write it as TASK:PATH.coreset.safetensors"
            for i, s in enumerate(stages)
            if not s.coreset
        ]

    plan = staticmethod(_sequential_plan)
    examples = staticmethod(_own_examples)

    def prepare(self, model, run, ctx):
        from trace_transfer.train.masking import combine

        k = run.tasks[0]
        core = combine(ctx.coresets[k], isolation=ctx.options.isolation, previous=list(ctx.coresets[:k]))
        info: dict[str, Any] = {"coreset": ctx.stages[k].coreset, "isolation": ctx.options.isolation,
                                "coreset_selected": ctx.coresets[k].num_selected()}
        if ctx.options.isolation == "strict" and k > 0:
            info["removed_by_isolation"] = ctx.coresets[k].num_selected() - core.num_selected()
            if core.num_selected() == 0:
                raise ConfigError(
                    f"stage {k + 1} ({ctx.stages[k].task}): strict isolation leaves no trainable parameter "
                    f"(its CoreSet lies inside earlier stages' cores); use --isolation none or a larger ratio"
                )
        return _masked(model, core, "train-core", ctx.weight_decay, info, ctx.options.masking)


class Lora:
    name = "lora"
    # Under ZeRO-3 the stage start loads partitioned, like every other method's: the runner does not
    # call finish() there; its streaming save (train.ds.save_consolidated) merges the adapters tensor
    # by tensor (tests/train/test_lora_stream_save.py runs it on a partitioned start).

    def check(self, stages, options):
        return []

    plan = staticmethod(_sequential_plan)
    examples = staticmethod(_own_examples)

    def prepare(self, model, run, ctx):
        from peft import LoraConfig, get_peft_model

        o = ctx.options
        config = LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                            target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        info = _count_trainable(peft_model)
        info.update({"lora_r": o.lora_r, "lora_alpha": o.lora_alpha, "merged_after_stage": True})

        def finish(m):
            # Merge so the checkpoint is a plain model and the next stage starts from W + BA (one
            # process; under DeepSpeed the streaming save writes the same merged tensors instead).
            return m.merge_and_unload()

        return Prepared(model=peft_model, finish=finish, info=info)


class Joint:
    name = "joint"

    def check(self, stages, options):
        return []

    def plan(self, stages):
        return [RunPlan(index=1, tasks=tuple(range(len(stages))), steps_factor=len(stages))]

    examples = staticmethod(_own_examples)

    def prepare(self, model, run, ctx):
        _train_everything(model)
        return Prepared(model=model, info=_count_trainable(model))


class Replay:
    name = "replay"

    def check(self, stages, options):
        return []

    plan = staticmethod(_sequential_plan)

    def examples(self, run, per_task, options, rng):
        k = run.tasks[0]
        out = list(per_task[k])
        for j in range(k):
            pool = per_task[j]
            n = min(len(pool), math.ceil(options.replay_share * len(pool)))
            out.extend(rng.sample(pool, n))
        return out

    def prepare(self, model, run, ctx):
        _train_everything(model)
        info = _count_trainable(model)
        info["replay_share"] = ctx.options.replay_share
        return Prepared(model=model, info=info)


class GeneralCore:
    name = "general-core"

    def check(self, stages, options):
        if not options.general_coreset:
            return ["method general-core needs --general-coreset PATH (the CoreSet to protect)"]
        return []

    plan = staticmethod(_sequential_plan)
    examples = staticmethod(_own_examples)

    def prepare(self, model, run, ctx):
        return _masked(model, ctx.general_coreset, "freeze-core", ctx.weight_decay,
                       {"general_coreset": ctx.options.general_coreset}, ctx.options.masking)


class CpiFtSft:
    """CPI-FT pipeline SFT: freeze the stage's CoreSet (the tasks' core regions), train the rest.

    Consecutive stages naming the *same* CoreSet file form one training run over their tasks' data
    mixed (a CPI-FT group); give every stage its own file for one run per task.
    """

    name = "cpi-ft-sft"

    def check(self, stages, options):
        return [f"stage {i + 1} ({s.task}) has no frozen CoreSet (TASK:FROZEN.coreset.safetensors)"
                for i, s in enumerate(stages) if not s.coreset]

    def plan(self, stages):
        plans, start = [], 0
        for i in range(1, len(stages) + 1):
            if i == len(stages) or stages[i].coreset != stages[start].coreset:
                tasks = tuple(range(start, i))
                plans.append(RunPlan(index=len(plans) + 1, tasks=tasks, steps_factor=len(tasks)))
                start = i
        return plans

    examples = staticmethod(_own_examples)

    def prepare(self, model, run, ctx):
        from trace_transfer.coreset import CoreSet

        path = ctx.stages[run.tasks[0]].coreset
        frozen = CoreSet.load(path)
        frozen.check_fits(model)
        info: dict[str, Any] = {"frozen_coreset": path, "frozen_params": frozen.num_selected()}
        if frozen.num_selected() == 0:  # freeze="prior", first run: nothing to protect yet
            _train_everything(model)
            return Prepared(model=model, info={**info, "trainable_params": _count_trainable(model)["total_params"]})
        return _masked(model, frozen, "freeze-core", ctx.weight_decay, info, ctx.options.masking)


class Lisa:
    """LISA (Pan et al. 2024, arXiv 2403.17919): every ``lisa_interval`` optimizer steps, ``lisa_layers``
    transformer layers drawn uniformly are trainable and the other layers frozen; everything outside the
    layers (embeddings, LM head, final norm) always trains, as in LMFlow's LISA trainer.

    Every parameter enters the stage's AdamW; a frozen layer has no gradient, so AdamW neither steps nor
    decays it (its moments wait for its next turn). The draw is seeded from torch's seed and the stage.
    """

    name = "lisa"
    # ZeRO flattens and partitions the trainable parameters (and their optimizer state) once, at
    # deepspeed.initialize; a layer whose requires_grad flips afterwards is never picked up or released.
    deepspeed_refusal = ("method lisa cannot run under --deepspeed: ZeRO builds its optimizer partitions at "
                         "initialize, so LISA's switching of trainable layers every K steps would not take effect; "
                         "use --method trace or full under DeepSpeed, or run lisa without --deepspeed")

    def check(self, stages, options):
        return []

    plan = staticmethod(_sequential_plan)
    examples = staticmethod(_own_examples)

    def prepare(self, model, run, ctx):
        import re

        layers: dict[int, list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            m = re.search(r"\.(\d+)\.", name)
            if m:
                layers.setdefault(int(m.group(1)), []).append(p)
        if not layers:
            raise ConfigError("method lisa found no numbered transformer layers in the model's parameter names")
        o = ctx.options
        gamma, ids = min(o.lisa_layers, len(layers)), sorted(layers)
        rng = random.Random(torch.initial_seed() * 1000 + run.index)
        history: list[list[int]] = []
        steps = {"n": 0}

        def sample() -> None:
            active = set(rng.sample(ids, gamma))
            for i, params in layers.items():
                for p in params:
                    p.requires_grad_(i in active)
            history.append(sorted(active))

        def first_forward(module, args):
            # The optimizer is built from the parameters that require grad when training starts, so the
            # first draw waits for the first forward pass: every layer is in the optimizer, one is trained.
            hook.remove()
            sample()

        def after_step() -> None:
            steps["n"] += 1
            if steps["n"] % o.lisa_interval == 0:
                sample()

        def finish(m):
            hook.remove()
            _train_everything(m)
            return m

        _train_everything(model)
        hook = model.register_forward_pre_hook(first_forward)
        total = sum(p.numel() for p in model.parameters())
        in_layers = sum(p.numel() for ps in layers.values() for p in ps)
        # what one step can change: everything outside the layers plus gamma layers of mean size
        share = (total - in_layers + gamma * in_layers / len(ids)) / total
        info = {**_count_trainable(model), "trainable_share": share, "lisa_layers": gamma,
                "lisa_interval": o.lisa_interval, "layers": len(ids), "sampled": history}
        return Prepared(model=model, after_step=after_step, finish=finish, info=info)


for _m in (Trace, Full, Lora, Joint, Replay, GeneralCore, CpiFtSft, Lisa):
    register_method(_m)
