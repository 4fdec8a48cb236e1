"""`trace-transfer demo`: the embedded end-to-end run (README command 1)."""

from __future__ import annotations

import time
from pathlib import Path

import click


# The demo's numbers are reproducible only at a fixed thread count: torch splits float sums by thread,
# so another count changes the last bits, and over a few hundred training steps the scores. One thread:
# the same on every machine, and the tiny models gain little from more (on a busy 2-core machine two
# spinning OpenMP threads made pretraining ~10x slower, measured).
DEMO_THREADS = 1
# The one place the demo's duration is stated; the README and --help quote it.
QUICK_DURATION = "about 2 min on 2 quiet CPU cores"


@click.command("demo")
@click.option("--quick", is_flag=True, help=f"Smoke-test scale ({QUICK_DURATION}); scores are meaningless.")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default runs/demo or runs/demo-quick). Reruns reuse the pretrained models "
                   "and every finished step.")
@click.option("--seed", "seeds", type=int, multiple=True, help="Training seed(s) (default 0). Repeatable.")
@click.option("--threads", type=int, default=DEMO_THREADS, show_default=True,
              help="torch intra-op threads. The README's numbers are for the default; another count changes "
                   "the last bits of every sum, and so the scores.")
@click.option("--force", multiple=True, metavar="STEP", help="Redo STEP (name or prefix). Repeatable.")
@click.option("--show-config", is_flag=True, help="Print the pipeline config the demo runs, and exit.")
def command(quick: bool, run_dir: Path | None, seeds: tuple[int, ...], threads: int,
            force: tuple[str, ...], show_config: bool) -> None:
    """Run the whole small-to-large pipeline offline on built-in tiny models and tasks.

    A char-level Llama source and a deeper, wider Qwen3 target with a BPE tokenizer are built and
    pretrained on the base-skill mixture; each stream task (math → medical → code) is probed on both;
    LF/CS CoreSets are scored; the source's CoreSets are transferred to the target through the CKA
    layer map and the architecture rules; then the baselines (full, joint, LoRA, replay), TRACE on the
    target and Transfer from the source fine-tune the target in sequence. Prints the Table 1 shape and
    writes a markdown + HTML report.

    The run is deterministic for a seed, a thread count (--threads, default 1) and the library
    versions in constraints.txt; the summary records them.

    \b
    Example:
      trace-transfer demo                 # about 6 min on 2 quiet CPU cores the first time
      trace-transfer demo --quick         # about 2 min: smoke test
      trace-transfer demo --show-config > my.yaml && trace-transfer run my.yaml
    """
    from trace_transfer.pipeline.demo import load_preset, preset_path
    from trace_transfer.pipeline.run import run_pipeline
    from trace_transfer.report.summary import print_table

    name = "demo-quick" if quick else "demo"
    path = preset_path(name)
    if show_config:
        click.echo(path.read_text(), nl=False)
        return
    _fix_threads(threads)
    cfg = load_preset(name, seeds=seeds)
    run_dir = run_dir or Path("runs") / cfg.name
    t0 = time.perf_counter()
    click.echo(f"trace-transfer demo{' --quick' if quick else ''}: run directory {run_dir} (config: {path})")
    result = run_pipeline(cfg, run_dir, force=force, base_dir=Path.cwd(), say=_timestamped)
    print_table(result.summary)
    click.echo(f"report: {result.artifacts['report'] / 'report.md'} and report.html "
               f"({time.perf_counter() - t0:.0f}s)")


def _timestamped(msg: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}")


def _fix_threads(threads: int) -> None:
    """Pin every thread pool that can split a float sum, before torch starts its pools."""
    import os

    if threads < 1:
        raise click.BadParameter(f"must be at least 1, got {threads}", param_hint="--threads")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # only possible before the first parallel op; harmless to skip
    except RuntimeError:
        pass
