"""Worker for tests/train/test_ds_token_loss.py, run by `torchrun --nproc_per_node=2` with
DS_ACCELERATOR=cpu: full fine-tuning of a tiny Llama under ZeRO-2 and ZeRO-3 on data whose answers
differ in length between the ranks, plus ZeRO-2 with the old per-rank-mean loss patched back in. Each
phase is compared with one process (train.loop.train) at the same global micro-batch; rank 0 writes
OUT/results.json: per phase the losses and the worst per-tensor relative weight-update difference.

usage: token_loss.py OUT
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _tiny_masking

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _tiny_masking import VOCAB, tiny_llama  # noqa: E402

from trace_transfer.train import ds  # noqa: E402
from trace_transfer.train.loop import TrainConfig, causal_lm_loss, train  # noqa: E402

WORLD, MICRO, ACCUM, STEPS, SEQ = 2, 2, 2, 3, 12
CFG = dict(lr=1e-3, max_steps=STEPS, grad_accum=ACCUM, warmup_ratio=0.0, scheduler="constant", precision="fp32",
           max_grad_norm=0.0)


def zero(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  "stage3_prefetch_bucket_size": 0},
            "steps_per_print": 1000, "wall_clock_breakdown": False}


def micro_batches() -> list[dict[str, torch.Tensor]]:
    """``WORLD × ACCUM × STEPS`` micro-batches of MICRO sequences; batch i goes to rank i % WORLD.
    Rank 0's answers are 1-2 tokens long, rank 1's 8-10 (the prompt's labels are -100), so a
    per-rank mean would weigh rank 0's ~3 tokens as much as rank 1's ~18. No padding: one process
    concatenating two ranks' batches then computes exactly the same logits."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(WORLD * ACCUM * STEPS):
        start = torch.randint(0, VOCAB, (MICRO, 1), generator=g)
        ids = (start * 7 + torch.arange(SEQ) * (1 + i % 3)) % VOCAB
        labels = ids.clone()
        for row in range(MICRO):
            answer = 1 + (row + i) % 2 if i % WORLD == 0 else 8 + (row + i) % 3
            labels[row, : SEQ - answer] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def single_process() -> tuple[dict[str, torch.Tensor], list[float]]:
    """The reference: one process, micro-batch WORLD × MICRO (rank 0's batch, then rank 1's)."""
    data = micro_batches()
    joined = [{k: torch.cat([data[j][k] for j in range(i, i + WORLD)]) for k in data[i]}
              for i in range(0, len(data), WORLD)]
    model = tiny_llama(seed=0)
    res = train(model, lambda epoch: joined, TrainConfig(batch_size=WORLD * MICRO, **CFG))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, res.losses


def old_per_rank_mean(monkeypatch_on: bool):
    """Put the pre-fix loss back: each rank's own mean, DeepSpeed averaging the ranks' means."""
    saved = (ds.causal_lm_token_sum, ds.global_token_scale)
    if monkeypatch_on:
        ds.causal_lm_token_sum, ds.global_token_scale = causal_lm_loss, (lambda batch, device: 1.0)
    return saved


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    base = {n: p.detach().clone() for n, p in tiny_llama(seed=0).named_parameters()}
    ref, ref_losses = single_process()
    results = {"single": {"losses": ref_losses}}
    for phase, stage, old in (("zero2", 2, False), ("zero3", 3, False), ("zero2-per-rank-mean", 2, True)):
        saved = old_per_rank_mean(old)
        try:
            model = tiny_llama(seed=0)
            res = ds.deepspeed_train(model, lambda epoch: micro_batches(), TrainConfig(batch_size=MICRO, **CFG),
                                     zero(stage))
        finally:
            ds.causal_lm_token_sum, ds.global_token_scale = saved
        worst = 0.0
        for n, p in model.named_parameters():
            want, got = ref[n] - base[n], p.detach() - base[n]
            worst = max(worst, float((got - want).norm()) / float(want.norm()))
        results[phase] = {"losses": res.losses, "worst_rel_update_diff": worst}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
