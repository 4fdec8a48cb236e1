"""``--strategy spectrum``: Spectrum's SNR against an independent numpy reference, and its per-type selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trace_transfer.errors import ConfigError
from trace_transfer.scoring import score
from trace_transfer.scoring.spectrum import module_type, spectrum_snr


def _reference_snr(w: np.ndarray) -> float:
    """cognitivecomputations/spectrum spectrum.py, in numpy: IQR noise scale, Marchenko-Pastur edge,
    signal/noise sums of singular values, divided by the largest."""
    w = np.atleast_2d(w).astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    sigma = (np.percentile(s, 75) - np.percentile(s, 25)) / 1.349
    n, m = w.shape
    beta = n / m if n < m else m / n
    tau = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    signal = s[s > tau].sum() if (s > tau).any() else 0.0
    noise = s[s <= tau].sum() if (s <= tau).any() else 1.0
    return (signal / noise) / s[0]


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16), (24,)])
def test_snr_matches_numpy_reference(shape):
    rng = np.random.default_rng(7)
    w = rng.standard_normal(shape)
    if len(shape) == 2:  # a low-rank signal on top of noise, so both sums are non-trivial
        w += 3 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1])) / np.sqrt(shape[1])
    assert spectrum_snr(torch.from_numpy(w)) == pytest.approx(_reference_snr(w), rel=1e-12)


def test_module_type_follows_spectrum():
    assert module_type("model.layers.3.mlp.up_proj.weight") == "mlp.up_proj"
    assert module_type("model.layers.10.self_attn.q_proj.bias") == "self_attn.q_proj"
    assert module_type("lm_head.weight") == "lm_head"


@pytest.fixture
def spectrum_probe(tiny_llama, tmp_path):
    from trace_transfer.checkpoint import open_checkpoint

    reader = open_checkpoint(tiny_llama)
    d = tmp_path / "probe"
    d.mkdir()
    save_file({n: torch.zeros(reader.shape(n)) for n in reader.names()}, str(d / "delta.safetensors"))
    (d / "probe.json").write_text(json.dumps({"task": "t", "model_path": str(tiny_llama)}))
    return d, reader


def test_spectrum_takes_the_top_share_of_every_module_type(spectrum_probe):
    d, reader = spectrum_probe
    # scope "layers": 9 module types x 2 layers; ratio 0.5 keeps one matrix of each type, as Spectrum's
    # per-type top 50 % does
    cs = score([d], "spectrum", 0.5, granularity="tensor")["t"]
    snr = cs.metadata["spectrum_snr_ratio"]
    by_type: dict[str, list[str]] = {}
    for n in snr:
        by_type.setdefault(module_type(n), []).append(n)
    assert len(by_type) == 9 and all(len(m) == 2 for m in by_type.values())
    for typ, members in by_type.items():
        chosen = [n for n in members if cs.num_selected(n)]
        assert len(chosen) == 1, typ
        if "norm" not in typ:  # norm vectors all have snr_ratio 1 (one singular value): a tie
            assert chosen == [max(members, key=lambda n: snr[n])], typ
    assert snr["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(
        _reference_snr(reader.get("model.layers.0.self_attn.q_proj.weight").numpy()), rel=1e-9)


def test_spectrum_below_tensor_granularity_fills_the_budget_matrix_by_matrix(spectrum_probe):
    d, _ = spectrum_probe
    whole = score([d], "spectrum", 0.5, granularity="tensor")["t"]
    rows = score([d], "spectrum", 0.3, granularity="row")["t"]
    partial = [n for n in rows.names() if rows.num_selected(n) < np.prod(rows.shape(n))]
    assert len(partial) <= 1  # whole matrices, the last one partly
    assert set(rows.names()) - set(partial) <= set(whole.names())
    with pytest.raises(ConfigError, match="--granularity tensor"):
        score([d], "spectrum", 0.5, granularity="element")
