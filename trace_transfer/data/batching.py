"""Tokenisation with loss masks, padding, data loaders — shared by pretraining, probes and stages.

The layout every path uses (and that evaluation's generation reproduces, so train and test see the
same tokens): ``[special prefix, e.g. BOS] + prompt tokens + response tokens + EOS``; prompt and
response are encoded *separately*, because generation starts from the prompt's own encoding and a
BPE merge across the boundary would otherwise show the model tokens at train time it never sees at
test time. Labels are -100 on the prompt and on padding: the loss is on the response (and its EOS,
which teaches the model to stop) only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from trace_transfer.data._example import Example
from trace_transfer.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "tokenize_examples", "collate", "make_dataloader", "pad_id_of"]

IGNORE_INDEX = -100


def pad_id_of(tokenizer: Any) -> int:
    """The pad id (pad, else EOS, else 0): padded positions are masked, so any id works."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _special_layout(tokenizer: Any) -> tuple[int, bool]:
    """``(number of special prefix tokens, whether an EOS suffix is added)`` of ``tokenizer``."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(plain)
    for start in range(len(with_special) - n + 1):
        if with_special[start : start + n] == plain:
            eos_suffix = (tokenizer.eos_token_id is not None and len(with_special) > start + n
                          and with_special[-1] == tokenizer.eos_token_id)
            return start, eos_suffix
    return 0, False


def tokenize_examples(tokenizer: Any, examples: Sequence[Example], seq_len: int) -> list[dict[str, list[int]]]:
    """Token ids and labels for causal-LM fine-tuning on responses.

    Args:
        tokenizer: a HF tokenizer.
        examples: :class:`Example` objects (``prompt``, ``response``).
        seq_len: maximum tokens per example. Longer examples lose the *oldest prompt tokens* (after
            the special prefix), which keeps the response and the text right before it; a response
            that alone exceeds ``seq_len`` is cut at the end (a warning says how many).

    Returns:
        One ``{"input_ids": [...], "labels": [...]}`` per example (unpadded; see :func:`collate`).

    Raises:
        ConfigError: ``seq_len`` too small to hold the special prefix, one prompt token and one
            response token.

    Example:
        >>> feats = tokenize_examples(tok, task.train_examples(), seq_len=32)
        >>> batch = collate(feats[:8], pad_id=tok.pad_token_id)
    """
    n_prefix, eos_suffix = _special_layout(tokenizer)
    if seq_len < n_prefix + 2:
        raise ConfigError(f"seq_len {seq_len} is too small: the tokenizer adds {n_prefix} special token(s) and an "
                          f"example needs at least one prompt and one response token; use seq_len >= {n_prefix + 2}")
    examples = list(examples)
    if not examples:
        return []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    cut_prompt = cut_response = 0
    for p, r in zip(prompts, responses):
        p = list(p)
        if eos_suffix and len(p) > n_prefix and p[-1] == eos:
            p = p[:-1]  # the prompt must not end in "stop": the model would learn to answer after EOS
        r = list(r)
        if eos is not None and (not r or r[-1] != eos):
            r.append(eos)
        overflow = len(p) + len(r) - seq_len
        if overflow > 0:
            # Keep the special prefix and at least one prompt token; drop the oldest prompt tokens.
            drop = min(overflow, max(0, len(p) - n_prefix - 1))
            if drop:
                p = p[:n_prefix] + p[n_prefix + drop :]
                cut_prompt += 1
            if len(p) + len(r) > seq_len:
                r = r[: seq_len - len(p)]
                cut_response += 1
        out.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    if cut_prompt or cut_response:
        logger.warning("seq_len %d: truncated the prompt of %d and the response of %d of %d examples",
                       seq_len, cut_prompt, cut_response, len(examples))
    return out


def collate(batch: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad features from :func:`tokenize_examples` into tensors.

    Args:
        batch: dicts with ``input_ids`` and optionally ``labels`` (lists or 1-D tensors).
        pad_id: id placed in padded ``input_ids`` positions (labels get -100, attention 0).
        padding_side: ``"right"`` for training (causal attention never looks at later pads) or
            ``"left"`` for batched generation.

    Returns:
        ``input_ids``, ``attention_mask`` and (if present) ``labels`` as ``LongTensor[batch, max_len]``.
    """
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side {padding_side!r}: expected 'right' or 'left'")
    if not batch:
        raise ConfigError("collate got an empty batch")
    width = max(len(f["input_ids"]) for f in batch)
    has_labels = "labels" in batch[0]
    ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for row, f in enumerate(batch):
        seq = torch.as_tensor(f["input_ids"], dtype=torch.long)
        n = seq.numel()
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, sl] = seq
        mask[row, sl] = 1
        if labels is not None:
            labels[row, sl] = torch.as_tensor(f["labels"], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = labels
    return out


def make_dataloader(
    tokenizer: Any,
    examples: Sequence[Example],
    seq_len: int,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of padded batches; the order is a function of ``seed`` alone.

    Each new iteration over the loader (epoch) draws the next permutation from the same seeded
    generator, so two loaders built with the same arguments yield identical batches epoch by epoch.
    """
    features = tokenize_examples(tokenizer, examples, seq_len)
    pad = pad_id_of(tokenizer)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        features, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
        collate_fn=functools.partial(collate, pad_id=pad),
    )
