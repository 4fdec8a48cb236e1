"""Layer maps: planted correspondence, DP optimality, methods, stability, reverse map, I/O, registry."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from trace_transfer.cka import CKAResult, cka_matrix_from_features
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError
from trace_transfer.cka.layermap import (
    LayerMap,
    available_layer_mappers,
    get_layer_mapper,
    map_layers,
    register_layer_mapper,
)


def planted_layers(latents: np.ndarray, depths: np.ndarray, width: int, rng, bandwidth=0.06, noise=0.5):
    """Features whose content drifts smoothly with relative depth: layer u mixes latent blocks whose
    centre is near u, seen through its own random orthogonal map plus isotropic noise."""
    bumps, n, rank = latents.shape
    centres = np.linspace(0, 1, bumps)
    out = []
    for u in depths:
        w = np.exp(-((u - centres) ** 2) / (2 * bandwidth**2))
        Z = (w[:, None, None] * latents).transpose(1, 0, 2).reshape(n, bumps * rank)
        Q, _ = np.linalg.qr(rng.standard_normal((width, bumps * rank)))
        scale = np.sqrt((Z**2).sum() / (n * width))
        out.append(Z @ Q.T + noise * scale * rng.standard_normal((n, width)))
    return out


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((16, 160, 2))
    src = planted_layers(latents, np.linspace(0, 1, 32), 40, rng)
    tgt = planted_layers(latents, np.linspace(0, 1, 48), 56, rng)
    return CKAResult.from_features(src, tgt)


def test_planted_32_to_48_recovered_in_order(planted):
    expected_fwd = np.rint(np.arange(32) * 47 / 31)
    expected_rev = np.rint(np.arange(48) * 31 / 47)
    lm = map_layers(planted, method="monotone")
    fwd = np.array([lm.forward[i] for i in range(32)])
    rev = np.array([lm.reverse[j] for j in range(48)])
    assert np.abs(fwd - expected_fwd).max() <= 1 and np.abs(rev - expected_rev).max() <= 1
    assert (np.diff(fwd) >= 0).all() and (np.diff(rev) >= 0).all()
    assert (fwd[0], fwd[-1], rev[0], rev[-1]) == (0, 47, 0, 31)
    for method in ("argmax", "hungarian"):
        f = np.array(list(map_layers(planted, method=method).forward.values()))
        assert np.abs(f - expected_fwd).max() <= 1


def _brute_force_monotone(sim):
    Ls, Lt = sim.shape
    best = None
    for path in itertools.combinations_with_replacement(range(Lt), Ls):
        if path[0] == 0 and path[-1] == Lt - 1:
            cost = sum(1 - sim[i, j] for i, j in enumerate(path))
            best = cost if best is None else min(best, cost)
    return best


def test_monotone_dp_is_optimal():
    rng = np.random.default_rng(3)
    monotone = get_layer_mapper("monotone")
    for _ in range(40):
        sim = rng.random((rng.integers(2, 6), rng.integers(1, 7)))
        path = monotone(sim)
        assert (np.diff(path) >= 0).all() and path[0] == 0 and path[-1] == sim.shape[1] - 1
        assert sum(1 - sim[i, j] for i, j in enumerate(path)) == pytest.approx(_brute_force_monotone(sim))


def test_hungarian_handles_unequal_depths():
    rng = np.random.default_rng(0)
    sim = rng.random((7, 3))
    fwd = get_layer_mapper("hungarian")(sim)
    assert len(fwd) == 7 and np.bincount(fwd, minlength=3).max() <= 3  # every target used at most ceil(7/3)
    rev = get_layer_mapper("hungarian")(sim.T)
    assert len(set(rev.tolist())) == 3  # one-to-one when the rows are fewer


def test_relative_depth_and_its_shortcut():
    lm = map_layers(np.zeros((4, 7)), method="relative-depth")
    assert lm.forward == {0: 0, 1: 2, 2: 4, 3: 6}
    assert lm.reverse == {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3}  # halves round up
    short = LayerMap.relative_depth(4, 7)
    assert short.forward == lm.forward and short.reverse == lm.reverse


def test_margins_and_single_layer_edge_cases():
    sim = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.7, 0.6, 0.65]])
    arg = map_layers(sim, method="argmax")
    assert [r.margin for r in arg.rows] == pytest.approx([0.4, 0.5, 0.05])
    mono = map_layers(sim, method="monotone")  # last row is pinned to the last target: below its argmax
    assert mono.forward == {0: 0, 1: 2, 2: 2}
    assert mono.rows[2].margin == pytest.approx(0.65 - 0.7) and mono.rows[2].cka == pytest.approx(0.65)
    one = map_layers(np.array([[0.1, 0.9, 0.2]]), method="monotone")
    assert one.forward == {0: 1} and one.reverse == {0: 0, 1: 0, 2: 0}
    col = map_layers(np.array([[0.3], [0.4]]), method="argmax")
    assert col.forward == {0: 0, 1: 0} and col.rows[0].margin is None


def test_bootstrap_stability(planted):
    lm = map_layers(planted, method="argmax", bootstrap=8, seed=1)
    stab = np.array([r.stability for r in lm.rows])
    assert ((0 <= stab) & (stab <= 1)).all() and stab.mean() > 0.5
    assert all(r.stability is not None for r in lm.reverse_rows)
    again = map_layers(planted, method="argmax", bootstrap=8, seed=1)
    assert [r.stability for r in again.rows] == stab.tolist()
    # Pure noise: the argmax of an unstructured matrix moves from resample to resample.
    rng = np.random.default_rng(0)
    noise = CKAResult.from_features([rng.standard_normal((40, 8)) for _ in range(4)],
                                    [rng.standard_normal((40, 8)) for _ in range(6)])
    noisy = map_layers(noise, method="argmax", bootstrap=20, seed=0)
    assert np.mean([r.stability for r in noisy.rows]) < stab.mean()
    assert lm.provenance["bootstrap"] == 8 and lm.provenance["cka"]["n"] == 160


def test_bootstrap_needs_kernels():
    with pytest.raises(ConfigError, match="needs a CKAResult"):
        map_layers(np.eye(3), bootstrap=5)
    res = CKAResult.from_features([np.random.randn(10, 3)], [np.random.randn(10, 3)], keep_kernels=False)
    with pytest.raises(ArtifactNotFoundError, match="--no-kernels"):
        map_layers(res, bootstrap=2)
    with pytest.raises(ConfigError, match="fraction"):
        map_layers(res, bootstrap=2, fraction=1.5)


def test_nan_rows_are_avoided_with_a_warning():
    sim = np.array([[0.9, 0.1, 0.2], [np.nan, np.nan, np.nan], [0.1, 0.2, 0.8]])
    with pytest.warns(RuntimeWarning, match="degenerate source layers \\[1\\]"):
        lm = map_layers(sim, method="argmax")
    assert lm.forward[0] == 0 and lm.forward[2] == 2 and lm.rows[1].cka is None
    assert lm.reverse[1] != 1


def test_save_load_round_trip(tmp_path, planted):
    lm = map_layers(planted, method="monotone", bootstrap=2)
    path = lm.save(tmp_path / "layer_map.json")
    data = json.loads(path.read_text())
    assert data["format"] == "trace-transfer/layer-map" and data["forward"]["31"] == 47
    assert set(data["rows"][0]) == {"source", "target", "cka", "margin", "stability"}
    back = LayerMap.load(path)
    assert back.forward == lm.forward and back.reverse == lm.reverse and back.rows == lm.rows
    assert all(isinstance(k, int) and isinstance(v, int) for k, v in back.forward.items())


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="map-layers"):
        LayerMap.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text(json.dumps({"forward": {"0": 0}}))
    with pytest.raises(ArtifactError, match="not a trace-transfer layer map"):
        LayerMap.load(tmp_path / "x.json")
    d = map_layers(np.eye(2), method="argmax").to_dict()
    d["rows"][1]["target"] = 5
    with pytest.raises(ArtifactError, match="target 5 out of range"):
        LayerMap.from_dict(d)


def test_registry():
    assert {"argmax", "monotone", "hungarian", "relative-depth"} <= set(available_layer_mappers())
    with pytest.raises(ConfigError, match="choose one of"):
        map_layers(np.eye(2), method="nearest")
    with pytest.raises(ConfigError, match="already registered"):
        register_layer_mapper("argmax", lambda s: s.argmax(1))

    @register_layer_mapper("test-first", description="always layer 0")
    def first(sim):
        return np.zeros(sim.shape[0], dtype=int)

    try:
        assert map_layers(np.eye(3), method="test-first").forward == {0: 0, 1: 0, 2: 0}
        register_layer_mapper("test-first", lambda s: np.full(s.shape[0], 9), overwrite=True)
        with pytest.raises(ConfigError, match="must return 3 integer indices"):
            map_layers(np.eye(3), method="test-first")
    finally:
        from trace_transfer.cka import layermap

        layermap.LAYER_MAPPERS.unregister("test-first")


def test_planted_matrix_from_features_matches_result(planted):
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((4, 20, 2))
    src = planted_layers(latents, np.linspace(0, 1, 3), 10, rng)
    tgt = planted_layers(latents, np.linspace(0, 1, 4), 12, rng)
    np.testing.assert_array_equal(CKAResult.from_features(src, tgt).matrix, cka_matrix_from_features(src, tgt))


# --------------------------------------------------------------------------------------------------
# Verdict: is the CKA informative?
# --------------------------------------------------------------------------------------------------


def test_verdict_is_informative_for_a_planted_correspondence(planted):
    lm = map_layers(planted, method="monotone", bootstrap=5)
    assert lm.informative is True, lm.verdict
    assert lm.verdict["path_gain"] >= lm.verdict["threshold"] >= 0.05
    again = LayerMap.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert again.verdict == lm.verdict


def test_flat_cka_verdict_fires_for_two_independently_initialised_models(tmp_path):
    from trace_transfer.cka import compute_cka, load_probe_texts
    from trace_transfer.models import build_tiny_model

    a = build_tiny_model("llama", tmp_path / "a", layers=3, hidden=32, heads=4, kv_heads=2, tokenizer="char", seed=0)
    b = build_tiny_model("qwen3", tmp_path / "b", layers=4, hidden=48, heads=4, kv_heads=2, tokenizer="bpe", seed=1)
    res = compute_cka(a, b, load_probe_texts("general")[:96], tmp_path / "cka", progress=False)
    lm = map_layers(res, method="monotone", bootstrap=5)
    assert lm.informative is False, lm.verdict
    assert "path gain" in lm.verdict["reason"]
