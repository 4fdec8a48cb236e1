"""Your own training script on the library: probe -> score -> mask -> HF Trainer -> verify.

Selective activation (TRACE) written by hand with the public API, one Hugging Face ``Trainer`` per
stage: every task gets a short warm-start probe, TRACE-LF turns the probes into one CoreSet per task,
and stage k trains exactly CoreSet k of the model the previous stage left. After every stage the
script proves the promise: every element outside CoreSet k is bit-identical to the stage before.

    python examples/train_with_trainer.py --quick        # tiny Llama built on the spot, CPU, < 1 minute
    python examples/train_with_trainer.py                # same, a few more steps
    python examples/train_with_trainer.py --model meta-llama/Meta-Llama-3-8B --bf16 \\
        --task examples/tasks/gsm8k_rft.yaml --task examples/tasks/medqa.yaml \\
        --task examples/tasks/code_alpaca.yaml --probe-steps 0 --train-steps 0 --seq-len 1024

(``--probe-steps 0`` / ``--train-steps 0``: one epoch for the probe, three for each stage, the paper's
settings. For multi-GPU training of one stage see examples/deepspeed/train_coreset_trainer.py.)
The tiny model has random weights, so its task scores stay at 0: the run shows the mechanics.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

from trace_transfer.data import collate, load_task, pad_id_of, tokenize_examples
from trace_transfer.evaluation.metrics import evaluate
from trace_transfer.models import build_tiny_model, load_model, load_tokenizer
from trace_transfer.probe import ProbeConfig, probe
from trace_transfer.scoring import score
from trace_transfer.train.hf import CoreSetTrainer
from trace_transfer.train.verify import verify_frozen

DEFAULT_TASKS = ["synthetic:math", "synthetic:medical", "synthetic:code"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model: hub id or local directory (default: build a tiny Llama)")
    ap.add_argument("--task", action="append", default=None,
                    help=f"task YAML or synthetic:<name>, once per stage in training order (default: {' '.join(DEFAULT_TASKS)})")
    ap.add_argument("--out", default="runs/train_with_trainer", help="working directory")
    ap.add_argument("--ratio", type=float, default=0.1, help="CoreSet size: share of the layers' parameters")
    ap.add_argument("--granularity", default="row", choices=["tensor", "row", "column", "head", "element"])
    ap.add_argument("--probe-steps", type=int, default=30, help="warm-start steps per task; 0 = one epoch")
    ap.add_argument("--train-steps", type=int, default=30, help="Trainer steps per stage; 0 = --epochs")
    ap.add_argument("--epochs", type=float, default=3.0, help="epochs per stage when --train-steps is 0")
    ap.add_argument("--lr", type=float, default=None, help="probe and stage learning rate (default: 3e-4 on the "
                    "tiny model, 2e-5 on a given --model)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=32, help="evaluation examples per task after each stage")
    ap.add_argument("--bf16", action="store_true", help="load and train in bf16 (for bf16 checkpoints)")
    ap.add_argument("--quick", action="store_true", help="smoke test: a handful of steps everywhere")
    args = ap.parse_args()
    if args.quick:
        args.probe_steps, args.train_steps, args.eval_limit = 6, 6, 8
    args.task = args.task or list(DEFAULT_TASKS)
    if args.lr is None:
        args.lr = 2e-5 if args.model else 3e-4
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()  # one line per event below instead of a bar per load/save
    out = Path(args.out)
    t0 = time.time()
    use_cpu = not torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else None

    # 1. The base model: yours, or a tiny random-weight Llama with a char tokenizer.
    base = args.model or str(build_tiny_model("llama", out / "base", layers=2, hidden=64, heads=4, kv_heads=2,
                                              tokenizer="char", seed=0, overwrite=True))
    tokenizer = load_tokenizer(base)
    tasks = [load_task(t) for t in args.task]
    print(f"base: {base}; stages: {' -> '.join(t.name for t in tasks)}")

    # 2. Warm-start probe per task: delta = theta* - theta0 and the diagonal Fisher, streamed to disk.
    probe_cfg = ProbeConfig.from_flat(max_steps=args.probe_steps, epochs=1.0, lr=args.lr, batch_size=args.batch_size,
                                      seq_len=args.seq_len, precision="bf16" if args.bf16 else "auto")
    probe_dirs = []
    for ref, task in zip(args.task, tasks):
        res = probe(base, ref, out / "probes" / task.name, probe_cfg)
        probe_dirs.append(res.out_dir)
        print(f"probe {task.name}: {res.steps} steps, loss {res.first_loss:.3f} -> {res.final_loss:.3f}")

    # 3. TRACE-LF: alpha * norm(RMS of delta) + beta * norm(mean Fisher) per row; top `ratio` per task.
    cores = score(probe_dirs, "lf", args.ratio, out / "cores", granularity=args.granularity)
    for name, core in cores.items():
        print(f"CoreSet {name}: {core.num_selected():,} of {core.num_total():,} parameters")

    # 4. Selective activation: stage k trains exactly CoreSet k, starting from stage k-1's model.
    previous = base
    for k, (ref, task) in enumerate(zip(args.task, tasks), start=1):
        stage_dir = out / f"stage_{k}"
        model = load_model(previous, dtype=dtype)  # the checkpoint's dtype: a cast would change every element
        features = tokenize_examples(tokenizer, task.train_examples(), args.seq_len)
        targs = TrainingArguments(
            output_dir=str(out / "trainer"), use_cpu=use_cpu, bf16=args.bf16, max_steps=args.train_steps or -1,
            num_train_epochs=args.epochs, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
            weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=10,
            save_strategy="no", report_to="none", disable_tqdm=True, seed=k,
        )
        # CoreSetTrainer applies the CoreSet (masking API: requires_grad + gradient masks) in __init__,
        # before the model is wrapped, and builds its optimizer from the handle's parameter groups:
        # rows of a partly-core tensor are trained, the frozen rows get no weight decay.
        trainer = CoreSetTrainer(model=model, args=targs, train_dataset=features, coreset=cores[task.name],
                                 data_collator=lambda batch: collate(batch, pad_id_of(tokenizer)))
        h = trainer.mask_handle
        print(f"stage {k} ({task.name}): tensors wholly trainable {len(h.full)}, partly {len(h.partial)}, "
              f"frozen {len(h.frozen)}")
        result = trainer.train()
        h.remove()  # model back to fully trainable, gradient hooks gone
        trainer.model.save_pretrained(stage_dir)
        tokenizer.save_pretrained(stage_dir)

        # 5. The guarantee, checked bit for bit against the model this stage started from.
        report = verify_frozen(previous, stage_dir, cores[task.name])
        report.raise_if_changed()
        print(f"stage {k}: loss {result.training_loss:.3f}; verify_frozen OK: {report.tensors_checked} tensors, "
              f"0 of {report.elements_checked - report.elements_allowed:,} elements outside the core changed "
              f"({report.changed_in_core:,} inside)")
        scores = {t.name: evaluate(trainer.model, tokenizer, t, limit=args.eval_limit).score for t in tasks}
        print(f"stage {k}: " + ", ".join(f"{n} {s:.3f}" for n, s in scores.items()))
        previous = str(stage_dir)

    # The whole stream only ever moved the union of the CoreSets.
    report = verify_frozen(base, previous, list(cores.values()))
    report.raise_if_changed()
    print(f"final vs base: nothing outside the union of {len(cores)} CoreSets changed; done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
