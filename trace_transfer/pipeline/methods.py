"""The pipeline's method table: what each name under ``methods:`` in a pipeline config needs and runs.

A pipeline method is data, not a branch in ``run.py``: which CoreSets it trains on (none, the
target's own, or the source's transferred onto the target), which scoring strategy makes them, whether
it freezes a general core, and which training method of the sequential runner trains it. ``run.py``
plans the probe, scoring, transfer and fine-tuning steps by asking this table, and ``config.py``
checks a config's methods against it, so a new method is one :func:`register_pipeline_method` call:

    >>> from trace_transfer.pipeline.methods import register_pipeline_method
    >>> m = register_pipeline_method("transfer-random", runner="trace", cores="transfer", strategy="random",
    ...                              description="random source cores mapped onto the target (control)")
    >>> m.core_key
    'transfer-random'

This module imports neither torch nor the registries it names (scoring strategies, training
methods): validating a config's method names stays cheap, and :func:`method_problems` looks the
strategy and runner up only when a config is checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from trace_transfer.errors import ConfigError
from trace_transfer.registry import Registry

__all__ = ["PipelineMethod", "PIPELINE_METHODS", "GENERAL_CORE_STRATEGY", "register_pipeline_method", "resolve",
           "method_problems"]

# The general core is the target's LF core on the general task (Selective Parameter Optimization):
# the parameters general skills lean on most, frozen while the rest is fine-tuned.
GENERAL_CORE_STRATEGY = "lf"

Cores = Literal["none", "target", "transfer", "cheap"]
Trainer = Literal["sequence", "cpi-ft"]


@dataclass(frozen=True)
class PipelineMethod:
    """What one pipeline method needs from the earlier steps and how its fine-tuning step runs."""

    runner: str | None = field(default=None, metadata={
        "help": "the sequential runner's training method (trace_transfer.train.methods) for trainer='sequence'"})
    cores: Cores = field(default="none", metadata={
        "help": "per-task CoreSets it trains: 'none'; 'target' (scored from probes of the target itself); "
                "'transfer' (scored on the source, mapped onto the target by CKA + rules)"})
    strategy: str | None = field(default=None, metadata={
        "help": "the scoring strategy (trace_transfer.scoring) that makes those CoreSets"})
    refine: bool = field(default=False, metadata={
        "help": "choose the units on the target with `refine` (the config's `refine:` sets the signal): inside the "
                "per-slot budgets transfer carries from the source (cores='transfer'), or globally with no source "
                "at all (cores='cheap', the source-free control)"})
    granularity: str | None = field(default=None, metadata={
        "help": "score the source at this granularity instead of scoring.granularity ('tensor': mapped exactly)"})
    general_core: bool = field(default=False, metadata={
        "help": "needs the general core: the target probed on general_task and scored with "
                f"{GENERAL_CORE_STRATEGY!r}, passed to the runner as MethodOptions.general_coreset"})
    trainer: Trainer = field(default="sequence", metadata={
        "help": "'sequence': run_sequence with `runner`; 'cpi-ft': the CPI-FT recipe (trace_transfer.surgery)"})
    lr_sweep: bool = field(default=False, metadata={
        "help": "also fine-tune at each training.lr_sweep rate (one result label per rate)"})
    deepspeed: bool = field(default=True, metadata={
        "help": "can run under launch.deepspeed (torchrun + `trace-transfer finetune --deepspeed`, or "
                "`cpi-ft --deepspeed` for trainer='cpi-ft')"})
    baseline: bool = field(default=False, metadata={
        "help": "a reference method: the summary reports every method's AA change against the best baseline"})

    def __post_init__(self) -> None:
        problems = []
        if self.cores not in ("none", "target", "transfer", "cheap"):
            problems.append(f"cores={self.cores!r}: expected 'none', 'target', 'transfer' or 'cheap'")
        if self.cores == "cheap" and not self.refine:
            problems.append("cores='cheap' are chosen by refine on the target: set refine=True")
        if self.trainer not in ("sequence", "cpi-ft"):
            problems.append(f"trainer={self.trainer!r}: expected 'sequence' or 'cpi-ft'")
        if (self.cores == "none") != (self.strategy is None):
            problems.append("give a scoring `strategy` exactly when the method trains CoreSets (cores='target' or "
                            f"'transfer'); got cores={self.cores!r}, strategy={self.strategy!r}")
        if self.trainer == "sequence" and not self.runner:
            problems.append("trainer='sequence' needs `runner`, a training method such as 'trace' or 'full'")
        if problems:
            raise ConfigError("invalid pipeline method", problems)

    @property
    def core_key(self) -> str | None:
        """The CoreSet family it trains on, as named in the run directory (``cores/<core_key>``)."""
        if not self.strategy:
            return None
        return f"{self.cores}-{self.strategy}" + (f"-{self.granularity}" if self.granularity else "")


PIPELINE_METHODS: Registry[PipelineMethod] = Registry(
    "pipeline method", cli_hint="methods:", how_to_add="or register your own with register_pipeline_method")


def register_pipeline_method(name: str, *, description: str = "", replace: bool = False, **needs) -> PipelineMethod:
    """Add ``name`` to the pipeline's method table; ``needs`` are :class:`PipelineMethod` fields.

    Register before :func:`~trace_transfer.pipeline.config.load_pipeline` reads a config naming it.
    The runner method and strategy it names are checked when a config uses it (they may be
    registered later, in the same plugin file).

    Raises:
        ConfigError: an unknown or inconsistent field, a malformed or taken name (``replace=True``
            overrides on purpose).
    """
    unknown = sorted(set(needs) - set(PipelineMethod.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"pipeline method {name!r}: unknown field(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(PipelineMethod.__dataclass_fields__)}")
    return PIPELINE_METHODS.register(name, PipelineMethod(**needs), description=description, replace=replace)


def resolve(names: Iterable[str]) -> list[tuple[str, PipelineMethod]]:
    """``(name, entry)`` for the known names, in order (unknown ones are :func:`method_problems`' business)."""
    return [(n, PIPELINE_METHODS.get(n)) for n in names if n in PIPELINE_METHODS]


def method_problems(names: Iterable[str], *, num_tasks: int, deepspeed: bool) -> list[str]:
    """Every problem with a config's ``methods:`` list, collected: unknown names, strategies and
    runners that are not registered, too few tasks for a strategy, methods that cannot run under
    ``launch.deepspeed``."""
    names = list(names)
    problems = [f"methods: {PIPELINE_METHODS.unknown(n)}" for n in names if n not in PIPELINE_METHODS]
    known = resolve(names)
    if not known:
        return problems
    # Imported here, not at the top: both pull in torch, and only a config check needs them.
    from trace_transfer.scoring import STRATEGIES
    from trace_transfer.train.methods import METHODS

    for name, m in known:
        if m.runner and m.trainer == "sequence" and m.runner not in METHODS:
            problems.append(f"methods: {name}: {METHODS.unknown(m.runner)}")
        if m.strategy and m.strategy not in STRATEGIES:
            problems.append(f"methods: {name}: {STRATEGIES.unknown(m.strategy)}")
        elif m.strategy and num_tasks < STRATEGIES.get(m.strategy).min_tasks:
            need = STRATEGIES.get(m.strategy).min_tasks
            problems.append(f"methods: {name} scores with {m.strategy!r}, which needs at least {need} tasks "
                            f"({STRATEGIES.entry(m.strategy).description}) — the config has {num_tasks}")
        if deepspeed and not m.deepspeed:
            problems.append(f"methods: {name} does not run under launch.deepspeed yet; run it in a separate "
                            "config without launch.deepspeed")
    return problems


# -------------------------------------------------------------------------------------------------
# Built-ins. Baselines train everything or LoRA; trace-* train each task's own core on
# the target; transfer-* train the small source's cores mapped onto the target.
# -------------------------------------------------------------------------------------------------

register_pipeline_method("full", runner="full", lr_sweep=True, baseline=True, description="sequential full fine-tuning")
register_pipeline_method("joint", runner="joint", baseline=True,
                         description="one run over all tasks mixed (upper reference)")
register_pipeline_method("lora", runner="lora", baseline=True, description="sequential LoRA, merged after every stage")
register_pipeline_method("replay", runner="replay", baseline=True,
                         description="sequential with a share of earlier tasks replayed")
for _s, _what in (("lf", "TRACE-LF"), ("cs", "TRACE-CS"), ("random", "random equal-budget")):
    register_pipeline_method(f"trace-{_s}", runner="trace", cores="target", strategy=_s,
                             description=f"selective activation on the target's own {_what} cores")
# Spectrum (SNR of the base weights, no task signal) at the same budget and granularity as trace-lf.
register_pipeline_method("trace-spectrum", runner="trace", cores="target", strategy="spectrum",
                         description="Spectrum baseline: matrices ranked by singular-value SNR of the target's "
                                     "weights, per module type, trained as cores (the same every task)")
# LISA redraws its trainable layers by toggling requires_grad mid-run, which ZeRO's flat partitions do not follow.
register_pipeline_method("lisa", runner="lisa", deepspeed=False,
                         description="LISA: a random transformer layer at a time (redrawn every 20 steps), "
                                     "embeddings and head always trained")
for _s, _what in (("lf", "TRACE-LF"), ("cs", "TRACE-CS")):
    register_pipeline_method(f"transfer-{_s}", runner="trace", cores="transfer", strategy=_s, refine=True,
                             description=f"the source's {_what} cores as per-slot budgets on the target, units "
                                         "chosen there by the refine signal")
register_pipeline_method("transfer-lf-tensor", runner="trace", cores="transfer", strategy="lf", granularity="tensor",
                         description="the source's whole-tensor TRACE-LF cores, mapped exactly (nothing run on the target)")
register_pipeline_method("cheap-lf", runner="trace", cores="cheap", strategy="lf", refine=True,
                         description="no source: the global top ratio by the refine signal on the target "
                                     "(the source-free control at the same target cost)")
register_pipeline_method("cpi-ft", trainer="cpi-ft",
                         description="CPI-FT: per-task FT, cluster by core overlap, transplant + SLERP, pipelined SFT")
register_pipeline_method("general-core", runner="general-core", general_core=True,
                         description="freeze the target's general-task core, fine-tune its complement")
