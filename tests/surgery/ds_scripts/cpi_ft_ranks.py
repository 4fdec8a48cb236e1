"""Worker for tests/surgery/test_cpi_ft_ds.py, run by `torchrun --nproc_per_node=2` with DeepSpeed on CPU
(gloo): the whole of cpi_ft under ZeRO-3, once per entry of SETTINGS_JSON's ``calls`` (each may ask for
``resume``, and for ``fail``: rank 0's transplant + SLERP step then raises). Every file write of cpi_ft
and of the runner is logged per rank; each rank leaves OUT.rank<r>.json with, per call, its log and its
result (or its error).

usage: cpi_ft_ranks.py MODEL OUT DS_CONFIG SETTINGS_JSON
"""

import json
import os
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
    merge = cpi.merge_models
    rank = int(os.environ.get("RANK", -1))  # torchrun's, for an error before the process group exists
    calls = []
    for call in settings.get("calls", [{}]):
        cpi.merge_models = _no_space if call.get("fail") else merge
        writes.clear()
        t0 = time.time()
        try:
            res = cpi.cpi_ft(model, settings["tasks"], out, cpi.CpiFtConfig(ratio=settings["ratio"]),
                             ft_cfg=TrainConfig(**settings["train"]), eval_limit=settings["eval_limit"],
                             deepspeed_config=ds_config, resume=call.get("resume", False))
            result = {"R": res.R, "rank": res.rank, "groups": res.results["cpi_ft"]["groups"],
                      "stage_seconds": [p["seconds"] for p in res.results["per_stage"]]}
        except Exception as exc:  # reported to the test, which checks how every rank ended
            result = {"error": f"{type(exc).__name__}: {exc}"}
        calls.append({"writes": list(writes), "seconds": time.time() - t0, **result})
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(calls))


def _logging(fn, writes: list[str]):
    def call(target, *args, **kwargs):
        writes.append(str(target))
        return fn(target, *args, **kwargs)

    return call


def _no_space(*args, **kwargs):
    raise OSError("no space left on device (simulated)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
