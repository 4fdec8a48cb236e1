"""`trace-transfer plan`: memory, FLOPs, time and a verdict for every step of a pipeline config."""

from __future__ import annotations

from pathlib import Path

import click


def _examples(values: tuple[str, ...]) -> tuple[dict[str, int], int | None]:
    per_task: dict[str, int] = {}
    default = None
    for v in values:
        key, sep, n = v.rpartition("=")
        if not n.isdigit():
            raise click.BadParameter(f"{v!r}: expected N or TASK=N (e.g. medqa=10178)", param_hint="--examples")
        if sep:
            per_task[key] = int(n)
        else:
            default = int(n)
    return per_task, default


def _with_overrides(path: Path, overrides: tuple[str, ...]) -> Path | dict:
    """The config as a dict with ``KEY=VALUE`` overrides applied (the file itself when there are none)."""
    if not overrides:
        return path
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. scoring.ratio=0.05", param_hint="--set")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise click.BadParameter(f"{item!r}: {part!r} is not a section of the config", param_hint="--set")
        node[leaf] = yaml.safe_load(value)
    return raw


@click.command("plan")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="GPUs per node [default: the config's launch.nproc_per_node, else 1].")
@click.option("--nodes", type=click.IntRange(min=1), default=None,
              help="Nodes [default: the config's launch.nnodes where it has one, else 1].")
@click.option("--gpu", "gpu_name", default="h100", show_default=True,
              help="GPU type for memory, bf16 peak and bandwidth: a100-40gb, a100, h100-pcie, h100, h200, l40s, "
                   "b200, mi300x.")
@click.option("--gpu-mem", default=None, help="GPU memory, overriding --gpu's (80GiB, 80GB = 10^9 bytes, or GiB).")
@click.option("--host-mem", default="1TiB", show_default=True, help="Host memory per node.")
@click.option("--mfu", default="25-50", show_default=True, help="Model-FLOPs-utilisation range in percent, LO-HI.")
@click.option("--configs", "configs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory where a hub id ORG/NAME has ORG/NAME/config.json (offline look-up); repeatable. "
                   "Also read from $TRACE_TRANSFER_MODEL_CONFIGS. The paper's models: examples/paper_models.")
@click.option("--examples", "examples", multiple=True, metavar="N|TASK=N",
              help="Training examples per task (for the time column) when the data cannot be read offline; "
                   "repeatable. Synthetic tasks are counted.")
@click.option("--eval-items", type=click.IntRange(min=1), default=None,
              help="Evaluation items per task when eval.limit is null (full test sets).")
@click.option("--masking", type=click.Choice(["dense", "sparse"]), default=None,
              help="Masking of finer-than-tensor cores [default: the config's, else auto = sparse up to half a "
                   "tensor; the other one is shown too].")
@click.option("--coreset", "coresets", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A scored CoreSet of the target: the core methods' row counts exactly what it trains "
                   "(the largest, when repeated) instead of bounds from scoring.ratio.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value for this plan (dotted key, YAML value), e.g. --set scoring.ratio=0.05 "
                   "--set training.batch_size=1; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (for scripts).")
def command(config, gpus, nodes, gpu_name, gpu_mem, host_mem, mfu, configs, examples, eval_items, masking, coresets,
            overrides, as_json):
    """Estimate memory, FLOPs and time of every step of a pipeline, from model configs alone.

    Each model is built on the meta device from its config.json (no weights are read or
    downloaded). For every step (probe, score, CKA, transfer, fine-tuning per method, evaluation)
    it prints per-GPU and host memory with and without gradient checkpointing, a time range at the
    given MFU, and a verdict for what the config will run (training steps follow its
    training.gradient_checkpointing, probe steps its probe.gradient_checkpointing; under
    launch.deepspeed the probes are planned as launched, with their Fisher pass): fits / fits only
    with training.gradient_checkpointing: true / needs ZeRO-3 / needs grad ckpt / needs offload /
    needs N more GPUs. The formulas and hand checks are in docs/PLANNER.md.

    \b
    Examples:
      trace-transfer plan examples/pipelines/paper-llama3-8b-to-qwen3-32b.yaml \\
          --configs examples/paper_models --gpus 8 --gpu-mem 80GiB --examples 10000
      trace-transfer plan my.yaml --gpus 4 --gpu a100 --json > plan.json
      trace-transfer plan my.yaml --set scoring.granularity=row --set scoring.ratio=0.05
    """
    from trace_transfer.errors import ConfigError
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.plan import Hardware, gpu_spec, parse_size, plan
    from trace_transfer.plan.report import render, to_json

    lo, _, hi = mfu.partition("-")
    try:
        mfu_range = (float(lo) / 100, float(hi or lo) / 100)
    except ValueError:
        raise ConfigError(f"--mfu {mfu!r}: expected LO-HI in percent, e.g. 25-50") from None
    cfg = load_pipeline(_with_overrides(config, overrides), base_dir=config.parent)
    per_task, default = _examples(examples)
    hw = Hardware(gpu=gpu_spec(gpu_name), gpus_per_node=gpus or cfg.launch.nproc_per_node,
                  nodes=nodes or getattr(cfg.launch, "nnodes", None) or 1,
                  gpu_memory=parse_size(gpu_mem, "--gpu-mem") if gpu_mem else None,
                  host_memory=parse_size(host_mem, "--host-mem"), mfu=mfu_range)
    result = plan(cfg, hw, base_dir=config.parent, configs=list(configs), examples=per_task,
                  default_examples=default, eval_items=eval_items, masking=masking, coresets=list(coresets))
    click.echo(to_json(result) if as_json else render(result))
