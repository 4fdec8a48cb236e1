"""`trace-transfer map-layers`: source -> target layer map from a CKA result (thin glue over map_layers)."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._output import force_option


@click.command("map-layers")
@click.option("--cka", "cka_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Directory written by `trace-transfer cka`.")
@click.option("--method", default="monotone", show_default=True,
              help="argmax (paper), monotone (order-preserving, ends pinned), hungarian, relative-depth, "
                   "or a method registered with register_layer_mapper.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output layer_map.json.")
@click.option("--bootstrap", type=int, default=0, show_default=True,
              help="Probe resamples for the per-row stability (0 = skip).")
@click.option("--fraction", type=float, default=0.8, show_default=True,
              help="Share of probes drawn without replacement per resample.")
@click.option("--seed", type=int, default=0, show_default=True)
@force_option
def command(cka_dir, method, out, bootstrap, fraction, seed, force) -> None:
    """Map each source layer to a target layer (and each target layer back to a source layer).

    Also judges whether the CKA is informative at all: the mapped layers must beat a random layer's
    CKA by at least 0.05 (flat CKA between independently trained tiny models gains <= 0.04) and by 3
    bootstrap standard deviations of the entries when --bootstrap is given. The verdict is saved in
    layer_map.json.

    \b
    Example:
      trace-transfer map-layers --cka runs/cka --method monotone --bootstrap 100 --out runs/layer_map.json
    """
    from rich.console import Console
    from rich.table import Table

    from trace_transfer.checkpoint import check_output
    from trace_transfer.cka import map_layers

    check_output(out, force, "layer map")
    lm = map_layers(cka_dir, method=method, bootstrap=bootstrap, seed=seed, fraction=fraction)
    lm.save(out)

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    console = Console()
    for title, rows, key, other in (("source -> target", lm.rows, "source", "target"),
                                    ("target -> source (reverse)", lm.reverse_rows, "target", "source")):
        table = Table(title=f"{method}: {title}")
        for col in (key, other, "CKA", "margin", "stability"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(getattr(r, key)), str(getattr(r, other)), fmt(r.cka), fmt(r.margin), fmt(r.stability))
        console.print(table)
    v = lm.verdict
    console.print(f"CKA {'is' if v['informative'] else 'is NOT'} informative: {v['reason']}"
                  + ("" if v["informative"] else "; the layers do not correspond more than chance says: "
                     "map by relative depth instead (--method relative-depth; the pipeline does so by default)"))
    console.print(f"wrote {out}")
