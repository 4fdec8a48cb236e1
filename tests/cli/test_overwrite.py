"""Commands that write an optional or secondary output refuse an existing one unless --force (issue 10)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.coreset import CoreSet


def _coreset(path, bit: int):
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[bit] = True
    cs = CoreSet.from_masks({"w": mask}, shapes={"w": (4, 3)}, metadata={"task": f"t{bit}"})
    return cs.save(path)


@pytest.fixture
def files(tmp_path):
    a = _coreset(tmp_path / "a.coreset.safetensors", 0)
    b = _coreset(tmp_path / "b.coreset.safetensors", 1)
    existing = tmp_path / "existing.coreset.safetensors"
    existing.write_bytes(b"not mine")
    return tmp_path, a, b, existing


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("argv", [
    ["coreset", "union", "{a}", "{b}", "--out", "{existing}"],
    ["coreset", "intersect", "{a}", "{b}", "--out", "{existing}"],
    ["coreset", "diff", "{a}", "{b}", "--out", "{existing}"],
    ["coreset", "complement", "{a}", "--out", "{existing}"],
    ["coreset", "union", "{a}", "{b}", "--out", "{stem}"],  # the suffix is appended, the check sees it
    ["cluster", "{a}", "{b}", "--out", "{existing}"],
    ["cluster", "{a}", "{b}", "--heatmap", "{existing}"],
    ["eval", "--model", "./no-such-model", "--task", "synthetic:math", "--out", "{existing}"],
    ["verify-frozen", "--base", "{a}", "--tuned", "{b}", "--coreset", "{a}", "--json", "{existing}"],
])
def test_existing_output_is_refused_and_kept(files, argv):
    tmp, a, b, existing = files
    before = _digest(existing)
    args = [x.format(a=a, b=b, existing=existing, stem=tmp / "existing") for x in argv]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert "already exists" in res.output and "--force" in res.output
    assert _digest(existing) == before


def test_force_overwrites(files):
    tmp, a, b, existing = files
    res = CliRunner().invoke(main, ["coreset", "union", str(a), str(b), "--out", str(existing), "--force"])
    assert res.exit_code == 0, res.output
    assert CoreSet.load(existing).num_selected() == 6
