"""Loading models and tokenizers (hub id or local dir), and building tiny real HF models offline.

Why tiny models are built rather than downloaded: no machine of this project reaches the Hugging Face
Hub, yet every command must go through the ordinary ``from_pretrained`` path users rely on. So
``build_tiny_model`` writes a *real* model directory (``config.json``, safetensors weights, a
``tokenizer.json``) that ``load_model``/``load_tokenizer`` — and any user script — open exactly like a
downloaded checkpoint.

Architectures are data: ``_ARCHS`` maps an architecture name to its HF ``model_type`` and to which
config key receives which size (``hidden``, ``layers``, ``heads``, ...). Adding a family is one row.

Tokenizers are built with the ``tokenizers`` library, no download:

* ``char`` — every printable ASCII character (plus ``\\n`` and ``\\t``) is one token, after four
  specials ``<pad>=0 <bos>=1 <eos>=2 <unk>=3``. The synthetic tasks are character puzzles, so one
  token per character keeps them learnable by a ~1M-parameter model.
* ``bpe`` — a byte-level BPE trained on text of the synthetic tasks (default 384 tokens), merging only
  inside runs of letters (digits, spaces and punctuation are single tokens). It exists so that a source
  and a target can have *different* tokenizers, exercising the cross-tokenizer paths (CKA alignment
  per probe text, not per token).

Both add ``<bos>`` in front of every encoded text (as Llama tokenizers do) and never append ``<eos>``;
training appends ``<eos>`` to responses itself (``trace_transfer.data.tokenize_examples``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_transfer._version import versions
from trace_transfer.checkpoint import write_json_atomic
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "load_model",
    "input_device",
    "inference_device_map",
    "planned_model_bytes",
    "INFERENCE_OVERHEAD",
    "check_model_dir",
    "read_model_config",
    "load_tokenizer",
    "build_tiny_model",
    "build_tokenizer",
    "available_archs",
    "PROVENANCE_FILE",
    "SPECIAL_TOKENS",
]

PROVENANCE_FILE = "trace_transfer.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in both tiny tokenizers
# Printable ASCII plus newline and tab: everything the synthetic tasks and the shipped probes use.
_CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
_DEFAULT_BPE_VOCAB = 384
_MAX_POSITIONS = 1024  # far above the synthetic tasks' lengths; RoPE models pay nothing for it


# --------------------------------------------------------------------------------------------------
# Architecture table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """How one family's config is filled from the generic sizes.

    ``keys`` maps an HF config key to the name of a size variable (see ``_size_vars``); ``extra``
    holds literal config values. ``gated_mlp`` picks the default intermediate size (SwiGLU has three
    matrices, so ~8/3·hidden keeps its MLP as large as a 4·hidden plain MLP); ``gqa`` says whether
    the family has separate key/value heads.
    """

    model_type: str
    keys: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    gated_mlp: bool = True
    gqa: bool = True


_DECODER = {
    "hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads", "intermediate_size": "intermediate", "vocab_size": "vocab",
    "max_position_embeddings": "max_pos", "pad_token_id": "pad_id", "bos_token_id": "bos_id",
    "eos_token_id": "eos_id",
}
# Families whose config default head_dim is a constant (128, 256) rather than hidden // heads.
_HEAD_DIM = {"head_dim": "head_dim"}
# Gemma scales queries by query_pre_attn_scalar**-0.5 (default 256): tie it to the real head_dim.
_GEMMA = {**_HEAD_DIM, "query_pre_attn_scalar": "head_dim"}
_MOE = {"num_experts": "experts", "num_experts_per_tok": "experts_per_tok", "moe_intermediate_size": "moe_intermediate"}

_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("llama", _DECODER),
    "mistral": _Arch("mistral", {**_DECODER, **_HEAD_DIM}),
    "qwen2": _Arch("qwen2", _DECODER),
    "qwen3": _Arch("qwen3", {**_DECODER, **_HEAD_DIM}),
    "gemma2": _Arch("gemma2", {**_DECODER, **_GEMMA}),
    "gemma3": _Arch("gemma3_text", {**_DECODER, **_GEMMA}),
    "phi3": _Arch("phi3", _DECODER),
    "gpt2": _Arch(
        "gpt2",
        {"n_embd": "hidden", "n_layer": "layers", "n_head": "heads", "n_inner": "intermediate",
         "vocab_size": "vocab", "n_positions": "max_pos", "pad_token_id": "pad_id", "bos_token_id": "bos_id",
         "eos_token_id": "eos_id"},
        gated_mlp=False, gqa=False,
    ),
    "gpt_neox": _Arch(
        "gpt_neox",
        {"hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
         "intermediate_size": "intermediate", "vocab_size": "vocab", "max_position_embeddings": "max_pos",
         "pad_token_id": "pad_id", "bos_token_id": "bos_id", "eos_token_id": "eos_id"},
        gated_mlp=False, gqa=False,
    ),
    "qwen2_moe": _Arch("qwen2_moe", {**_DECODER, **_MOE, "shared_expert_intermediate_size": "intermediate"}),
    "qwen3_moe": _Arch("qwen3_moe", {**_DECODER, **_HEAD_DIM, **_MOE}),
    "mixtral": _Arch("mixtral", {**_DECODER, "num_local_experts": "experts", "num_experts_per_tok": "experts_per_tok"}),
}
# Names users may know the family by (HF model_type) -> our name.
_ALIASES = {"gemma3_text": "gemma3", "neox": "gpt_neox", "gptneox": "gpt_neox"}


def available_archs() -> list[str]:
    """Architecture names accepted by :func:`build_tiny_model`."""
    return sorted(_ARCHS)


def _resolve_arch(arch: str) -> tuple[str, _Arch]:
    key = _ALIASES.get(arch.lower().replace("-", "_"), arch.lower().replace("-", "_"))
    if key not in _ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; available: {', '.join(available_archs())}")
    return key, _ARCHS[key]


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def build_tokenizer(kind: str = "char", vocab_size: int | None = None, seed: int = 0):
    """A tiny tokenizer built offline, wrapped in ``PreTrainedTokenizerFast``.

    Args:
        kind: ``"char"`` (one token per printable ASCII character) or ``"bpe"`` (byte-level BPE
            trained on the synthetic tasks' text).
        vocab_size: BPE target size (default 384); ignored for ``char``.
        seed: seed of the synthetic text the BPE is trained on.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>/<bos>/<eos>/<unk>`` at ids 0..3 that prepends
        ``<bos>`` and never appends ``<eos>``.

    Raises:
        ConfigError: unknown ``kind`` or a BPE vocabulary too small for its alphabet.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "char":
        vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *_CHARS])}
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        # Every character (newline included) is its own pre-token; Fuse joins them back without the
        # spaces WordLevel decoding would otherwise insert.
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tk.decoder = decoders.Fuse()
    elif kind == "bpe":
        target = vocab_size or _DEFAULT_BPE_VOCAB
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # The initial alphabet is the byte-level image of printable ASCII, so every character the
        # tasks can contain is representable even if the training text happens to miss it.
        alphabet = sorted({piece for ch in _CHARS for piece, _ in byte_level.pre_tokenize_str(ch)})
        if target < len(alphabet) + len(SPECIAL_TOKENS) + 16:
            raise ConfigError(f"bpe vocab_size {target} is too small: the alphabet alone needs "
                              f"{len(alphabet) + len(SPECIAL_TOKENS)}; use at least 256")
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        # Merges stay inside runs of letters: whitespace, digits and punctuation are isolated first.
        # So a fact key is the same token(s) in every task format (`xyz=` and `dx xyz?`) and digits are
        # single tokens (as in Llama 3 / Qwen); otherwise a held-out key or digit pair would be spelled
        # differently in the new format than where the base model learned it, and the domain tasks
        # would stop being "new formats over known skills" for BPE models.
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=target, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=alphabet, show_progress=False)
        from trace_transfer.data.synthetic import corpus

        tk.train_from_iterator(corpus(n_per_task=600, seed=seed), trainer)
    else:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; expected 'char' or 'bpe'")
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=_MAX_POSITIONS)


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


