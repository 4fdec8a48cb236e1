"""Evaluation spread over ranks (issue 12.5): 2 gloo ranks give the single-process scores and per-item
outputs exactly; uneven shares; a failing rank stops both; the KV cache is used; the optional vLLM
backend is selected only when asked for, and its absence is one clear error."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from trace_transfer.errors import ConfigError
from trace_transfer.evaluation import metrics as M
from trace_transfer.evaluation.distributed import evaluate_tasks, local_device
from trace_transfer.evaluation.sharding import contiguous_split, map_batches, sharded
from trace_transfer.models import load_model, load_tokenizer

WORKER = Path(__file__).parent / "_dist_eval_worker.py"


def _worker():
    spec = importlib.util.spec_from_file_location("_dist_eval_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(tiny_llama), load_tokenizer(tiny_llama)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_single_process_scores_and_outputs_exactly(tiny_llama, llama, tmp_path):
    from _tiny_masking import run_two_cpu_ranks

    worker = _worker()
    model, tok = llama
    expected = {f"bs{bs}": worker.results_json(evaluate_tasks(model, tok, worker.tasks(), batch_size=bs,
                                                              per_example=True)) for bs in (2, 16)}
    out = tmp_path / "eval"
    run_two_cpu_ranks(WORKER, str(tiny_llama), str(out), timeout=600)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["device"] == "cpu"
        for bs in ("bs2", "bs16"):
            assert set(got[bs]) == {"em", "mc", "ppl"}
            for name, want in expected[bs].items():
                assert want["n"] == worker.ITEMS and len(want["per_example"]) == worker.ITEMS
                assert got[bs][name] == want, (bs, name)  # scores and every per-item output, bit for bit
    assert ranks[0]["error"] == "RankFailed: evaluation rank 1 of 2 failed while scoring its batches: " \
                                "ValueError: simulated failure"
    assert ranks[1]["error"] == "ValueError: simulated failure"


def test_one_process_is_the_plain_path(llama):
    """No process group: sharded() is a no-op and evaluate_tasks returns what evaluate does."""
    worker = _worker()
    model, tok = llama
    with sharded() as shard:
        assert shard is None
    got = evaluate_tasks(model, tok, worker.tasks(5), batch_size=2, per_example=True)
    for task in worker.tasks(5):
        want = M.evaluate(model, tok, task, batch_size=2, per_example=True)
        assert got[task.name].to_dict(with_examples=True) == want.to_dict(with_examples=True)
    assert local_device() == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_batches_are_merged_in_item_order_and_split_evenly():
    assert map_batches(5, [[3, 1], [0], [4, 2]], lambda idx: [f"x{i}" for i in idx]) == [f"x{i}" for i in range(5)]
    assert contiguous_split(7, 2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert contiguous_split(1, 4) == [[0]] and contiguous_split(0, 2) == []
    with pytest.raises(RuntimeError, match="covered 2 of 3"):
        map_batches(3, [[0, 1]], lambda idx: idx)


def test_generation_uses_the_kv_cache(llama, monkeypatch):
    """After the prompt, every forward pass of HF generate sees one new token per row: the cache holds
    the rest. Holds even for a checkpoint saved with use_cache false."""
    model, tok = llama
    monkeypatch.setattr(model.config, "use_cache", False)
    monkeypatch.setattr(model.generation_config, "use_cache", False)
    widths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        M.generate(model, tok, ["sum 3 4=", "copy qxm:"], max_new_tokens=5, batch_size=2)
    finally:
        hook.remove()
    assert widths[0] > 1 and len(widths) >= 2 and set(widths[1:]) == {1}, widths


# --------------------------------------------------------------------------------------------------
# The optional vLLM backend
# --------------------------------------------------------------------------------------------------


def test_vllm_backend_absent_is_one_clear_error(llama, monkeypatch):
    from trace_transfer.evaluation.vllm_backend import check_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(ConfigError, match=r"not installed.*pip install vllm"):
        check_backend("vllm")
    model, tok = llama
    with pytest.raises(ConfigError, match="pip install vllm"):
        M.generate(model, tok, ["a"], backend="vllm")
    with pytest.raises(ConfigError, match="choose one of hf, vllm"):
        check_backend("tgi")
    assert check_backend(None) == "hf" and check_backend("HF") == "hf"


def test_the_default_backend_never_imports_vllm(llama, monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    model, tok = llama
    task = _worker().tasks(2)[0]
    M.evaluate(model, tok, task)
    assert "vllm" not in sys.modules


class _FakeVllm(ModuleType):
    """Records the prompts vLLM is given and answers with fixed token ids."""

    def __init__(self, answer_ids):
        super().__init__("vllm")
        fake = self
        self.engines, self.prompts = [], []

        class LLM:
            def __init__(self, model, **kwargs):
                fake.engines.append(model)

            def generate(self, prompts, params, use_tqdm=False):
                fake.prompts.extend(p["prompt_token_ids"] for p in prompts)
                return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=answer_ids)]) for _ in prompts]

        self.LLM = LLM
        self.SamplingParams = lambda **kw: SimpleNamespace(**kw)


def test_vllm_backend_is_selected_when_asked_and_fed_the_hf_prompt_ids(tiny_llama, llama, monkeypatch):
    from trace_transfer.evaluation import vllm_backend

    model, tok = llama
    answer = tok("12;3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + [5, 6]
    fake = _FakeVllm(answer)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(vllm_backend, "_engine", {})
    prompts = ["sum 3 4=", "a"]
    texts = M.generate(str(tiny_llama), tok, prompts, max_new_tokens=4, stop=[";"], backend="vllm")
    assert texts == ["12", "12"]  # decoded with our tokenizer, cut at EOS, then at the stop string
    assert fake.prompts == [M._prompt_ids(tok, p) for p in prompts]
    # through evaluate: the metric hands vLLM the checkpoint it is told of, and the engine is reused
    task = _worker().tasks(2)[0]
    r = M.evaluate(model, tok, task, backend="vllm", checkpoint=str(tiny_llama), per_example=True)
    assert [e["prediction"] for e in r.per_example] == ["12;3", "12;3"]
    assert fake.engines == [str(Path(tiny_llama).resolve())]
    # an in-memory model is never mapped back to a directory (after training, name_or_path names the
    # weights it started from)
    with pytest.raises(ConfigError, match="in-memory model: pass checkpoint=DIR"):
        M.generate(model, tok, prompts, backend="vllm")
    with pytest.raises(ConfigError, match="no config.json"):
        M.generate(model, tok, prompts, backend="vllm", checkpoint=str(Path(tiny_llama) / "nothing"))


def test_eval_command_refuses_vllm_where_it_is_absent_before_loading(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from trace_transfer.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)
    missing = tmp_path / "no-such-model"  # never reached: the backend is checked first
    res = CliRunner().invoke(main, ["eval", "--model", str(missing), "--task", "synthetic:math", "--backend", "vllm"])
    assert res.exit_code == 1 and "pip install vllm" in res.output and "no-such-model" not in res.output, res.output
    res = CliRunner().invoke(main, ["eval", "--model", str(missing), "--task", "synthetic:math", "--backend", "tgi"])
    assert res.exit_code == 1 and "choose one of hf, vllm" in res.output, res.output
