"""Streaming checkpoint saves (issue 12, item 4): ``StreamingShardWriter`` lays shards out up front and
writes each tensor as it comes; ``save_consolidated`` streams a (ZeRO-3-sharded) model through it, one
tensor at a time, and writes what the old consolidate-then-``save_pretrained`` path wrote, bit for bit.
The 2-rank ZeRO-3 test measures each rank's memory during the save."""

import json
import os
from pathlib import Path

import pytest
import torch
from _tiny_masking import batches_fn, coreset_at, run_two_cpu_ranks, tiny_llama
from safetensors import safe_open

from trace_transfer.checkpoint import StreamingShardWriter, open_checkpoint
from trace_transfer.errors import ArtifactError
from trace_transfer.train.loop import TrainConfig, train
from trace_transfer.train.masking import apply_coreset

MiB = 2**20


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            assert st.metadata() == {"format": "pt"}, f  # from_pretrained wants HF's marker
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def assert_same_checkpoint(got: Path, want: Path) -> None:
    """Same tensor names, dtypes and bytes, same config.json, same shard count."""
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((got / "config.json").read_text()) == json.loads((want / "config.json").read_text())
    assert len(list(got.glob("*.safetensors"))) == len(list(want.glob("*.safetensors")))


def test_streaming_writer_lays_out_shards_and_takes_tensors_in_any_order(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2, 2).bfloat16(), "empty": torch.ones(0, 4),
          "scalar": torch.tensor(3.0), "mask": torch.tensor([True, False, True])}
    layout = [(n, t.shape, t.dtype) for n, t in ts.items()]
    with StreamingShardWriter(tmp_path / "multi", "model", layout, max_shard_bytes=64, header={"format": "pt"}) as w:
        for name in reversed(list(ts)):
            w.add(name, ts[name])
    files = sorted(p.name for p in (tmp_path / "multi").iterdir())
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4 and not any(".tmp" in f for f in files)
    reader = open_checkpoint(tmp_path / "multi")
    for name, t in ts.items():
        assert torch.equal(reader.get(name), t), name
    index = json.loads((tmp_path / "multi" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())

    with StreamingShardWriter(tmp_path / "one", "model", layout) as w:
        for name, t in ts.items():
            w.add(name, t)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["model.safetensors"]


def test_streaming_writer_refuses_a_wrong_tensor_and_leaves_nothing_when_incomplete(tmp_path):
    layout = [("w", (2, 3), torch.float32), ("b", (3,), torch.float32)]
    w = StreamingShardWriter(tmp_path, "model", layout)
    with pytest.raises(ArtifactError, match=r"'w' is \(3, 2\)"):
        w.add("w", torch.zeros(3, 2))
    with pytest.raises(ArtifactError, match="not in the layout"):
        w.add("x", torch.zeros(3))
    w.add("w", torch.zeros(2, 3))
    with pytest.raises(ArtifactError, match="written twice"):
        w.add("w", torch.zeros(2, 3))
    with pytest.raises(ArtifactError, match="never written .first: 'b'"):
        w.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), StreamingShardWriter(tmp_path, "model", layout) as w:
        w.add("w", torch.zeros(2, 3))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tie", [False, True])
def test_save_consolidated_streams_what_the_old_path_wrote_and_load_model_reads_it(tmp_path, tie):
    from trace_transfer.models import build_tokenizer, load_model
    from trace_transfer.train.ds import consolidated_state_dict, save_consolidated

    model = tiny_llama(tie=tie)
    cs = coreset_at(model, "row")
    # the (tied) embedding is partly core: its delta is folded, and it is written once, under HF's name
    assert "model.embed_tokens.weight" in cs.names()
    handle = apply_coreset(model, cs, masking="sparse")
    train(model, batches_fn(), TrainConfig(lr=1e-2, max_steps=2, precision="fp32", warmup_ratio=0.0),
          params=handle.param_groups(0.0))
    tokenizer = build_tokenizer("char")
    save_consolidated(model, tmp_path / "stream", tokenizer, max_shard_bytes=20_000)  # several shards
    model.save_pretrained(tmp_path / "old", state_dict=consolidated_state_dict(model), max_shard_size=20_000)
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "old")
    assert (tmp_path / "stream" / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temp dir was renamed
    handle.remove()
    reloaded = load_model(tmp_path / "stream")
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie
    want = model.state_dict()
    for name, t in reloaded.state_dict().items():
        assert torch.equal(t, want[name]), name
    # a second save replaces the first (the run's own directory), still atomically
    save_consolidated(model, tmp_path / "stream")
    assert sorted(os.listdir(tmp_path)) == ["old", "stream"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures RSS through Linux's /proc")
def test_two_rank_zero3_save_memory_per_rank_is_its_shard_plus_one_tensor(tmp_path, monkeypatch):
    """2 CPU ranks, ZeRO-3, a 29M-parameter Llama (112 MiB fp32; largest tensor: the tied 16 MiB
    embedding, partly core so the save folds its sparse delta). Each rank's peak resident memory while
    ``save_consolidated`` streams the still-sharded model is bounded by

        RSS before the save (its shard, optimizer state, code) + 2 x largest tensor + 16 MiB,

    2 x: the gathered tensor plus one transient full-size copy (measured ~2 x on both ranks: the
    all-gather's working copy, and on rank 0 the folded tensor); 16 MiB: allocator and IPC slack. That is asserted, and to be well under the full model (< 1/2).
    The old path (every tensor gathered onto every rank, as ``_unshard`` did, rank 0 writing) is
    measured in the same run: its growth must reach the full model, showing the measurement sees it.
    glibc's mmap threshold is pinned to 1 MiB: by default it adapts up to 32 MiB, so this test's
    16 MiB tensors would be carved out of a fragmenting heap, while a real model's (hundreds of MiB)
    are always mmapped and returned at once; pinning it makes the small model behave like the large.
    Both checkpoints are then compared bit for bit, and the streamed one loads with load_model."""
    pytest.importorskip("deepspeed")
    from trace_transfer.models import load_model

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(MiB))
    out = tmp_path / "save"
    run_two_cpu_ranks(Path(__file__).parent / "ds_scripts" / "zero3_save.py", str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        bound = 2 * r["largest_tensor_bytes"] + 16 * MiB
        stream, old = r["stream"]["growth_bytes"], r["old"]["growth_bytes"]
        print(f"rank {r['rank']}: model {r['model_bytes'] / MiB:.1f} MiB, shard {r['shard_bytes'] / MiB:.1f} MiB, "
              f"save growth streamed {stream / MiB:.1f} MiB (bound {bound / MiB:.1f}), old {old / MiB:.1f} MiB")
        assert r["released"] and r["sparse_tensors"] > 0
        assert stream <= bound, r
        assert stream < r["model_bytes"] / 2, r
        assert old >= 0.9 * r["model_bytes"], r
    assert sorted(os.listdir(out)) == ["old", "rank0.json", "rank1.json", "stream"]  # rank 1 wrote no checkpoint
    assert_same_checkpoint(out / "stream", out / "old")
    model = load_model(out / "stream")
    assert model.lm_head.weight is model.model.embed_tokens.weight
