"""Transplantation: exact copies of core elements, collision rules, per-tensor collision counts."""

from __future__ import annotations

import pytest
import torch

from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.surgery.transplant import transplant_state_dict, transplant_tensor


def _masks():
    m1 = torch.zeros(4, 4, dtype=torch.bool)
    m2 = torch.zeros(4, 4, dtype=torch.bool)
    m1[0, :] = True   # donor 1 owns row 0
    m2[1, :] = True   # donor 2 owns row 1
    m1[2, :2] = True  # both own (2, 0) and (2, 1): collisions
    m2[2, :2] = True
    return m1, m2


def test_exact_copy_without_collisions():
    g = torch.Generator().manual_seed(0)
    backbone = torch.randn(4, 4, generator=g)
    d1, d2 = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    m1 = torch.zeros(4, 4, dtype=torch.bool)
    m2 = torch.zeros(4, 4, dtype=torch.bool)
    m1[0], m2[3, 1:] = True, True
    out, st = transplant_tensor(backbone, [d1, d2], [m1, m2])
    assert torch.equal(out[0], d1[0])
    assert torch.equal(out[3, 1:], d2[3, 1:])
    rest = ~(m1 | m2)
    assert torch.equal(out[rest], backbone[rest])
    assert st["core"] == 7 and st["collisions"] == 0 and st["from_donor"] == [4, 3]
    assert torch.equal(backbone, backbone.clone())  # input untouched


def test_collision_rules():
    backbone = torch.zeros(4, 4)
    d1, d2 = torch.full((4, 4), 1.0), torch.full((4, 4), 2.0)
    m1, m2 = _masks()
    s1 = torch.zeros(4, 4)
    s2 = torch.zeros(4, 4)
    s1[2, 0], s2[2, 0] = 0.9, 0.1   # donor 1 scores higher at (2, 0)
    s1[2, 1], s2[2, 1] = 0.2, 0.8   # donor 2 at (2, 1)

    first, st = transplant_tensor(backbone, [d1, d2], [m1, m2], rule="first")
    assert first[2, 0] == 1 and first[2, 1] == 1 and first[1, 3] == 2 and first[3, 3] == 0
    assert st["collisions"] == 2 and st["conflicts"] == 2 and st["resolved_by"] == "first"
    assert st["from_donor"] == [6, 4]

    last, st = transplant_tensor(backbone, [d1, d2], [m1, m2], rule="last")
    assert last[2, 0] == 2 and last[2, 1] == 2 and last[0, 0] == 1

    scored, st = transplant_tensor(backbone, [d1, d2], [m1, m2], [s1, s2], rule="score")
    assert scored[2, 0] == 1 and scored[2, 1] == 2 and st["resolved_by"] == "score"

    # auto: score when every colliding donor has scores, else first listed.
    auto, st = transplant_tensor(backbone, [d1, d2], [m1, m2], [s1, s2])
    assert torch.equal(auto, scored) and st["resolved_by"] == "score"
    auto, st = transplant_tensor(backbone, [d1, d2], [m1, m2], [s1, None])
    assert torch.equal(auto, first) and st["resolved_by"] == "first"

    with pytest.raises(ConfigError, match="collide on 2 elements"):
        transplant_tensor(backbone, [d1, d2], [m1, m2], rule="error", name="w")
    with pytest.raises(ConfigError, match="no scores"):
        transplant_tensor(backbone, [d1, d2], [m1, m2], [s1, None], rule="score")
    with pytest.raises(ConfigError, match="unknown"):
        transplant_tensor(backbone, [d1, d2], [m1, m2], rule="best")


def test_equal_values_collide_without_conflict():
    backbone = torch.zeros(3)
    d = torch.tensor([1.0, 2.0, 3.0])
    m = torch.tensor([True, True, False])
    out, st = transplant_tensor(backbone, [d, d.clone()], [m, m])
    assert torch.equal(out, torch.tensor([1.0, 2.0, 0.0]))
    assert st["collisions"] == 2 and st["conflicts"] == 0


def test_bf16_bits_copied_exactly_including_negative_zero_and_nan():
    backbone = torch.zeros(4, dtype=torch.bfloat16)
    donor = torch.tensor([-0.0, float("nan"), 1.5, 7.0], dtype=torch.bfloat16)
    out, _ = transplant_tensor(backbone, [donor], [torch.tensor([True, True, True, False])])
    assert torch.equal(out.view(torch.int16)[:3], donor.view(torch.int16)[:3])
    assert out[3] == 0 and out.dtype == torch.bfloat16


def test_shape_mismatch():
    with pytest.raises(ModelMismatchError):
        transplant_tensor(torch.zeros(3), [torch.zeros(4)], [torch.ones(4, dtype=torch.bool)])


def test_state_dict_with_coresets_and_row_scores():
    shapes = {"a": (4, 3), "b": (5,)}
    backbone = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}
    donor1 = {"a": torch.ones(4, 3), "b": torch.ones(5)}
    donor2 = {"a": torch.full((4, 3), 2.0), "b": torch.full((5,), 2.0)}
    rows = UnitLayout.rows()
    cs1 = CoreSet.from_unit_masks({"a": torch.tensor([1, 1, 0, 0], dtype=torch.bool)}, {"a": rows}, shapes,
                                  scores={"a": torch.tensor([0.9, 0.1, 0.0, 0.0])}, metadata={"task": "t1"})
    cs2 = CoreSet.from_unit_masks({"a": torch.tensor([0, 1, 1, 0], dtype=torch.bool)}, {"a": rows}, shapes,
                                  scores={"a": torch.tensor([0.0, 0.8, 0.5, 0.0])}, metadata={"task": "t2"})
    out, stats = transplant_state_dict(backbone, [donor1, donor2], [cs1, cs2])
    # Row 1 is core for both; donor 2's score is higher there.
    assert torch.equal(out["a"][:, 0], torch.tensor([1.0, 2.0, 2.0, 0.0]))
    assert torch.equal(out["b"], backbone["b"])
    assert stats.colliding_tensors() == ["a"]
    assert stats.totals()["collisions"] == 3 and stats.totals()["core"] == 9
    out, _ = transplant_state_dict(backbone, [donor1, donor2], [cs1, cs2], rule="first")
    assert torch.equal(out["a"][:, 0], torch.tensor([1.0, 1.0, 2.0, 0.0]))
