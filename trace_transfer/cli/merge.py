"""`trace-transfer merge`: merge model directories tensor by tensor (slerp | lerp | transplant)."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._output import force_option
from trace_transfer.surgery import FILL_MODES, MERGE_COLLISION_RULES, MULTI_METHODS, RESTRICT_MODES


@click.command("merge")
@click.argument("method", metavar="METHOD")
@click.option("--model", "models", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="Model dir (repeat, at least twice). The first is model A: untouched elements and config come from it.")
@click.option("--t", "t", type=float, default=None, help="Two models: interpolation factor (0 = model A, 1 = model B).")
@click.option("--weight", "weights", multiple=True, type=float,
              help="One weight per --model, in order (any scale) [default: equal].")
@click.option("--coreset", "coresets", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="slerp/lerp: restrict to these CoreSets' union (repeatable). transplant: one per --model, same order.")
@click.option("--restrict", type=click.Choice(RESTRICT_MODES), default="inside", show_default=True,
              help="With --coreset for slerp/lerp: change only the elements inside the CoreSets, or only those outside.")
@click.option("--per-row", is_flag=True, help="SLERP: one angle per row (axis 0) instead of one per tensor.")
@click.option("--multi", type=click.Choice(MULTI_METHODS), default="pairwise", show_default=True,
              help="SLERP over more than two models: iterative pairwise SLERP, or normalised weighted mean.")
@click.option("--fill", type=click.Choice(FILL_MODES), default="first", show_default=True,
              help="transplant: what the non-core elements get (slerp = CPI-FT steps 3+4 in one pass).")
@click.option("--base", type=click.Path(exists=True, path_type=Path), default=None,
              help="transplant: the base model dir (backbone for --fill base; reference for --collision update).")
@click.option("--collision", type=click.Choice(MERGE_COLLISION_RULES), default="auto",
              show_default=True, help="transplant: who wins where cores overlap (auto: score when stored, else first; "
                                      "update: largest |model - base|).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Shard size cap of the written safetensors.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output model dir.")
@force_option
def command(method, models, t, weights, coresets, restrict, per_row, multi, fill, base, collision, max_shard_size,
            out, force) -> None:
    """Merge model directories, streaming one tensor at a time into sharded safetensors.

    METHOD is slerp, lerp, transplant, or a merge method registered with register_merge_method.

    \b
    Examples:
      trace-transfer merge slerp --model ft/math --model ft/code --t 0.3 --out merged
      trace-transfer merge lerp --model a --model b --model c --weight 2 --weight 1 --weight 1 --out avg
      trace-transfer merge slerp --model a --model b --coreset cores/math.coreset.safetensors \\
          --restrict outside --per-row --out merged
      trace-transfer merge transplant --model ft/math --model ft/code \\
          --coreset cores/math.coreset.safetensors --coreset cores/code.coreset.safetensors --fill slerp --out cpi
    """
    from trace_transfer.checkpoint import output_dir
    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.surgery._modeldir import parse_size
    from trace_transfer.surgery.merge import MergeOptions, merge_models

    opts = MergeOptions(t=t, weights=list(weights) or None, per_row=per_row, multi=multi, restrict=restrict,
                        fill=fill, collision=collision)
    with output_dir(out, force, "output model directory"), progress_bars() as update:
        report = merge_models(list(models), out, method, coresets=list(coresets), base=base, options=opts,
                              max_shard_bytes=parse_size(max_shard_size),
                              progress=lambda i, n, _name: update(f"merge {method}", i, n))

    tot = report.totals()
    click.echo(f"{method}: {len(models)} models -> {out}")
    click.echo(f"  elements changed vs model A: {tot['changed']:,} / {tot['numel']:,} "
               f"({100 * tot['changed'] / max(tot['numel'], 1):.2f}%) in {len(report.per_tensor)} tensors")
    if tot["rows"]:
        click.echo(f"  SLERP angles: {tot['rows']:,} vectors, {tot['fallback_rows']:,} nearly parallel (linear fallback)")
    if method == "transplant":
        click.echo(f"  core elements transplanted: {tot['core']:,}; collisions: {tot['collisions']:,} "
                   f"(values differing: {tot['conflicts']:,})")
        rows = report.collisions()
        if rows:
            click.echo("\n  tensor" + " " * 44 + "collisions  conflicts  resolved by")
            for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["collisions"])[:20]:
                click.echo(f"  {name:<50}{r['collisions']:>10,}  {r['conflicts']:>9,}  {r['resolved_by']}")
            if len(rows) > 20:
                click.echo(f"  ... {len(rows) - 20} more tensors (all in {out / 'surgery.json'})")
    click.echo(f"wrote {out} (report: {out / 'surgery.json'})")
