"""Worker for test_eval_placement.py, run by `torchrun --nproc_per_node=2` over gloo on CPU.

Both ranks score the same tiny checkpoint with evaluate_checkpoint twice: ``replicated`` (each rank
loads it and scores a share of the batches) and ``device-map`` forced through the environment (rank 0
alone loads and scores, rank 1 receives each task's result), then a device-map evaluation whose load
fails on rank 0. Each rank leaves OUT.rank<r>.json.

usage: _placement_worker.py MODEL_DIR OUT
"""

import datetime
import json
import os
import sys
from pathlib import Path


def main(model_dir: str, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from _dist_eval_worker import results_json, tasks

    from trace_transfer.evaluation import distributed as D
    from trace_transfer.models import load_tokenizer

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    tok = load_tokenizer(model_dir)
    record = {}
    results, record["auto"] = D.evaluate_checkpoint(model_dir, tok, tasks(), batch_size=2, per_example=True)
    record["replicated"] = results_json(results)
    os.environ[D.PLACEMENT_ENV] = "device-map"
    results, record["forced"] = D.evaluate_checkpoint(model_dir, tok, tasks(), batch_size=2, per_example=True)
    record["device-map"] = results_json(results)
    # rank 0 cannot load: both ranks stop with it, none waits for the other
    record["error"] = _raised(lambda: D.evaluate_checkpoint(str(Path(model_dir) / "missing"), tok, tasks()))
    dist.destroy_process_group()
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(record))


def _raised(fn) -> str | None:
    """``Type: message`` of what ``fn()`` raised, None if nothing."""
    try:
        fn()
    except Exception as exc:  # the test checks what each rank raised
        return f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
