"""`trace-transfer run PIPELINE.yaml`: the whole small-to-large pipeline from one config."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._code_exec import allow_code_exec_option
from trace_transfer.config import help_of
from trace_transfer.devices import DTYPES, DeviceConfig


@click.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/<name>). Reusing it resumes: finished steps are skipped.")
@click.option("--force", multiple=True, metavar="STEP",
              help="Redo STEP even if done, and the steps that consume it (a name or path prefix: probe, "
                   "cores/target-lf, finetune/full). Repeatable.")
@click.option("--check", is_flag=True, help="Only validate the config (all problems at once) and exit.")
@click.option("--dry-run", is_flag=True,
              help="Print every command that runs the pipeline (one `run --only STEP` per in-process step; "
                   "the torchrun/deepspeed launch of each multi-process step), for a cluster script; run "
                   "nothing, create nothing.")
@click.option("--only", multiple=True, metavar="STEP",
              help="Run only STEP (a name or prefix, as --force); the steps it consumes must be done. Repeatable.")
@click.option("--device", type=str, default=None,
              help=f"Override launch.device: {help_of(DeviceConfig, 'device')} [default: the config's].")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Override launch.dtype (inference steps' weights) [default: the config's].")
@allow_code_exec_option
def command(pipeline: Path, run_dir: Path | None, force: tuple[str, ...], check: bool, dry_run: bool,
            only: tuple[str, ...], device: str | None, dtype: str | None) -> None:
    """Run the pipeline described by PIPELINE (YAML): models → probes → CoreSets → CKA layer map →
    transfer → every method's sequential fine-tuning on the target → report.

    \b
    Example:
      trace-transfer run examples/pipelines/tiny.yaml --out runs/tiny
      trace-transfer run examples/pipelines/tiny.yaml --out runs/tiny --force finetune/trace-lf
      trace-transfer run examples/pipelines/tiny.yaml --out runs/tiny --dry-run > steps.sh
    """
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.pipeline.run import run_pipeline
    from trace_transfer.report.summary import print_table

    cfg = load_pipeline(pipeline)
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if overrides:  # validated like the YAML key (the same pattern and choices)
        from trace_transfer.config import validate_tree
        from trace_transfer.pipeline.config import LaunchSpec

        launch = validate_tree(LaunchSpec, {**cfg.launch.model_dump(), **overrides}, "--device/--dtype",
                               what="launch override")
        cfg = cfg.model_copy(update={"launch": launch})
    if check:
        click.echo(f"{pipeline}: valid ({len(cfg.tasks)} tasks, methods: {', '.join(cfg.methods)})")
        return
    run_dir = run_dir or Path("runs") / cfg.name
    if dry_run:
        from trace_transfer.pipeline.launch import DryRunner, dry_run as plan_commands, format_commands

        extra = [a for k, v in (("--device", device), ("--dtype", dtype)) if v is not None for a in (k, v)]
        runner = DryRunner(run_dir)
        run_pipeline(cfg, run_dir, base_dir=pipeline.parent, runner=runner)
        commands = plan_commands(runner, cfg, pipeline, base_dir=pipeline.parent, extra_run_args=extra)
        click.echo(f"# trace-transfer run {pipeline} --dry-run: {len({c.step for c in commands})} steps, in order; "
                   f"each command once, on one node, unless marked '# every node'", nl=True)
        click.echo(format_commands(commands), nl=False)
        return
    result = run_pipeline(cfg, run_dir, force=force, base_dir=pipeline.parent, say=click.echo, only=only)
    if only and "report" not in result.artifacts:
        click.echo(f"ran the steps selected by --only {' '.join(only)}")
        return
    print_table(result.summary)
    click.echo(f"report: {result.artifacts['report'] / 'report.html'}")
