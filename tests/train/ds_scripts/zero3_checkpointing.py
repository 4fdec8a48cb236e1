"""Worker for tests/train/test_gradient_checkpointing.py, run by `torchrun --nproc_per_node=2` with
DS_ACCELERATOR=cpu: the same sparse row CoreSet trained under ZeRO-3 without and with
TrainConfig.gradient_checkpointing. Rank 0 writes base/, plain/, ckpt/ (consolidated checkpoints), the
CoreSet and results.json (losses, and how often the first layer's MLP ran per phase)."""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _tiny_masking

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _tiny_masking import ZERO3, batches_fn, coreset_at, tiny_llama  # noqa: E402

from trace_transfer.train.ds import deepspeed_train, save_consolidated  # noqa: E402
from trace_transfer.train.loop import TrainConfig  # noqa: E402
from trace_transfer.train.masking import apply_coreset  # noqa: E402



def main(out: Path) -> None:
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, warmup_ratio=0.0, scheduler="constant", precision="fp32")
    cs = coreset_at(tiny_llama(seed=0), "row", seed=1, share=0.2)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tiny_llama(seed=0).save_pretrained(out / "base")
        cs.save(out / "core.coreset.safetensors")
    results = {}
    for phase, checkpointing in (("plain", False), ("ckpt", True)):
        model = tiny_llama(seed=0)
        calls = [0]
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        handle = apply_coreset(model, cs, masking="sparse")
        res = deepspeed_train(model, batches_fn(n=4, batch_size=4),
                              dataclasses.replace(cfg, gradient_checkpointing=checkpointing), ZERO3,
                              params=handle.param_groups(cfg.weight_decay), after_step=handle.after_step)
        handle.remove()
        save_consolidated(model, out / phase)
        results[phase] = {"losses": res.losses, "mlp_calls": calls[0]}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
