"""The launch lines of a pipeline: how its multi-process steps start, and ``run --dry-run``.

A fine-tuning step under DeepSpeed runs as ``trace-transfer finetune --deepspeed`` (``cpi-ft --deepspeed`` for
CPI-FT), a probe step as ``trace-transfer probe --deepspeed`` (source and target probes alike), and a refine
step as one ``trace-transfer refine --deepspeed`` per task (after the budgets it reads are written), under a
launcher:

* one node: ``torchrun`` on ``launch.nproc_per_node`` local processes (the pipeline starts it itself);
* several nodes: ``torchrun --nnodes N --node_rank R --rdzv_endpoint HOST:PORT`` on *every* node, or
  the DeepSpeed launcher once with a ``hostfile`` (it reaches the other hosts itself). The pipeline
  cannot start processes on other nodes, so these launches are the cluster's: the step refuses to
  run in-process until the launch has written its results, and then only records them.

:func:`dry_run` lists every step of a config, in order, as the shell commands that run it:
``trace-transfer run CONFIG --out RUN --only STEP`` for the steps that run in one process (the very
code path and step hashes of a plain ``run``, so a later ``run`` skips them), and for a multi-process
step the launch line between a line that marks the step directory as this step's attempt (so the
pipeline keeps what the launch writes) and the ``--only`` line that records it. Nothing is created.
The run directory is assumed to be on a filesystem every node sees.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_transfer.pipeline.steps import StepRecord, step_hash

__all__ = ["Command", "DryRunner", "finetune_args", "cpi_ft_args", "probe_args", "launch_world", "probe_launch_problems",
           "finetune_launch_problems", "launch_argv", "dry_run", "format_commands", "PROBE_OVERRIDE",
           "probe_override_keys", "refine_args", "refine_launch_problems", "REFINE_OVERRIDE_KEYS"]

PROBE_OVERRIDE = "probe"  # the launch.deepspeed_overrides key of every launched probe


def probe_override_keys(side: str) -> tuple[str, str]:
    """The ``launch.deepspeed_overrides`` keys of a probe of ``side`` (source/target), most specific first."""
    return f"{PROBE_OVERRIDE}/{side}", PROBE_OVERRIDE


# A launched refine pass is the distributed probe on the target (probe_deepspeed, fewer steps): it runs with
# the target probe's DeepSpeed config, so it fits wherever that probe does.
REFINE_OVERRIDE_KEYS = probe_override_keys("target")


# Left unquoted in a printed command, so the cluster script's shell fills in this node's rank.
NODE_RANK_VAR = "${NODE_RANK:?}"  # the shell refuses an unset NODE_RANK (SLURM: NODE_RANK=$SLURM_NODEID)


@dataclass
class Command:
    """One shell command of a dry run. ``every_node``: run it on each node of the launch (torchrun
    across nodes); otherwise once, on one node."""

    step: str
    argv: list[str]
    note: str = ""
    every_node: bool = False
    raw: str | None = None  # a line written as shell (a redirection), instead of argv

    def line(self) -> str:
        if self.raw is not None:
            return self.raw
        return " ".join(_word(t) for t in self.argv)


def _word(token: str) -> str:
    """A token as one shell word; one holding ``${...}`` (this node's rank, or a config value such as
    ``rdzv_endpoint: "${HEAD_NODE}:29500"``) is double-quoted so the cluster script's shell fills it in."""
    if "${" in token and not any(c in token for c in '"`\\'):
        return f'"{token}"'
    return shlex.quote(token)


def finetune_args(d: Path, target: str, stages: list, method: str, opts: Any, train_cfg: Any, ds: str,
                  cfg: Any) -> list[str]:
    """``-m trace_transfer finetune ...``: what every rank of a fine-tuning launch runs (``--resume``:
    a relaunch continues after the last complete stage)."""
    args = ["-m", "trace_transfer", "finetune", "--model", target, "--method", method,
            *_common_args(d, train_cfg, ds, cfg),
            "--isolation", opts.isolation, "--replay-share", repr(opts.replay_share)]
    if cfg.eval.backend != "hf":  # refused under a launch (run --check says so first); passed to be refused clearly
        args += ["--eval-backend", cfg.eval.backend]
    if opts.general_coreset:
        args += ["--general-coreset", opts.general_coreset]
    for m in getattr(cfg, "monitor", ()):  # evaluated at every row, never trained (pipeline `monitor:`)
        # Not --monitor: torchrun's argparse prefix-matches the script's arguments too, and rejects
        # --monitor as an ambiguous abbreviation of its own --monitor-interval.
        args += ["--monitor-task", m]
    for st in stages:
        args += ["--stage", f"{st.task}:{st.coreset}" if st.coreset else st.task]
    return args


