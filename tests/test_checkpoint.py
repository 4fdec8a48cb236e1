"""Streaming safetensors I/O: sharding, index, atomic writes, fingerprints."""

import json

import pytest
import torch

from trace_transfer.checkpoint import (
    ContentHash,
    ShardedWriter,
    atomic_path,
    file_sha256,
    fingerprint_of,
    open_checkpoint,
)
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.w": torch.randn(64, 32, generator=g) for i in range(5)}


def test_single_shard_round_trip(tmp_path):
    ts = _tensors()
    with ShardedWriter(tmp_path, "delta", metadata={"task": "math"}) as w:
        for k, v in ts.items():
            w.add(k, v)
    assert (tmp_path / "delta.safetensors").exists()
    r = open_checkpoint(tmp_path, prefix="delta")
    assert r.names() == list(ts)
    assert r.metadata == {"task": "math"}
    for k, v in r.iter_tensors():
        assert torch.equal(v, ts[k])


def test_sharded_round_trip_with_index(tmp_path):
    ts = _tensors()
    with ShardedWriter(tmp_path, "fisher", max_shard_bytes=64 * 32 * 4 * 2) as w:
        for k, v in ts.items():
            w.add(k, v)
    index = json.loads((tmp_path / "fisher.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    r = open_checkpoint(tmp_path / "fisher.safetensors.index.json")
    assert sorted(r.names()) == sorted(ts)
    assert torch.equal(r.get("layers.3.w"), ts["layers.3.w"])
    assert r.shape("layers.0.w") == (64, 32)
    # a later single-shard write under the same prefix replaces the shards cleanly
    with ShardedWriter(tmp_path, "fisher") as w:
        w.add("x", torch.zeros(2))
    assert open_checkpoint(tmp_path, prefix="fisher").names() == ["x"]
    assert not list(tmp_path.glob("fisher-*"))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path, "delta") as w:
            w.add("a", torch.zeros(3))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            raise ValueError
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="nowhere"):
        open_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ArtifactNotFoundError, match="delta"):
        open_checkpoint(tmp_path, prefix="delta")
    with ShardedWriter(tmp_path, "d") as w:
        w.add("a", torch.zeros(1))
        with pytest.raises(ArtifactError, match="twice"):
            w.add("a", torch.zeros(1))


def test_fingerprint_ignores_dtype_but_not_shape():
    a = {"w": torch.zeros(2, 3)}
    assert fingerprint_of(a) == fingerprint_of({"w": torch.zeros(2, 3, dtype=torch.bfloat16)})
    assert fingerprint_of(a)["hash"] != fingerprint_of({"w": torch.zeros(3, 2)})["hash"]


def test_content_hash_is_the_sorted_tensor_digests_whatever_the_order_or_sharding(tmp_path):
    import hashlib

    ts = {**_tensors(), "b16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}
    rows = sorted([n, str(t.dtype).removeprefix("torch."), list(t.shape),
                   hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()]
                  for n, t in ts.items())
    expect = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    forward, backward = ContentHash(), ContentHash()
    for n, t in ts.items():
        forward.update(n, t)
    for n, t in reversed(list(ts.items())):
        backward.update(n, t)
    assert forward.hexdigest() == backward.hexdigest() == expect
    with ShardedWriter(tmp_path, "m", max_shard_bytes=20_000) as w:
        for n, t in ts.items():
            w.add(n, t)
    streamed = ContentHash()
    for n, t in open_checkpoint(tmp_path, prefix="m").iter_tensors():
        streamed.update(n, t)
    assert streamed.hexdigest() == expect
    changed = ContentHash()
    for n, t in ts.items():
        changed.update(n, t.clone().index_fill_(0, torch.tensor([0]), 0) if n == "layers.0.w" else t)
    assert changed.hexdigest() != expect
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
