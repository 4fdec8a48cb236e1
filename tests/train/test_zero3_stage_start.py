"""A stage's start model under ZeRO-3 (issue 12, "Left" item 1): loaded partitioned
(``train.ds.load_partitioned``: built under ``zero.Init``, streamed in tensor by tensor), not whole on
every rank before ``deepspeed.initialize``. Same checkpoints as the whole load; a per-rank memory bound."""

import json
from pathlib import Path

import pytest
import torch
from _tiny_masking import ZERO3, coreset_at, run_two_cpu_ranks

from trace_transfer.checkpoint import open_checkpoint

MiB = 2**20
SCRIPT = Path(__file__).parent / "ds_scripts" / "zero3_stage_start.py"
TASKS = ("synthetic:math?n_train=48&n_eval=6", "synthetic:code?n_train=48&n_eval=6")
METHODS = ("trace", "full", "general-core")


def _as_placeholders(model: torch.nn.Module) -> torch.nn.Module:
    """What zero.Init leaves in place of each parameter: an empty tensor, the real shape and size aside."""
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    return model


def test_coreset_checks_masks_and_counts_read_the_shapes_of_partitioned_placeholders():
    """Between the partitioned load and deepspeed.initialize: CoreSet.check_fits, the sparse deltas of
    apply_coreset and every trainable count see the real shapes (ds_shape, ds_numel), so a stage's
    method info is the one a whole model gives (0 trainable parameters otherwise)."""
    from _tiny_masking import tiny_llama

    from trace_transfer.coreset import CoreSet
    from trace_transfer.errors import ModelMismatchError
    from trace_transfer.train.masking import apply_coreset
    from trace_transfer.train.methods import get_method

    whole, empty = tiny_llama(), _as_placeholders(tiny_llama())
    core = coreset_at(whole, "row")
    core.check_fits(empty)
    with pytest.raises(ModelMismatchError, match="shape"):
        CoreSet.from_unit_masks({}, {}, {n: (core.shape(n)[0] + 1, *core.shape(n)[1:])
                                         for n in core.all_names()}).check_fits(empty)
    assert get_method("full").prepare(empty, None, None).info == get_method("full").prepare(whole, None, None).info
    handles = [apply_coreset(m, core, masking="sparse") for m in (whole, empty)]
    assert handles[1].summary() == handles[0].summary() and handles[1].summary()["trainable_params"] > 0
    assert [tuple(e.delta.shape) for e in handles[1].sparse.values()] == \
        [tuple(e.delta.shape) for e in handles[0].sparse.values()]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_runs_loaded_partitioned_write_the_checkpoints_of_the_whole_load(tiny_llama, tmp_path):
    """2 CPU ranks, ZeRO-3, 2 stages of ``trace`` (sparse row cores: the deltas are made on partitioned
    placeholders and converted by ``deepspeed.initialize``), of ``full`` and of ``general-core`` (the
    first core frozen, its complement trained with dense gradient masks): every stage starts from a
    partitioned model, and the stage checkpoints, losses, method info (trainable counts from ds_numel)
    and scores equal, bit for bit, those of the same runs with the old whole load on every rank."""
    pytest.importorskip("deepspeed")
    from trace_transfer.models import load_model

    base = load_model(tiny_llama)
    cores = [str(coreset_at(base, "row", seed=i).save(tmp_path / f"core{i}.coreset.safetensors")) for i in (0, 1)]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(ZERO3))
    out = tmp_path / "runs"
    out.mkdir()
    run_two_cpu_ranks(SCRIPT, "runs", str(tiny_llama), json.dumps([list(s) for s in zip(TASKS, cores)]), str(ds),
                      str(out))
    for r in (0, 1):
        seen = json.loads((out / f"rank{r}.json").read_text())["partitioned"]
        assert seen == {f"{m}-{how}": [how == "partitioned"] * 2 for m in METHODS
                        for how in ("partitioned", "whole")}, (r, seen)
    for method in METHODS:
        new, old = out / f"{method}-partitioned", out / f"{method}-whole"
        for k in (1, 2):
            a, b = (dict(open_checkpoint(d / f"stage_{k}").iter_tensors()) for d in (new, old))
            assert a.keys() == b.keys()
            for name in b:
                assert torch.equal(a[name], b[name]), (method, k, name)
            sa, sb = (json.loads((d / f"stage_{k}" / "stage.json").read_text()) for d in (new, old))
            assert sa["method_info"] == sb["method_info"] and sa["method_info"]["trainable_params"] > 0
            assert sa["train"]["losses"] == sb["train"]["losses"]
        rows = [json.loads((d / "results.json").read_text())["R"] for d in (new, old)]
        assert rows[0] == rows[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures RSS through Linux's /proc")
def test_zero3_stage_start_memory_per_rank_is_its_partition_plus_two_tensors(tmp_path, monkeypatch):
    """2 CPU ranks, ZeRO-3, the 29M-parameter Llama of test_ds_save (112 MiB fp32, largest tensor the
    tied 16 MiB embedding). Each rank's peak resident-memory growth from before the load to just after
    ``deepspeed.initialize`` (a sparse row CoreSet applied in between, as ``trace`` does) is bounded by

        its partition after initialize (~59 MiB: half the model, plus the deltas) + 2 x largest tensor + 24 MiB,

    2 x: while a tensor is streamed in it is gathered whole on every rank, and rank 0 also holds the
    copy it read from disk; 24 MiB: DeepSpeed's optimizer set-up at initialize and allocator slack.
    Measured (2 cores, loaded machine): 97-101 MiB on each rank (bound ~115). The old path (the whole
    model loaded on every rank, then partitioned by initialize) is measured in the same run and must
    reach the whole model: ~174 MiB on each rank. glibc's mmap threshold is pinned to 1 MiB, for the reason
    test_ds_save.py gives (small tensors would otherwise come from a fragmenting heap)."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(MiB))
    out = tmp_path / "mem"
    out.mkdir()
    run_two_cpu_ranks(SCRIPT, "memory", str(out))
    for rank in (0, 1):
        r = json.loads((out / f"rank{rank}.json").read_text())
        new, old = r["partitioned"], r["whole"]
        bound = new["shard_bytes"] + 2 * new["largest_tensor_bytes"] + 24 * MiB
        print(f"rank {rank}: model {new['model_bytes'] / MiB:.1f} MiB, partition {new['shard_bytes'] / MiB:.1f} MiB; "
              f"stage-start growth partitioned {new['growth_bytes'] / MiB:.1f} MiB (bound {bound / MiB:.1f}), "
              f"whole {old['growth_bytes'] / MiB:.1f} MiB")
        assert new["loaded_partitioned"] and new["streamed"] and not old["loaded_partitioned"]
        assert new["trainable_params"] == old["trainable_params"] > 0
        assert new["growth_bytes"] <= bound, r
        assert old["growth_bytes"] >= new["model_bytes"], r


def test_a_hub_id_streams_from_its_cached_snapshot(tiny_llama, tmp_path, monkeypatch):
    """A hub id (the paper pipelines name ``Qwen/Qwen3-32B``) resolves to its snapshot in the Hugging Face
    cache, so ``load_partitioned`` streams it in instead of taking ``from_pretrained``'s whole read on
    rank 0; an id with no snapshot (offline, nothing cached) gives None, for the fallback to report."""
    import shutil

    from trace_transfer.train.ds import _hub_snapshot

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert _hub_snapshot("someorg/tiny") == snap
    assert _hub_snapshot("someorg/not-cached") is None
