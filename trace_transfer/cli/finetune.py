"""`trace-transfer finetune`: sequential fine-tuning over a stream of tasks (thin glue over run_sequence)."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cli._code_exec import allow_code_exec_option
from trace_transfer.config import click_options
from trace_transfer.devices import DeviceConfig
from trace_transfer.train.config import MethodOptions, TrainConfig


@click.command("finetune")
@click.option("--model", "model", required=True, help="Base model: HF id or local directory.")
@click.option("--stage", "stage_specs", multiple=True, required=True,
              help="TASK[:CORESET], once per stage, in training order (TASK may contain colons).")
@click.option("--method", default="trace", show_default=True,
              help="trace | full | lora | joint | replay | general-core | lisa | cpi-ft-sft (or a registered plug-in "
                   "method). lisa does not run under --deepspeed.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--isolation", type=click.Choice(["none", "strict"]), default="none", show_default=True,
              help="trace: 'strict' also freezes earlier stages' cores.")
@click_options(TrainConfig, ["epochs", "max_steps", "lr", "batch_size", "grad_accum", "seq_len", "weight_decay",
                            "scheduler", "warmup_ratio", "precision", "gradient_checkpointing"],
              defaults={"epochs": 3.0})  # paper: 3 per stage
@click.option("--replay-share", type=float, default=0.1, show_default=True,
              help="replay: share of each earlier task's training data mixed into later stages.")
@click.option("--general-coreset", type=click.Path(dir_okay=False), default=None,
              help="general-core: the CoreSet to freeze (its complement is trained).")
@click.option("--masking", type=click.Choice(["auto", "sparse", "dense"]), default="auto", show_default=True,
              help="Masked methods: sparse trains a delta over the core only (memory ∝ core); dense masks "
                   "gradients of whole tensors; auto = sparse where at most half of a tensor is core.")
@click.option("--lora-r", type=int, default=8, show_default=True, help="lora: rank (paper: 8).")
@click.option("--lora-alpha", type=int, default=16, show_default=True, help="lora: alpha (paper: 16).")
@click_options(MethodOptions, ["lisa_layers", "lisa_interval"])
@click.option("--eval-limit", type=click.IntRange(min=0), default=None,
              help="Evaluate the first N examples of each task.")
@click.option("--monitor", "--monitor-task", "monitor", multiple=True,
              help="Task evaluated after every stage but never trained (e.g. synthetic:general); repeatable. "
                   "--monitor-task is the same option, for torchrun command lines (see pipeline/launch.py).")
@click.option("--eval-batch-size", type=int, default=32, show_default=True)
@click.option("--eval-backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="Generation backend of the evaluation after each stage: hf (HF generate, KV cache) | vllm "
                   "(optional: pip install vllm; reads each stage's checkpoint directory; not under --deepspeed).")
@click.option("--resume", is_flag=True, help="Continue after the last complete stage of --out.")
@click.option("--deepspeed", "deepspeed_config", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed JSON config (launch with torchrun / deepspeed).")
@click.option("--plot", is_flag=True, help="Also write accuracy_matrix.png.")
@click.option("--seed", type=int, default=0, show_default=True, help="Stage k uses seed + k.")
@click_options(DeviceConfig, ["device", "dtype"])  # --dtype: the per-stage evaluation's weights
@allow_code_exec_option
def command(model, stage_specs, method, out_dir, isolation, epochs, max_steps, lr, batch_size, grad_accum, seq_len,
            weight_decay, scheduler, warmup_ratio, precision, replay_share, general_coreset, masking, lora_r,
            lora_alpha, lisa_layers, lisa_interval, eval_limit, monitor, eval_batch_size, resume, deepspeed_config, plot, seed, device,
            gradient_checkpointing, dtype, eval_backend):
    """Fine-tune MODEL on a stream of tasks; checkpoint and evaluate every task after each stage.

    \b
    Example (TRACE selective activation, math -> medical -> code):
      trace-transfer finetune --model tiny --method trace \\
        --stage synthetic:math:cores/math.coreset.safetensors \\
        --stage synthetic:medical:cores/medical.coreset.safetensors \\
        --stage synthetic:code:cores/code.coreset.safetensors \\
        --max-steps 150 --lr 3e-4 --batch-size 32 --out runs/trace --plot

    Writes OUT/stage_k/ (HF checkpoint + eval), OUT/results.json (R, AA, BWT, FWT, forgetting,
    provenance) and OUT/results.md. --resume continues an interrupted run.
    """
    import os

    from trace_transfer.cli._progress import progress_bars
    from trace_transfer.train.methods import counting_steps, watch_steps
    from trace_transfer.train.runner import run_sequence
    from trace_transfer.train.stages import parse_stage

    stages = [parse_stage(s) for s in stage_specs]
    cfg = TrainConfig(lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                      seq_len=seq_len, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                      scheduler=scheduler, precision=precision, seed=seed,
                      gradient_checkpointing=gradient_checkpointing)
    options = MethodOptions(isolation=isolation, replay_share=replay_share, general_coreset=general_coreset,
                            lora_r=lora_r, lora_alpha=lora_alpha, lisa_layers=lisa_layers,
                            lisa_interval=lisa_interval, masking=masking)
    # Each stage's optimizer steps as a bar (plain lines with rate and ETA without a terminal); under
    # torchrun only rank 0 shows them.
    with progress_bars(enabled=os.environ.get("RANK", "0") == "0") as bar, watch_steps(counting_steps(bar, max_steps)):
        result = run_sequence(model, stages, method, out_dir, cfg, eval_limit=eval_limit, resume=resume,
                              deepspeed_config=deepspeed_config, options=options,
                              eval_batch_size=eval_batch_size, monitor=list(monitor),
                              progress=lambda m: click.echo(m, err=True), device=device, dtype=dtype,
                              eval_backend=eval_backend)
    if result.rank == 0:  # under torchrun every rank returns here; one table is enough
        if plot:  # training returns results; the report draws them
            from trace_transfer.report.plots import plot_run

            plot_run(out_dir)
        click.echo((Path(out_dir) / "results.md").read_text())
        click.echo(f"wrote {Path(out_dir) / 'results.json'}")
