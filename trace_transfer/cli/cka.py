"""`trace-transfer cka`: CKA between every decoder layer of two models (thin glue over compute_cka)."""

from __future__ import annotations

from pathlib import Path

import click

from trace_transfer.cka import POOLINGS, VARIANTS
from trace_transfer.cli._output import force_option
from trace_transfer.config import click_options
from trace_transfer.devices import DeviceConfig


@click.command("cka")
@click.option("--source", required=True, help="Source model: local directory or HF id (rows of the matrix).")
@click.option("--target", required=True, help="Target model: local directory or HF id (columns).")
@click.option("--probes", default="general", show_default=True,
              help="Probe texts: a .jsonl/.txt file, a shipped set (general, math, code, medical, all; "
                   "comma-separated to mix) or hf:<id>:<split>:<field>.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (cka.safetensors, cka.json, cka.png, kernels.safetensors).")
@click.option("--variant", type=click.Choice(VARIANTS), default="linear-debiased", show_default=True,
              help="CKA estimator; debiased is robust when probes are fewer than hidden units.")
@click.option("--pooling", type=click.Choice(POOLINGS), default="mean", show_default=True,
              help="One vector per probe text: mean over its tokens or its last token.")
@click.option("--include-special", is_flag=True, help="Pool over BOS/EOS/special tokens too (off by default: "
              "their massive activations make unrelated models look alike).")
@click.option("--padding-side", type=click.Choice(["right", "left"]), default="right", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-probes", type=int, default=None, help="Use only the first N probe texts.")
@click.option("--max-length", type=int, default=512, show_default=True, help="Truncate probes to N tokens.")
@click.option("--rbf-sigma", type=float, default=0.5, show_default=True,
              help="RBF bandwidth as a multiple of the median distance (rbf variants).")
@click_options(DeviceConfig, ["device", "dtype"])
@click.option("--no-kernels", is_flag=True, help="Do not keep the per-layer n x n kernels (saves disk; "
              "map-layers --bootstrap then becomes unavailable).")
@force_option
def command(source, target, probes, out, variant, pooling, include_special, padding_side, batch_size, max_probes,
            max_length, rbf_sigma, dtype, device, no_kernels, force) -> None:
    """Compare every decoder layer of SOURCE with every decoder layer of TARGET by CKA on probe texts.

    The two models may use different tokenizers: each probe text gives one pooled vector per layer.

    \b
    Example:
      trace-transfer cka --source tiny-llama --target tiny-qwen3 --probes general,math \\
        --out runs/cka --max-probes 256
      trace-transfer map-layers --cka runs/cka --method monotone --bootstrap 100 --out runs/layer_map.json
    """
    from rich.console import Console
    from rich.table import Table

    from trace_transfer.checkpoint import output_dir
    from trace_transfer.cka import compute_cka

    with output_dir(out, force, "CKA directory"):
        res = compute_cka(source, target, probes, out, variant=variant, pooling=pooling,
                          exclude_special=not include_special, padding_side=padding_side, batch_size=batch_size,
                          max_probes=max_probes, max_length=max_length, rbf_sigma=rbf_sigma,
                          keep_kernels=not no_kernels, dtype=dtype, device=device)
    table = Table(title=f"CKA {res.variant}, n={res.n}: best target layer per source layer")
    for col in ("source layer", "best target", "CKA", "runner-up"):
        table.add_column(col, justify="right")
    for r in res.best_targets():
        table.add_row(str(r.source), "-" if r.best is None else str(r.best), "nan" if r.cka is None else f"{r.cka:.4f}",
                      "-" if r.runner_up is None else f"{r.runner_up_cka:.4f} (layer {r.runner_up})")
    console = Console()
    console.print(table)
    console.print(f"wrote {out}/cka.safetensors, cka.json, cka.png" + ("" if no_kernels else ", kernels.safetensors"))
