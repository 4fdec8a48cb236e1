"""`trace-transfer verify-frozen`: prove that fine-tuning left every non-core element bit-identical."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._output import force_option


def _parse_aliases(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, target = v.partition("=")
        if not sep or not name or not target:
            raise click.BadParameter(f"{v!r}: expected CHECKPOINT_NAME=CORESET_NAME", param_hint="--alias")
        out[name] = target
    return out


@click.command("verify-frozen")
@click.option("--base", required=True, type=click.Path(exists=True, path_type=Path),
              help="Checkpoint before fine-tuning (HF model dir, .safetensors file or sharded index).")
@click.option("--tuned", required=True, type=click.Path(exists=True, path_type=Path),
              help="Checkpoint after fine-tuning.")
@click.option("--coreset", "coresets", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CoreSet whose elements were allowed to change (repeatable: their union is allowed).")
@click.option("--allow-missing", is_flag=True,
              help="Do not fail on tensors present in only one checkpoint (e.g. a tied lm_head saved by one side).")
@click.option("--alias", "aliases", multiple=True, metavar="CKPT_NAME=CORESET_NAME",
              help="Check a checkpoint tensor against a CoreSet tensor of another name (repeatable).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full report (every offending tensor) as JSON.")
@click.option("--max-rows", default=20, show_default=True, help="Offending tensors listed in the table.")
@force_option
def command(base, tuned, coresets, allow_missing, aliases, json_path, max_rows, force) -> None:
    """Check that every element outside the CoreSets is bit-identical between BASE and TUNED.

    Tensors are streamed one at a time and compared bitwise in their stored dtype. Prints the number of
    changed elements outside the cores, the largest |diff|, the first offending tensor and a row per
    offending tensor. Exit status 1 when any element outside the cores changed (or a tensor could not
    be compared), 0 otherwise.

    \b
    Example:
      trace-transfer verify-frozen --base tiny --tuned runs/trace/stage_1 \\
          --coreset cores/math.coreset.safetensors
    """
    from trace_transfer.checkpoint import check_output
    from trace_transfer.train.verify import verify_frozen

    if json_path:
        check_output(json_path, force, "--json")
    report = verify_frozen(base, tuned, list(coresets), allow_missing=allow_missing,
                           aliases=_parse_aliases(aliases))
    if json_path:
        report.save(json_path)
    click.echo(report.format(max_rows=max_rows))
    if not report.ok:
        raise SystemExit(1)
