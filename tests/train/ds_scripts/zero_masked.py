"""Worker for tests/test_deepspeed.py, run by `torchrun --nproc_per_node=2` with DS_ACCELERATOR=cpu:
masked training of a tiny Llama with a partial-tensor CoreSet under DeepSpeed ZeRO-3 (through
deepspeed_train, CoreSet applied inside), ZeRO-2 (runner-style: CoreSet applied by the caller) and,
optionally, HF CoreSetTrainer with a ZeRO-3 dict. Rank 0 writes base/, one consolidated checkpoint per
phase and results.json into OUT; the test then runs verify-frozen on them."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _tiny_masking

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _tiny_masking import batches_fn, coreset_at, tiny_llama  # noqa: E402

from trace_transfer.train.ds import deepspeed_train, save_consolidated  # noqa: E402
from trace_transfer.train.loop import TrainConfig  # noqa: E402
from trace_transfer.train.masking import apply_coreset  # noqa: E402


def zero(stage: int) -> dict:
    conf = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage}, "steps_per_print": 1000, "wall_clock_breakdown": False}
    if stage == 3:
        # tiny model: make every tensor go through partitioning rather than stay persistent
        conf["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                          "stage3_prefetch_bucket_size": 0})
    return conf


def main(out: Path, phases: list[str]) -> None:
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=4, grad_accum=2, weight_decay=0.1, warmup_ratio=0.0,
                      scheduler="constant", precision="fp32")
    model = tiny_llama(seed=0)
    # rows on some matrices, elements on others, one whole tensor: all three mechanisms at once
    cs = coreset_at(model, "row", seed=1) | coreset_at(model, "element", seed=2) | coreset_at(model, "tensor")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out / "base")
        cs.save(out / "core.coreset.safetensors")
    results = {}
    data = batches_fn(n=8, batch_size=4)
    for phase in phases:
        t0 = time.time()
        model = tiny_llama(seed=0)
        if phase == "zero3":
            res = deepspeed_train(model, data, cfg, zero(3), coreset=cs)
        elif phase == "zero2":
            handle = apply_coreset(model, cs)  # as the runner does
            res = deepspeed_train(model, data, cfg, zero(2), params=handle.param_groups(cfg.weight_decay),
                                  after_step=handle.after_step)
            handle.remove()
        elif phase == "trainer":
            results[phase] = {"losses": _trainer(model, cs, out, data), "seconds": time.time() - t0}
            continue
        else:
            raise SystemExit(f"unknown phase {phase}")
        # the returned model is plain and full on every rank
        assert all(p.numel() > 0 and not hasattr(p, "ds_id") for p in model.parameters())
        save_consolidated(model, out / phase)
        results[phase] = {"losses": res.losses, "seconds": time.time() - t0}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


def _trainer(model, cs, out, data):
    from transformers import TrainingArguments

    from trace_transfer.train.hf import CoreSetTrainer

    rows = [{k: v[i] for k, v in b.items()} for b in data(0) for i in range(b["input_ids"].shape[0])]
    args = TrainingArguments(output_dir=str(out / "trainer-work"), use_cpu=True, max_steps=6,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                             weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to="none", disable_tqdm=True, deepspeed=zero(3))
    trainer = CoreSetTrainer(model=model, args=args, train_dataset=rows, coreset=cs)
    trainer.train()
    trainer.mask_handle.remove()
    # the trainer leaves the model ZeRO-3-sharded: save_consolidated gathers it tensor by tensor
    save_consolidated(trainer.model, out / "trainer")
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else ["zero3", "zero2"])
