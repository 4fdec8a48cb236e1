"""Worker for tests/train/test_sparse.py, run by `torchrun --nproc_per_node=2` with DS_ACCELERATOR=cpu:
the same partial-tensor CoreSet trained under ZeRO-3 with sparse deltas and with dense gradient masks.
Records, per phase, the optimizer state each rank holds (summed over ranks), the trainable element
count, and any frozen tensor that made it into the optimizer; rank 0 writes base/, a consolidated
checkpoint per phase and results.json into OUT."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _tiny_masking

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _tiny_masking import ZERO3, batches_fn, coreset_at, tiny_llama  # noqa: E402

from trace_transfer.train.ds import deepspeed_train, save_consolidated  # noqa: E402
from trace_transfer.train.loop import TrainConfig  # noqa: E402
from trace_transfer.train.masking import apply_coreset  # noqa: E402



def main(out: Path) -> None:
    cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=4, grad_accum=2, weight_decay=0.1, warmup_ratio=0.0,
                      scheduler="constant", precision="fp32")
    model = tiny_llama(seed=0)
    # rows, heads and elements on different matrices, one whole tensor: every sparse path at once
    cs = (coreset_at(model, "row", seed=1, share=0.2) | coreset_at(model, "element", seed=2, share=0.2)
          | coreset_at(model, "tensor"))
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out / "base")
        cs.save(out / "core.coreset.safetensors")
    results = {}
    for phase in ("sparse", "dense"):
        model = tiny_llama(seed=0)
        handle = apply_coreset(model, cs, masking=phase)  # as the runner does: applied by the caller
        names = {id(p): n for n, p in model.named_parameters()}
        seen = {}

        def inspect(engine):
            opt = engine.optimizer
            groups = getattr(opt, "fp16_groups", None) or getattr(opt, "bit16_groups", None)
            held = {id(p) for g in groups for p in g}
            seen["frozen_in_optimizer"] = sorted(names[i] for i in held if i in names
                                                 and not dict(model.named_parameters())[names[i]].requires_grad)
            state = sum(t.numel() for s in opt.optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t) and t.dim() > 0)
            total = torch.tensor([state], dtype=torch.int64)
            dist.all_reduce(total)
            seen["optimizer_state"] = int(total)

        res = deepspeed_train(model, batches_fn(n=8, batch_size=4), cfg, ZERO3,
                              params=handle.param_groups(cfg.weight_decay), after_step=handle.after_step,
                              on_engine=inspect)
        summary = handle.summary()
        handle.remove()  # folds the deltas (the model is unsharded again)
        save_consolidated(model, out / phase)
        trainable = sum(p.numel() for p in handle.full.values()) + sum(
            p.numel() for p in (e.param for e in handle.partial.values()))
        trainable += sum(e.delta.numel() for e in handle.sparse.values())
        results[phase] = {**seen, "losses": res.losses, "trainable_numel": trainable,
                          "sparse_tensors": summary["sparse_tensors"]}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
