"""`trace-transfer delta extract|apply|revert`: sparse task deltas over one base model."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._errors import Group
from trace_transfer.cli._output import force_option


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@click.group("delta", cls=Group)
def command() -> None:
    """Sparse task deltas: keep one base model and, per task, only its changed core elements.

    \b
    Example:
      trace-transfer delta extract --base tiny --tuned run/stage_1 --coreset cores/math.coreset.safetensors --out deltas/math
      trace-transfer delta apply --base tiny --delta deltas/math --out rebuilt/math
      trace-transfer delta revert --tuned run/stage_1 --delta deltas/math --out rebuilt/base
    """


@command.command("extract")
@click.option("--base", required=True, type=click.Path(exists=True, path_type=Path), help="Base model dir.")
@click.option("--tuned", required=True, type=click.Path(exists=True, path_type=Path), help="Fine-tuned model dir.")
@click.option("--coreset", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The CoreSet the tuned model was trained under.")
@click.option("--allow-outside", is_flag=True,
              help="Store changed elements outside the CoreSet too (reported) instead of failing.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Shard size cap of the delta file.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Delta directory to write.")
@force_option
def extract_cmd(base, tuned, coreset, allow_outside, max_shard_size, out, force) -> None:
    """Store the elements where TUNED differs from BASE (sorted flat indices + values), with BASE's fingerprint.

    \b
    Example:
      trace-transfer delta extract --base tiny --tuned run/stage_1 --coreset cores/math.coreset.safetensors --out deltas/math
    """
    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.surgery._modeldir import parse_size
    from trace_transfer.checkpoint import output_dir
    from trace_transfer.surgery.delta import extract

    with output_dir(out, force, "delta directory"), progress_bars() as update:
        rep = extract(base, tuned, coreset, out, allow_outside=allow_outside,
                      max_shard_bytes=parse_size(max_shard_size),
                      progress=lambda i, n, _name: update("delta extract", i, n))
    total = rep.manifest["total_params"]
    click.echo(f"changed elements: {rep.changed:,} of {total:,} ({100 * rep.changed / max(total, 1):.3f}%) "
               f"in {len(rep.per_tensor)} tensors")
    if rep.outside:
        click.echo(f"warning: {rep.outside:,} changed elements lie outside the CoreSet (kept: --allow-outside)")
        for name, r in rep.per_tensor.items():
            if r["outside"]:
                click.echo(f"  {name}: {r['outside']:,}")
    click.echo(f"delta size: {_human(rep.delta_bytes)} vs full checkpoint {_human(rep.full_bytes)} "
               f"(ratio {rep.ratio:.4f}, {1 / rep.ratio if rep.ratio else float('inf'):.1f}x smaller)")
    click.echo(f"wrote {out}")


@command.command("apply")
@click.option("--base", required=True, type=click.Path(exists=True, path_type=Path), help="Base model dir the delta was made on.")
@click.option("--delta", "delta", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Delta directory from `delta extract`.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Shard size cap of the written model.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output model dir.")
@force_option
def apply_cmd(base, delta, max_shard_size, out, force) -> None:
    """Rebuild the tuned model (bit-identical) from BASE + DELTA.

    \b
    Example:
      trace-transfer delta apply --base tiny --delta deltas/math --out rebuilt/math
    """
    _rebuild("apply", base, delta, max_shard_size, out, force)


@command.command("revert")
@click.option("--tuned", required=True, type=click.Path(exists=True, path_type=Path), help="Tuned model dir the delta was made from.")
@click.option("--delta", "delta", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Delta directory from `delta extract`.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Shard size cap of the written model.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output model dir.")
@force_option
def revert_cmd(tuned, delta, max_shard_size, out, force) -> None:
    """Rebuild the base model (bit-identical) from TUNED − DELTA.

    \b
    Example:
      trace-transfer delta revert --tuned run/stage_1 --delta deltas/math --out rebuilt/base
    """
    _rebuild("revert", tuned, delta, max_shard_size, out, force)


def _rebuild(direction: str, source: Path, delta: Path, max_shard_size: str, out: Path, force: bool) -> None:
    from trace_transfer.checkpoint import output_dir
    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.surgery import delta as delta_mod
    from trace_transfer.surgery._modeldir import parse_size

    fn = delta_mod.apply if direction == "apply" else delta_mod.revert
    with output_dir(out, force, "output model directory"), progress_bars() as update:
        rep = fn(source, delta, out, max_shard_bytes=parse_size(max_shard_size),
                 progress=lambda i, n, _name: update(f"delta {direction}", i, n))
    what = "tuned" if direction == "apply" else "base"
    click.echo(f"patched {rep.elements_patched:,} elements in {rep.tensors_patched} tensors; "
               f"every patched tensor verified against the {what} model's recorded hash")
    click.echo(f"wrote {out}")
