"""models.py: tiny model directories for every family, tiny tokenizers, loading and its errors."""

from __future__ import annotations

import json
import string

import pytest
import torch
from safetensors.torch import load_file

from trace_transfer.data import collate, load_task, tokenize_examples
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError
from trace_transfer.models import (
    PROVENANCE_FILE,
    available_archs,
    build_tiny_model,
    build_tokenizer,
    load_model,
    load_tokenizer,
)

# The families the product must cover (each has a rule file in trace_transfer/rules/families/): each must
# build offline and train a step.
REQUIRED = {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "qwen2_moe",
            "qwen3_moe", "mixtral"}


def test_all_required_archs_are_available():
    assert REQUIRED <= set(available_archs())


@pytest.mark.parametrize("arch", sorted(REQUIRED))
def test_every_arch_builds_loads_and_learns(arch, tmp_path):
    path = build_tiny_model(arch, tmp_path / arch, layers=2, hidden=32, heads=4, kv_heads=2, seed=1)
    model, tok = load_model(path), load_tokenizer(path)
    prov = json.loads((path / PROVENANCE_FILE).read_text())
    assert prov["arch"] == arch and prov["seed"] == 1 and prov["sizes"]["hidden"] == 32
    assert prov["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert "torch" in prov["versions"] and "transformers" in prov["versions"]
    assert model.config.num_hidden_layers == 2 if arch != "gpt2" else model.config.n_layer == 2
    # one optimizer step on real task tokens lowers the loss on that batch
    batch = collate(tokenize_examples(tok, load_task("synthetic:math").train_examples()[:8], 32), tok.pad_token_id)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(**batch).loss
    first.backward()
    opt.step()
    with torch.no_grad():
        assert model(**batch).loss.item() < first.item()


def test_qwen3_and_gemma_get_real_head_dim(tmp_path):
    # Their configs default head_dim to 128/256; a tiny model must use hidden // heads.
    for arch in ("qwen3", "gemma2"):
        m = load_model(build_tiny_model(arch, tmp_path / arch, hidden=32, heads=4))
        assert m.config.head_dim == 8
    assert tuple(load_model(tmp_path / "qwen3").model.layers[0].self_attn.q_norm.weight.shape) == (8,)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = load_file(build_tiny_model("llama", tmp_path / "a", hidden=32, seed=3) / "model.safetensors")
    b = load_file(build_tiny_model("llama", tmp_path / "b", hidden=32, seed=3) / "model.safetensors")
    c = load_file(build_tiny_model("llama", tmp_path / "c", hidden=32, seed=4) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_does_not_disturb_the_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("llama", tmp_path / "m", hidden=32)
    assert torch.equal(torch.rand(3), expected)


def test_char_tokenizer_round_trips_printable_ascii(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    text = string.printable[:95] + "\n\t"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character, BOS first
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_bpe_tokenizer_merges_and_round_trips(tiny_qwen3):
    tok = load_tokenizer(tiny_qwen3)
    assert 256 <= len(tok) <= 512
    for text in ("sum 3 4=", "a=3;b=7;a?", "Hello, World!\n", "dx abc?"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("sum 3 4=", add_special_tokens=False)["input_ids"]) < len("sum 3 4=")  # real merges


def test_bpe_is_deterministic():
    a, b = build_tokenizer("bpe", seed=0), build_tokenizer("bpe", seed=0)
    assert a.get_vocab() == b.get_vocab()


def test_vocab_size_pads_the_embedding(tmp_path):
    m = load_model(build_tiny_model("llama", tmp_path / "m", hidden=32, vocab_size=128))
    assert m.get_input_embeddings().weight.shape[0] == 128
    with pytest.raises(ConfigError, match="smaller than"):
        build_tiny_model("llama", tmp_path / "n", hidden=32, vocab_size=50)


def test_bad_sizes_and_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="available: .*llama"):
        build_tiny_model("nope", tmp_path / "x")
    with pytest.raises(ConfigError, match="not divisible by heads"):
        build_tiny_model("llama", tmp_path / "x", hidden=30, heads=4)
    with pytest.raises(ConfigError, match="kv_heads"):
        build_tiny_model("llama", tmp_path / "x", hidden=32, heads=4, kv_heads=3)
    with pytest.raises(ConfigError, match="char' or 'bpe"):
        build_tiny_model("llama", tmp_path / "x", tokenizer="word")


def test_existing_output_needs_overwrite(tmp_path):
    build_tiny_model("llama", tmp_path / "m", hidden=32, seed=0)
    with pytest.raises(ArtifactError, match="overwrite"):
        build_tiny_model("llama", tmp_path / "m", hidden=32)
    build_tiny_model("llama", tmp_path / "m", hidden=32, seed=5, overwrite=True)
    assert json.loads((tmp_path / "m" / PROVENANCE_FILE).read_text())["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="does not exist.*tiny-model"):
        load_model(tmp_path / "nope")
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ArtifactNotFoundError):
        load_model("./runs/nope")


def test_directory_without_config_is_an_artifact_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_unavailable_hub_id_is_a_clear_error():
    with pytest.raises(ArtifactNotFoundError, match="Hugging Face Hub"):
        load_model("trace-transfer-test/not-a-model", local_files_only=True)


def test_load_tokenizer_falls_back_to_eos_for_padding(tmp_path, tiny_llama):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.pad_token is not None


def test_dtype_by_name(tiny_llama):
    assert load_model(tiny_llama, dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(tiny_llama).dtype == torch.float32
