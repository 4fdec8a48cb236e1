"""`trace-transfer transfer`: map a source CoreSet onto a different target architecture."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._output import force_option
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
@click.option("--source-rules", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The source's rule file, used as given (instead of the one its model_type selects).")
@click.option("--target-rules", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The target's rule file, used as given (instead of the one its model_type selects).")
@click.option("--direction", type=click.Choice(["reverse", "forward"]), default="reverse", show_default=True,
              help="reverse: every target layer takes its mapped source layer; forward: each source layer feeds its target.")
@click.option("--budget", type=click.Choice(["auto", "tensors", "params"]), default="auto", show_default=True,
              help="Count the budget in whole tensors (the paper) or parameters; auto follows the source CoreSet.")
@click.option("--target-names", type=click.Choice(["model", "checkpoint"]), default="model", show_default=True,
              help="Key the target CoreSet by the model class's parameter names or the checkpoint's tensor names.")
@click.option("--carry", type=click.Choice(["auto", "exact", "budget", "profile"]), default="auto", show_default=True,
              help="What crosses over. auto: whole-tensor CoreSets map exactly (a CoreSet); finer ones give per-slot "
                   "budgets (a .budgets.json for `trace-transfer refine`). profile: the ablation that resamples per-unit "
                   "scores by relative position into a CoreSet; measured on the demo pair, those scores are "
                   "uncorrelated with the target's own (Spearman ~0.03) and train no better than random units in "
                   "the same per-tensor counts.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the report as JSON.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Target CoreSet (*.coreset.safetensors) or, when carrying budgets, *.budgets.json "
                   "(a .coreset.safetensors name is changed to .budgets.json).")
@force_option
def command(coreset_path, source, target, layer_map, ratio, rules, source_rules, target_rules, direction, budget,
            target_names, carry, report_path, out, force) -> None:
    """Transfer a CoreSet from a small source model to a different target (TRACE §5.5).

    Units are matched by role through both models' rule files and by layer through the layer map;
    fused tensors are sliced per part; companions (e.g. Qwen3's q_norm/k_norm) are added. Whole-tensor
    CoreSets are re-selected by transferred score to the target's own budget. Finer CoreSets give
    per-slot budgets: how many units each target (layer, role) slot gets; `trace-transfer refine`
    then picks the units on the target from a cheap signal.

    \b
    Example:
      trace-transfer transfer --coreset cores/math.coreset.safetensors --source tiny-llama \\
          --target tiny-qwen3 --layer-map cka/layer_map.json --out cores/math.budgets.json
      trace-transfer refine --budgets cores/math.budgets.json --model tiny-qwen3 --task synthetic:math \\
          --signal fisher --batches 16 --out cores/math.qwen3.coreset.safetensors
    """
    from trace_transfer.checkpoint import check_output
    from trace_transfer.transfer import BUDGETS_SUFFIX, SlotBudgets, transfer

    check_output(out, force, "output file")
    if report_path:
        check_output(report_path, force, "report")
    cs, report = transfer(coreset_path, source, target, layer_map, ratio=ratio, rules=list(rules),
                          source_rules=source_rules, target_rules=target_rules, direction=direction, budget=budget, target_layout=target_names, carry=carry)
    if isinstance(cs, SlotBudgets) and not out.name.endswith(".json"):
        out = out.with_name(out.name.removesuffix(".safetensors").removesuffix(".coreset") + BUDGETS_SUFFIX)
    check_output(out, force, "output file")  # the name may have changed to .budgets.json
    path = cs.save(out)
    if report_path:
        report.save(report_path)

    b = report.budget
    click.echo(f"{report.source_family} -> {report.target_family}  (layer map: {report.direction}, "
               f"{len(report.layer_pairs)} layer pairs)\n")
    echo_table(["role", "target slots", "resampled", "via fallback role", "no source", "source slots lost"],
           [[r["role"], r["mapped"], r["resampled"], r["fallback"], r["no_source"], r["source_lost"]] for r in report.role_rows()])
    if report.source_unmapped:
        click.echo("\nsource roles with no counterpart in the target (details: --report):")
        echo_table(["role.field", "slots", "core params dropped"],
                   [[r["role"], r["slots"], r["core_params"]] for r in report.unmapped_rows()])
    if report.companions:
        click.echo("\ncompanions added: " + ", ".join(c["tensor"] for c in report.companions))
    if isinstance(cs, SlotBudgets):
        click.echo(f"\nbudgets: {b['selected']:,} / {b['budget']:,} params (ratio {b['ratio']:.4g} of {b['total']:,}) "
                   f"over {b['budgeted_groups']} of {b['groups']} target slots; pick the units with `trace-transfer refine`")
    else:
        click.echo(f"\nbudget: {b['selected']} / {b['budget']} {b['unit']} (ratio {b['ratio']:.4g} of {b['total']}); "
                   f"{b['selected_params']:,} parameters in {b['selected_tensors']} tensors")
    for w in report.warnings:
        click.echo(f"warning: {w}")
    click.echo(f"wrote {path}")
