"""DeepSpeed ZeRO-2/3 glue for masked (and full) fine-tuning, sharing the single-process loop's pieces.

Order matters, and is why this module exists:

1. the CoreSet is applied to the bare model *before* ``deepspeed.initialize`` — frozen tensors
   (``requires_grad=False``) then get no gradient buffers and no optimizer state under ZeRO;
2. the optimizer is AdamW over the mask handle's parameter groups (partly-core tensors at weight decay
   0), passed to DeepSpeed as a client optimizer; a DeepSpeed ``optimizer`` section is honoured only
   when it cannot decay a frozen element;
3. gradient masks are plain ``param.register_hook`` hooks: under ZeRO-3 they still see the full-shape
   gradient (checked on this project's machines, DeepSpeed 0.19), so masking is identical everywhere;
   with sparse masking (the default for small cores) a partly-core tensor is frozen — partitioned,
   no optimizer state — and its delta over the core, a registered parameter made before
   ``deepspeed.initialize``, is the only trainable state (``tests/train/test_sparse.py`` checks the
   optimizer's partitions on 2 ranks); the delta is folded into the weight when the handle is removed;
4. saving never gathers the model: :func:`save_consolidated` streams it, one tensor at a time — gathered
   from its ZeRO-3 partitions, its sparse delta folded, written straight into its safetensors shard on
   rank 0 (:class:`trace_transfer.checkpoint.StreamingShardWriter`), dropped on every rank before the
   next — so a rank's memory during the save is its shard plus one tensor (two on rank 0 while
   folding; ``tests/train/test_ds_save.py`` measures it). A PEFT LoRA model is saved the same way,
   merged: each LoRA-wrapped base weight is gathered with only its own adapter factors and written as
   ``W + ΔW`` (PEFT's ``get_delta_weight``) under its merged name, the adapters themselves skipped —
   bit-equal to ``merge_and_unload()`` + ``save_pretrained`` (``tests/train/test_lora_stream_save.py``).
   The runner saves each stage of every method this way from the still-sharded engine
   (``unshard=False`` + ``before_teardown``), releases the shards, and evaluates and continues from the
   checkpoint on disk. Library callers get today's default,
   ``unshard=True``: the model handed back whole on every rank (gathered one tensor at a time,
   DeepSpeed's hooks removed) — the whole model per rank, so avoid it for models near host memory.

Launch under ``torchrun`` / ``deepspeed`` / ``accelerate launch`` (see ``examples/deepspeed/``). On CPU:
``DS_ACCELERATOR=cpu`` and the gloo backend.

bf16: a config with ``bf16.enabled`` casts the module to bf16. Non-core elements then equal the *bf16*
base bit for bit — load the base model in bf16 (as the paper does) to verify against its checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from trace_transfer.coreset import CoreSet
from trace_transfer.data.batching import IGNORE_INDEX
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError
from trace_transfer.train.loop import (
    TrainConfig,
    TrainResult,
    enable_gradient_checkpointing,
    make_optimizer,
    make_scheduler,
    total_steps,
)
from trace_transfer.train.masking import _ACTIVE_ATTR, apply_coreset

logger = logging.getLogger(__name__)

__all__ = ["deepspeed_train", "load_ds_config", "zero_stage", "load_partitioned", "consolidated_state_dict",
           "save_consolidated",
           "response_tokens", "causal_lm_token_sum", "global_token_scale"]


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_ds_config(ds_config: str | os.PathLike | dict[str, Any], cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """Read a DeepSpeed config (path or dict) and fill the values the TrainConfig owns: micro batch,
    accumulation, global batch, clipping, and every ``"auto"`` (as the HF integration does).

    Raises:
        ArtifactNotFoundError: the file does not exist.
        ConfigError: the file is not JSON, or it fixes a batch size that contradicts ``cfg``.
    """
    if isinstance(ds_config, dict):
        conf = copy.deepcopy(ds_config)
    else:
        path = Path(ds_config)
        if not path.exists():
            raise ArtifactNotFoundError(f"DeepSpeed config not found: {path}")
        try:
            conf = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
    }
    problems = []
    for key, value in wanted.items():
        have = conf.get(key, "auto")
        if have == "auto":
            conf[key] = value
        elif int(have) != value:
            problems.append(f"{key} is {have} in the DeepSpeed config but {value} from the training settings; "
                            f"set it to \"auto\"")
    if problems:
        raise ConfigError("DeepSpeed config contradicts the training settings", problems)
    if conf.get("gradient_clipping", "auto") == "auto":
        conf["gradient_clipping"] = cfg.max_grad_norm
    bf16 = conf.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = cfg.precision == "bf16" or (
            cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        )
    fp16 = conf.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") == "auto":
        fp16["enabled"] = False
    opt = conf.get("optimizer", {}).get("params", {})
    for key, value in (("lr", cfg.lr), ("weight_decay", cfg.weight_decay), ("betas", [0.9, 0.999]), ("eps", 1e-8)):
        if opt.get(key) == "auto":
            opt[key] = value
    if "optimizer" not in conf:
        # our AdamW is a "client optimizer" to DeepSpeed; ZeRO wants this acknowledged
        conf["zero_allow_untested_optimizer"] = True
    return conf


def zero_stage(conf: dict[str, Any]) -> int:
    """The ZeRO stage of a loaded DeepSpeed config (0 when it has no ``zero_optimization``)."""
    return int((conf.get("zero_optimization") or {}).get("stage", 0))


def load_partitioned(model_ref: str | os.PathLike, conf: dict[str, Any]) -> torch.nn.Module:
    """Load a causal LM already partitioned by ZeRO-3, so that no rank ever holds the whole model.

    Every rank calls it (collective) with the same ``conf`` (from :func:`load_ds_config`, ZeRO stage 3).
    For a local model directory the model is built from its config under ``deepspeed.zero.Init``,
    without random initialisation: each parameter is an empty placeholder (``p.ds_shape``,
    ``p.ds_numel``) whose rank-local slice is ``p.ds_tensor``. The weights are then streamed in one
    tensor at a time: gathered, filled by rank 0 from the file, re-partitioned — so each rank's peak is
    its partition plus about two tensors (the gathered one and rank 0's read;
    ``tests/train/test_zero3_stage_start.py`` measures it). ``from_pretrained`` under ZeRO-3
    (transformers' ``HfDeepSpeedConfig``, kept alive only for the call) reads the whole checkpoint
    into rank 0's memory first; it is only the fallback here, for a checkpoint whose tensor names
    differ from the model's (transformers 5 fusing some weights in memory) or a hub id whose snapshot
    cannot be fetched. A hub id streams in from its snapshot in the Hugging Face cache (fetched there by
    rank 0 first if missing).

    The parameters take the dtype ``zero.Init`` derives from ``conf`` (bf16/fp16 when enabled, else
    fp32), which is the dtype ``deepspeed.initialize`` would cast a whole-loaded model to. The model
    is returned in eval mode, like :func:`trace_transfer.models.load_model`.

    Raises:
        ConfigError: ``conf`` is not ZeRO stage 3.
        ArtifactNotFoundError / ArtifactError: as :func:`trace_transfer.models.load_model`.
    """
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    from trace_transfer.models import load_model

    if zero_stage(conf) != 3:
        raise ConfigError(f"load_partitioned needs a ZeRO stage 3 config, got stage {zero_stage(conf)}; "
                          f"load the model whole with trace_transfer.models.load_model")
    path = Path(model_ref) if Path(model_ref).is_dir() else _hub_snapshot(str(model_ref))
    if path is not None and (path / "config.json").exists():
        model = _build_and_stream(path, conf)
        if model is not None:
            return model.eval()
    zero3 = HfDeepSpeedConfig(conf)  # while it lives, from_pretrained builds the model under zero.Init
    try:
        return load_model(model_ref, device=get_accelerator().current_device_name())
    finally:
        del zero3


def _hub_snapshot(ref: str) -> Path | None:
    """The local snapshot directory of hub id ``ref`` (its config and safetensors), so a hub model streams in
    partitioned like a local one instead of through ``from_pretrained``'s whole read on rank 0.

    Collective: rank 0 fetches into the Hugging Face cache (nothing when it is there already, or when
    ``HF_HUB_OFFLINE`` is set), the other ranks then resolve the cached copy. None on every rank when the
    snapshot cannot be had (no such id, no network and no cache): the caller's ``from_pretrained`` fallback
    then reports the real problem."""
    import torch.distributed as dist

    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    patterns = ["*.json", "*.safetensors"]  # config, generation config, weights and their index: no .bin (pickle)

    def fetch(local_only: bool) -> str | None:
        try:
            return snapshot_download(ref, allow_patterns=patterns, local_files_only=local_only)
        except Exception:  # noqa: BLE001 - not a hub id, offline without a cache, ...: the fallback reports it
            return None

    rank, world = _dist()
    found = fetch(local_only=False) if rank == 0 else None
    if world > 1 and dist.is_initialized():
        box = [found is not None]
        dist.broadcast_object_list(box, src=0)  # the others wait for rank 0's download, and agree on the path
        if rank != 0:
            found = fetch(local_only=True) if box[0] else None
    return Path(found) if found else None


def _build_and_stream(path: Path, conf: dict[str, Any]) -> torch.nn.Module | None:
    """The model of ``path`` built partitioned, its weights streamed in from the checkpoint tensor by
    tensor; None (on every rank alike) when a parameter's name is not in the checkpoint, for the
    caller to fall back to ``from_pretrained``."""
    import contextlib

    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    from trace_transfer.checkpoint import open_checkpoint
    from trace_transfer.models import check_model_dir

    try:  # keeps RoPE's position arange out of zero.Init's bf16/fp16 cast (as from_pretrained does)
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:  # an older transformers 5: fp32 configs are unaffected
        prevent_arange_dtype_change = contextlib.nullcontext

    check_model_dir(path)
    reader = open_checkpoint(path, prefix="model")
    # Built under zero.Init directly, not transformers' HfDeepSpeedConfig: its from_config would also
    # random-initialise every weight (gathering each module in turn) only for the checkpoint to
    # overwrite it — slower, and on these CPU runs ~50 MiB more peak per rank (measured).
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=conf):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.tie_weights()  # as from_pretrained does after a zero.Init build: lm_head becomes the embedding
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied tensor under each of its names
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    plan = [(params[i], next((n for n in ns if n in reader), None)) for i, ns in names.items()]
    missing = [names[id(p)][0] for p, key in plan if key is None]
    if missing:  # never filled: no_init_weights left them as garbage, so nothing of this model is kept
        logger.warning("%s: %d parameter(s) (first: %r) are not stored under their in-memory names; loading "
                       "through from_pretrained, which reads the whole checkpoint on rank 0", path, len(missing),
                       missing[0])
        return None
    rank, _ = _dist()
    with torch.no_grad():
        for p, key in plan:
            # Gathered whole on every rank for the copy; on exit rank 0's values are re-partitioned.
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                if rank == 0:
                    p.data.copy_(reader.get(key))  # one tensor read from disk (its file opened for it alone)
        for name, buf in model.named_buffers():
            if name in reader:  # persistent buffers are not partitioned: every rank reads its own
                buf.copy_(reader.get(name))
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _check_decay(model: torch.nn.Module, conf: dict[str, Any]) -> None:
    handle = getattr(model, _ACTIVE_ATTR, None)
    if handle is None or not handle.partly_core():
        return
    if handle.decay == "masked":
        raise ConfigError(
            "decay='masked' is not supported under DeepSpeed: ZeRO steps its own fp32 partitions, which the "
            "mask handle cannot reach; apply the CoreSet with decay='zero'"
        )
    wd = conf.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    if wd:
        raise ConfigError(
            f"the DeepSpeed config's optimizer section decays every parameter (weight_decay={wd}), which moves "
            f"frozen elements (or sparse deltas) of {len(handle.partly_core())} partly-core tensor(s) "
            f"(first: {handle.partly_core()[0]!r}); "
            f"remove the 'optimizer' section (AdamW is then built from the CoreSet's groups) or set weight_decay 0"
        )


def deepspeed_train(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    cfg: TrainConfig,
    ds_config: str | os.PathLike | dict[str, Any],
    *,
    params: Iterable[Any] | None = None,
    coreset: CoreSet | None = None,
    mode: str = "train-core",
    masking: str = "auto",
    steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    after_step: Callable[[], None] | None = None,
    on_engine: Callable[[Any], None] | None = None,
    unshard: bool = True,
    before_teardown: Callable[[Any, TrainResult], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place under DeepSpeed; same contract as :func:`trace_transfer.train.loop.train`.

    Every rank calls this with the same ``batches``; rank r trains on batches r, r+W, r+2W, ... (W =
    world size), so one optimizer step sees ``W × batch_size × grad_accum`` examples.
    Each micro-step's loss is the mean over all ranks' response tokens (see :func:`_loop`), so W ranks
    take the step one process takes with micro-batch ``W × batch_size``, also for answers of
    different lengths.

    Args:
        model: the bare module (not yet wrapped): whole on every rank, or already partitioned by
            :func:`load_partitioned` (ZeRO-3). On return it is a plain, unsharded module on every
            rank, in eval mode, with DeepSpeed's hooks removed, or, with ``unshard=False``, a shell
            whose parameters are released (empty) on every rank.
        batches: ``epoch -> iterable of batches``.
        cfg: optimisation settings (lr, steps, micro batch, accumulation, clipping, decay, schedule).
        ds_config: a DeepSpeed JSON config (path or dict); ``"auto"`` values are filled from ``cfg``.
        params: parameter groups from ``MaskHandle.param_groups`` (the runner applies the CoreSet
            itself); or give ``coreset`` to have it applied here and removed afterwards.
        coreset, mode, masking: see :func:`trace_transfer.train.masking.apply_coreset`. With sparse
            masking (the default for small cores) each partly-core tensor is frozen — under ZeRO-3
            partitioned with no optimizer state — and only its delta over the core is trained.
        on_step: ``(step, loss)`` after every optimizer step; the loss is the global batch's mean token
            loss (averaged over accumulation micro-steps), the same on every rank.
        after_step: called after every optimizer step.
        on_engine: called with the DeepSpeed engine after the last step, before it is torn down
            (inspection: optimizer state, partitions).
        unshard: gather the trained model back onto every rank (the whole model per rank). False
            releases each rank's shard instead: save first, in ``before_teardown``.
        before_teardown: ``(engine, result)``, called on every rank after training while the model
            is still sharded: the place for :func:`save_consolidated`, which streams the checkpoint
            tensor by tensor (the runner saves each stage this way, then evaluates from disk).

    Returns:
        :class:`TrainResult` (identical on every rank).

    Raises:
        ConfigError: a DeepSpeed optimizer section or ``decay="masked"`` that would move frozen
            elements, batch sizes that contradict ``cfg``, or fewer batches than ranks.
    """
    import deepspeed
    import torch.distributed as dist

    if params is not None and coreset is not None:
        raise ConfigError("deepspeed_train: give either params (CoreSet already applied) or coreset, not both")
    handle = apply_coreset(model, coreset, mode=mode, masking=masking) if coreset is not None else None
    try:
        # Validate before joining the process group: a config error should fail fast, not hang peers.
        conf = load_ds_config(ds_config, cfg, _dist()[1])
        _check_decay(model, conf)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
        rank, world = _dist()
        if params is None:
            params = handle.param_groups(cfg.weight_decay) if handle is not None else model.parameters()

        def local(epoch: int) -> list[dict[str, torch.Tensor]]:
            all_batches = list(batches(epoch))
            usable = len(all_batches) - len(all_batches) % world  # equal counts, or collectives hang
            if usable == 0:
                raise ConfigError(f"the training data has {len(all_batches)} batches, fewer than the {world} ranks")
            return all_batches[rank:usable:world]

        if steps is None:
            steps = cfg.max_steps if cfg.max_steps > 0 else total_steps(cfg, len(local(0)))
        if "optimizer" in conf:
            client_opt = None
            model_parameters = [p for p in model.parameters() if p.requires_grad]
        else:
            client_opt = make_optimizer(params, cfg)
            model_parameters = None
        scheduler = None if "scheduler" in conf else (lambda opt: make_scheduler(opt, steps, cfg))
        enable_gradient_checkpointing(model, cfg)  # --gradient-checkpointing: before DeepSpeed wraps the module
        # What the teardown strips from each parameter: every attribute DeepSpeed added — for a model built
        # under zero.Init (load_partitioned) all of them, which were there before initialize already.
        before_attrs = {id(p): set() if hasattr(p, "ds_id") else set(vars(p)) for p in model.parameters()}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_opt, model_parameters=model_parameters,
                                               lr_scheduler=scheduler, config=conf)
        try:
            result = _loop(engine, local, steps, cfg, on_step, after_step)
            if on_engine is not None:
                on_engine(engine)
            if before_teardown is not None:
                before_teardown(engine, result)
        finally:
            if unshard:
                _unshard(engine, model, before_attrs)
            else:
                if handle is not None:
                    handle.remove()  # while the partitions exist: removing restores forwards and flags
                _release(engine, model, before_attrs)
    finally:
        if handle is not None:
            handle.remove()
    model.eval()
    return result


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens whose next-token loss counts: labels other than ``IGNORE_INDEX``, after the causal shift."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def causal_lm_token_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SUM of token cross-entropies over response tokens (fp32), where
    :func:`trace_transfer.train.loop.causal_lm_loss` takes their mean: a sum can be weighted by the
    global token count, a per-rank mean cannot."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    logits = logits[:, :-1].float()  # HF's own loss upcasts too
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def global_token_scale(batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """``W / N``: the factor that turns this rank's token-loss sum into its share of the global mean,
    N = response tokens in the global micro-batch (summed over ranks, one all_reduce of a count).
    DeepSpeed averages gradients over the W ranks, so ``Σ_r sum_r × W / N / W`` is the global token
    mean's gradient, whatever the ranks' token counts. 0 when no rank holds a response token (the
    micro-step then adds nothing; one process would get a NaN mean there)."""
    import torch.distributed as dist

    total = torch.tensor([response_tokens(batch)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dist.get_world_size() / float(total) if float(total) > 0 else 0.0


def _loop(engine, local, steps, cfg, on_step, after_step) -> TrainResult:
    """The optimisation loop, weighted as one process at the global batch would be.

    One process (``train.loop.train`` with micro-batch ``W × batch_size``) takes, per micro-step, the
    mean token loss of that whole micro-batch and averages the ``grad_accum`` micro-steps equally. Here
    rank r holds one W-th of that micro-batch, so each rank backpropagates its token-loss SUM × W / N
    (N: the micro-step's response tokens over all ranks); ``engine.backward`` divides by
    ``grad_accum`` and DeepSpeed averages over ranks — the same gradient, up to reduction order, also
    when ranks hold different numbers of response tokens (a per-rank mean weighs a rank's few tokens
    as much as another's many). The reported loss is that same global token mean, averaged over the
    accumulation micro-steps, identical on every rank.
    """
    import time

    import torch.distributed as dist

    engine.train()
    losses: list[float] = []
    step, epoch, acc = 0, 0, 0.0
    t0 = time.perf_counter()
    while step < steps:
        for batch in local(epoch):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            scale = global_token_scale(batch, engine.device)
            loss = causal_lm_token_sum(engine, batch) * scale  # this rank's share × W of the global mean
            engine.backward(loss)  # scales by 1 / grad_accum, as train.loop does
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()  # steps the optimizer and the schedule only at accumulation boundaries
            acc += float(loss.detach()) / cfg.grad_accum
            if not boundary:
                continue
            if after_step is not None:
                after_step()
            mean = torch.tensor([acc], dtype=torch.float64)
            dist.all_reduce(mean)  # Σ_r share_r × W = W × the global token mean
            value = float(mean) / dist.get_world_size()
            losses.append(value)
            if on_step is not None:
                on_step(step, value)
            acc = 0.0
            step += 1
            if step >= steps:
                break
        epoch += 1
    return TrainResult(steps=step, losses=losses, seconds=time.perf_counter() - t0)


def _unshard(engine, model: torch.nn.Module, before_attrs: dict[int, set[str]]) -> None:
    """Turn the engine's module back into a plain module with full parameters on every rank."""
    import deepspeed

    full: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3: gather one tensor at a time to bound the peak
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full[id(p)] = p.data.detach().clone()
    engine.destroy()  # removes ZeRO's module and gradient hooks
    for p in model.parameters():
        if id(p) in full:
            p.data = full[id(p)]
        for attr in set(vars(p)) - before_attrs.get(id(p), set()):
            delattr(p, attr)  # ds_id, ds_tensor, all_gather, ...: nothing may think it is still sharded
        p.grad = None


def _tied_targets(model: torch.nn.Module) -> list[str]:
    """Names (regex patterns) HF declares as tied *copies* (``lm_head.weight`` of a tied embedding):
    ``save_pretrained`` drops them and keeps the source, and ``from_pretrained`` re-ties them."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: {target: source}, every submodel
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) or ()  # transformers 4: a list of target patterns
    return list(tied)


class _SparseFold:
    """A partly-core tensor's sparse delta, folded in: ``W0 + scatter(δ)``."""

    def __init__(self, entry: Any):
        self.entry = entry
        self.tensors = [entry.delta]

    def value(self, t: torch.Tensor) -> torch.Tensor:
        return self.entry.effective(t.data, self.entry.delta.data)


class _LoraFold:
    """A LoRA layer's adapters, merged into its base weight as PEFT's ``merge()`` does (unsafe merge,
    the default of ``merge_and_unload``): ``W += layer.get_delta_weight(a)`` for each active adapter not
    yet merged, in order. ``get_delta_weight`` is PEFT's own (``B @ A``, transposed for
    ``fan_in_fan_out``, times the adapter's scaling, in the adapter's dtype with the fp32 detour PEFT
    takes for bf16/fp16 on CPU), and the in-place add is the same op on a copy, so the result is
    bit-equal to ``merge_and_unload()``. Only the adapters' own tensors are gathered with the weight."""

    def __init__(self, layer: torch.nn.Module, adapters: list[str]):
        self.layer, self.adapters = layer, adapters
        self.tensors = [t for a in adapters for t in _adapter_tensors(layer, a)]

    def value(self, t: torch.Tensor) -> torch.Tensor:
        merged = t.data.clone()
        for adapter in self.adapters:
            merged += self.layer.get_delta_weight(adapter)
        return merged


def _adapter_tensors(layer: torch.nn.Module, adapter: str) -> list[torch.Tensor]:
    if adapter in layer.lora_A:  # Linear, Conv
        return [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    return [layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]]  # Embedding


def _peft_base(model: torch.nn.Module) -> torch.nn.Module:
    """The model ``merge_and_unload()`` would return (a PeftModel's base), else ``model`` itself."""
    peft = getattr(model, "peft_config", None) is not None and hasattr(model, "get_base_model")
    return model.get_base_model() if peft else model


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """``{module path: _LoraFold}`` for every PEFT tuner layer in ``model``; refuses the ones whose
    merge is not a plain ``W + ΔW`` of the base weight (DoRA and other variants, LoRA biases,
    non-LoRA tuners, modules_to_save and trainable-token wrappers). Empty without PEFT."""
    import sys

    if "peft" not in sys.modules:  # no PEFT layer can exist unless peft was imported: skip its import cost
        return {}
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as Wrapper
    except ImportError:  # peft < 0.15: modules_to_save was the only such wrapper
        from peft.utils.other import ModulesToSaveWrapper as Wrapper

    out: dict[str, Any] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, Wrapper):  # not a tuner layer, yet its tensors would be written under its own names
            raise ConfigError(f"{path}: PEFT {type(mod).__name__} (modules_to_save / trainable tokens) cannot be "
                              f"merged while streaming the checkpoint; merge_and_unload() the model and save that")
        if not isinstance(mod, BaseTunerLayer):
            continue
        if not isinstance(mod, LoraLayer) or hasattr(mod, "unload_and_optionally_merge_module"):
            raise ConfigError(f"{path}: {type(mod).__name__} adapters cannot be merged while streaming the "
                              f"checkpoint (only plain LoRA layers); merge_and_unload() the model and save that")
        adapters = [a for a in check_adapters_to_merge(mod) if a in mod.lora_A or a in mod.lora_embedding_A]
        odd = [a for a in adapters if a in mod.lora_variant or mod.lora_bias.get(a)]
        if odd:
            raise ConfigError(f"{path}: adapter {odd[0]!r} uses DoRA, a LoRA variant or a LoRA bias, whose merge "
                              f"is not W + B·A; merge_and_unload() the model and save that, or use plain LoRA")
        out[path] = _LoraFold(mod, adapters)
    return out


def _merged_module_name(mod_name: str, tuners: dict[str, Any]) -> str | None:
    """``mod_name`` as it is after ``merge_and_unload()`` (a tuner's ``base_layer`` takes the tuner's
    place); None for a module inside an adapter (lora_A, lora_B, dropout), which the merge drops."""
    parts = mod_name.split(".") if mod_name else []
    for i in range(len(parts)):
        if ".".join(parts[:i]) in tuners:
            if parts[i] != "base_layer":
                return None
            return ".".join(parts[:i] + parts[i + 1:])
    return mod_name


def _save_entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, Any]]:
    """``(name, tensor, fold or None)`` for every tensor a checkpoint of ``model`` holds, in state-dict
    order: parameters and persistent buffers, a tied tensor once under the name HF keeps (not a
    declared tied copy). A fold turns the stored tensor into the value to write, gathering its
    ``tensors`` with it: sparse deltas of an active CoreSet are folded into their tensors, and LoRA
    adapters merged into their base weights, under the names ``merge_and_unload()`` +
    ``save_pretrained`` give (a PeftModel is saved as its merged base model); the deltas and adapters
    are not written themselves. Reads no weights, so it works on a ZeRO-3-sharded module."""
    import re

    handle = getattr(model, _ACTIVE_ATTR, None)
    sparse = {id(e.param): e for e in handle.sparse.values()} if handle is not None and not handle._removed else {}
    model = _peft_base(model)
    tuners = _lora_layers(model)
    folds: dict[int, Any] = {pid: _SparseFold(e) for pid, e in sparse.items()}
    folds.update({id(fold.layer.get_base_layer().weight): fold for fold in tuners.values()})
    skip = {id(e.delta) for e in sparse.values()}
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    by_name: dict[str, torch.Tensor] = {}
    names: dict[int, list[str]] = {}
    # state_dict()'s names and order, without calling it: its hooks would fold every sparse tensor at once
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        merged_name = _merged_module_name(mod_name, tuners) if tuners else mod_name
        if merged_name is None:
            continue  # an adapter's own module: merged, not written
        prefix = f"{merged_name}." if merged_name else ""
        own = list(mod._parameters.items()) + [
            (n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for attr, t in own:
            name = prefix + attr
            if t is not None and id(t) not in skip and name not in ignore:
                by_name[name] = t
                names.setdefault(id(t), []).append(name)
    targets = _tied_targets(model)
    out = []
    for group in names.values():
        kept = [n for n in group if not any(re.search(pat, n) for pat in targets)]
        name = kept[0] if kept else sorted(group)[-1]
        t = by_name[name]
        out.append((name, t, folds.get(id(t))))
    return out


def _gathered(t: torch.Tensor, fold: Any):
    """Context holding ``t`` (and what its fold reads: a sparse delta, LoRA factors) whole on every rank
    if ZeRO-3 partitioned it; on exit DeepSpeed re-partitions, so every rank drops the full copies at once."""
    import deepspeed

    group = [t] if fold is None else [t, *fold.tensors]
    return deepspeed.zero.GatheredParameters(group, modifier_rank=None,
                                             enabled=any(hasattr(x, "ds_id") for x in group))


def _full_value(t: torch.Tensor, fold: Any) -> torch.Tensor:
    return t.data if fold is None else fold.value(t)


def _release(engine, model: torch.nn.Module, before_attrs: dict[int, set[str]]) -> None:
    """Tear the engine down and drop every rank's shard: the model is left an empty shell."""
    engine.destroy()
    for p in model.parameters():
        for attr in set(vars(p)) - before_attrs.get(id(p), set()):
            delattr(p, attr)  # ds_tensor (the shard) goes with its attribute
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        p.grad = None


def consolidated_state_dict(model: torch.nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU tensors of every parameter and persistent buffer (tied tensors once, under the name HF
    keeps), gathered one at a time if the module is ZeRO-3-sharded. Sparse deltas of an active
    CoreSet are folded into their tensors, LoRA adapters merged into their base weights (neither
    written themselves). All ranks must call it; with ``rank0_only`` the others get ``{}``.

    This holds the whole model on rank 0 (every rank, without ``rank0_only``): to write a
    checkpoint use :func:`save_consolidated`, which streams tensor by tensor instead."""
    rank, _ = _dist()
    out: dict[str, torch.Tensor] = {}
    for name, t, entry in _save_entries(model):
        with _gathered(t, entry):
            if rank == 0 or not rank0_only:
                out[name] = _full_value(t, entry).detach().to("cpu", copy=True)
    return out


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)  # a ZeRO-3 placeholder is empty


def _warn_on_renamed_weights(model: torch.nn.Module, layout: list[tuple[str, Any, torch.dtype]]) -> None:
    """transformers 5 renames/fuses some weights in memory (MoE experts) and reverts that on save, across
    many tensors at once; a tensor-by-tensor save writes the in-memory names instead."""
    try:
        from transformers.modeling_utils import revert_weight_conversion

        meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, shape, dtype in layout}
        renamed = set(revert_weight_conversion(model, dict(meta))) != set(meta)
    except Exception:  # noqa: BLE001 - an old transformers or a model without the machinery: nothing to revert
        return
    if renamed:
        logger.warning("%s keeps some weights fused in memory; the streamed checkpoint has the in-memory names, "
                       "not the original checkpoint's (transformers 5 loads both)", type(model).__name__)


def _write_config(model: torch.nn.Module, tmp: Path) -> None:
    """config.json (+ generation_config.json) as ``save_pretrained`` writes them: dtype and architecture set."""
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    if getattr(model, "can_generate", lambda: False)() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)


def save_consolidated(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None,
                      max_shard_bytes: int | None = None,
                      before_publish: Callable[[Path], None] | None = None) -> Path | None:
    """Write ``model`` as one HF directory (config, safetensors shards + index, tokenizer) from rank 0,
    streaming: each tensor is gathered (if ZeRO-3 partitioned it), has its sparse delta folded (or its
    LoRA adapters merged), goes straight into its shard file on rank 0, and is dropped on every rank
    before the next one. No rank ever holds more than one full tensor (two on rank 0 while folding or
    merging, plus the adapter's small factors), so a sharded engine is saved without gathering the
    model. The directory is written into a temp directory that replaces
    ``out_dir`` only when complete. All ranks must call it; an error on rank 0 is raised on every rank
    (after the gathers, so no rank is left waiting at a collective).

    Args:
        model: a plain or ZeRO-3-sharded module (an HF model gets config.json and HF's shard names).
            A PEFT LoRA model is written merged, as ``merge_and_unload()`` + ``save_pretrained`` would
            write it (same names, bit-equal tensors, the base model's config), without gathering it.
        out_dir: the directory to write (replaced if it exists).
        tokenizer: saved alongside when given.
        max_shard_bytes: shard size cap (default: HF's 50 GB for HF models, else 2 GiB).
        before_publish: called on rank 0 with the complete temp directory just before the rename
            (extra files such as a stage record).

    Returns:
        ``out_dir`` on rank 0, None elsewhere.
    """
    from trace_transfer.checkpoint import DEFAULT_MAX_SHARD_BYTES, METADATA_KEY, StreamingShardWriter

    import torch.distributed as dist

    rank, world = _dist()
    out = Path(out_dir)
    entries = _save_entries(model)
    model = _peft_base(model)  # a LoRA model is written as its merged base: that model's config and class
    layout = [(name, _shape(t), t.dtype) for name, t, _ in entries]
    hf = hasattr(model, "save_pretrained") and hasattr(model, "config")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    writer, error = None, None
    if rank == 0:
        try:
            if hf:
                _warn_on_renamed_weights(model, layout)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            # HF marks its files {"format": "pt"} (from_pretrained checks it); others carry our metadata key
            header = {"format": "pt"} if hf else {METADATA_KEY: "{}"}
            cap = max_shard_bytes or (50 * 10**9 if hf else DEFAULT_MAX_SHARD_BYTES)
            writer = StreamingShardWriter(tmp, "model", layout, max_shard_bytes=cap, header=header)
        except Exception as exc:  # noqa: BLE001 - re-raised after the gathers, on every rank
            error = exc
    for name, t, entry in entries:
        with _gathered(t, entry):  # collective: every rank gathers, even once rank 0 has failed
            if writer is not None and error is None:
                try:
                    writer.add(name, _full_value(t, entry))
                except Exception as exc:  # noqa: BLE001
                    error = exc
    if rank == 0:
        try:
            if error is not None:
                raise error
            writer.close()
            if hf:
                _write_config(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if before_publish is not None:
                before_publish(tmp)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            if old.exists():
                shutil.rmtree(old)
        except Exception as exc:  # noqa: BLE001
            error = exc
            if writer is not None:
                writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
    if world > 1 and dist.is_available() and dist.is_initialized():
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None and rank != 0:
            raise ArtifactError(f"rank 0 failed while saving {out}: {status[0]}")
    if error is not None:
        raise error
    return out if rank == 0 else None
