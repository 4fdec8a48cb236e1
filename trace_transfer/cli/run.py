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
@click.option("--device", type=str, default=None,
              help=f"Override launch.device: {help_of(DeviceConfig, 'device')} [default: the config's].")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Override launch.dtype (inference steps' weights) [default: the config's].")
@allow_code_exec_option
def command(pipeline: Path, run_dir: Path | None, force: tuple[str, ...], check: bool, device: str | None,
            dtype: str | None) -> None:
    """Run the pipeline described by PIPELINE (YAML): models → probes → CoreSets → CKA layer map →
    transfer → every method's sequential fine-tuning on the target → report.

    \b
    Example:
      trace-transfer run examples/pipelines/tiny.yaml --out runs/tiny
      trace-transfer run examples/pipelines/tiny.yaml --out runs/tiny --force finetune/trace-lf
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
    result = run_pipeline(cfg, run_dir, force=force, base_dir=pipeline.parent, say=click.echo)
    print_table(result.summary)
    click.echo(f"report: {result.artifacts['report'] / 'report.html'}")
