"""`trace-transfer transfer`: map a source CoreSet onto a different target architecture."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._table import echo_table


@click.command("transfer")
@click.option("--coreset", "coreset_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Source CoreSet (*.coreset.safetensors).")
@click.option("--source", required=True, help="Source model (local dir or hub id); only its config is read.")
@click.option("--target", required=True, help="Target model (local dir or hub id); config, no weights.")
@click.option("--layer-map", "layer_map", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="layer_map.json from `trace-transfer map-layers`.")
@click.option("--ratio", type=float, default=None, help="Target budget as a fraction [default: the source CoreSet's ratio].")
@click.option("--rules", "rules", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Extra rule file or directory (repeatable), searched by model_type before the shipped rules.")
@click.option("--direction", type=click.Choice(["reverse", "forward"]), default="reverse", show_default=True,
              help="reverse: every target layer takes its mapped source layer; forward: each source layer feeds its target.")
@click.option("--budget", type=click.Choice(["auto", "tensors", "params"]), default="auto", show_default=True,
              help="Count the budget in whole tensors (the paper) or parameters; auto follows the source CoreSet.")
@click.option("--target-names", type=click.Choice(["model", "checkpoint"]), default="model", show_default=True,
              help="Key the target CoreSet by the model class's parameter names or the checkpoint's tensor names.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the report as JSON.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Target CoreSet to write.")
def command(coreset_path, source, target, layer_map, ratio, rules, direction, budget, target_names, report_path, out) -> None:
    """Transfer a CoreSet from a small source model to a different target (TRACE §5.5).

    Units are matched by role through both models' rule files and by layer through the layer map;
    fused tensors are sliced per part; companions (e.g. Qwen3's q_norm/k_norm) are added; the target
    is re-selected by transferred score to the target's own budget.

    \b
    Example:
      trace-transfer transfer --coreset cores/math.coreset.safetensors --source tiny-llama \\
          --target tiny-qwen3 --layer-map cka/layer_map.json --out cores/math.qwen3.coreset.safetensors
    """
    from trace_transfer.errors import TraceTransferError
    from trace_transfer.transfer import transfer

    try:
        cs, report = transfer(coreset_path, source, target, layer_map, ratio=ratio, rules=list(rules),
                              direction=direction, budget=budget, target_layout=target_names)
        path = cs.save(out)
        if report_path:
            report.save(report_path)
    except TraceTransferError as exc:
        raise click.ClickException(str(exc)) from None

    b = report.budget
    click.echo(f"{report.source_family} -> {report.target_family}  (layer map: {report.direction}, "
               f"{len(report.layer_pairs)} layer pairs)\n")
    echo_table(["role", "target slots", "resampled", "via fallback role", "no source", "source slots lost"],
           [[r["role"], r["mapped"], r["resampled"], r["fallback"], r["no_source"], r["source_lost"]] for r in report.role_rows()])
    if report.source_unmapped:
        by_role: dict[str, list[int]] = {}
        for u in report.source_unmapped:
            row = by_role.setdefault(u["slot"].split()[0], [0, 0])
            row[0] += 1
            row[1] += u["core_params"]
        click.echo("\nsource roles with no counterpart in the target (details: --report):")
        echo_table(["role.field", "slots", "core params dropped"], [[k, v[0], v[1]] for k, v in by_role.items()])
    if report.companions:
        click.echo("\ncompanions added: " + ", ".join(c["tensor"] for c in report.companions))
    click.echo(f"\nbudget: {b['selected']} / {b['budget']} {b['unit']} (ratio {b['ratio']:.4g} of {b['total']}); "
               f"{b['selected_params']:,} parameters in {b['selected_tensors']} tensors")
    for w in report.warnings:
        click.echo(f"warning: {w}")
    click.echo(f"wrote {path}")
