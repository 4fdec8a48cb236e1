"""Worker for tests/refine/test_refine_distributed.py, run by `torchrun --nproc_per_node=2` with
DS_ACCELERATOR=cpu: `trace-transfer refine --deepspeed` (ZeRO-3) in budgets mode and source-free.

usage: _ds_refine_ranks.py MODEL OUT   (OUT holds task/, zero3.json and t.budgets.json, written by the test)
"""

import sys
from pathlib import Path

# One process uses --batch-size 4; here 2 ranks take 2 each of the same global batch.
SETTINGS = dict(signal="microprobe", steps=3, batches=3, lr=1e-3, batch_size=4, seq_len=32, seed=0, precision="fp32")
SOURCE_FREE = dict(ratio=0.1, granularity="row")


def args_of(settings: dict) -> list[str]:
    return [a for key, value in settings.items() for a in (f"--{key.replace('_', '-')}", str(value))]


def main(model: str, out: Path) -> None:
    from trace_transfer.cli import main as cli

    common = ["refine", "--model", model, "--task", str(out / "task" / "fixed_sums.yaml"),
              "--deepspeed", str(out / "zero3.json"), *args_of(SETTINGS)]
    cli.main([*common, "--budgets", str(out / "t.budgets.json"), "--out", str(out / "budgets.coreset.safetensors")],
             standalone_mode=False)
    cli.main([*common, *args_of(SOURCE_FREE), "--out", str(out / "free.coreset.safetensors")], standalone_mode=False)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
