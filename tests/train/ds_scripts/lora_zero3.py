"""Worker for tests/train/test_lora_stream_save.py, run by `torchrun --nproc_per_node=2` with
DS_ACCELERATOR=cpu: one LoRA stage through the runner under ZeRO-3, twice, from the same model, seed and
data (so the same training):

1. ``new``: the runner as it is. The stage is streamed from the still-sharded engine with its adapters
   merged tensor by tensor; each rank's resident-memory growth over that save is measured
   (``zero3_save.Growth``: peak minus the RSS just before).
2. ``old``: the path it replaced, patched in: ``deepspeed_train(unshard=True)`` gathers the PEFT model
   onto every rank, rank 0 runs ``merge_and_unload()`` and ``save_pretrained`` into OUT/old_merged.

Rank r writes OUT/rank<r>.json (both runs' R, the save's memory growth, sizes).

usage: lora_zero3.py MODEL TASK OUT
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _tiny_masking
sys.path.insert(0, str(Path(__file__).resolve().parent))  # zero3_save's memory probe

import torch.distributed as dist  # noqa: E402
from _tiny_masking import ZERO3  # noqa: E402
from zero3_save import Growth  # noqa: E402

from trace_transfer.train import runner  # noqa: E402
from trace_transfer.train.ds import deepspeed_train  # noqa: E402
from trace_transfer.train.loop import TrainConfig  # noqa: E402
from trace_transfer.train.methods import Stage  # noqa: E402


def main(model: str, task: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ds_config = out / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3))
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=2, grad_accum=1, seq_len=32, warmup_ratio=0.0,
                      weight_decay=0.0, precision="fp32")
    report: dict = {}
    stream = runner._save_checkpoint_streaming

    def measured_save(peft_model, *args):
        sizes = [(n, p.ds_numel * p.element_size()) for n, p in peft_model.named_parameters()]
        report["model_bytes"] = sum(b for n, b in sizes if "lora_" not in n)
        report["largest_tensor_bytes"] = max(b for n, b in sizes)
        report["largest_lora_weight_bytes"] = max(b for n, b in sizes if "base_layer" in n)
        dist.barrier()
        with Growth() as g:
            stream(peft_model, *args)
        report["save_growth_bytes"] = g.bytes

    runner._save_checkpoint_streaming = measured_save
    res = runner.run_sequence(model, [Stage(task)], "lora", out / "new", cfg, eval_limit=2,
                              deepspeed_config=ds_config)
    report["new_R"] = res.R
    runner._save_checkpoint_streaming = stream

    def gather_then_merge(prepared, batches, cfg, ds, on_step, save=None):
        result = deepspeed_train(prepared.model, batches, cfg, ds, params=prepared.params, on_step=on_step,
                                 after_step=prepared.after_step, unshard=True)
        if dist.get_rank() == 0:
            prepared.finish(prepared.model).save_pretrained(out / "old_merged")
        dist.barrier()
        save(None, result)  # the runner's stage directory, so that it can go on (rank 0 streams its merged model)
        return result

    runner._train_deepspeed = gather_then_merge
    res = runner.run_sequence(model, [Stage(task)], "lora", out / "old", cfg, eval_limit=2,
                              deepspeed_config=ds_config)
    report["old_R"] = res.R
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
