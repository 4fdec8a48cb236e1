"""Ways to break an artifact in place (each returns a setup function for a battery case)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Setup = Callable[[Path], None]


def chain(*fns: Setup) -> Setup:
    def run(w: Path) -> None:
        for fn in fns:
            fn(w)
    return run


def truncate(rel: str, keep: float = 0.5) -> Setup:
    def run(w: Path) -> None:
        p = w / rel
        p.write_bytes(p.read_bytes()[: max(1, int(p.stat().st_size * keep))])
    return run


def write(rel: str, data: str | bytes) -> Setup:
    def run(w: Path) -> None:
        p = w / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return run


def remove(rel: str) -> Setup:
    def run(w: Path) -> None:
        p = w / rel
        if p.is_dir():
            import shutil
            shutil.rmtree(p)
        else:
            p.unlink()
    return run


def non_utf8(rel: str) -> Setup:
    """The file's text with one latin-1 byte in a comment: valid YAML once decoded, but not UTF-8."""
    def run(w: Path) -> None:
        p = w / rel
        p.write_bytes(b"# caf\xe9\n" + p.read_bytes())
    return run


def edit_text(rel: str, old: str, new: str) -> Setup:
    def run(w: Path) -> None:
        p = w / rel
        text = p.read_text()
        assert old in text, (old, rel)
        p.write_text(text.replace(old, new, 1))
    return run


def edit_json(rel: str, fn: Callable[[dict], None]) -> Setup:
    def run(w: Path) -> None:
        p = w / rel
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))
    return run


def _rewrite_safetensors(p: Path, tensors_fn=None, meta_fn=None) -> None:
    with safe_open(str(p), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    save_file(tensors, str(p), metadata=meta)


def st_header(rel: str, fn: Callable[[dict], None], key: str = "trace_transfer") -> Setup:
    """Edit the JSON stored under ``key`` in a safetensors file's metadata (the CoreSet header)."""
    def run(w: Path) -> None:
        def meta_fn(meta):
            d = json.loads(meta[key])
            fn(d)
            meta[key] = json.dumps(d)
        _rewrite_safetensors(w / rel, meta_fn=meta_fn)
    return run


def st_raw_header(rel: str, raw: str, key: str = "trace_transfer") -> Setup:
    def run(w: Path) -> None:
        _rewrite_safetensors(w / rel, meta_fn=lambda m: m.__setitem__(key, raw))
    return run


def st_tensors(rel: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> Setup:
    def run(w: Path) -> None:
        _rewrite_safetensors(w / rel, tensors_fn=fn)
    return run


def poison(rel: str, value: float, match: str = "mlp") -> Setup:
    """Set a few elements of the first tensor whose name contains ``match`` to ``value`` (NaN, Inf, -1)."""
    def fn(tensors):
        name = next(n for n in sorted(tensors) if match in n)
        t = tensors[name].clone()
        t.view(-1)[:3] = value
        tensors[name] = t
    return st_tensors(rel, fn)


def read_only(rel: str) -> Setup:
    def run(w: Path) -> None:
        p = w / rel
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return run


def is_root() -> bool:
    return os.geteuid() == 0
