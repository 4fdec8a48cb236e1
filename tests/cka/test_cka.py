"""CKA: golden values, invariances, all-pairs route, activation capture and the `cka` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trace_transfer.cka.kernels import (
    CKAResult,
    capture_pooled_activations,
    cka,
    cka_matrix,
    cka_matrix_from_features,
    compute_cka,
    kernel_matrix,
    linear_cka_features,
    load_probe_texts,
    shipped_probe_sets,
)
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError

VARIANTS = ["linear", "linear-debiased", "rbf", "rbf-debiased"]
TEXTS = load_probe_texts("general,code", max_probes=200)[::5] + ["Short.", "x"]


# --------------------------------------------------------------------------------------------------
# Tiny models with different tokenizers, depths and widths, built offline from configs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """name -> (model dir, loaded model, tokenizer). Llama/char vs Qwen3/BPE, plus an independent
    Llama and a GPT-2 (absolute positions, for the padding test)."""
    from trace_transfer.models import build_tiny_model, load_model, load_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cka_models")
    out = {}
    for name, arch, tokenizer, layers, hidden, seed in (("llama", "llama", "char", 3, 32, 0),
                                                        ("qwen3", "qwen3", "bpe", 4, 48, 1),
                                                        ("llama_b", "llama", "char", 3, 32, 7),
                                                        ("gpt2", "gpt2", "char", 2, 32, 3)):
        path = build_tiny_model(arch, root / name, layers=layers, hidden=hidden, heads=4, kv_heads=2,
                                tokenizer=tokenizer, seed=seed)
        out[name] = (path, load_model(path), load_tokenizer(path))
    return out


# --------------------------------------------------------------------------------------------------
# CKA mathematics
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_xy():
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    return X, Y


@pytest.mark.parametrize(("variant", "expected"), [("linear", 0.55761), ("rbf", 0.65483), ("linear-debiased", 0.51346)])
def test_golden_values(golden_xy, variant, expected):
    assert cka(*golden_xy, variant=variant) == pytest.approx(expected, abs=5e-6)


def test_default_variant_is_debiased(golden_xy):
    assert cka(*golden_xy) == pytest.approx(0.51346, abs=5e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_self_similarity_is_one(golden_xy, variant):
    X, _ = golden_xy
    assert cka(X, X, variant=variant) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_invariant_to_orthogonal_map_isotropic_scale_and_translation(golden_xy, variant):
    X, Y = golden_xy
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    base = cka(X, Y, variant=variant)
    transformed = 3.7 * (Y @ Q) + rng.standard_normal(10) * 50.0
    assert cka(X, transformed, variant=variant) == pytest.approx(base, abs=1e-9)
    assert cka(0.01 * X - 4.0, Y, variant=variant) == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("variant", ["linear", "linear-debiased"])
def test_not_invariant_to_random_invertible_map(golden_xy, variant):
    X, _ = golden_xy
    rng = np.random.default_rng(1)
    A = rng.standard_normal((10, 10)) @ np.diag(np.logspace(0, 2, 10))  # invertible, far from orthogonal
    assert abs(np.linalg.det(A)) > 1e-6
    assert cka(X, X @ A, variant=variant) < 0.95


@pytest.mark.parametrize("n,d", [(100, 10), (40, 300)])
def test_gram_route_equals_feature_route(n, d):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, d))
    Y = X[:, : d // 2] @ rng.standard_normal((d // 2, d)) + rng.standard_normal((n, d))
    assert cka(X, Y, "linear") == pytest.approx(linear_cka_features(X, Y, debiased=False), abs=1e-12)
    assert cka(X, Y, "linear-debiased") == pytest.approx(linear_cka_features(X, Y, debiased=True), abs=1e-12)


def test_biased_is_inflated_when_n_below_d_and_debiased_is_not():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((64, 1024)), rng.standard_normal((64, 1024))
    assert cka(X, Y, "linear") > 0.8  # independent data, yet "similar": biased CKA drifts toward 1 when n < d
    assert abs(cka(X, Y, "linear-debiased")) < 0.1


def test_float32_with_large_offset_matches_float64():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 30))
    Y = X @ rng.standard_normal((30, 20)) + rng.standard_normal((200, 20))
    X32, Y32 = (X + 1e3).astype(np.float32), (Y - 5e3).astype(np.float32)
    for variant in VARIANTS:
        # Upcast before centering: the float32 inputs give exactly the float64 answer on their values...
        assert cka(X32, Y32, variant) == pytest.approx(cka(X32.astype(np.float64), Y32.astype(np.float64), variant),
                                                       abs=1e-12)
        # ...and the offset costs only float32 rounding of the inputs.
        assert cka(X32, Y32, variant) == pytest.approx(cka(X, Y, variant), abs=1e-3)


def test_all_pairs_matrix_matches_pairwise_and_streaming_chunks():
    rng = np.random.default_rng(0)
    src = [rng.standard_normal((50, 8)) for _ in range(3)]
    tgt = [src[i % 3] @ rng.standard_normal((8, 12)) + rng.standard_normal((50, 12)) for i in range(5)]
    for variant in VARIANTS:
        M = cka_matrix_from_features(src, tgt, variant)
        pairwise = np.array([[cka(a, b, variant) for b in tgt] for a in src])
        np.testing.assert_allclose(M, pairwise, atol=1e-12)
    debiased = [kernel_matrix(X) for X in tgt]
    full = cka_matrix([kernel_matrix(X) for X in src], debiased, chunk=100).matrix
    lazy = cka_matrix((kernel_matrix(X) for X in src), iter(debiased), chunk=1).matrix
    np.testing.assert_allclose(lazy, full, atol=1e-14)


def test_zero_norm_layer_gives_nan_with_warning():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4))
    with pytest.warns(RuntimeWarning, match="source layer 1 has a zero-norm"):
        M = cka_matrix_from_features([X, np.ones((20, 4))], [X], "linear")
    assert M[0, 0] == pytest.approx(1.0) and np.isnan(M[1, 0])


def test_bad_inputs_raise_actionable_errors():
    with pytest.raises(ConfigError, match="choose one of"):
        cka(np.ones((5, 2)), np.ones((5, 2)), variant="cosine")
    with pytest.raises(ConfigError, match="same number of samples"):
        cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ConfigError, match="at least 4 samples"):
        cka(np.eye(3), np.eye(3))


def test_result_from_features_recompute_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    src = [rng.standard_normal((30, 6)) for _ in range(2)]
    tgt = [src[1] @ rng.standard_normal((6, 9)), rng.standard_normal((30, 9)), src[0] + 0.1]
    res = CKAResult.from_features(src, tgt)
    np.testing.assert_allclose(res.recompute(np.arange(30)), res.matrix, atol=1e-6)  # kernels kept as float32
    sub = np.arange(0, 30, 2)
    expected = cka_matrix_from_features([X[sub] for X in src], [Y[sub] for Y in tgt])
    np.testing.assert_allclose(res.recompute(sub), expected, atol=1e-6)
    res.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"cka.safetensors", "cka.json", "cka.png", "kernels.safetensors"}
    back = CKAResult.load(tmp_path)
    np.testing.assert_array_equal(back.matrix, res.matrix)
    assert back.variant == "linear-debiased" and back.n == 30 and back.num_target_layers == 3
    np.testing.assert_allclose(back.recompute(sub), expected, atol=1e-6)
    meta = json.loads((tmp_path / "cka.json").read_text())
    assert meta["best_target_per_source"] == [2, 0]


def test_load_missing_or_foreign_file(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="trace-transfer cka"):
        CKAResult.load(tmp_path)
    from safetensors.numpy import save_file

    save_file({"matrix": np.eye(2)}, str(tmp_path / "cka.safetensors"))
    with pytest.raises(ArtifactError, match="not a trace-transfer CKA file"):
        CKAResult.load(tmp_path)


# --------------------------------------------------------------------------------------------------
# Probe texts
# --------------------------------------------------------------------------------------------------


def test_shipped_probe_sets_are_real_and_varied():
    assert set(shipped_probe_sets()) >= {"general", "math", "code", "medical"}
    total = 0
    for name in shipped_probe_sets():
        texts = load_probe_texts(name)
        assert len(texts) >= 100 and len(set(texts)) == len(texts)
        assert len({" ".join(t.split()[:3]) for t in texts}) > 0.9 * len(texts)  # not one template repeated
        total += len(texts)
    assert len(load_probe_texts("all")) == total >= 400


def test_probe_references(tmp_path, monkeypatch):
    assert load_probe_texts("probes/math.jsonl") == load_probe_texts("math")
    assert load_probe_texts("general,math", max_probes=150)[100:] == load_probe_texts("math")[:50]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_probe_texts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"text": "ok", "domain": "x"}\n{"txt": "typo"}\n')
    with pytest.raises(ArtifactError, match=r"p.jsonl:2: expected an object"):
        load_probe_texts(tmp_path / "p.jsonl")
    with pytest.raises(ArtifactNotFoundError, match="shipped sets"):
        load_probe_texts("no_such_probes")
    with pytest.raises(ConfigError, match="hf:<id>:<split>:<field>"):
        load_probe_texts("hf:only-id")

    import datasets

    def fake_load(name, config=None, split=None):
        assert (name, config, split) == ("someone/corpus", None, "validation")
        return datasets.Dataset.from_dict({"sentence": ["a b", "", "c d"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_probe_texts("hf:someone/corpus:validation:sentence") == ["a b", "c d"]
    with pytest.raises(ConfigError, match="fields: \\['sentence'\\]"):
        load_probe_texts("hf:someone/corpus:validation:text")


# --------------------------------------------------------------------------------------------------
# Activation capture
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_left_and_right_padding_pool_the_same(tiny, name, pooling):
    _, model, tok = tiny[name]
    texts = TEXTS[:12]
    right = capture_pooled_activations(model, tok, texts, batch_size=6, pooling=pooling, padding_side="right")
    left = capture_pooled_activations(model, tok, texts, batch_size=6, pooling=pooling, padding_side="left")
    alone = capture_pooled_activations(model, tok, texts, batch_size=1, pooling=pooling)  # no padding at all
    assert right.shape == (model.config.num_hidden_layers, 12, model.config.hidden_size)
    np.testing.assert_allclose(left, right, atol=1e-5)
    np.testing.assert_allclose(alone, right, atol=1e-5)
    assert tok.padding_side == "right"  # restored after the left-padded run


def test_pooling_excludes_special_tokens_and_uses_block_outputs(tiny):
    _, model, tok = tiny["llama"]
    text = TEXTS[0]
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.bos_token_id
    with torch.no_grad():
        model.config.tie_last_hidden_states = False
        hs = model(**enc, output_hidden_states=True).hidden_states
        del model.config.tie_last_hidden_states
    pooled = capture_pooled_activations(model, tok, [text])
    for layer in range(model.config.num_hidden_layers):
        expected = hs[layer + 1][0, 1:].double().mean(0).numpy()  # block output, BOS left out
        np.testing.assert_allclose(pooled[layer, 0], expected, atol=1e-6)
    with_bos = capture_pooled_activations(model, tok, [text], exclude_special=False)
    assert not np.allclose(with_bos, pooled)
    last = capture_pooled_activations(model, tok, [text], pooling="last")
    np.testing.assert_allclose(last[-1, 0], hs[-1][0, -1].double().numpy(), atol=1e-6)
    assert not hasattr(model.config, "tie_last_hidden_states") or model.config.tie_last_hidden_states is None


def test_text_with_nothing_to_pool_is_an_error(tiny):
    _, model, tok = tiny["llama"]
    with pytest.raises(ConfigError, match="probe text #1"):
        capture_pooled_activations(model, tok, ["fine text", "<bos>"])


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_different_tokenizers_streaming_equals_in_memory(tiny, tmp_path):
    src_dir, src_model, src_tok = tiny["llama"]
    tgt_dir, tgt_model, tgt_tok = tiny["qwen3"]
    assert src_tok.get_vocab() != tgt_tok.get_vocab()
    res = compute_cka(src_dir, tgt_dir, TEXTS, tmp_path / "out", batch_size=3, progress=False)
    assert res.matrix.shape == (3, 4) and np.isfinite(res.matrix).all()
    assert (res.source_dim, res.target_dim, res.n) == (32, 48, len(TEXTS))
    feats_s = capture_pooled_activations(src_model, src_tok, TEXTS, batch_size=len(TEXTS))
    feats_t = capture_pooled_activations(tgt_model, tgt_tok, TEXTS, batch_size=len(TEXTS))
    np.testing.assert_allclose(res.matrix, cka_matrix_from_features(feats_s, feats_t), atol=1e-6)
    assert not any(p.name.startswith(".cka-features") for p in (tmp_path / "out").iterdir())  # spill removed
    meta = json.loads((tmp_path / "out" / "cka.json").read_text())
    assert meta["source"]["model_type"] == "llama" and meta["target"]["num_layers"] == 4
    assert meta["probes"]["n"] == len(TEXTS) and meta["variant"] == "linear-debiased" and "versions" in meta


def test_independent_models_are_not_all_similar(tiny):
    _, a, tok = tiny["llama"]
    _, b, _ = tiny["llama_b"]
    texts = load_probe_texts("all")[::4]
    res = compute_cka(a, b, texts, source_tokenizer=tok, target_tokenizer=tok, variant="linear", progress=False)
    assert res.matrix.max() < 0.9 and res.matrix.mean() < 0.6
    same = compute_cka(a, a, texts[:40], source_tokenizer=tok, target_tokenizer=tok, progress=False)
    np.testing.assert_allclose(np.diag(same.matrix), 1.0, atol=1e-9)


def test_cli_cka_and_map_layers(tiny, tmp_path):
    from click.testing import CliRunner

    from trace_transfer.cli import main

    runner = CliRunner()
    out = tmp_path / "cka"
    result = runner.invoke(main, ["cka", "--source", str(tiny["llama"][0]), "--target", str(tiny["qwen3"][0]),
                                  "--probes", "general,math", "--max-probes", "48", "--out", str(out),
                                  "--batch-size", "16", "--variant", "linear"])
    assert result.exit_code == 0, result.output
    assert "best target" in result.output
    res = CKAResult.load(out)
    assert res.matrix.shape == (3, 4) and res.variant == "linear" and res.n == 48
    result = runner.invoke(main, ["map-layers", "--cka", str(out), "--method", "monotone", "--bootstrap", "5",
                                  "--out", str(tmp_path / "layer_map.json")])
    assert result.exit_code == 0, result.output
    lm = json.loads((tmp_path / "layer_map.json").read_text())
    assert lm["forward"]["0"] == 0 and lm["forward"]["2"] == 3 and len(lm["reverse"]) == 4
    assert all(0.0 <= r["stability"] <= 1.0 for r in lm["rows"])
    bad = runner.invoke(main, ["map-layers", "--cka", str(out), "--method", "nearest", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "choose one of" in bad.output
    help_text = runner.invoke(main, ["cka", "--help"]).output
    assert "Example" in help_text and "--variant" in help_text


def test_tokenizer_without_pad_token_is_restored(tiny):
    _, model, tok = tiny["gpt2"]
    saved = tok.pad_token
    tok.pad_token = None
    try:
        feats = capture_pooled_activations(model, tok, TEXTS[:5], batch_size=5)
        assert np.isfinite(feats).all() and tok.pad_token is None
    finally:
        tok.pad_token = saved


def test_rbf_end_to_end_and_copy_to_new_directory(tiny, tmp_path):
    _, model, tok = tiny["llama"]
    res = compute_cka(model, model, TEXTS[:20], tmp_path / "a", source_tokenizer=tok, target_tokenizer=tok,
                      variant="rbf", pooling="last", progress=False)
    np.testing.assert_allclose(np.diag(res.matrix), 1.0, atol=1e-9)
    assert json.loads((tmp_path / "a" / "cka.json").read_text())["rbf_sigma"] == 0.5
    loaded = CKAResult.load(tmp_path / "a" / "cka.safetensors")
    loaded.save(tmp_path / "b")
    again = CKAResult.load(tmp_path / "b")
    np.testing.assert_allclose(again.recompute(np.arange(20)), res.matrix, atol=1e-5)
    with pytest.raises(ConfigError, match="without its tokenizer"):
        compute_cka(model, model, TEXTS[:20], progress=False)
