"""`trace-transfer probe`: warm-start fine-tune on one task, write Δ, Fisher and provenance."""

from __future__ import annotations

import os

import click

from trace_transfer.cli._output import force_option
from trace_transfer.config import click_options
from trace_transfer.probe.config import ProbeConfig
from trace_transfer.train.config import TrainConfig


@click.command("probe")
@click.option("--model", required=True, help="Base model: hub id or local directory.")
@click.option("--task", required=True, help="Task: synthetic:<name> or a task YAML file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Probe directory to write.")
# Settings come from the config dataclasses (names, types, defaults, choices, help): declared once.
@click_options(TrainConfig, ["epochs", "max_steps", "lr", "batch_size", "seq_len", "precision",
                             "gradient_checkpointing"])
@click_options(ProbeConfig, ["fisher", "fisher_at", "fisher_batches", "fisher_elements", "max_examples", "device"])
@click_options(TrainConfig, ["seed"])
@click.option("--deepspeed", "deepspeed_config", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed ZeRO-2/3 JSON config: launch with torchrun / deepspeed; --batch-size is then per rank.")
@force_option
def command(model, task, out_dir, epochs, max_steps, lr, batch_size, seq_len, precision, fisher, fisher_at,
            fisher_batches, fisher_elements, max_examples, device, seed,
            gradient_checkpointing, deepspeed_config, force):
    """Warm-start fine-tune MODEL on TASK and write the probe directory.

    \b
    Writes OUT/delta.safetensors (Δ = θ* − θ0, fp32), OUT/fisher.safetensors (diagonal Fisher, fp32),
    OUT/fisher_tensor.json (per-tensor reductions) and OUT/probe.json (provenance).

    \b
    Example:
      trace-transfer probe --model tiny --task synthetic:math --out probes/math --max-steps 100 --lr 3e-4
      torchrun --nproc_per_node=8 -m trace_transfer probe --model M --task T --out probes/t \\
        --deepspeed examples/deepspeed/ds_zero3.json
    """
    from trace_transfer.checkpoint import output_dir
    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.probe import ProbeConfig, probe

    cfg = ProbeConfig.from_flat(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                                precision=precision, fisher=fisher, fisher_at=fisher_at, fisher_batches=fisher_batches,
                                fisher_elements=fisher_elements, max_examples=max_examples, device=device, seed=seed,
                                gradient_checkpointing=gradient_checkpointing)
    if deepspeed_config is not None:
        from trace_transfer.probe.distributed import probe_deepspeed

        with progress_bars() as bar:  # every rank runs this; rank 0 alone claims OUT, writes and reports
            res = probe_deepspeed(model, task, out_dir, cfg, ds_config=deepspeed_config, progress=bar, force=force)
        if int(os.environ.get("RANK", "0")) != 0:
            return
    else:
        from trace_transfer.probe.distributed import require_single_process

        require_single_process()
        with output_dir(out_dir, force, "probe directory"), progress_bars() as bar:
            res = probe(model, task, out_dir, cfg, progress=bar)
    first, last = res.first_loss, res.final_loss
    loss = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no steps"
    click.echo(f"probe {res.task}: {res.steps} steps, {loss}; Fisher {fisher} at {fisher_at} "
               f"({res.info['fisher']['observations']} observations); wrote {res.out_dir}")
