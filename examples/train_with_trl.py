"""Train a CoreSet with TRL's SFTTrainer: probe -> score -> SFTTrainer + CoreSetCallback -> verify.

``CoreSetCallback`` applies the CoreSet when the trainer finishes ``__init__`` (before ``train()`` wraps
the model), so it works with trainers you cannot subclass. TRL's default AdamW decays every trainable
parameter, so with row/column/element cores (tensors only partly core) keep ``weight_decay=0``; the
callback refuses otherwise. Needs ``pip install 'trace-transfer[trl]'``.

    python examples/train_with_trl.py --quick        # tiny Llama built on the spot, CPU, < 1 minute
    python examples/train_with_trl.py --model Qwen/Qwen3-0.6B --task examples/tasks/gsm8k_rft.yaml \\
        --probe-steps 0 --train-steps 0 --bf16

The tiny model has random weights: the run shows the mechanics, not task scores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from datasets import Dataset, disable_progress_bars
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from trace_transfer.data import load_task
from trace_transfer.models import build_tiny_model, load_model, load_tokenizer
from trace_transfer.probe import ProbeConfig, probe
from trace_transfer.scoring import score
from trace_transfer.train.hf import CoreSetCallback
from trace_transfer.train.verify import verify_frozen


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model: hub id or local directory (default: build a tiny Llama)")
    ap.add_argument("--task", default="synthetic:math", help="task YAML or synthetic:<name>")
    ap.add_argument("--out", default="runs/train_with_trl", help="working directory")
    ap.add_argument("--ratio", type=float, default=0.1, help="CoreSet size: share of the layers' parameters")
    ap.add_argument("--granularity", default="row", choices=["tensor", "row", "column", "head", "element"])
    ap.add_argument("--probe-steps", type=int, default=30, help="warm-start steps; 0 = one epoch")
    ap.add_argument("--train-steps", type=int, default=30, help="SFTTrainer steps; 0 = --epochs")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-4 on the tiny model, 2e-5 on a given --model")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: a handful of steps")
    args = ap.parse_args()
    if args.quick:
        args.probe_steps, args.train_steps = 6, 6
    if args.lr is None:
        args.lr = 2e-5 if args.model else 3e-4
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()
    disable_progress_bars()  # TRL maps the dataset several times; one bar each drowns the output
    out, t0 = Path(args.out), time.time()
    base = args.model or str(build_tiny_model("llama", out / "base", layers=2, hidden=64, heads=4, kv_heads=2,
                                              tokenizer="char", seed=0, overwrite=True))
    tokenizer, task = load_tokenizer(base), load_task(args.task)

    # 1. Warm-start probe and TRACE-LF scores: the task's CoreSet.
    cfg = ProbeConfig.from_flat(max_steps=args.probe_steps, epochs=1.0, lr=args.lr, batch_size=args.batch_size,
                                seq_len=args.seq_len, precision="bf16" if args.bf16 else "auto")
    res = probe(base, args.task, out / "probes" / task.name, cfg)
    core = score([res.out_dir], "lf", args.ratio, out / "cores", granularity=args.granularity)[task.name]
    print(f"CoreSet {task.name}: {core.num_selected():,} of {core.num_total():,} parameters")

    # 2. TRL SFT on prompt/completion pairs (loss on the completion only), training exactly the CoreSet.
    data = Dataset.from_list([{"prompt": e.prompt, "completion": e.response} for e in task.train_examples()])
    model = load_model(base, dtype=torch.bfloat16 if args.bf16 else None)
    sft = SFTConfig(output_dir=str(out / "trainer"), max_steps=args.train_steps or -1, num_train_epochs=args.epochs,
                    learning_rate=args.lr, per_device_train_batch_size=args.batch_size, max_length=args.seq_len,
                    weight_decay=0.0,  # partly-core tensors: the trainer's AdamW would decay frozen rows
                    use_cpu=not torch.cuda.is_available(), bf16=args.bf16, report_to="none", save_strategy="no",
                    logging_steps=10, disable_tqdm=True)
    callback = CoreSetCallback(core)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    loss = trainer.train().training_loss
    callback.handle.remove()  # fold sparse deltas, drop gradient hooks
    trainer.model.save_pretrained(out / "tuned")
    tokenizer.save_pretrained(out / "tuned")

    # 3. The guarantee, bit for bit: nothing outside the CoreSet moved.
    report = verify_frozen(base, out / "tuned", core)
    report.raise_if_changed()
    print(f"SFT loss {loss:.3f}; verify_frozen OK: 0 of {report.elements_checked - report.elements_allowed:,} "
          f"elements outside the core changed ({report.changed_in_core:,} inside); {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
