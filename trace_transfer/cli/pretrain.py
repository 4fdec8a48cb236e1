"""`trace-transfer pretrain`: teach a tiny model the base skills the built-in task stream builds on."""

from __future__ import annotations

import click

from trace_transfer.cli._code_exec import allow_code_exec_option
from trace_transfer.config import click_options
from trace_transfer.devices import DeviceConfig


@click.command("pretrain")
@click.option("--model", required=True, help="Model to start from: hub id or directory (e.g. from tiny-model).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--task", default="synthetic:general", show_default=True, help="Training task (synthetic:<name> or YAML).")
@click.option("--steps", type=int, default=2400, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (cosine, 5% warm-up).")
@click.option("--seq-len", type=int, default=48, show_default=True, help="Max tokens per example.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order.")
@click.option("--eval-limit", type=int, default=250, show_default=True, help="Eval examples per score; 0 skips.")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice].")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out directory.")
@click_options(DeviceConfig, ["device"])
@allow_code_exec_option
def command(model, out_dir, task, steps, batch_size, lr, seq_len, seed, eval_limit, threads, overwrite, device):
    """Full fine-tuning of MODEL on the base-skill mixture (copy, sort, facts, 1-digit addition, code
    tracing), then per-skill accuracy. The result is the base for the synthetic stream
    (math -> medical -> code), whose tasks are new formats over these skills.

    \b
    Example:
      trace-transfer tiny-model --arch llama --out tiny --layers 4 --hidden 128
      trace-transfer pretrain --model tiny --out base --steps 2400 --threads 2
    """
    import torch

    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.cli._table import echo_table
    from trace_transfer.train.pretrain import pretrain

    if threads:
        torch.set_num_threads(threads)
    with progress_bars() as bar:
        res = pretrain(model, out_dir, task=task, steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len,
                       seed=seed, eval_limit=eval_limit, overwrite=overwrite, progress=bar,
                       device=device)
    loss = f"loss {res.losses[0]:.3f} -> {res.final_loss:.3f}" if res.losses else "no steps"
    click.echo(f"wrote {res.out_dir}: {res.steps} steps in {res.seconds:.0f}s, {loss}")
    if res.scores:
        echo_table(["task", "accuracy"], [[name, f"{score:.3f}"] for name, score in res.scores.items()])
