"""`trace-transfer coreset`: inspect CoreSet files and combine them (set algebra, overlap)."""

from __future__ import annotations

import math
from functools import reduce

import click

from trace_transfer.cli._errors import Group
from trace_transfer.cli._output import force_option

_FILE = click.Path(exists=True, dir_okay=False)


@click.group("coreset", cls=Group)
def command():
    """Inspect and combine CoreSet files (*.coreset.safetensors).

    \b
    Examples:
      trace-transfer coreset show cores/math.coreset.safetensors --heatmap math.png
      trace-transfer coreset stats cores/math.coreset.safetensors
      trace-transfer coreset stats cores/math.coreset.safetensors cores/code.coreset.safetensors
      trace-transfer coreset union cores/math.coreset.safetensors cores/code.coreset.safetensors --out both
      trace-transfer coreset export cores/math.coreset.safetensors --to axolotl --out math.axolotl.yaml
    """


def _load(path):
    from trace_transfer.coreset import CoreSet

    return CoreSet.load(path)


def _cell(share: float) -> str:
    if math.isnan(share):
        return ""
    if share == 0:
        return "[dim]·[/dim]"
    if share == 1:
        return "[bold green]■[/bold green]"
    return f"{100 * share:.0f}%" if share >= 0.01 else f"{100 * share:.1g}%"


def _print_summary(console, file, cs) -> None:
    m = cs.metadata
    facts = {k: m.get(k) for k in ("strategy", "granularity", "budget", "ratio", "preset") if m.get(k) is not None}
    if m.get("scope"):
        facts["scope"] = ",".join(m["scope"])
    console.print(
        f"[bold]{m.get('task') or file}[/bold]  " + "  ".join(f"{k}={v}" for k, v in facts.items()) + "\n"
        f"selected {cs.num_selected():,} of {cs.num_total():,} parameters ({100 * cs.ratio():.2f}%), "
        f"{len(cs.names())} of {len(cs.all_names())} tensors touched"
    )


def _print_grid(console, grid) -> None:
    from rich.table import Table

    from trace_transfer.report.importance import short_names

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
    from trace_transfer.report.console import wide_console

    from trace_transfer.report.importance import layer_module_grid

    cs = _load(file)
    m = cs.metadata
    grid = layer_module_grid(cs)
    console = wide_console()
    _print_summary(console, file, cs)
    _print_grid(console, grid)
    if heatmap:
        from trace_transfer.report.plots import plot_importance_heatmap

        values, label = grid.values(value)
        title = f"{m.get('task', '')} · {m.get('strategy', '')} · {m.get('granularity', '')} · r={m.get('ratio')}"
        plot_importance_heatmap(values, grid.layers, grid.modules, heatmap, title=title, value_label=label,
                                selected=grid.selected)
        console.print(f"wrote {heatmap}")


def _write(cs, out, what: str) -> None:
    path = cs.save(out)  # --out was checked by _checked_out before the inputs were read
    click.echo(f"{what}: {cs.num_selected():,} of {cs.num_total():,} parameters ({100 * cs.ratio():.2f}%) -> {path}")


def _checked_out(out, force: bool) -> None:
    """Refuse an existing output before any input is read (CoreSet.save appends the suffix if missing)."""
    from pathlib import Path

    from trace_transfer.checkpoint import check_output
    from trace_transfer.coreset import SUFFIX

    path = Path(out)
    if not path.name.endswith(SUFFIX):
        path = path.with_name(path.name.removesuffix(".safetensors") + SUFFIX)
    check_output(path, force, "--out")


def _combine(files, op, out, what):
    _write(reduce(op, [_load(f) for f in files]), out, what)


@command.command("union")
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
@force_option
def union(files, out, force):
    """Elements core in ANY of FILES.  Example: coreset union a.coreset.safetensors b.coreset.safetensors --out ab"""
    _checked_out(out, force)
    _combine(files, lambda a, b: a | b, out, "union")


@command.command("intersect")
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
@force_option
def intersect(files, out, force):
    """Elements core in ALL of FILES.  Example: coreset intersect a.coreset.safetensors b.coreset.safetensors --out shared"""
    _checked_out(out, force)
    _combine(files, lambda a, b: a & b, out, "intersection")


@command.command("diff")
@click.argument("a", type=_FILE)
@click.argument("b", type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
@force_option
def diff(a, b, out, force):
    """Elements core in A but not in B.  Example: coreset diff math.coreset.safetensors code.coreset.safetensors --out only-math"""
    _checked_out(out, force)
    _combine([a, b], lambda x, y: x - y, out, "difference")


@command.command("complement")
@click.argument("file", type=_FILE)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CoreSet file to write.")
@force_option
def complement(file, out, force):
    """Every element NOT core in FILE.  Example: coreset complement general.coreset.safetensors --out trainable"""
    _checked_out(out, force)
    _write(~_load(file), out, "complement")


@command.command("stats", short_help="Selection of one CoreSet per layer × module, or overlap (Jaccard) of several.")
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--per", type=click.Choice(["layer", "module", "tensor"]), default="layer", show_default=True,
              help="Breakdown: of the selection (one FILE) or of the Jaccard overlap (several).")