def cpi_ft_args(d: Path, target: str, tasks: list[str], train_cfg: Any, ds: str, cfg: Any) -> list[str]:
    """``-m trace_transfer cpi-ft ...``: what every rank of a CPI-FT launch runs, with the settings the
    pipeline's in-process call uses (``CpiFtConfig()`` defaults; step 5 trains like step 1)."""
    args = ["-m", "trace_transfer", "cpi-ft", "--model", target, *_common_args(d, train_cfg, ds, cfg)]
    for task in tasks:
        args += ["--task", task]
    return args


def probe_args(d: Path, model: str, task: str, settings: dict[str, Any], ds: str, world: int) -> list[str]:
    """``-m trace_transfer probe ...``: what every rank of a probe launch runs. ``settings`` are the
    ``ProbeConfig.from_flat`` keywords of the in-process probe, as the probe's own flags; its
    ``batch_size`` is the global batch and becomes the per-rank micro-batch ``batch_size / world`` (the
    DeepSpeed probe's global batch is ``world x micro``), so a probe means the same batches launched or not
    (:func:`probe_launch_problems` refuses a batch the ranks cannot share evenly). ``--force``: the step
    directory is the pipeline's (its ``.attempt`` and launch log are in it, a stale attempt is cleared
    by the step runner), and the probe writes ``probe.json`` last, so a complete probe is never relaunched."""
    from trace_transfer.config import click_args

    micro = {**settings, "batch_size": settings["batch_size"] // world}
    return ["-m", "trace_transfer", "probe", "--model", model, "--task", task, "--out", str(d), "--force",
            "--deepspeed", ds, *click_args(micro)]


def refine_args(out: Path, model: str, task: str, settings: dict[str, Any], ds: str,
                budgets: Path | None = None) -> list[str]:
    """``-m trace_transfer refine ...``: what every rank of one task's refine launch runs. ``settings`` are
    the ``RefineConfig`` fields of the in-process pass, as refine's own flags (``batch_size`` stays the global
    batch: ``refine --deepspeed`` splits it over the ranks itself). ``out``: the task's CoreSet in the step
    directory, whose existence marks the launch done (``CoreSet.save`` renames it into place when complete)."""
    from trace_transfer.config import click_args

    # No --signal: torchrun's argparse takes it for an ambiguous abbreviation of its --signals-to-handle and
    # the launch dies. refine's default, microprobe, is the one signal a launched pass runs
    # (refine_launch_problems refuses the others), so leaving it out means the same pass.
    if settings.get("signal", "microprobe") != "microprobe":
        from trace_transfer.errors import ConfigError

        raise ConfigError(f"refine.signal: {settings['signal']!r} cannot run under launch.deepspeed (the distributed "
                          f"pass is the micro-probe); set refine.signal: microprobe")
    args = ["-m", "trace_transfer", "refine", "--model", model, "--task", task, "--out", str(out),
            "--deepspeed", ds, *click_args({k: v for k, v in settings.items() if k != "signal"})]
    return args + (["--budgets", str(budgets)] if budgets is not None else [])


def launch_world(launch: Any, base_dir: Path | None = None) -> int:
    """The processes of one launch: ``nnodes x nproc_per_node``; with a hostfile and no ``nnodes`` the
    DeepSpeed launcher uses every host the file lists."""
    nodes = launch.nnodes
    if launch.hostfile and nodes == 1:
        hostfile = Path(launch.hostfile)
        hostfile = base_dir / hostfile if base_dir is not None and not hostfile.is_absolute() else hostfile
        if hostfile.is_file():
            hosts = [ln for ln in (s.split("#")[0].strip() for s in hostfile.read_text().splitlines()) if ln]
            nodes = max(1, len(hosts))
    return nodes * launch.nproc_per_node


def probe_launch_problems(cfg: Any, base_dir: Path) -> list[str]:
    """Why the probes of ``cfg`` cannot be launched under ``launch.deepspeed`` (``run --check``): the
    probe's ``batch_size`` is its global batch and must split evenly over the ranks, and the DeepSpeed
    probe takes the batch Fisher only."""
    from trace_transfer.pipeline.methods import resolve

    methods = [m for _, m in resolve(cfg.methods)]
    sides = [side for side, probed in (("source", any(m.cores == "transfer" for m in methods)),
                                       ("target", any(m.cores == "target" or m.general_core for m in methods)))
             if probed]
    if not cfg.launch.deepspeed or not sides:  # e.g. full fine-tuning alone probes nothing
        return []
    from trace_transfer.probe.config import TRACE_COMPATIBLE_MODE

    world = launch_world(cfg.launch, base_dir)
    # Whichever config (launch.deepspeed or an override) the probes of each side run with.
    configs = {_config_key(cfg.launch, *probe_override_keys(side)) for side in sides}
    problems = _global_batch_problems(cfg, base_dir, configs, f"each rank probes batch_size / {world} examples per step",
                                      "the probe's")
    if cfg.probe.fisher != TRACE_COMPATIBLE_MODE:  # probe_deepspeed's own refusal, before any launch
        problems.append(f"probe.fisher: {cfg.probe.fisher!r} is not supported under launch.deepspeed (the engine "
                        f"reduces the ranks' gradients together); use fisher: {TRACE_COMPATIBLE_MODE}")
    return problems


def refine_launch_problems(cfg: Any, base_dir: Path) -> list[str]:
    """Why the refine passes of ``cfg`` cannot be launched under ``launch.deepspeed`` (``run --check``): the
    distributed pass is the micro-probe only (at least one step), and its global batch (``probe.batch_size``)
    must split evenly over the ranks and agree with the DeepSpeed JSON it runs with."""
    from trace_transfer.pipeline.methods import resolve

    if not cfg.launch.deepspeed or not any(m.refine for _, m in resolve(cfg.methods)):
        return []
    problems = []
    if cfg.refine.signal != "microprobe":
        problems.append(f"refine.signal: {cfg.refine.signal!r} is not supported under launch.deepspeed (the distributed "
                        f"pass is the micro-probe, which always trains a step); use signal: microprobe")
    if cfg.refine.steps < 1:
        problems.append("refine.steps: 0 under launch.deepspeed (the distributed micro-probe trains at least one "
                        "step); set steps >= 1")
    world = launch_world(cfg.launch, base_dir)
    problems += _global_batch_problems(cfg, base_dir, {_config_key(cfg.launch, *REFINE_OVERRIDE_KEYS)},
                                       f"the launched refine passes take batch_size / {world} per rank",
                                       "the refine pass's")
    return problems


def _global_batch_problems(cfg: Any, base_dir: Path, config_keys: set[str], why: str, whose: str) -> list[str]:
    """``probe.batch_size`` is the global batch of a launched probe or refine pass: it must split evenly over
    the ranks (``why`` says how it is used), and then agree with every DeepSpeed JSON at ``config_keys``
    that fixes a batch size."""
    world, batch = launch_world(cfg.launch, base_dir), cfg.probe.batch_size
    if batch % world:
        return [f"probe.batch_size: {batch} does not split evenly over the launch's {world} processes ({why}); "
                f"set it to a multiple of {world}"]
    return [p for key in sorted(config_keys) for p in _batch_problems(cfg.launch, key, base_dir, batch // world, 1,
                                                                       world, whose)]


def finetune_launch_problems(cfg: Any, base_dir: Path) -> list[str]:
    """Why the fine-tuning launches cannot start (``run --check``): a DeepSpeed JSON (``launch.deepspeed``
    or a method's override) fixing a batch size that contradicts ``training:``."""
    if not cfg.launch.deepspeed:
        return []
    t, world = cfg.training, launch_world(cfg.launch, base_dir)
    problems = []
    for key in sorted({_config_key(cfg.launch, m) for m in cfg.methods}):
        problems += _batch_problems(cfg.launch, key, base_dir, t.batch_size, t.grad_accum, world, "training's")
    return problems


def _config_key(launch: Any, *keys: str) -> str:
    """The launch key whose DeepSpeed config a step named by ``keys`` runs with."""
    return next((f"deepspeed_overrides.{k}" for k in keys if k in launch.deepspeed_overrides), "deepspeed")


def _batch_problems(launch: Any, key: str, base_dir: Path, micro: int, accum: int, world: int, whose: str) -> list[str]:
    """``load_ds_config``'s refusal of the config at ``launch.<key>`` for a per-rank batch ``micro`` (a
    missing or unreadable file is reported where the key is checked, or at the launch)."""
    from trace_transfer.errors import ConfigError
    from trace_transfer.train.config import TrainConfig
    from trace_transfer.train.ds import load_ds_config

    path = Path(launch.deepspeed if key == "deepspeed" else launch.deepspeed_overrides[key.split(".", 1)[1]])
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        return []
    try:
        load_ds_config(path, TrainConfig(batch_size=micro, grad_accum=accum), world)
    except ConfigError as exc:
        if not exc.problems:  # not JSON
            return [f"launch.{key}: {exc}"]
        return [f"launch.{key}: {path.name} fixes a batch size that contradicts {whose} over {world} processes: "
                f"{'; '.join(exc.problems)}"]
    return []


def _common_args(d: Path, train_cfg: Any, ds: str, cfg: Any) -> list[str]:
    """The flags ``finetune`` and ``cpi-ft`` share: run dir (resumed on a relaunch), DeepSpeed config,
    training settings and evaluation."""
    args = ["--out", str(d), "--resume", "--deepspeed", ds,
            "--lr", repr(train_cfg.lr), "--epochs", repr(train_cfg.epochs), "--max-steps", str(train_cfg.max_steps),
            "--batch-size", str(train_cfg.batch_size), "--grad-accum", str(train_cfg.grad_accum),
            "--warmup-ratio", repr(train_cfg.warmup_ratio), "--weight-decay", repr(train_cfg.weight_decay),
            "--precision", train_cfg.precision, "--seq-len", str(train_cfg.seq_len),
            "--seed", str(train_cfg.seed), "--eval-batch-size", str(cfg.eval.batch_size),
            "--dtype", cfg.launch.dtype]  # the evaluations' weights, as in-process steps get them
    if getattr(train_cfg, "gradient_checkpointing", False):
        args.append("--gradient-checkpointing")
    if cfg.eval.limit is not None:
        args += ["--eval-limit", str(cfg.eval.limit)]
    return args


def launch_argv(launch: Any, args: list[str], *, run_id: str, base_dir: Path | None = None,
                python: str | None = None, port: int | None = None) -> list[str]:
    """The launcher in front of ``args`` (from :func:`finetune_args`) under ``launch`` (a ``LaunchSpec``).

    With ``python`` and ``port`` (the pipeline starting a one-node launch itself): that interpreter's
    ``torch.distributed.run`` on 127.0.0.1. Otherwise the line a cluster script runs: ``torchrun``
    (``--standalone`` on one node; ``--nnodes/--node_rank/--rdzv_endpoint`` across nodes, the rank
    left to the shell when ``launch.node_rank`` is unset) or ``deepspeed --hostfile``.
    """
    n = launch.nproc_per_node
    if python is not None:
        return [python, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
                f"--master_port={port}", *args]
    if launch.hostfile:
        hostfile = Path(launch.hostfile)
        if base_dir is not None and not hostfile.is_absolute():
            hostfile = base_dir / hostfile
        head = ["deepspeed", f"--hostfile={hostfile}", f"--num_gpus={n}"]
        if launch.nnodes > 1:
            head.append(f"--num_nodes={launch.nnodes}")
        if launch.rdzv_endpoint:
            host, _, p = launch.rdzv_endpoint.rpartition(":")
            head += [f"--master_addr={host}", f"--master_port={p}"]
        # The DeepSpeed launcher takes a module with --module and the script name on its own.
        return [*head, "--module", *args[1:]]
    if launch.nnodes == 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={n}", *args]
    rank = NODE_RANK_VAR if launch.node_rank is None else str(launch.node_rank)
    return ["torchrun", f"--nnodes={launch.nnodes}", f"--nproc_per_node={n}", f"--node_rank={rank}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={launch.rdzv_endpoint}", f"--rdzv_id={run_id}", *args]


@dataclass
class DryRunner:
    """A :class:`~trace_transfer.pipeline.steps.StepRunner` stand-in that runs nothing and touches no
    file: it records each step (with the hash a real run computes) and the step body it would call."""

    run_dir: Path
    records: dict[str, StepRecord] = field(default_factory=dict)
    planned: list[tuple[StepRecord, Any]] = field(default_factory=list)
    dry: bool = True

    def say(self, msg: str) -> None:  # step bodies never run here; nothing to report
        pass

    def selected(self, name: str) -> bool:
        return True

    def step(self, name: str, params: dict[str, Any], fn: Any, depends: list[str] = (),
             resumable: bool = False) -> StepRecord:
        rec = StepRecord(name, self.run_dir / name, step_hash(name, params, {d: self.records[d].hash for d in depends}),
                         True, 0.0, {})
        self.records[name] = rec
        self.planned.append((rec, fn))
        return rec


def dry_run(runner: DryRunner, cfg: Any, config_path: str | os.PathLike, *, base_dir: Path,
            extra_run_args: list[str] = ()) -> list[Command]:
    """Every command that runs the pipeline ``cfg`` into ``runner.run_dir``, in order (see the module
    docstring); ``runner`` has been through ``run_pipeline(cfg, ..., runner=runner)``.

    ``extra_run_args`` (e.g. ``--device cuda``) are added to every ``trace-transfer run`` line.
    """
    run_dir = runner.run_dir
    run = ["trace-transfer", "run", str(config_path), "--out", str(run_dir), *extra_run_args]
    if os.environ.get("TRACE_TRANSFER_ALLOW_CODE_EXEC") == "1":
        run.append("--allow-code-exec")
    out: list[Command] = []
    for rec, fn in runner.planned:
        args = getattr(fn, "launch_args", None)
        if args is None:
            out.append(Command(rec.name, [*run, "--only", rec.name], "one process"))
            continue
        launch = cfg.launch
        # One launch per step, or (refine steps) one per task, each after the one-process commands it needs.
        launches = fn.launches(rec.dir) if hasattr(fn, "launches") else [([], args(rec.dir))]
        every = launch.nnodes > 1 and not launch.hostfile
        where = (f"{launch.nnodes} nodes x {launch.nproc_per_node} processes" if launch.multi_node()
                 else f"{launch.nproc_per_node} processes")
        ds = getattr(fn, "deepspeed", None)  # the step's own config (launch.deepspeed or its override)
        out.append(Command(rec.name, ["mkdir", "-p", str(rec.dir)],
                           f"DeepSpeed{f' ({Path(ds).name})' if ds else ''} on {where}: mark the step's attempt"))
        out.append(Command(rec.name, [], raw=f"printf %s {rec.hash} > {shlex.quote(str(rec.dir / '.attempt'))}"))
        for i, (before, step_args) in enumerate(launches):
            out += [Command(rec.name, b, "one process, before the launch") for b in before]
            argv = launch_argv(launch, step_args, run_id=f"{rec.hash}-{i}" if len(launches) > 1 else rec.hash,
                               base_dir=base_dir)
            note = "the launch" if len(launches) == 1 else f"launch {i + 1} of {len(launches)}"
            out.append(Command(rec.name, argv, note, every_node=every))
        out.append(Command(rec.name, [*run, "--only", rec.name], "record the finished launch"))
    return out


def format_commands(commands: list[Command]) -> str:
    """The dry run as a shell script body: a ``# step NAME: note`` comment before each step's first
    command, and ``# every node`` right before a command each node must run."""
    lines, last = [], None
    for c in commands:
        if c.step != last:
            lines.append(f"# step {c.step}" + (f": {c.note}" if c.note else ""))
            last = c.step
        elif c.note:
            lines.append(f"# {c.note}")
        if c.every_node:
            lines.append("# every node")
        lines.append(c.line())
    return "\n".join(lines) + "\n"
