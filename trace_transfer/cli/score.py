"""`trace-transfer score`: probe directories → one CoreSet per task (LF, CS, random or magnitude)."""

from __future__ import annotations

import click

from trace_transfer.cli._output import force_option
from trace_transfer.scoring import BUDGETS, DEFAULT_SCOPE, GRANULARITIES, PRESETS, SCOPE_GROUPS


@click.command("score")
@click.option("--strategy", default="lf", show_default=True,
              help="lf (α·L2 + β·Fisher) | cs (cross-task specificity, needs >= 3 tasks) | random (control) | "
                   "magnitude (CPI-FT core regions: largest |Δ|) | any registered strategy.")
@click.option("--probe", "probe_dirs", multiple=True, required=True, type=click.Path(file_okay=False),
              help="A probe directory (from `trace-transfer probe`); repeat once per task.")
@click.option("--ratio", type=float, required=True, help="Share of the budget to select, e.g. 0.05 for 5%.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for <task>.coreset.safetensors.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=None,
              help="Unit of selection [default: row; tensor under --preset paper].")
@click.option("--budget", type=click.Choice(BUDGETS), default=None,
              help="tensors = r% of the units (whole tensors at tensor granularity); params = r% of the "
                   "parameters in scope [default: tensors at tensor granularity, else params].")
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="paper = the official TRACE code: whole tensors, all tensors in scope, 0.5/0.5, floor(r% of tensors).")
@click.option("--alpha", type=float, default=None, help="LF weight of the L2 (RMS Δ) term [default: 0.5].")
@click.option("--beta", type=float, default=None, help="LF weight of the Fisher term [default: 0.5].")
@click.option("--scope", default=None,
              help=f"Tensors that compete: comma list of {', '.join(SCOPE_GROUPS)}, or all "
                   f"[default: {','.join(DEFAULT_SCOPE)}].")
@click.option("--head-dim", type=int, default=None, help="Attention head size for --granularity head "
                                                         "[default: from the probed model's config].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --strategy random.")
@force_option
def command(strategy, probe_dirs, ratio, out_dir, granularity, budget, preset, alpha, beta, scope, head_dim, seed, force):
    """Score parameters from warm-start probes and write one CoreSet per task.

    \b
    Examples:
      trace-transfer score --strategy lf --probe probes/math --ratio 0.05 --out cores
      trace-transfer score --strategy cs --probe probes/math --probe probes/code --probe probes/med \\
        --ratio 0.05 --granularity row --out cores
      trace-transfer score --strategy lf --preset paper --probe probes/math --ratio 0.1 --out cores-paper
    """
    from pathlib import Path

    from rich.table import Table

    from trace_transfer.checkpoint import output_dir
    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.report.console import wide_console
    from trace_transfer.scoring import coreset_filename, score

    # OUT may hold other CoreSets (score refuses only to overwrite its own files without --force); a
    # directory created here is removed again if scoring fails.
    with output_dir(out_dir, force=True, what="CoreSet directory"), progress_bars() as bar:
        cores = score(list(probe_dirs), strategy, ratio, out_dir, granularity=granularity, budget=budget,
                      preset=preset, scope=scope, alpha=alpha, beta=beta, seed=seed, head_dim=head_dim,
                      progress=bar, force=force)
    first = next(iter(cores.values())).metadata
    table = Table(title=f"{strategy} · {first['granularity']} · budget {first['budget']} · ratio {ratio} · "
                        f"scope {','.join(first['scope'])}")
    for col in ("task", "units", "params", "% of scope", "% of model", "tensors", "file"):
        table.add_column(col, justify="left" if col in ("task", "file") else "right")
    for task, cs in cores.items():
        m = cs.metadata
        sel = cs.num_selected()
        table.add_row(task, f"{m['selected_units']:,}/{m['total_units']:,}", f"{sel:,}",
                      f"{100 * sel / max(1, m['scope_params']):.2f}", f"{100 * cs.ratio():.2f}",
                      f"{len(cs.names())}/{m['scope_tensors']}",
                      str(Path(out_dir) / coreset_filename(task)))
    wide_console().print(table)

