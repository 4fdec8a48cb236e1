"""Masked fine-tuning of one task with the Hugging Face Trainer, optionally under DeepSpeed — the
"bring your own training script" path. Launch commands: README.md next to this file.

    python examples/deepspeed/train_coreset_trainer.py --model tiny --task synthetic:math \
        --coreset cores/math.coreset.safetensors --out runs/hf-math --cpu --max-steps 20
    trace-transfer verify-frozen --base tiny --tuned runs/hf-math --coreset cores/math.coreset.safetensors
"""

from __future__ import annotations

import argparse

import torch
from transformers import TrainingArguments

from trace_transfer.data import load_task
from trace_transfer.data.batching import collate, pad_id_of, tokenize_examples
from trace_transfer.models import load_model, load_tokenizer
from trace_transfer.train.ds import save_consolidated
from trace_transfer.train.hf import CoreSetTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: HF id or local directory")
    ap.add_argument("--task", required=True, help="task YAML or synthetic:<name>")
    ap.add_argument("--coreset", required=True, help="*.coreset.safetensors to train (everything else frozen)")
    ap.add_argument("--out", required=True, help="directory for the fine-tuned HF model")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (ds_zero2.json / ds_zero3.json)")
    ap.add_argument("--mode", default="train-core", choices=["train-core", "freeze-core"])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=4, help="per device")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--bf16", action="store_true", help="bf16 weights and compute (the paper's setting)")
    ap.add_argument("--cpu", action="store_true", help="train on CPU (tests, tiny models)")
    args = ap.parse_args()

    if args.deepspeed:
        import deepspeed

        # Join the process group before anything reads the world size: on CPU, TrainingArguments does
        # not, and zero.Init would then check the batch sizes against a world of 1.
        deepspeed.init_distributed(dist_backend="gloo" if args.cpu else None)
    # TrainingArguments first: with a ZeRO-3 config it registers DeepSpeed with transformers, so the
    # from_pretrained below loads the model already partitioned (zero.Init) instead of whole per rank.
    targs = TrainingArguments(
        output_dir=f"{args.out}.work", deepspeed=args.deepspeed, use_cpu=args.cpu, bf16=args.bf16,
        num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        weight_decay=args.weight_decay, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=10,
        save_strategy="no", report_to="none",
    )
    tokenizer = load_tokenizer(args.model)
    # Load in the dtype the base checkpoint has (bf16 for the paper's models): a cast would change every
    # frozen element and verify-frozen would rightly fail.
    model = load_model(args.model, dtype=torch.bfloat16 if args.bf16 else None)
    features = tokenize_examples(tokenizer, load_task(args.task).train_examples(), args.seq_len)
    pad = pad_id_of(tokenizer)
    trainer = CoreSetTrainer(model=model, args=targs, train_dataset=features,
                             data_collator=lambda batch: collate(batch, pad), coreset=args.coreset, mode=args.mode)
    trainer.train()
    trainer.mask_handle.remove()
    save_consolidated(trainer.model, args.out, tokenizer=tokenizer)  # gathers ZeRO-3 shards; rank 0 writes


if __name__ == "__main__":
    main()
