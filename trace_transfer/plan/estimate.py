"""Per-step memory and FLOPs of training and inference, from a :class:`ModelShape` alone.

Every figure is a sum of named terms (bytes per GPU unless said otherwise), so a plan shows where the
memory goes and docs/PLANNER.md can check one by hand. The formulas:

**Model states** (Ψ parameters, G of them trainable; ZeRO paper, Rajbhandari et al. 2020):

* one process (``engine="single"``: the pipeline's probe and its fine-tuning without DeepSpeed): the
  model in fp32 (4Ψ), fp32 gradients (4G), AdamW moments (8G), and under bf16 autocast a bf16 copy of
  every trainable weight that autocast caches for the step (2G); 18 bytes per trainable parameter.
* DeepSpeed with bf16: bf16 weights 2Ψ, bf16 gradients 2G, fp32 master + two moments 12G, and the fp32
  gradient copy the optimizer step reads 4G — 16 bytes per trainable parameter in the ZeRO paper's
  accounting plus that copy. ZeRO-1 partitions the 12G (and the fp32 copy) over the N data-parallel
  ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights; ZeRO-3 builds the fp32 gradient copy one
  ``sub_group_size`` at a time. ``offload_optimizer`` moves 12G + 4G to host memory, ``offload_param``
  (ZeRO-3) the weights too.
* ZeRO working buffers: stage 3 gathers a layer's bf16 weights before using it and prefetches the
  next (2 × the largest layer or global tensor, capped by ``stage3_max_live_parameters``); stages 2-3
  reduce gradients through a ``reduce_bucket_size`` bucket, stage 2 gathers weights through an
  ``allgather_bucket_size`` one.

**Trainable fraction** comes from the method and the CoreSet (see ``pipeline.py``): whole-tensor cores
train only their tensors; row/column/head/element cores under dense masking keep every touched tensor
trainable (in practice every tensor in scope: 1.00× full FT's state, measured on a 58M model), under
sparse masking only δ (+ int32 indices; an element core also builds one weight-sized tensor at a time).

**Activations** (what autograd keeps for backward), per token and decoder layer, with ``e`` bytes per
activation (2 in bf16, 4 in fp32), h hidden, q = heads·head_dim, k = kv_heads·head_dim, i the MLP width.
It is the per-layer count of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", 34·s·b·h + 5·a·s²·b bytes for GPT) redone for a Llama-style block: no dropout
masks, RMSNorm that upcasts its input to fp32 (HF's implementation saves that fp32 copy), SwiGLU (four
i-wide tensors instead of GELU's two), grouped-query K/V, and SDPA/flash attention, which keeps no s×s
score matrix (the 5·a·s²·b term is gone)::

    per layer = 2·(4 + e)·h          two RMSNorms: fp32 input + normed output
              + e·q + 2·e·q          Q (after RoPE), K and V repeated to all heads, as SDPA saves them
              + 2·e·q                SDPA output and its contiguous copy (input of o_proj)
              + 4·e·i                gate, up, SiLU(gate), SiLU(gate)·up
              [+ (4 + e)·(q + k)     Qwen3's q_norm/k_norm]

K and V count at the full q width: with a padding mask HF repeats the KV heads before SDPA (its
native-GQA path needs ``attention_mask is None``), and fine-tuning batches are padded. Plus, once, the
final norm (4 + e)·h and the loss over the vocabulary V: the logits the model returns (e·V), their fp32
upcast when e < 4 (4·V) and HF's fp32 log-softmax output (4·V). This is an upper bound for whole-tensor
cores: a frozen matrix needs no copy of its input, and nothing below the lowest trainable tensor is
kept (measured 0.45x of it with the largest 10 % of tensors as the core; docs/PLANNER.md). With gradient checkpointing (one checkpoint per decoder
layer) only each layer's input is kept (r·h bytes, r = 4 when fp32 master weights make the residual
stream fp32, else e), plus one layer's full activations while it is recomputed.

**FLOPs** per token, with M the weights that multiply every token (all matrices but the input
embedding) and W the matrices whose weight gradient is computed: forward 2·M (+ causal attention
2·L·s·q), backward 2·M for the gradient with respect to the inputs — through *every* layer, frozen or
not, down to the lowest trainable tensor (we count all of them) — plus 2·W for the weight gradients (W
= M for full fine-tuning, so 6·M in all; a frozen tensor skips only its weight-gradient matmul), plus
twice the attention forward. Gradient checkpointing adds one more forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from trace_transfer.plan.hardware import GiB, Hardware
from trace_transfer.plan.shapes import ModelShape

# DeepSpeed's own defaults for the buffer sizes a JSON config may leave out (elements).
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
               "stage3_max_live_parameters": 1_000_000_000, "sub_group_size": 1_000_000_000}


@dataclass(frozen=True)
class Trainable:
    """What a method trains.

    Args:
        label: how the plan names it (``full``, ``tensor cores 5%``, ...).
        grad_params: parameter elements with a gradient and AdamW state (whole tensors under dense
            masking; δ under sparse masking; adapters for LoRA).
        weight_grad_params: matrix elements whose weight gradient backward computes (FLOPs).
        extra_params: elements added to the model (sparse δ, LoRA adapters), on top of Ψ.
        index_bytes: bytes of sparse-δ indices.
        transient_params: a weight-sized tensor built per step (element cores), elements.
        note: one line on where the figure comes from.
    """

    label: str
    grad_params: int
    weight_grad_params: int
    extra_params: int = 0
    index_bytes: int = 0
    transient_params: int = 0
    note: str = ""


@dataclass(frozen=True)
class Setup:
    """How a step runs: one process, or DeepSpeed with a ZeRO stage over ``world`` ranks."""

    engine: str = "single"  # single | deepspeed
    zero: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    world: int = 1
    bf16: bool = True
    micro_batch: int = 1
    seq_len: int = 1024
    checkpointing: bool = False
    buffers: dict[str, int] = field(default_factory=lambda: dict(DS_DEFAULTS))
    # > 0: the batch is global and the ranks share it (the launched probe: micro = batch / world), so
    # a setup with more ranks also holds fewer activations per rank; 0: micro_batch is per rank.
    global_batch: int = 0

    def per_rank_batch(self) -> int:
        """Examples per micro-batch on one rank."""
        if not self.global_batch:
            return self.micro_batch
        return self.global_batch if self.engine == "single" else max(1, math.ceil(self.global_batch / self.world))

    def describe(self) -> str:
        if self.engine == "single":
            return f"1 process, {'fp32 + bf16 autocast' if self.bf16 else 'fp32'}"
        off = "+".join(x for x, on in (("opt", self.offload_optimizer), ("param", self.offload_param)) if on)
        micro = f", micro-batch {self.per_rank_batch()}/rank" if self.global_batch else ""
        return f"ZeRO-{self.zero}{f' offload {off}' if off else ''} x{self.world}{micro}"


def activation_bytes(shape: ModelShape, tokens: int, seq_len: int, e: int, residual: int,
                     checkpointing: bool) -> int:
    """Bytes autograd keeps for ``tokens`` tokens (micro-batch x sequence) — see the module docstring."""
    h, q, k, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    layer = 2 * (4 + e) * h + e * q + 2 * e * q + 2 * e * q + 4 * e * i
    if shape.qk_norm:
        layer += (4 + e) * (q + k)
    head = (4 + e) * h + (e + (4 if e < 4 else 0) + 4) * shape.vocab
    kept = residual * h * shape.layers + layer if checkpointing else layer * shape.layers
    return (kept + head) * tokens


def train_memory(shape: ModelShape, trainable: Trainable, setup: Setup, hw: Hardware,
                 ranks_per_node: int | None = None) -> dict[str, Any]:
    """Per-GPU bytes by term, the total, and host bytes per node, for one training step."""
    psi, g, n = shape.params + trainable.extra_params, trainable.grad_params, setup.world
    tokens = setup.per_rank_batch() * setup.seq_len
    out: dict[str, int] = {}
    host = 0
    if setup.engine == "single":
        e = 2 if setup.bf16 else 4
        out["params"] = 4 * psi
        out["grads"] = 4 * g
        out["optimizer"] = 8 * g
        out["autocast_cache"] = 2 * g if setup.bf16 else 0
        out["buffers"] = 4 * trainable.transient_params + trainable.index_bytes
        residual = 4
        host = 4 * shape.params  # load_model(dtype=float32) materialises the model on the CPU first
    else:
        w = 2 if setup.bf16 else 4
        e = w
        residual = w
        # ZeRO-1/2/3 always clone an fp32 master partition, also of fp32 weights (measured on the 2-rank CPU
        # probe, bench/plan_vs_measured.py --probe); without ZeRO an fp32 model steps in place.
        opt = 12 if setup.bf16 or setup.zero >= 1 else 8
        fp32_grad = 4 if setup.bf16 else 0
        z = setup.zero
        out["params"] = w * psi // (n if z >= 3 else 1)
        out["grads"] = w * g // (n if z >= 2 else 1)
        opt_bytes = opt * g // (n if z >= 1 else 1)
        grad_copy = fp32_grad * (min(g // n, setup.buffers["sub_group_size"]) if z >= 3 else g // (n if z >= 1 else 1))
        if setup.offload_optimizer:
            out["optimizer"] = 0
            host += opt_bytes + grad_copy
        else:
            out["optimizer"] = opt_bytes + grad_copy
        if setup.offload_param and z >= 3:
            host += out["params"]
            out["params"] = 0
        # Buckets fill up to their size or to what there is to reduce / gather, whichever is smaller.
        buf = 0
        if z >= 3:
            biggest = max(shape.layer_params, max((t.numel for t in shape.tensors if t.group != "layers"), default=0))
            buf += w * min(2 * biggest, setup.buffers["stage3_max_live_parameters"], psi)
        if z >= 2:
            buf += w * min(setup.buffers["reduce_bucket_size"], g)
        if z == 2:
            buf += w * min(setup.buffers["allgather_bucket_size"], psi)
        out["buffers"] = buf + w * trainable.transient_params + trainable.index_bytes // (n if z >= 3 else 1)
        out["autocast_cache"] = 0
        rpn = ranks_per_node or min(n, hw.gpus_per_node)
        host = host * rpn + stage_start_host(shape, z, rpn)
    act = activation_bytes(shape, tokens, setup.seq_len, e, residual, checkpointing=False)
    act_ckpt = activation_bytes(shape, tokens, setup.seq_len, e, residual, checkpointing=True)
    out["activations"] = act_ckpt if setup.checkpointing else act
    out["overhead"] = hw.overhead
    total = sum(out.values())
    return {"per_gpu": out, "total": total, "activations_no_ckpt": act, "activations_ckpt": act_ckpt,
            "host_per_node": host}


def stage_start_host(shape: ModelShape, zero: int, ranks_per_node: int) -> int:
    """Host bytes per node while every DeepSpeed rank loads the model it starts from.

    ZeRO-3: ``train.ds.load_partitioned`` builds the model partitioned under ``zero.Init`` and streams the
    checkpoint in one tensor at a time (gathered on every rank, filled by rank 0 from the file): rank 0
    reads the largest tensor in the checkpoint's dtype, every rank holds it gathered in fp32 at most.
    ZeRO-0/1/2: every rank loads the whole model (checkpoint dtype) before ``deepspeed.initialize``.
    """
    if zero >= 3:
        return shape.checkpoint_bytes * shape.largest_tensor + ranks_per_node * 4 * shape.largest_tensor
    return ranks_per_node * shape.checkpoint_bytes * shape.params


# Host bytes per element of the largest tensor while rank 0 forms Δ (probe/warmstart.py and
# probe/distributed.py): θ0 read back (4) + θ* on the host (4) + Δ (4) + its float64 copy for the
# norm (8) + |Δ| (4).
DELTA_HOST_BYTES = 24
PROBE_PHASES = ("warm start", "fisher", "write")


def probe_memory(shape: ModelShape, setup: Setup, hw: Hardware, *, fisher_elements: bool = True,
                 shard_bytes: int = 2 * GiB, ranks_per_node: int | None = None) -> dict[str, Any]:
    """One warm-start probe of every parameter (``probe/warmstart.py``, or ``probe/distributed.py``
    when ``setup.engine == "deepspeed"``): the peak of its three phases, per GPU by term (``fisher``
    added), host bytes per node and disk bytes.

    * **warm start**: full fine-tuning as :func:`train_memory` counts it, with the setup's checkpointing.
    * **fisher**: the accumulator keeps an fp32 sum per element (``fisher_elements``; else float64 per
      tensor: nothing), 4Ψ in one process, 4Ψ/N under ZeRO-1/2/3 (each rank squares only its gradient
      partition). Its activations follow the setup's checkpointing, as the warm start's do (the pass
      runs in eval mode, where HF does not checkpoint, so the probe wraps the decoder layers itself:
      ``probe.fisher.eval_checkpointing``). In one process ``train()`` has returned and freed AdamW
      (weights, gradients, autocast copies stay); under DeepSpeed the pass runs inside the engine's
      ``on_engine`` callback, so every model state stays.
    * **write**: the per-element Fisher and Δ go out one tensor at a time: a gathered fp32 copy of the
      largest tensor on the GPU next to the states and the accumulator, no activations.

    Host: one process loads the model in fp32 on the CPU before moving it (4Ψ); under ZeRO-3 each rank
    streams the checkpoint into its partitions one tensor at a time (:func:`stage_start_host`); under ZeRO-1/2
    each rank loads the whole model in fp32 on the CPU. Then rank 0 (or the one process) buffers one
    output shard (``shard_bytes``) and forms Δ of one tensor (:data:`DELTA_HOST_BYTES` per element).
    Offloaded state adds as in :func:`train_memory`. Disk while it runs: θ0 (4Ψ, deleted at the end),
    Δ (4Ψ) and the per-element Fisher (4Ψ).
    """
    psi, n, largest = shape.params, setup.world, shape.largest_tensor
    full = Trainable("full", psi, shape.matmul_params)
    ds = setup.engine == "deepspeed"
    fisher = (4 * psi // (n if ds else 1)) if fisher_elements else 0
    plain = train_memory(shape, full, with_(setup, checkpointing=False), hw, ranks_per_node)

    def peak(ckpt: bool) -> tuple[str, dict[str, int], dict[str, int]]:
        warm = train_memory(shape, full, with_(setup, checkpointing=ckpt), hw, ranks_per_node)
        pass_terms = {**warm["per_gpu"], "fisher": fisher} if ds else \
            {**warm["per_gpu"], "optimizer": 0, "fisher": fisher}
        write_terms = {**pass_terms, "activations": 0, "buffers": pass_terms["buffers"] + 4 * largest}
        phases = {"warm start": {**warm["per_gpu"], "fisher": 0}, "fisher": pass_terms, "write": write_terms}
        totals = {k: sum(v.values()) for k, v in phases.items()}
        name = max(PROBE_PHASES, key=lambda k: totals[k])
        return name, phases[name], totals

    plain_peak, ckpt_peak = peak(False), peak(True)
    phase, terms, totals = ckpt_peak if setup.checkpointing else plain_peak
    rpn = ranks_per_node or (min(n, hw.gpus_per_node) if ds else 1)
    loaded = stage_start_host(shape, setup.zero, rpn) if ds else 4 * psi  # what train_memory's host holds for the load
    offloaded = plain["host_per_node"] - loaded if ds else 0
    if not ds:
        load = 4 * psi
    elif setup.zero >= 3:
        load = stage_start_host(shape, setup.zero, rpn)
    else:
        load = rpn * 4 * psi
    # The output shard buffer fills up to its size or to the whole Δ, whichever is smaller.
    host = offloaded + max(load, min(shard_bytes, 4 * psi) + DELTA_HOST_BYTES * largest)
    return {"per_gpu": terms, "total": totals[phase], "phase": phase, "phases": totals,
            "activations_no_ckpt": plain["activations_no_ckpt"], "activations_ckpt": plain["activations_ckpt"],
            "total_no_ckpt": plain_peak[2][plain_peak[0]], "total_ckpt": ckpt_peak[2][ckpt_peak[0]],
            "host_per_node": host, "disk": 4 * psi * (3 if fisher_elements else 2)}


def train_flops(shape: ModelShape, trainable: Trainable, tokens: float, seq_len: int, checkpointing: bool = False) -> float:
    """FLOPs of training on ``tokens`` tokens (see the module docstring for the terms)."""
    m = shape.matmul_params + trainable.extra_params
    attn = 2 * shape.layers * seq_len * shape.heads * shape.head_dim  # causal: half of QKᵀ and AV
    fwd = 2 * m + attn
    bwd = 2 * m + 2 * trainable.weight_grad_params + 2 * attn
    return (fwd * (2 if checkpointing else 1) + bwd) * tokens


def forward_flops(shape: ModelShape, tokens: float, seq_len: int) -> float:
    attn = 2 * shape.layers * seq_len * shape.heads * shape.head_dim
    return (2 * shape.matmul_params + attn) * tokens


def inference_memory(shape: ModelShape, batch: int, prompt: int, new_tokens: int, gpus: int, hw: Hardware,
                     loglik: bool = True) -> dict[str, Any]:
    """bf16 weights split over ``gpus`` (device_map), the KV cache, and the largest transient tensors."""
    e = 2
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * e * batch * (prompt + new_tokens)
    layer_act = e * (2 * shape.hidden + 3 * shape.intermediate) * batch * prompt  # one layer's transients
    logits = (e + 8) * shape.vocab * batch * (prompt if loglik else 1)
    out = {"params": e * shape.params // gpus, "kv_cache": kv // gpus, "activations": layer_act + logits,
           "overhead": hw.overhead}
    return {"per_gpu": out, "total": sum(out.values()), "host_per_node": shape.checkpoint_bytes * shape.params}


def time_range(flops: float, gpus: int, hw: Hardware) -> tuple[float, float]:
    """Seconds at the high and at the low end of the MFU range."""
    peak = gpus * hw.gpu.bf16_flops
    return flops / (peak * hw.mfu[1]), flops / (peak * hw.mfu[0])


def fits(memory: dict[str, Any], hw: Hardware) -> bool:
    return memory["total"] <= hw.budget and memory["host_per_node"] <= hw.host_memory


def gb(x: float) -> float:
    return x / GiB


def with_(setup: Setup, **kw: Any) -> Setup:
    return replace(setup, **kw)
