"""Worker for tests/test_runner.py, run by `torchrun --nproc_per_node=2` over gloo: the sequential
runner's rank discipline without DeepSpeed's start-up cost. The runner takes its DeepSpeed path, except
that training goes through the plain loop on each rank (same seed and data, so the same weights).

Every file the runner writes is logged; each rank leaves OUT.rank<r>.json with its log and its result
(or its error). Rank 1 reaches the run-directory check late, the way a slower process does; with
`fail`, rank 0 cannot save stage 1's checkpoint.

usage: runner_ranks.py MODEL STAGES_JSON OUT DS_CONFIG ok|fail
"""

import datetime
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

import trace_transfer.report.plots as plots
from trace_transfer.train import runner
from trace_transfer.train.loop import TrainConfig, train
from trace_transfer.train.methods import Stage


def main(model: str, stages: list[list[str]], out: str, ds_config: str, mode: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    writes: list[str] = []

    def logged(fn):
        def wrapper(path, *args, **kwargs):
            writes.append(str(path))
            return fn(path, *args, **kwargs)

        return wrapper

    runner.write_json_atomic = logged(runner.write_json_atomic)
    runner.write_text_atomic = logged(runner.write_text_atomic)
    plot = plots.plot_accuracy_matrix

    def plot_logged(rows, tasks, labels, path, **kwargs):
        writes.append(str(path))
        return plot(rows, tasks, labels, path, **kwargs)

    plots.plot_accuracy_matrix = plot_logged
    # The DeepSpeed path saves collectively, streaming from the (here plain) model: every rank takes
    # part, rank 0 alone writes. "fail" makes rank 0's first tensor write fail, as a full disk would.
    save = runner._save_checkpoint_streaming

    def save_logged(model, tokenizer, out_dir, k, info):
        if rank == 0:
            writes.append(str(Path(out_dir) / f"stage_{k}"))
        return save(model, tokenizer, out_dir, k, info)

    runner._save_checkpoint_streaming = save_logged
    if mode == "fail" and rank == 0:
        from trace_transfer.checkpoint import StreamingShardWriter

        def full_disk(self, name, tensor):
            raise OSError("no space left on device (simulated)")

        StreamingShardWriter.add = full_disk

    def plain_train(prepared, batches, cfg, ds, on_step, save=None):
        result = train(prepared.model, batches, cfg, params=prepared.params, after_step=prepared.after_step)
        if save is not None:  # what deepspeed_train does before tearing the engine down
            save(None, result)
        return result

    runner._train_deepspeed = plain_train
    if rank == 1:
        check = runner._check_resume

        def late_check(*args, **kwargs):
            time.sleep(3)
            return check(*args, **kwargs)

        runner._check_resume = late_check

    cfg = TrainConfig(lr=3e-3, max_steps=2, batch_size=8, seq_len=32, warmup_ratio=0.0)
    t0 = time.time()
    try:
        res = runner.run_sequence(model, [Stage(t, c) for t, c in stages], "trace", out, cfg, eval_limit=2,
                                  deepspeed_config=ds_config)
        if res.rank == 0:  # as `finetune --plot` does: the report draws what training returned
            from trace_transfer.report.plots import plot_run

            plot_run(out)
        result = {"R": res.R, "rank": res.rank}
    except Exception as exc:  # reported to the test, which checks that every rank ended and how
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.time() - t0
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"writes": writes, **result}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
