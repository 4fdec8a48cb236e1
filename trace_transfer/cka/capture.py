"""Activation capture for CKA: one pooled vector per probe text and decoder layer.

Pooling per text (not per token) keeps two models with different tokenizers aligned sample by sample.
Pooled vectors are streamed batch by batch; `_FeatureStore` spills them to disk per layer so a large
probe set is never held in memory for all layers of a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trace_transfer.cka.variants import POOLINGS
from trace_transfer.errors import ArtifactError, ConfigError


@contextlib.contextmanager
def _capture_settings(model: Any, tokenizer: Any, padding_side: str) -> Iterator[None]:
    """Temporarily put model and tokenizer in the state capture needs, and restore them afterwards."""
    was_training = model.training
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    had_tie = hasattr(model.config, "tie_last_hidden_states")
    saved_tie = getattr(model.config, "tie_last_hidden_states", None)
    try:
        model.eval()
        tokenizer.padding_side = padding_side
        if tokenizer.pad_token is None:
            # The pad id only fills masked positions; any existing special token will do.
            fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
            if fallback is None:
                raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, eos, unk or "
                                  "bos token to pad with; set tokenizer.pad_token first")
            tokenizer.pad_token = fallback
        # transformers 5 overwrites the last hidden state with the final-norm output; we want every
        # entry to be a decoder block output so all layers are comparable.
        model.config.tie_last_hidden_states = False
        yield
    finally:
        model.train(was_training)
        tokenizer.padding_side = saved_side
        tokenizer.pad_token = saved_pad
        if had_tie:
            model.config.tie_last_hidden_states = saved_tie
        else:
            with contextlib.suppress(AttributeError):
                del model.config.tie_last_hidden_states


def _pool(hidden: Any, keep: Any, pooling: str) -> Any:
    import torch

    h = hidden.to(torch.float64)
    if pooling == "mean":
        w = keep.to(torch.float64).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1)
    # Last *kept* token: works for left and right padding alike (pads and specials are not kept).
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    last = torch.where(keep, positions, -1).argmax(1)
    return h[torch.arange(h.shape[0], device=h.device), last]


def iter_pooled_activations(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    pooling: str = "mean",
    exclude_special: bool = True,
    padding_side: str = "right",
    max_length: int = 512,
    progress: bool = False,
    description: str = "activations",
) -> Iterator[tuple[np.ndarray, Any]]:
    """Run ``model`` over ``texts`` in batches; yield pooled decoder-layer outputs per batch.

    One vector per text and decoder layer (``hidden_states[1:]``: block outputs, not the embedding
    output), pooled over the text's real tokens: ``mean`` over them or the ``last`` one. Padding and,
    with ``exclude_special``, special tokens such as BOS/EOS are left out, since a BOS token's massive
    activations make unrelated models look alike. Texts are batched longest first to limit padding.

    Args:
        model: a causal LM (any ``transformers`` model accepting ``output_hidden_states``).
        tokenizer: its tokenizer; the pad token falls back to EOS/UNK/BOS for the call if unset.
        texts: probe texts.
        batch_size, max_length: batching and truncation.
        pooling: ``"mean"`` or ``"last"``.
        exclude_special: leave special tokens (BOS, EOS, chat markers) out of the pooling.
        padding_side: ``"right"`` or ``"left"``; positions are computed from the attention mask so
            the pooled vectors do not depend on it.
        progress: show a progress bar.

    Yields:
        ``(indices, pooled)``: indices into ``texts`` and a float64 CPU tensor of shape
        ``(num_layers, len(indices), hidden_size)``.

    Raises:
        ConfigError: bad option, or a text with no token left to pool.
        ArtifactError: the model produced non-finite activations.
    """
    import inspect

    import torch

    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    from trace_transfer.models import input_device

    # The embedding's device, not the first parameter's: a model dispatched by device_map spreads its
    # layers over several devices (or offloads them to meta), and accelerate moves activations onward.
    device = input_device(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    special_ids = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long)
    with _capture_settings(model, tokenizer, padding_side), torch.inference_mode(), \
            _progress(len(texts), description, progress) as advance:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt", return_special_tokens_mask=True)
            attention = enc["attention_mask"].bool()
            keep = attention
            if exclude_special:
                # The mask covers tokens the tokenizer inserted (BOS/EOS); the id check also catches
                # special tokens written in the text itself (chat markers such as <|im_start|>).
                keep = keep & ~enc["special_tokens_mask"].bool() & ~torch.isin(enc["input_ids"], special_ids)
            empty = (~keep.any(1)).nonzero().flatten().tolist()
            if empty:
                i = idx[empty[0]]
                raise ConfigError(f"probe text #{i} ({texts[i][:60]!r}) has no token left to pool after removing "
                                  "special tokens; drop it or pass exclude_special=False")
            inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
            if takes_positions:
                # Count positions from the first real token so left padding does not shift them
                # (matters for absolute position embeddings, e.g. GPT-2).
                inputs["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0).to(device)
            out = model(**inputs, output_hidden_states=True, use_cache=False)
            # Each layer pools where its hidden state is (one device per layer under a device map); only
            # the pooled (batch, hidden) float64 vectors come to the CPU.
            masks: dict[Any, Any] = {}
            pooled = torch.stack([_pool(h, masks.setdefault(h.device, keep.to(h.device)), pooling).cpu()
                                  for h in out.hidden_states[1:]])
            if not torch.isfinite(pooled).all():
                layer = int((~torch.isfinite(pooled)).flatten(1).any(1).nonzero()[0])
                raise ArtifactError(f"model {getattr(model, 'name_or_path', '')!r} produced non-finite activations "
                                    f"at decoder layer {layer}; load it in float32 (--dtype float32)")
            yield np.asarray(idx), pooled
            advance(len(idx))


def capture_pooled_activations(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8,
                               pooling: str = "mean", exclude_special: bool = True, padding_side: str = "right",
                               **kwargs: Any) -> np.ndarray:
    """All pooled activations in memory as a float64 array ``(num_layers, n, hidden_size)``.

    For small probe sets and tests; :func:`compute_cka` streams through a disk-backed store instead.
    Arguments as in :func:`iter_pooled_activations`.

    Example:
        >>> feats = capture_pooled_activations(model, tok, ["a probe.", "another one."], pooling="last")
    """
    out: np.ndarray | None = None
    for idx, pooled in iter_pooled_activations(model, tokenizer, texts, batch_size=batch_size, pooling=pooling,
                                               exclude_special=exclude_special, padding_side=padding_side,
                                               **kwargs):
        if out is None:
            out = np.empty((pooled.shape[0], len(texts), pooled.shape[2]), dtype=np.float64)
        out[:, idx] = pooled.numpy()
    assert out is not None
    return out


class _FeatureStore:
    """Pooled features of one model: one disk-backed ``(n, d)`` float64 array per layer.

    Memory-mapped so a large probe set x many layers is paged to disk rather than held in RAM.
    """

    def __init__(self, directory: Path, n: int):
        self.directory, self.n = directory, n
        self.layers: list[np.memmap] = []

    def write(self, idx: np.ndarray, pooled: Any) -> None:
        if not self.layers:
            self.layers = [np.lib.format.open_memmap(self.directory / f"layer{l:04d}.npy", mode="w+",
                                                     dtype=np.float64, shape=(self.n, pooled.shape[2]))
                           for l in range(pooled.shape[0])]
        for l, mm in enumerate(self.layers):
            mm[idx] = pooled[l].numpy()

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, l: int) -> np.ndarray:
        return self.layers[l]


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)
