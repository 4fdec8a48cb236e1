"""Worker for tests/train/test_ds_save.py, run by `torchrun --nproc_per_node=2` with DS_ACCELERATOR=cpu.

A ~29M-parameter Llama (8 layers, 112 MiB in fp32; the tied 8192 x 512 embedding, 16 MiB, is the
largest tensor) is trained 2 steps under ZeRO-3 with a sparse row CoreSet (the embedding partly core,
so the save folds a delta into the largest tensor), then saved from the still-sharded engine twice,
in ``before_teardown``:

1. streamed: ``save_consolidated`` (OUT/stream);
2. the old way: every tensor gathered onto every rank (what ``_unshard`` did) and rank 0 writing the
   consolidated state dict with ``save_pretrained`` (OUT/old).

Each rank measures its resident-memory growth over each save window: the kernel's peak (VmHWM, reset
through /proc/self/clear_refs) and a 1 ms sampling thread, whichever is higher, minus VmRSS just
before (after ``malloc_trim``, so memory freed earlier cannot hide the save's own). Rank r writes
OUT/rank<r>.json.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _tiny_masking

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _tiny_masking import ZERO3, coreset_at  # noqa: E402

from trace_transfer.train.ds import consolidated_state_dict, deepspeed_train, save_consolidated  # noqa: E402
from trace_transfer.train.loop import TrainConfig  # noqa: E402
from trace_transfer.train.masking import apply_coreset  # noqa: E402

VOCAB, HIDDEN, LAYERS = 8192, 512, 8


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Growth:
    """Peak resident memory over a ``with`` block, minus the resident memory at its start (bytes)."""

    def __enter__(self):
        # Hand freed heap memory back first (the full model built before partitioning, training's
        # buffers): otherwise the save's allocations reuse it and never show up as growth.
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim the same way
            pass
        self.before = status_kb("VmRSS")
        try:  # "5" resets the peak (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.sampled, self.stop = self.before, threading.Event()

        def sample():
            while not self.stop.is_set():
                self.sampled = max(self.sampled, status_kb("VmRSS"))
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        peak = max(self.sampled, status_kb("VmHWM") if self.hwm else 0, status_kb("VmRSS"))
        self.bytes = (peak - self.before) * 1024
        self.baseline = self.before * 1024


def model_and_data():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=3 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return model, (lambda epoch: data)


def main(out: Path) -> None:
    from trace_transfer.models import build_tokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model, batches = model_and_data()
    sizes = {"params": sum(p.numel() for p in model.parameters()),
             "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
             "largest_tensor_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
             "largest_layer_bytes": max(sum(p.numel() * p.element_size() for p in layer.parameters())
                                        for layer in model.model.layers)}
    cs = coreset_at(model, "row", share=0.1)
    assert "model.embed_tokens.weight" in cs.names()
    handle = apply_coreset(model, cs, masking="sparse")  # as the runner does: applied by the caller
    tokenizer = build_tokenizer("char")
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=2, grad_accum=1, weight_decay=0.0, warmup_ratio=0.0,
                      scheduler="constant", precision="fp32")
    report: dict = {"rank": rank, **sizes}

    def save_twice(engine, result) -> None:
        report["sparse_tensors"] = len(handle.sparse)
        report["shard_bytes"] = sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                                    for p in model.parameters() if hasattr(p, "ds_tensor"))
        dist.barrier()
        with Growth() as g:
            save_consolidated(model, out / "stream", tokenizer)
        report["stream"] = {"growth_bytes": g.bytes, "baseline_bytes": g.baseline, "seconds": g.seconds}
        dist.barrier()
        with Growth() as g:
            state = consolidated_state_dict(model, rank0_only=False)  # _unshard's gather: all of it, every rank
            if rank == 0:
                model.save_pretrained(out / "old", state_dict=state)
                tokenizer.save_pretrained(out / "old")
            del state
        report["old"] = {"growth_bytes": g.bytes, "baseline_bytes": g.baseline, "seconds": g.seconds}
        dist.barrier()

    deepspeed_train(model, batches, cfg, ZERO3, params=handle.param_groups(0.0), after_step=handle.after_step,
                    unshard=False, before_teardown=save_twice)
    report["released"] = all(p.numel() == 0 and not hasattr(p, "ds_tensor") for p in model.parameters())
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