def stats(files, per):
    """One FILE: what it selects per layer × module. Several: their pairwise Jaccard overlap matrix,
    and the overlap per layer/module/tensor (each pair, and common to all).

    \b
    Examples:
      trace-transfer coreset stats cores/math.coreset.safetensors --per module
      trace-transfer coreset stats cores/math.coreset.safetensors cores/code.coreset.safetensors --per module
      trace-transfer coreset stats cores/*.coreset.safetensors
    """
    from trace_transfer.report.console import wide_console

    sets = [_load(f) for f in files]
    if len(sets) == 1:
        _print_selection(wide_console(), files[0], sets[0], per)
    else:
        _print_overlap(wide_console(), files, sets, per)


def _print_selection(console, file, cs, per) -> None:
    from rich.table import Table

    from trace_transfer.coreset import selection_stats
    from trace_transfer.report.importance import layer_module_grid

    st = selection_stats(cs)
    _print_summary(console, file, cs)
    _print_grid(console, layer_module_grid(cs))
    table = Table(title=f"selected per {per}")
    for col in (per, "selected", "total", "share"):
        table.add_column(col, justify="left" if col == per else "right")
    for key, c in st[f"per_{per}"].items():
        table.add_row(str(key), f"{c['selected']:,}", f"{c['total']:,}", f"{100 * c['share']:.2f}%")
    console.print(table)


def _print_overlap(console, files, sets, per) -> None:
    from rich.table import Table

    from trace_transfer.coreset import pairwise_overlap

    st = pairwise_overlap(sets)
    n = len(sets)
    legend = Table(title="CoreSets")
    for col in ("#", "task", "selected", "file"):
        legend.add_column(col, justify="right" if col in ("#", "selected") else "left")
    for i, (f, cs) in enumerate(zip(files, sets), start=1):
        legend.add_row(str(i), str(cs.metadata.get("task") or ""), f"{cs.num_selected():,}", str(f))
    console.print(legend)
    matrix = Table(title="pairwise Jaccard")
    matrix.add_column("#", justify="right")
    for j in range(n):
        matrix.add_column(str(j + 1), justify="right")
    for i, row in enumerate(st["jaccard"], start=1):
        matrix.add_row(str(i), *[f"{v:.4f}" for v in row])
    console.print(matrix)
    if n == 2:
        o = st["pairs"][0, 1]["overall"]
        console.print(f"Jaccard {o['jaccard']:.4f}: intersection {o['intersection']:,}, union {o['union']:,} "
                      f"(A {o['a_selected']:,}, B {o['b_selected']:,})")
    else:
        a = st["all"]
        console.print(f"common to all {n}: Jaccard {a['jaccard']:.4f}: intersection {a['intersection']:,}, "
                      f"union {a['union']:,}")
    columns = {f"{i + 1}·{j + 1}": p[f"per_{per}"] for (i, j), p in st["pairs"].items()}
    if n > 2:
        columns["all"] = st["all"][f"per_{per}"]
    keys = list(dict.fromkeys(k for c in columns.values() for k in c))
    table = Table(title=f"Jaccard per {per}")
    table.add_column(per)
    for label in columns:
        table.add_column(label if n > 2 else "jaccard", justify="right")
    for key in keys:
        table.add_row(str(key), *[f"{c[key]:.4f}" if key in c else "" for c in columns.values()])
    console.print(table)


@command.command("export", short_help="Write a CoreSet as Axolotl / LLaMA-Factory / PEFT / JSON freezing config.")
@click.argument("file", type=_FILE)
@click.option("--to", "fmt", required=True, type=click.Choice(["axolotl", "llamafactory", "peft", "json"]),
              help="Target: axolotl (unfrozen_parameters with row ranges), llamafactory (freeze tuning), "
                   "peft (a SHiRA adapter directory), json ({name: ranges}).")
@click.option("--out", required=True, type=click.Path(), help="File to write (peft: a directory).")
@click.option("--approximate", is_flag=True,
              help="llamafactory: write the closest setting when none is exact, reporting parameters added/lost.")
@click.option("--base-model", default=None, help="peft: base_model_name_or_path for the adapter (default: the CoreSet's model).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
def export(file, fmt, out, approximate, base_model, force):
    """Export FILE so another trainer trains exactly its core (or refuse, saying why and what is exact).

    \b
    Examples:
      trace-transfer coreset export cores/math.coreset.safetensors --to axolotl --out math.axolotl.yaml
      trace-transfer coreset export cores/math.coreset.safetensors --to llamafactory --out lf.yaml --approximate
      trace-transfer coreset export cores/math.coreset.safetensors --to peft --out adapters/math
      trace-transfer coreset export cores/math.coreset.safetensors --to json --out math.ranges.json
    """
    from trace_transfer.coreset.export import export_coreset

    res = export_coreset(file, fmt, out, approximate=approximate, force=force, base_model=base_model)
    for note in res.notes:
        click.echo(f"note: {note}")
    exact = "exact" if res.exact else f"approximate: +{res.added:,} added, -{res.lost:,} lost"
    click.echo(f"{fmt}: {exact} -> {res.path}")
