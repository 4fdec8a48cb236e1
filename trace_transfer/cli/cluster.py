"""`trace-transfer cluster`: group tasks by the overlap of their core regions (CPI-FT step 2)."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._output import force_option
from trace_transfer.surgery.modes import CLUSTER_METHODS, DEFAULT_TAU


@click.command("cluster")
@click.argument("coresets", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tau", type=float, default=DEFAULT_TAU, show_default=True,
              help="Connect two tasks when the Jaccard overlap of their cores exceeds tau (paper: 0.1).")
@click.option("--method", type=click.Choice(CLUSTER_METHODS), default="components", show_default=True,
              help="Groups = connected components of the thresholded graph (paper), or Louvain communities.")
@click.option("--seed", type=int, default=0, show_default=True, help="Louvain's random seed.")
@click.option("--heatmap", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the overlap heatmap (PNG), tasks ordered by group.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write groups + Jaccard matrix as JSON.")
@force_option
def command(coresets, tau, method, seed, heatmap, out, force) -> None:
    """Cluster tasks by the Jaccard overlap of their CoreSets and print the groups.

    Task names come from each CoreSet's `task` metadata (or its file name).

    \b
    Example:
      trace-transfer cluster cores/*.coreset.safetensors --tau 0.1 --heatmap overlap.png --out clusters.json
    """
    from trace_transfer.checkpoint import check_output
    from trace_transfer.coreset import SUFFIX, CoreSet
    from trace_transfer.surgery.clustering import cluster_tasks, named_coresets

    for path, what in ((out, "--out"), (heatmap, "--heatmap")):
        if path:
            check_output(path, force, what)
    named = named_coresets([CoreSet.load(p) for p in coresets],
                           fallback=[p.name.removesuffix(SUFFIX).removesuffix(".safetensors") for p in coresets])
    res = cluster_tasks(named, tau=tau, method=method, seed=seed)
    res.provenance["inputs"] = {n: str(p) for n, p in zip(named, coresets)}
    if out:
        res.save(out)
    if heatmap:
        from trace_transfer.report.plots import plot_overlap_heatmap

        plot_overlap_heatmap(res.matrix, res.names, heatmap, groups=res.groups, tau=tau)

    width = max(len(n) for n in res.names)
    click.echo(f"Jaccard overlap of core regions ({sum(res.selected):,} core parameters over {len(res.names)} tasks)\n")
    click.echo(" " * (width + 3) + "".join(f"  {i + 1:>6}" for i in range(len(res.names))))
    for i, n in enumerate(res.names):
        click.echo(f"{i + 1:>2} {n:<{width}}" + "".join(f"  {v:6.3f}" for v in res.matrix[i]))
    click.echo(f"\n{len(res.groups)} groups ({method}, tau = {tau:g}):")
    for g, members in enumerate(res.groups, start=1):
        click.echo(f"  group {g}: {', '.join(members)}")
    if heatmap:
        click.echo(f"wrote {heatmap}")
    if out:
        click.echo(f"wrote {out}")
