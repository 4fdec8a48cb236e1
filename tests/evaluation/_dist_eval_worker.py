"""Worker for test_distributed_eval.py, run by `torchrun --nproc_per_node=2` over gloo on CPU.

Each rank loads the same tiny checkpoint, scores the tasks of :func:`tasks` with their batches spread
over both ranks (evaluate_tasks), and leaves OUT.rank<r>.json with every result, per-example outputs
included. It then makes rank 1's share of a map_batches call fail and records what each rank raised.

usage: _dist_eval_worker.py MODEL_DIR OUT
"""

import datetime
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ITEMS = 7  # odd on purpose: the ranks get unequal shares


def tasks(n: int = ITEMS) -> list:
    """exact_match, multiple_choice and perplexity tasks over the first ``n`` synthetic math examples."""
    from trace_transfer.data import Example, GenerationSpec, MetricSpec, load_task

    base = list(load_task("synthetic:math").eval_examples())[:n]
    wrong = [base[(i + 1) % n].response for i in range(n)]
    mc = [Example(e.prompt, e.response, choices=[w, e.response, w + "0"], answer=1) for e, w in zip(base, wrong)]

    def task(name, examples, metric, **gen):
        spec = SimpleNamespace(metric=MetricSpec(name=metric), generation=GenerationSpec(**gen) if gen else None)
        return SimpleNamespace(name=name, spec=spec,
                               eval_examples=lambda limit=None: examples[:limit] if limit else examples)

    return [task("em", base, "exact_match", max_new_tokens=6), task("mc", mc, "multiple_choice"),
            task("ppl", base, "perplexity")]


def results_json(results) -> dict:
    """JSON-ready results, floats kept exact (json writes repr)."""
    return json.loads(json.dumps({k: r.to_dict(with_examples=True) for k, r in results.items()}))


def main(model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from trace_transfer.evaluation.distributed import evaluate_tasks, local_device
    from trace_transfer.evaluation.sharding import map_batches, sharded
    from trace_transfer.models import load_model, load_tokenizer

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    model, tok = load_model(model_dir, device=local_device()), load_tokenizer(model_dir)
    record = {"device": local_device()}
    # batch 2: 4 batches of generation/perplexity, 11 of MC pairs; batch 16: one batch, rank 1 idle
    for bs in (2, 16):
        record[f"bs{bs}"] = results_json(evaluate_tasks(model, tok, tasks(), batch_size=bs, per_example=True))

    def fail_on_rank_1(idx):
        if rank == 1:
            raise ValueError("simulated failure")
        return idx

    with sharded():
        try:
            map_batches(4, [[0], [1], [2], [3]], fail_on_rank_1)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
