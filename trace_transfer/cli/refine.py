"""`trace-transfer refine`: pick a target CoreSet's units on the target from a cheap signal."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click

from trace_transfer.cli._table import echo_table
from trace_transfer.config import help_of
from trace_transfer.refine.config import GRANULARITIES, SIGNALS, RefineConfig

_D = {f.name: f.default for f in fields(RefineConfig)}


def _opt(name: str, **kw):
    return click.option(f"--{name.replace('_', '-')}", name, default=_D[name], show_default=True,
                        help=help_of(RefineConfig, name).capitalize() + ".", **kw)


@click.command("refine")
@click.option("--budgets", "budgets_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Per-slot budgets from `trace-transfer transfer` (*.budgets.json); without it, the global top "
                   "--ratio by the signal (the source-free control).")
@click.option("--model", required=True, help="Target model: hub id or local directory.")
@click.option("--task", required=True, help="Task: synthetic:<name> or a task YAML file.")
@_opt("signal", type=click.Choice(list(SIGNALS)))
@_opt("batches", type=int)
@_opt("steps", type=int)
@_opt("lr", type=float)
@_opt("batch_size", type=int)
@_opt("seq_len", type=int)
@_opt("ratio", type=float)
@_opt("granularity", type=click.Choice(list(GRANULARITIES)))
@_opt("scope")
@_opt("max_examples", type=int)
@_opt("precision", type=click.Choice(["auto", "bf16", "fp32"]))
@_opt("device")
@_opt("seed", type=int)
@click.option("--native-probe", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A `trace-transfer probe` directory of this task on this model: its cost is recorded next to this one.")
@click.option("--deepspeed", "deepspeed_config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="DeepSpeed ZeRO-1/2/3 JSON config: the micro-probe runs on every rank of a torchrun / deepspeed "
                   "launch; --batch-size stays the global batch (a multiple of the ranks); signal microprobe only.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Target CoreSet to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def command(budgets_path, model, task, native_probe, deepspeed_config, out, force, **settings) -> None:
    """Choose the units of a target CoreSet on the target, inside per-slot budgets or globally.

    \b
    Signals (K = --batches forward+backward passes on the target):
      fisher      one-shot diagonal Fisher at the base weights, no optimizer state
      saliency    |W * g| at the base weights (RMS gradient over the K batches)
      microprobe  --steps optimizer steps, then K Fisher batches; LF combination of the update and Fisher
    With --budgets every slot gets exactly its budget of units (its top units by the signal). The
    CoreSet records the cost on the target (passes, optimizer steps, peak memory, seconds), next to
    a native probe's when --native-probe is given.

    \b
    Under --deepspeed (launched with torchrun or deepspeed; every rank runs the command) the micro-probe
    is the distributed probe (ZeRO-2/3 warm start, Fisher on each rank's gradient partition) written to
    a temporary probe directory next to --out; rank 0 scores and selects from it, writes --out and
    removes the directory. The units are those one process picks with the same seed and --batch-size.

    \b
    Example:
      trace-transfer refine --budgets cores/math.budgets.json --model tiny-qwen3 --task synthetic:math \\
          --signal fisher --batches 16 --out cores/math.qwen3.coreset.safetensors
      trace-transfer refine --model tiny-qwen3 --task synthetic:math --ratio 0.05 --signal microprobe \\
          --steps 4 --batches 4 --out cores/math.cheap.coreset.safetensors
      torchrun --nproc_per_node=8 -m trace_transfer refine --budgets cores/math.budgets.json --model M \\
          --task synthetic:math --out cores/math.M.coreset.safetensors --deepspeed examples/deepspeed/ds_zero3.json
    """
    from trace_transfer.errors import ArtifactError
    from trace_transfer.refine import refine

    if out.exists() and not force:
        raise ArtifactError(f"{out} exists; pass --force to overwrite it or choose another --out")
    if deepspeed_config is not None:
        out.parent.mkdir(parents=True, exist_ok=True)  # it holds the temporary probe directory
    cs, cost = refine(model, task, budgets_path, RefineConfig(**settings), native=native_probe,
                      deepspeed_config=deepspeed_config, work_dir=out.parent)
    if cs is None:  # a DeepSpeed rank other than 0: rank 0 writes and reports
        return
    path = cs.save(out)
    native = cost["native"]
    echo_table(["", "forward+backward", "optimizer steps", "peak memory (MB)", "seconds"],
               [["this pass", cost["forward_backward"], cost["optimizer_steps"], cost["peak_memory_mb"], cost["seconds"]]]
               + ([["native probe", native["forward_backward"], native["optimizer_steps"], "-", native["seconds"] or "-"]]
                  if native else []))
    if "world_size" in cost:
        click.echo(f"{cost['device']}: peak memory per rank (MB) {cost['peak_memory_mb_per_rank']}")
    if cost["relative_to_native"] is not None:
        click.echo(f"target passes: {cost['relative_to_native']:.1%} of a native probe's")
    click.echo(f"{cs.metadata['mode']}: {cs.num_selected():,} parameters selected ({cs.metadata['strategy']})")
    click.echo(f"wrote {path}")
