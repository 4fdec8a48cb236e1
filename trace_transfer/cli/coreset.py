"""`trace-transfer coreset`: inspect CoreSet files and combine them (set algebra, overlap)."""

from __future__ import annotations

import math
from functools import reduce

import click

from trace_transfer.errors import TraceTransferError

_FILE = click.Path(exists=True, dir_okay=False)


@click.group("coreset")
def command():
    """Inspect and combine CoreSet files (*.coreset.safetensors).

    \b
    Examples:
      trace-transfer coreset show cores/math.coreset.safetensors --heatmap math.png
      trace-transfer coreset stats cores/math.coreset.safetensors cores/code.coreset.safetensors
      trace-transfer coreset union cores/math.coreset.safetensors cores/code.coreset.safetensors --out both
    """


def _load(path):
    from trace_transfer.coreset import CoreSet

    try:
        return CoreSet.load(path)
    except TraceTransferError as exc:
        raise click.ClickException(str(exc)) from exc


def _cell(share: float) -> str:
    if math.isnan(share):
        return ""
    if share == 0:
        return "[dim]·[/dim]"
    if share == 1:
        return "[bold green]■[/bold green]"
    return f"{100 * share:.0f}%" if share >= 0.01 else f"{100 * share:.1g}%"


@command.command("show")
@click.argument("file", type=_FILE)
@click.option("--heatmap", type=click.Path(dir_okay=False), default=None,
              help="Also draw the layer × module importance heatmap (TRACE Fig. 6 layout) to this PNG.")
@click.option("--value", type=click.Choice(["auto", "score", "selected"]), default="auto", show_default=True,
              help="Heatmap value: mean per-unit score (auto when scores are stored) or the share selected.")
def show(file, heatmap, value):
    """Print what FILE selected, per layer × module (■ whole tensor, n% partial, · nothing).

    \b
    Example:
      trace-transfer coreset show cores/math.coreset.safetensors --heatmap math-importance.png
    """
    from rich.console import Console
    from rich.table import Table

    from trace_transfer.report.importance import layer_module_grid, short_names

    cs = _load(file)
    m = cs.metadata
    grid = layer_module_grid(cs)
    console = Console()
    facts = {k: m.get(k) for k in ("strategy", "granularity", "budget", "ratio", "preset") if m.get(k) is not None}
    if m.get("scope"):
        facts["scope"] = ",".join(m["scope"])
    console.print(
        f"[bold]{m.get('task') or file}[/bold]  " + "  ".join(f"{k}={v}" for k, v in facts.items()) + "\n"
        f"selected {cs.num_selected():,} of {cs.num_total():,} parameters ({100 * cs.ratio():.2f}%), "
        f"{len(cs.names())} of {len(cs.all_names())} tensors touched"
    )
    table = Table(title="share of each tensor selected")
    table.add_column("layer", justify="right")
    for mod in short_names(grid.modules):
        # fold long module names over several header lines rather than cutting them off
        table.add_column(mod, justify="center", overflow="fold", min_width=4)
    for layer, row in zip(grid.layers, grid.selected):
        table.add_row(str(layer), *[_cell(v) for v in row])
    console.print(table)
    if grid.globals:
        g = Table(title="tensors outside the layers")
        g.add_column("tensor")
        g.add_column("selected", justify="right")
        g.add_column("mean score", justify="right")
        for name, share, mean in grid.globals:
            g.add_row(name, _cell(share) or "·", "" if mean is None else f"{mean:.4f}")
        console.print(g)
    if heatmap:
        from trace_transfer.report.plots import plot_importance_heatmap

        try:
            values, label = grid.values(value)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        title = f"{m.get('task', '')} · {m.get('strategy', '')} · {m.get('granularity', '')} · r={m.get('ratio')}"
        plot_importance_heatmap(values, grid.layers, grid.modules, heatmap, title=title, value_label=label,
                                selected=grid.selected)
        console.print(f"wrote {heatmap}")


def _write(cs, out, what: str) -> None:
    path = cs.save(out)
    click.echo(f"{what}: {cs.num_selected():,} of {cs.num_total():,} parameters ({100 * cs.ratio():.2f}%) -> {path}")


def _combine(files, op, out, what):
    try:
        _write(reduce(op, [_load(f) for f in files]), out, what)
    except TraceTransferError as exc:
        raise click.ClickException(str(exc)) from exc


@command.command("union")
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
def union(files, out):
    """Elements core in ANY of FILES.  Example: coreset union a.coreset.safetensors b.coreset.safetensors --out ab"""
    _combine(files, lambda a, b: a | b, out, "union")


@command.command("intersect")
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
def intersect(files, out):
    """Elements core in ALL of FILES.  Example: coreset intersect a.coreset.safetensors b.coreset.safetensors --out shared"""
    _combine(files, lambda a, b: a & b, out, "intersection")


@command.command("diff")
@click.argument("a", type=_FILE)
@click.argument("b", type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
def diff(a, b, out):
    """Elements core in A but not in B.  Example: coreset diff math.coreset.safetensors code.coreset.safetensors --out only-math"""
    _combine([a, b], lambda x, y: x - y, out, "difference")


@command.command("complement")
@click.argument("file", type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
def complement(file, out):
    """Every element NOT core in FILE.  Example: coreset complement general.coreset.safetensors --out trainable"""
    try:
        _write(~_load(file), out, "complement")
    except TraceTransferError as exc:
        raise click.ClickException(str(exc)) from exc


@command.command("stats")
@click.argument("a", type=_FILE)
@click.argument("b", type=_FILE)
@click.option("--per", type=click.Choice(["layer", "module", "tensor"]), default="layer", show_default=True,
              help="Breakdown of the Jaccard overlap.")
def stats(a, b, per):
    """Jaccard overlap of two CoreSets, overall and per layer/module/tensor.

    \b
    Example:
      trace-transfer coreset stats cores/math.coreset.safetensors cores/code.coreset.safetensors --per module
    """
    from rich.console import Console
    from rich.table import Table

    from trace_transfer.coreset import overlap_stats

    try:
        st = overlap_stats(_load(a), _load(b))
    except TraceTransferError as exc:
        raise click.ClickException(str(exc)) from exc
    o = st["overall"]
    console = Console()
    console.print(f"Jaccard {o['jaccard']:.4f}: intersection {o['intersection']:,}, union {o['union']:,} "
                  f"(A {o['a_selected']:,}, B {o['b_selected']:,})")
    table = Table(title=f"Jaccard per {per}")
    table.add_column(per)
    table.add_column("jaccard", justify="right")
    for key, j in st[f"per_{per}"].items():
        table.add_row(str(key), f"{j:.4f}")
    console.print(table)
