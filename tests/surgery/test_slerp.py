"""SLERP / LERP against hand computations: endpoints, midpoint, parallel fallback, weights, per-row, masks."""

from __future__ import annotations

import math

import pytest
import torch

from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.surgery.slerp import lerp, lerp_many, normalize_weights, slerp, slerp_many

R2 = math.sqrt(0.5)


def close(x, y, tol=1e-6):
    return torch.allclose(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64), atol=tol)


def test_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    assert torch.equal(slerp(a, b, 0.0, per_row=True), a)
    assert torch.equal(slerp(a, b, 1.0, per_row=True), b)


def test_orthogonal_unit_vectors_hand_computed():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # theta = pi/2, sin(theta) = 1: weights are sin((1-t) pi/2) and sin(t pi/2).
    assert close(slerp(a, b, 0.5), [R2, R2])
    assert close(slerp(a, b, 0.25), [math.sin(3 * math.pi / 8), math.sin(math.pi / 8)])
    # The result stays on the unit circle, where lerp would cut the chord.
    assert close(torch.linalg.vector_norm(slerp(a, b, 0.3)), 1.0)
    assert close(torch.linalg.vector_norm(lerp(a, b, 0.5)), R2)


def test_sixty_degrees_and_unequal_norms():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    # theta = pi/3: weights sin(pi/6)/sin(pi/3) each -> the unit vector at 30 degrees.
    assert close(slerp(a, b, 0.5), [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    # The angle comes from the normalised vectors; the weights scale the unnormalised ones.
    a2, b2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    assert close(slerp(a2, b2, 0.5), [2 * R2, R2])


def test_nearly_parallel_falls_back_to_lerp():
    a = torch.tensor([1.0, 2.0, 3.0])
    info: dict = {}
    assert close(slerp(a, 2 * a, 0.25, info=info), 1.25 * a)
    assert info == {"rows": 1, "fallback_rows": 1}
    assert close(slerp(a, -a, 0.5), torch.zeros(3))            # antiparallel: lerp, no division by sin(pi)
    assert close(slerp(a, torch.zeros(3), 0.5), 0.5 * a)       # zero vector: no angle, lerp
    # cos = 0.9996 > 0.9995 -> exactly lerp; cos = 0.999 -> real slerp, off the chord.
    for cos, expect_lerp in ((0.9996, True), (0.999, False)):
        u, v = torch.tensor([1.0, 0.0]), torch.tensor([cos, math.sqrt(1 - cos * cos)])
        out = slerp(u, v, 0.5)
        assert torch.allclose(out, lerp(u, v, 0.5), atol=0, rtol=0) is expect_lerp
        if not expect_lerp:
            assert close(torch.linalg.vector_norm(out), 1.0)


def test_per_row_vs_per_tensor():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    info: dict = {}
    per_row = slerp(a, b, 0.5, per_row=True, info=info)
    assert close(per_row, [[R2, R2], [1.0, 0.0]])  # row 0 orthogonal, row 1 identical (fallback)
    assert info == {"rows": 2, "fallback_rows": 1}
    # One angle for the whole tensor: cos = 1/2, theta = pi/3, both weights 1/sqrt(3).
    w = 0.5 / math.sin(math.pi / 3)
    assert close(slerp(a, b, 0.5), w * (a + b))
    # A vector is a single row either way.
    v1, v2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(slerp(v1, v2, 0.3, per_row=True), slerp(v1, v2, 0.3))


def test_weighted_many_models():
    a = torch.tensor([1.0, 2.0, 3.0])
    parallel = [a, 2 * a, 4 * a]
    # Parallel vectors: pairwise SLERP reduces to the weighted linear average.
    assert close(slerp_many(parallel, [1, 2, 1]), (1 * a + 4 * a + 4 * a) / 4)
    x1, x2, x3 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    assert torch.equal(slerp_many([x1, x2, x3], [0, 0, 1]), x3)
    assert torch.equal(slerp_many([x1, x2, x3], [1, 0, 0]), x1)
    # Two models with weights == slerp with t = w_b / (w_a + w_b).
    assert close(slerp_many([x1, x2], [3, 1]), slerp(x1, x2, 0.25))
    # Three models: iterative pairwise with cumulative weights.
    expect = slerp(slerp(x1, x2, 0.5), x3, 1 / 3)
    assert close(slerp_many([x1, x2, x3]), expect)
    assert close(torch.linalg.vector_norm(expect), 1.0)
    # nlerp: order-independent spherical weighted mean.
    fwd = slerp_many([x1, x2, x3], [1, 2, 3], method="nlerp")
    rev = slerp_many([x3, x2, x1], [3, 2, 1], method="nlerp")
    assert close(fwd, rev)
    assert close(fwd, torch.tensor([1.0, 2.0, 3.0]) / math.sqrt(14))


def test_mask_restricts_changes_and_the_angle():
    a, b = torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0.0, 1.0, 7.0])
    mask = torch.tensor([True, True, False])
    out = slerp(a, b, 0.5, mask=mask)
    # The angle is measured on the merged (masked) elements only: orthogonal there.
    assert close(out, [R2, R2, 5.0])
    inv = slerp(a, b, 0.5, mask=mask, invert_mask=True)
    assert torch.equal(inv[:2], a[:2])
    assert close(inv[2], 6.0)  # a single element: parallel -> lerp
    assert close(lerp(a, b, 0.5, mask=mask), [0.5, 0.5, 5.0])


def test_untouched_elements_bit_identical_in_bf16():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    b = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    mask = torch.rand(8, 16, generator=g) < 0.3
    out = slerp(a, b, 0.4, mask=mask, per_row=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16)[~mask], a.view(torch.int16)[~mask])
    # Computed in float32 and rounded once.
    ref = slerp(a.float(), b.float(), 0.4, mask=mask, per_row=True).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_integer_tensors_copied_and_lerp_many():
    ids = torch.arange(6)
    assert torch.equal(slerp(ids, ids + 1, 0.5), ids)
    x, y, z = torch.ones(3), 2 * torch.ones(3), 4 * torch.ones(3)
    assert close(lerp_many([x, y, z], [2, 1, 1]), torch.full((3,), 2.0))
    assert close(lerp(x, y, 0.25), torch.full((3,), 1.25))


def test_errors():
    a = torch.zeros(3)
    with pytest.raises(ConfigError, match="outside"):
        slerp(a, a, 1.5)
    with pytest.raises(ModelMismatchError):
        slerp(a, torch.zeros(4))
    with pytest.raises(ModelMismatchError):
        slerp(a, a, mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ConfigError, match="non-negative"):
        normalize_weights([1, -1], 2)
    with pytest.raises(ConfigError, match="one weight per model"):
        normalize_weights([1, 1, 1], 2)
    with pytest.raises(ConfigError, match="sum to zero"):
        normalize_weights([0, 0], 2)
    with pytest.raises(ConfigError, match="pairwise"):
        slerp_many([a, a], method="karcher")
