"""Worker for tests/surgery/test_cpi_ft_ds.py, run by `torchrun --nproc_per_node=2` with DeepSpeed on CPU
(gloo): the whole of cpi_ft under ZeRO-3. Every file write of cpi_ft and of the runner is logged per rank;
each rank leaves OUT.rank<r>.json with its log and its result (or its error).

usage: cpi_ft_ranks.py MODEL OUT DS_CONFIG SETTINGS_JSON
"""

import json
import sys
import time
from pathlib import Path

from trace_transfer.surgery import cpi_ft as cpi
from trace_transfer.train import runner
from trace_transfer.train.loop import TrainConfig


def main(model: str, out: str, ds_config: str, settings: dict) -> None:
    writes: list[str] = []
    # merge_models(models, OUT/merged, ...) is logged by its first argument, the list of tuned models.
    for module, name in ((cpi, "write_json_atomic"), (cpi, "write_text_atomic"), (cpi, "merge_models"),
                         (runner, "write_json_atomic"), (runner, "write_text_atomic")):
        setattr(module, name, _logging(getattr(module, name), writes))
    t0 = time.time()
    rank = -1
    try:
        res = cpi.cpi_ft(model, settings["tasks"], out, cpi.CpiFtConfig(ratio=settings["ratio"]),
                         ft_cfg=TrainConfig(**settings["train"]), eval_limit=settings["eval_limit"],
                         deepspeed_config=ds_config)
        rank = res.rank
        result = {"R": res.R, "rank": res.rank, "groups": res.results["cpi_ft"]["groups"]}
    except Exception as exc:  # reported to the test, which checks how every rank ended
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else rank
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.time() - t0
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"writes": writes, **result}))


def _logging(fn, writes: list[str]):
    def call(target, *args, **kwargs):
        writes.append(str(target))
        return fn(target, *args, **kwargs)

    return call


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
