"""Where the per-stage evaluation loads a checkpoint (issue 12, evaluation at scale): the placement rule
(replicated on every rank when the weights x 1.2 fit every rank's free GPU memory, else device-map on
rank 0 alone), its forced spelling, and the two placements giving the same scores, alone and on 2 ranks."""

import importlib.util
import json
from pathlib import Path

import pytest

from trace_transfer.errors import ConfigError
from trace_transfer.evaluation import distributed as D
from trace_transfer.evaluation.metrics import evaluate
from trace_transfer.models import INFERENCE_OVERHEAD, load_model, load_tokenizer

GiB = 2**30
WORKER = Path(__file__).parent / "_placement_worker.py"


def _tasks(n=5):
    spec = importlib.util.spec_from_file_location("_dist_eval_worker", Path(__file__).parent / "_dist_eval_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.tasks(n)


def test_placement_rule():
    # 32B in bf16 is 64 GB: 76.8 GB with the margin does not fit an 80 GB GPU with 70 GB free.
    assert D.choose_placement(64 * GiB, [70 * GiB, 79 * GiB]) == "device-map"
    assert D.choose_placement(16 * GiB, [70 * GiB, 79 * GiB]) == "replicated"  # 8B in bf16
    need = 10 * GiB
    exact = int(need * INFERENCE_OVERHEAD)
    assert D.choose_placement(need, [exact]) == "replicated"
    assert D.choose_placement(need, [exact - 1, 80 * GiB]) == "device-map"  # the fullest rank decides
    assert D.choose_placement(need, None) == "replicated"  # no CUDA: every rank loads it (today's behaviour)
    assert D.choose_placement(None, [1]) == "replicated"  # config unreadable: the load reports the problem
    assert D.choose_placement(need, [80 * GiB], forced="device-map") == "device-map"
    assert D.choose_placement(need, [1], forced="replicated") == "replicated"
    with pytest.raises(ConfigError, match=r"TRACE_TRANSFER_EVAL_PLACEMENT='sharded': choose one of replicated, device-map"):
        D.choose_placement(need, None, forced="sharded")


def test_agree_placement_on_cpu_and_forced(tiny_llama, monkeypatch):
    monkeypatch.delenv(D.PLACEMENT_ENV, raising=False)
    if not _cuda():  # CPU: always replicated, whatever the size
        assert D.agree_placement(tiny_llama, "float32") == "replicated"
    monkeypatch.setenv(D.PLACEMENT_ENV, "device-map")
    assert D.agree_placement(tiny_llama, "float32") == "device-map"
    monkeypatch.setenv(D.PLACEMENT_ENV, "nope")
    with pytest.raises(ConfigError, match="choose one of"):
        D.agree_placement(tiny_llama)


def _cuda():
    import torch

    return torch.cuda.is_available()


def test_one_process_both_placements_give_evaluate_s_scores(tiny_llama):
    _, tasks = _tasks()
    tok = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama)
    want = {t.name: evaluate(model, tok, t, batch_size=2, per_example=True).to_dict(with_examples=True) for t in tasks}
    for placement in ("replicated", "device-map"):
        got, used = D.evaluate_checkpoint(tiny_llama, tok, tasks, dtype="float32", batch_size=2, per_example=True,
                                          placement=placement)
        assert used == placement
        assert {k: r.to_dict(with_examples=True) for k, r in got.items()} == want
    with pytest.raises(ConfigError, match="choose one of"):
        D.evaluate_checkpoint(tiny_llama, tok, tasks, placement="everywhere")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_device_map_gives_the_replicated_scores(tiny_llama, tmp_path):
    from _tiny_masking import run_two_cpu_ranks

    worker, tasks = _tasks()
    tok = load_tokenizer(tiny_llama)
    single = worker.results_json({t.name: evaluate(load_model(tiny_llama), tok, t, batch_size=2, per_example=True)
                                  for t in worker.tasks()})
    out = tmp_path / "placement"
    run_two_cpu_ranks(WORKER, str(tiny_llama), str(out), timeout=600)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert (got["auto"], got["forced"]) == ("replicated", "device-map")  # CPU ranks: replicated unless forced
        assert got["replicated"] == single  # every score and per-item output, bit for bit
        assert got["device-map"] == single
    assert ranks[0]["error"].startswith("ArtifactNotFoundError")
    assert ranks[1]["error"].startswith("RankFailed: evaluation rank 0 failed while scoring task 'em': "
                                        "ArtifactNotFoundError")
