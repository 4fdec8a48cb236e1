"""`trace-transfer tiny-model`: write a small random HF model directory (offline)."""

from __future__ import annotations

import click


@click.command("tiny-model")
@click.option("--arch", required=True, help="Family: llama, qwen2, qwen3, mistral, gemma2, gemma3, phi3, gpt2, "
                                            "gpt_neox, qwen2_moe, qwen3_moe, mixtral.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--kv-heads", type=int, default=2, show_default=True, help="Key/value heads (GQA families).")
@click.option("--intermediate", type=int, default=None, help="MLP width [default: ~8/3·hidden, 4·hidden for GPT-2/NeoX].")
@click.option("--tokenizer", type=click.Choice(["char", "bpe"]), default="char", show_default=True,
              help="char: one token per printable ASCII character; bpe: byte-level BPE trained on the synthetic tasks.")
@click.option("--vocab-size", type=int, default=None, help="Embedding rows (bpe: also its trained size, default 384).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weight initialisation.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out directory.")
def command(arch, out_dir, layers, hidden, heads, kv_heads, intermediate, tokenizer, vocab_size, seed, overwrite):
    """Build a tiny, randomly initialised model of family ARCH and save it as a HF model directory
    (config.json, model.safetensors, tokenizer, trace_transfer.json provenance).

    \b
    Example:
      trace-transfer tiny-model --arch llama --out models/tiny-llama --layers 4 --hidden 128
      trace-transfer tiny-model --arch qwen3 --out models/tiny-qwen3 --layers 6 --hidden 192 --tokenizer bpe
    """
    from trace_transfer.models import build_tiny_model, load_model

    path = build_tiny_model(arch, out_dir, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                            intermediate=intermediate, tokenizer=tokenizer, seed=seed, vocab_size=vocab_size,
                            overwrite=overwrite)
    n = sum(p.numel() for p in load_model(path).parameters())
    click.echo(f"wrote {path}: {arch}, {layers} layers, hidden {hidden}, {tokenizer} tokenizer, {n:,} parameters")
