"""`trace-transfer eval`: score a model on one or more tasks (thin glue over evaluate_model)."""

from __future__ import annotations

import click

from trace_transfer.cli._code_exec import allow_code_exec_option
from trace_transfer.cli._output import force_option
from trace_transfer.config import click_options
from trace_transfer.devices import DeviceConfig


@click.command("eval")
@click.option("--model", "model", required=True, help="HF id or local model directory.")
@click.option("--task", "tasks", multiple=True, required=True,
              help="Task reference (synthetic:NAME or a task YAML); repeat for several.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Evaluate the first N examples of each task.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Prompts per forward/generate call.")
@click.option("--per-example", is_flag=True, help="Keep every prediction in the JSON output.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Write results JSON here.")
# A plain string checked by evaluate_model: the evaluation package imports torch, which --help must not.
@click.option("--backend", default="hf", show_default=True,
              help="Generation backend: hf (HF generate, KV cache) | vllm (optional: pip install vllm).")
@click_options(DeviceConfig, ["device", "dtype"])
@allow_code_exec_option
@force_option
def command(model, tasks, limit, batch_size, per_example, out, backend, device, dtype, force):
    """Evaluate MODEL on each --task with the metric its spec names.

    \b
    Example:
      trace-transfer eval --model runs/trace/stage_3 --task synthetic:math --task synthetic:code \\
        --limit 200 --out eval.json
    """
    from trace_transfer.checkpoint import check_output
    from trace_transfer.evaluation.metrics import evaluate_model

    if out:
        check_output(out, force, "--out")  # before the model is loaded, not after the evaluation
    result = evaluate_model(model, list(tasks), limit=limit, batch_size=batch_size, out=out,
                            per_example=per_example, device=device, dtype=dtype, backend=backend)
    click.echo("| task | metric | score | n |")
    click.echo("|---|---|---:|---:|")
    for name, r in result["scores"].items():
        click.echo(f"| {name} | {r['metric']} | {r['score']:.4f} | {r['n']} |")
    if out:
        click.echo(f"wrote {out}")
