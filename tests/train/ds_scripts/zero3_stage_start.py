"""Worker for tests/train/test_zero3_stage_start.py, run by `torchrun --nproc_per_node=2` with
DS_ACCELERATOR=cpu: a stage's start model under ZeRO-3, loaded partitioned (``train.ds.load_partitioned``)
against the old way, loaded whole on every rank before ``deepspeed.initialize`` partitions it.

usage:
  zero3_stage_start.py runs MODEL STAGES_JSON DS_CONFIG OUT
      ``run_sequence`` with ``trace`` (sparse row cores), ``full`` and ``general-core`` (dense gradient
      masks), 2 stages each, once with the
      runner's loader and once with ``runner._load_stage_start`` replaced by the old whole load
      (OUT/<method>-<partitioned|whole>); rank r writes OUT/rank<r>.json: whether each stage's start
      model was partitioned.
  zero3_stage_start.py memory OUT
      the ~29M-parameter Llama of zero3_save.py saved to OUT/base; each rank measures its resident
      memory growth from before the load to just after ``deepspeed.initialize`` (``deepspeed_train``
      with no step; a sparse row CoreSet applied in between, as the runner's ``trace`` does), once
      loaded partitioned and once whole; rank r writes OUT/rank<r>.json.
"""

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _tiny_masking
sys.path.insert(0, str(Path(__file__).resolve().parent))  # zero3_save's memory probe and model

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _tiny_masking import ZERO3, coreset_at, tiny_llama  # noqa: E402
from zero3_save import Growth, model_and_data  # noqa: E402

from trace_transfer.models import load_model  # noqa: E402
from trace_transfer.train import ds, runner  # noqa: E402
from trace_transfer.train.ds import deepspeed_train, load_ds_config, load_partitioned  # noqa: E402
from trace_transfer.train.loop import TrainConfig  # noqa: E402
from trace_transfer.train.masking import apply_coreset  # noqa: E402
from trace_transfer.train.methods import MethodOptions, Stage  # noqa: E402


def partitioned(model: torch.nn.Module) -> bool:
    return all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())


def runs(model: str, stages: list[list[str]], ds_config: str, out: Path) -> None:
    rank = dist.get_rank()
    new_start = runner._load_stage_start
    seen: dict[str, list[bool]] = {}

    def old_start(ref, device, *args):  # what run_stage did before: the whole model on every rank
        return load_model(ref, device=device)

    cfg = TrainConfig(lr=3e-3, max_steps=2, batch_size=4, seq_len=32, warmup_ratio=0.0)
    # general-core freezes the first stage's core: its 70 % complement trains with dense gradient masks.
    for method, options in (("trace", MethodOptions()), ("full", MethodOptions()),
                            ("general-core", MethodOptions(general_coreset=stages[0][1]))):
        for how, start in (("partitioned", new_start), ("whole", old_start)):
            log = seen.setdefault(f"{method}-{how}", [])

            def logged(*args, start=start, log=log):
                m = start(*args)
                log.append(partitioned(m))
                return m

            runner._load_stage_start = logged
            runner.run_sequence(model, [Stage(t, c) for t, c in stages], method, out / f"{method}-{how}", cfg,
                                eval_limit=1, eval_batch_size=1, deepspeed_config=ds_config, options=options)
    (out / f"rank{rank}.json").write_text(json.dumps({"partitioned": seen}))


def memory(out: Path) -> None:
    rank = dist.get_rank()
    base = out / "base"
    model, batches = model_and_data()
    core = coreset_at(model, "row", share=0.1)  # from the whole model: a placeholder's p.shape is empty
    if rank == 0:
        model.save_pretrained(base)
    del model
    gc.collect()
    dist.barrier()
    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=2, grad_accum=1, weight_decay=0.0, warmup_ratio=0.0,
                      scheduler="constant", precision="fp32")
    conf = load_ds_config(ZERO3, cfg, dist.get_world_size())
    report: dict = {"rank": rank}
    streamed = []  # load_partitioned's own streaming load, not its from_pretrained fallback
    build = ds._build_and_stream
    ds._build_and_stream = lambda *args: streamed.append(build(*args)) or streamed[-1]
    # Warm-up on a tiny model, unmeasured: the first pass through either path imports modules and sets
    # up collectives (~150 MiB of anonymous memory on each rank), which is not the load's own cost.
    tiny = tiny_llama()
    if rank == 0:
        tiny.save_pretrained(out / "tiny")
    dist.barrier()
    rounds = [("partitioned", out / "tiny", coreset_at(tiny, "row")), ("whole", out / "tiny", coreset_at(tiny, "row")),
              ("partitioned", base, core), ("whole", base, core)]
    for how, ref, core_of in rounds:
        dist.barrier()
        g = Growth().__enter__()
        model = load_partitioned(ref, conf) if how == "partitioned" else load_model(ref)
        sizes = {"loaded_partitioned": partitioned(model), "streamed": how == "partitioned" and streamed[-1] is model,
                 "model_bytes": sum(p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else
                                    p.numel() * p.element_size() for p in model.parameters()),
                 "largest_tensor_bytes": max(p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else
                                             p.numel() * p.element_size() for p in model.parameters())}
        handle = apply_coreset(model, core_of, masking="sparse")
        trainable = handle.summary()["trainable_params"]

        def at_initialize(engine, sizes=sizes) -> None:  # steps=0: called right after deepspeed.initialize
            g.__exit__(None, None, None)
            sizes["shard_bytes"] = sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                                       for p in model.parameters() if hasattr(p, "ds_tensor"))

        deepspeed_train(model, batches, cfg, conf, params=handle.param_groups(0.0), steps=0, on_engine=at_initialize,
                        unshard=False)
        if ref == base:
            report[how] = {**sizes, "growth_bytes": g.bytes, "baseline_bytes": g.baseline, "seconds": g.seconds,
                           "trainable_params": trainable}
        del model, handle
        gc.collect()
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    if sys.argv[1] == "runs":
        runs(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    else:
        memory(Path(sys.argv[2]))
