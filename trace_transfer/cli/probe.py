"""`trace-transfer probe`: warm-start fine-tune on one task, write Δ, Fisher and provenance."""

from __future__ import annotations

import click


@click.command("probe")
@click.option("--model", required=True, help="Base model: hub id or local directory.")
@click.option("--task", required=True, help="Task: synthetic:<name> or a task YAML file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Probe directory to write.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data (paper: 1).")
@click.option("--max-steps", type=int, default=0, show_default=True, help="Optimizer steps; 0 = from --epochs.")
@click.option("--lr", type=float, default=2e-5, show_default=True, help="Peak learning rate (paper: 2e-5).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per batch (also for the Fisher).")
@click.option("--seq-len", type=int, default=1024, show_default=True, help="Max tokens per example.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="auto = bf16 autocast where the hardware supports it (weights stay fp32).")
@click.option("--fisher", type=click.Choice(["batch", "per-sample"]), default="batch", show_default=True,
              help="batch = squared mini-batch gradients (TRACE-compatible); per-sample = exact empirical Fisher.")
@click.option("--fisher-at", type=click.Choice(["probe", "base"]), default="probe", show_default=True,
              help="Take the Fisher at the warm-started model (paper) or at the base model.")
@click.option("--fisher-batches", type=int, default=0, show_default=True, help="Batches for the Fisher; 0 = one pass.")
@click.option("--fisher-elements/--no-fisher-elements", default=True, show_default=True,
              help="Store the per-element Fisher (row/column/head/element scoring need it).")
@click.option("--max-examples", type=int, default=0, show_default=True, help="Use the first N examples; 0 = all.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:i]")
@click.option("--seed", type=int, default=0, show_default=True)
def command(model, task, out_dir, epochs, max_steps, lr, batch_size, seq_len, precision, fisher, fisher_at,
            fisher_batches, fisher_elements, max_examples, device, seed):
    """Warm-start fine-tune MODEL on TASK and write the probe directory.

    \b
    Writes OUT/delta.safetensors (Δ = θ* − θ0, fp32), OUT/fisher.safetensors (diagonal Fisher, fp32),
    OUT/fisher_tensor.json (per-tensor reductions) and OUT/probe.json (provenance).

    \b
    Example:
      trace-transfer probe --model tiny --task synthetic:math --out probes/math --max-steps 100 --lr 3e-4
    """
    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.probe import ProbeConfig, probe

    cfg = ProbeConfig(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                      precision=precision, fisher=fisher, fisher_at=fisher_at, fisher_batches=fisher_batches,
                      fisher_elements=fisher_elements, max_examples=max_examples, device=device, seed=seed)
    with progress_bars() as bar:
        res = probe(model, task, out_dir, cfg, progress=bar)
    first, last = res.first_loss, res.final_loss
    loss = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no steps"
    click.echo(f"probe {res.task}: {res.steps} steps, {loss}; Fisher {fisher} at {fisher_at} "
               f"({res.info['fisher']['observations']} observations); wrote {res.out_dir}")