def _size_vars(arch: _Arch, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int | None,
               vocab: int) -> dict[str, int]:
    problems = []
    if min(layers, hidden, heads, kv_heads) < 1:
        problems.append(f"layers, hidden, heads and kv_heads must be >= 1 (got {layers}, {hidden}, {heads}, {kv_heads})")
    elif hidden % heads:
        problems.append(f"hidden {hidden} is not divisible by heads {heads}; pick e.g. hidden={heads * max(1, hidden // heads)}")
    elif arch.gqa and heads % kv_heads:
        problems.append(f"heads {heads} is not divisible by kv_heads {kv_heads} (grouped-query attention "
                        f"shares each key/value head among heads // kv_heads query heads)")
    if problems:
        raise ConfigError("invalid tiny-model sizes", problems)
    if intermediate is None:
        intermediate = (-(-8 * hidden // 3) + 15) // 16 * 16 if arch.gated_mlp else 4 * hidden
    return {
        "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads if arch.gqa else heads,
        "intermediate": intermediate, "head_dim": hidden // heads, "vocab": vocab, "max_pos": _MAX_POSITIONS,
        "pad_id": 0, "bos_id": 1, "eos_id": 2,
        # MoE: a few small experts, two active, so routing is real but the model stays tiny.
        "experts": 4, "experts_per_tok": 2, "moe_intermediate": max(8, intermediate // 2),
    }


def tiny_config(arch: str, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                intermediate: int | None = None, vocab_size: int = 128):
    """The HF config :func:`build_tiny_model` would use (no weights, no tokenizer)."""
    from transformers import AutoConfig

    _, spec = _resolve_arch(arch)
    sizes = _size_vars(spec, layers, hidden, heads, kv_heads, intermediate, vocab_size)
    kwargs = {key: sizes[var] for key, var in spec.keys.items()}
    return AutoConfig.for_model(spec.model_type, **kwargs, **spec.extra)


def build_tiny_model(
    arch: str,
    out_dir: str | os.PathLike,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    tokenizer: str = "char",
    seed: int = 0,
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a randomly initialised, real HF model directory for ``arch``.

    The directory holds ``config.json``, ``model.safetensors``, the tokenizer files and
    ``trace_transfer.json`` (provenance: arch, sizes, seed, parameter count, versions). It is built in
    a temp dir next to ``out_dir`` and renamed into place, so a crash never leaves half a model.

    Args:
        arch: one of :func:`available_archs` (HF model_type names such as ``gemma3_text`` work too).
        out_dir: target directory; must not exist or be empty unless ``overwrite``.
        layers, hidden, heads, kv_heads: sizes (kv_heads is ignored by families without GQA).
        intermediate: MLP width; default ~8/3·hidden (gated MLPs) or 4·hidden (GPT-2, GPT-NeoX).
        tokenizer: ``"char"`` or ``"bpe"`` (see :func:`build_tokenizer`).
        seed: seeds the weight initialisation (and the BPE training text).
        vocab_size: rows of the embedding; for ``bpe`` also the BPE's trained size (default 384);
            for ``char`` it pads the 101-token vocabulary (must be >= 101).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: unknown arch or tokenizer, inconsistent sizes, vocab_size too small.
        ArtifactError: ``out_dir`` exists, is not empty and ``overwrite`` is False.

    Example:
        >>> path = build_tiny_model("qwen3", "models/tiny-qwen3", layers=4, hidden=96, tokenizer="bpe")
        >>> model = load_model(path)
    """
    import torch
    from transformers import AutoModelForCausalLM

    name, spec = _resolve_arch(arch)
    out_dir = Path(out_dir)
    _check_writable(out_dir, overwrite)
    tok = build_tokenizer(tokenizer, vocab_size=vocab_size if tokenizer == "bpe" else None, seed=seed)
    vocab = vocab_size or len(tok)
    if vocab < len(tok):
        raise ConfigError(f"vocab_size {vocab} is smaller than the {tokenizer} tokenizer's {len(tok)} tokens; "
                          f"use vocab_size >= {len(tok)} or leave it unset")
    config = tiny_config(name, layers, hidden, heads, kv_heads, intermediate, vocab)
    # Seeding the global generator is what makes from_config reproducible; restore it afterwards so
    # building a model does not change the caller's random stream.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(rng_state)
    n_params = sum(p.numel() for p in model.parameters())
    provenance = {
        "kind": "tiny_model",
        "arch": name,
        "model_type": spec.model_type,
        "sizes": {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads if spec.gqa else None,
                  "intermediate": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None),
                  "vocab_size": vocab},
        "tokenizer": {"kind": tokenizer, "size": len(tok)},
        "seed": seed,
        "num_parameters": n_params,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / PROVENANCE_FILE, provenance)
    logger.info("built %s (%d parameters, %s tokenizer) in %s", name, n_params, tokenizer, out_dir)
    return out_dir


def _check_writable(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ArtifactError(f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) "
                            f"or choose another output directory")


class _atomic_dir:
    """Context manager: a temp dir beside ``final`` that replaces ``final`` only on success."""

    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.final.exists():
            # Move the old dir aside first: os.replace cannot replace a non-empty directory.
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _looks_local(ref: str) -> bool:
    """Whether ``ref`` is meant as a filesystem path rather than a hub id (``org/name``)."""
    if os.path.isabs(ref) or ref.startswith((".", "~")) or ref.endswith(("/", os.sep)) or ref.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in ref:
        return True
    # "runs/base" is also a valid hub id; it is a path when its first component exists here.
    head = ref.split("/", 1)[0]
    return "/" in ref and Path(head).is_dir()


def _resolve(ref: str | os.PathLike, what: str) -> tuple[str, bool]:
    """``(reference, is_local)``; raises when a local-looking path is missing or is not a model dir."""
    s = os.fspath(ref)
    path = Path(s).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and what == "model":
            raise ArtifactError(
                f"{path} is a directory but not a Hugging Face model directory (no config.json); pass the "
                f"directory written by save_pretrained, `trace-transfer tiny-model` or `trace-transfer pretrain`"
            )
        if path.is_dir() and what == "model":
            check_model_dir(path)
        return str(path), True
    if isinstance(ref, Path) or _looks_local(s):
        raise ArtifactNotFoundError(
            f"{what} directory {s!r} does not exist; build one with `trace-transfer tiny-model --arch llama "
            f"--out {s}` or pass an existing directory or hub id"
        )
    return s, False


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """A local model directory's ``config.json`` as a dict.

    Raises:
        ArtifactError: the file is missing, not UTF-8 or not a JSON object.
    """
    from trace_transfer.checkpoint import read_json_object

    f = Path(path) / "config.json"
    if not f.is_file():
        raise ArtifactError(f"{Path(path)} has no config.json; pass a Hugging Face model directory "
                            f"(written by save_pretrained or `trace-transfer tiny-model`)")
    return read_json_object(f, "restore the model's config.json")


def check_model_dir(path: str | os.PathLike) -> None:
    """Check a local model directory before transformers loads it: a readable config.json and weight
    files whose headers read and whose sizes match them (a truncated or foreign file otherwise
    surfaces as a library traceback deep inside ``from_pretrained``).

    Raises:
        ArtifactError / ArtifactNotFoundError: naming the file to fix.
    """
    from trace_transfer.checkpoint import open_checkpoint

    read_model_config(path)
    path = Path(path)
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        open_checkpoint(path)  # raises ArtifactError naming a truncated/corrupt shard
    elif not any(path.glob("*.bin")) and not any(path.glob("*.bin.index.json")):
        raise ArtifactNotFoundError(f"{path} holds no weights (*.safetensors); copy the model's weight files "
                                    f"into it or pass another model directory")


def _hub_error(ref: str, what: str, exc: Exception) -> ArtifactNotFoundError:
    return ArtifactNotFoundError(
        f"{what} {ref!r} is not a local directory and could not be loaded from the Hugging Face Hub "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Without network access, "
        f"download it elsewhere and pass its directory, or set HF_HUB_OFFLINE=1 to use the local cache only"
    )


def load_model(
    name_or_path: str | os.PathLike,
    dtype: Any = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """``AutoModelForCausalLM.from_pretrained`` on a hub id or a local directory.

    Args:
        name_or_path: hub id (``Qwen/Qwen3-0.6B``) or a model directory.
        dtype: ``torch.dtype`` or its name (``"bfloat16"``, ``"float32"``, ``"auto"``); None keeps
            transformers' default (the checkpoint's own dtype in transformers 5).
        device: where to put the model (ignored with ``device_map``).
        trust_remote_code: passed through (needed by a few hub models; never needed here).
        local_files_only: do not try the network (default: transformers' ``HF_HUB_OFFLINE`` setting).
        device_map: None (the whole model on ``device``), ``"auto"`` (accelerate spreads the layers over
            the visible GPUs, then the CPU, then ``offload_folder``) or an explicit
            ``{module name: device | "cpu" | "disk"}`` map. For inference only (CKA capture,
            evaluation): one copy of the model for the process, each layer on one device, so a model
            larger than one GPU still runs forward. :func:`inference_device_map` decides when.
        max_memory: accelerate's ``{device: "70GiB", "cpu": "200GiB"}`` caps for ``device_map``.
        offload_folder: where layers mapped to ``"disk"`` are kept (required when any is).

    Returns:
        The model in eval mode. A dispatched model has ``hf_device_map``; feed it inputs on
        :func:`input_device`.

    Raises:
        ArtifactNotFoundError: a local path does not exist, or a hub id cannot be fetched.
        ArtifactError: the directory exists but holds no ``config.json``.
        ConfigError: a device map with ``"disk"`` entries but no ``offload_folder``.

    Example:
        >>> model = load_model("runs/base", dtype="bfloat16")
        >>> big = load_model("Qwen/Qwen3-32B", dtype="bfloat16", device_map="auto")
    """
    import torch
    from transformers import AutoModelForCausalLM

    ref, _ = _resolve(name_or_path, "model")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if device_map is not None:
        if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
            raise ConfigError(f"device_map puts {sorted(k for k, v in device_map.items() if v == 'disk')} on 'disk' "
                              f"but no offload_folder was given; pass offload_folder=<a scratch directory>")
        kwargs.update(device_map=device_map, max_memory=max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = os.fspath(offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except OSError as exc:
        raise _hub_error(ref, "model", exc) from exc
    if device_map is None:
        model = model.to(device)
    return model.eval()


def input_device(model: Any):
    """The device a (possibly dispatched) model's inputs go to: its input embedding's.

    ``next(model.parameters()).device`` is wrong for a model spread by ``device_map``: the first
    parameter listed need not be the embedding, and offloaded weights sit on ``meta``. accelerate's
    hooks move each layer's inputs to that layer's device, so only the first hop matters.
    """
    import torch

    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    placed = getattr(model, "hf_device_map", None) or {}
    # Offloaded modules (cpu/disk) execute on accelerate's main device: the first accelerator in the map.
    accel = [d for d in placed.values() if d not in ("cpu", "disk")]
    if placed:
        if not accel:
            return torch.device("cpu")
        # accelerate writes GPU indices as ints; torch.device(int) would ask the current accelerator.
        return torch.device(f"cuda:{accel[0]}" if isinstance(accel[0], int) else accel[0])
    return next(model.parameters()).device


# Inference needs more than the weights: activations, the KV cache of generation, allocator slack.
# 20 % on top of the weights is the margin the decision below keeps free on the GPU (and the one the
# per-stage evaluation's placement rule uses, trace_transfer.evaluation.distributed.choose_placement).
INFERENCE_OVERHEAD = 1.2


def planned_model_bytes(name_or_path: str | os.PathLike, dtype: Any = None) -> int | None:
    """Bytes of a model's weights in ``dtype``, from its config alone (built on the meta device, no
    weights read). None when the config cannot be read (e.g. a hub id offline): the caller then
    falls back to plain loading, which reports the real problem."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(os.fspath(name_or_path))
    except (OSError, ValueError):
        return None
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            shell = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, ImportError):  # e.g. an architecture that needs trust_remote_code
        return None
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):  # None/"auto": the checkpoint's dtype
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored or torch.float32
    # parameters() lists a tied embedding once, as the checkpoint stores it.
    return sum(p.numel() for p in shell.parameters()) * dtype.itemsize


def inference_device_map(name_or_path: str | os.PathLike, device: str | None = "auto", dtype: Any = None) -> str | None:
    """The ``device_map`` an inference step (CKA capture, evaluation) loads ``name_or_path`` with.

    The rule: only under ``--device auto`` (an explicit ``cpu``/``cuda:i`` is obeyed as given), and
    only when the weights plus a 20 % margin exceed the free memory of ``cuda:0``; then ``"auto"``:
    accelerate spreads the layers over every visible GPU (and offloads what still does not fit to the
    CPU). A model that fits one GPU stays whole on it, which is faster than any split. Data-parallel
    ZeRO-3 ranks were the alternative; they need a launcher, while a device map serves the plain
    single-process ``eval``/``cka`` commands and the pipeline's inference steps alike.

    Returns:
        ``"auto"`` or None (load whole on the resolved device).
    """
    if (device or "auto").strip().lower() != "auto":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    need = planned_model_bytes(name_or_path, dtype)
    if need is None:
        return None
    torch.cuda.empty_cache()  # a model just deleted (CKA loads source, then target) is free again
    free = torch.cuda.mem_get_info(0)[0]
    if need * INFERENCE_OVERHEAD <= free:
        return None
    total_free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    where = "the visible GPUs" if need * INFERENCE_OVERHEAD <= total_free else "the GPUs and the CPU (offload: slow)"
    logger.info("%s needs %.1f GiB with margin, cuda:0 has %.1f GiB free: spreading it over %s (device_map='auto')",
                name_or_path, need * INFERENCE_OVERHEAD / 2**30, free / 2**30, where)
    return "auto"


def load_tokenizer(name_or_path: str | os.PathLike, local_files_only: bool | None = None):
    """``AutoTokenizer.from_pretrained`` with a pad token guaranteed.

    A tokenizer without a pad token gets its EOS (else UNK) token as pad: padding positions are
    masked out of attention and loss, so reusing an existing token is harmless and, unlike adding a
    new one, needs no resizing of the model's embeddings. Padding side is left to the caller
    (right for training, left for batched generation).

    Raises:
        ArtifactNotFoundError: as :func:`load_model`.
        ArtifactError: the tokenizer has none of pad, EOS and UNK tokens.
    """
    from transformers import AutoTokenizer

    ref, _ = _resolve(name_or_path, "tokenizer")
    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        tok = AutoTokenizer.from_pretrained(ref, **kwargs)
    except OSError as exc:
        raise _hub_error(ref, "tokenizer", exc) from exc
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ArtifactError(f"tokenizer of {ref!r} has no pad, eos or unk token to pad with; set one with "
                                f"tokenizer.add_special_tokens({{'pad_token': ...}}) and resize the model")
        tok.pad_token = fallback
    return tok
