"""`trace-transfer cpi-ft`: the whole CPI-FT method in one command (thin glue over trace_transfer.surgery.cpi_ft)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from trace_transfer.cli._code_exec import allow_code_exec_option
from trace_transfer.config import click_options
from trace_transfer.devices import DeviceConfig
from trace_transfer.scoring import GRANULARITIES
from trace_transfer.surgery import CLUSTER_METHODS, FREEZE_MODES, MERGE_COLLISION_RULES, SFT_MODES
from trace_transfer.surgery.modes import DEFAULT_TAU
from trace_transfer.train.config import TrainConfig


@click.command("cpi-ft")
@click.option("--model", required=True, help="Base model: HF id or local directory.")
@click.option("--task", "tasks", multiple=True, required=True, help="Task reference (repeat; at least two).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--ratio", type=float, default=0.01, show_default=True,
              help="Core region per task: share of parameters with the largest update (paper: 0.01).")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="element",
              show_default=True, help="Unit of the core regions (paper: element).")
@click.option("--scope", default="all", show_default=True, help="Tensor groups the core regions compete in.")
@click.option("--tau", type=float, default=DEFAULT_TAU, show_default=True, help="Jaccard threshold for clustering (paper: 0.1).")
@click.option("--cluster-method", type=click.Choice(CLUSTER_METHODS), default="components", show_default=True)
@click.option("--collision", type=click.Choice(MERGE_COLLISION_RULES), default="update",
              show_default=True, help="Who wins where cores overlap (update: the task that moved the element most).")
@click.option("--per-row", is_flag=True, help="SLERP one angle per row instead of per tensor.")
@click.option("--sft", type=click.Choice(SFT_MODES), default="sequence", show_default=True,
              help="Pipeline SFT: one stage per task (R like every method) or per group on mixed data (paper).")
@click.option("--freeze", type=click.Choice(FREEZE_MODES), default="all", show_default=True,
              help="Freeze every task's core in every SFT stage, or only earlier stages' cores (paper wording).")
@click.option("--keep-deltas", is_flag=True, help="Keep the per-task update files (as large as the model).")
@click.option("--epochs", type=float, default=3.0, show_default=True, help="Step 1: epochs per task.")
@click.option("--max-steps", type=int, default=0, show_default=True, help="Step 1: optimizer steps; 0 = from --epochs.")
@click.option("--lr", type=float, default=2e-5, show_default=True, help="Step 1: peak learning rate.")
@click.option("--sft-epochs", type=float, default=None, help="Step 5: epochs per stage [default: --epochs].")
@click.option("--sft-max-steps", type=int, default=None, help="Step 5: optimizer steps per stage [default: --max-steps].")
@click.option("--sft-lr", type=float, default=None, help="Step 5: peak learning rate [default: --lr].")
@click_options(TrainConfig, ["batch_size", "grad_accum", "seq_len", "weight_decay", "scheduler", "warmup_ratio",
                            "precision", "gradient_checkpointing"])
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-limit", type=click.IntRange(min=0), default=None,
              help="Evaluate the first N examples of each task.")
@click.option("--eval-batch-size", type=int, default=32, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--deepspeed", "deepspeed_config", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed JSON config for steps 1 and 5 (launch with torchrun / deepspeed).")
@click.option("--plot", is_flag=True, help="Also write overlap.png and accuracy_matrix.png.")
@click_options(DeviceConfig, ["device", "dtype"])  # --dtype: the evaluations' weights
@allow_code_exec_option
def command(model, tasks, out_dir, ratio, granularity, scope, tau, cluster_method, collision, per_row, sft, freeze,
            keep_deltas, epochs, max_steps, lr, sft_epochs, sft_max_steps, sft_lr, batch_size, grad_accum, seq_len,
            weight_decay, scheduler, warmup_ratio, precision, seed, eval_limit, eval_batch_size, resume,
            deepspeed_config, plot, device, dtype, gradient_checkpointing) -> None:
    """CPI-FT: per-task fine-tuning -> core regions -> clustering -> transplant + SLERP -> pipeline SFT.

    Evaluated like `trace-transfer finetune` (OUT/results.json with R, AA, BWT, FWT; row 0 = MODEL).

    \b
    Example:
      trace-transfer cpi-ft --model tiny --task synthetic:math --task synthetic:medical --task synthetic:code \\
          --ratio 0.01 --tau 0.1 --max-steps 150 --lr 3e-4 --batch-size 32 --out runs/cpi-ft --plot

    \b
    Under DeepSpeed, steps 1 and 5 train on every rank and the rest runs on rank 0:
      torchrun --nproc_per_node 8 -m trace_transfer cpi-ft --deepspeed examples/deepspeed/ds_zero3.json ...
    """
    from trace_transfer.surgery.cpi_ft import CpiFtConfig, cpi_ft
    from trace_transfer.train.loop import TrainConfig

    ft_cfg = TrainConfig(lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                         seq_len=seq_len, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                         scheduler=scheduler, precision=precision, seed=seed,
                         gradient_checkpointing=gradient_checkpointing)
    sft_cfg = replace(ft_cfg, **{k: v for k, v in (("epochs", sft_epochs), ("max_steps", sft_max_steps),
                                                    ("lr", sft_lr)) if v is not None})
    cfg = CpiFtConfig(ratio=ratio, granularity=granularity, scope=scope, tau=tau, cluster_method=cluster_method,
                      collision=collision, per_row=per_row, sft=sft, freeze=freeze, keep_deltas=keep_deltas)
    result = cpi_ft(model, list(tasks), out_dir, cfg, ft_cfg=ft_cfg, sft_cfg=sft_cfg, eval_limit=eval_limit,
                    eval_batch_size=eval_batch_size, resume=resume, progress=lambda m: click.echo(m, err=True),
                    device=device, dtype=dtype, deepspeed_config=deepspeed_config)
    if result.rank != 0:  # under torchrun every rank returns here; one table is enough
        return
    if plot:  # training returns results; the report draws them
        from trace_transfer.report.plots import plot_cpi_ft

        plot_cpi_ft(out_dir)
    click.echo((Path(out_dir) / "results.md").read_text())
    click.echo(f"wrote {Path(out_dir) / 'results.json'}")
