"""Step time and memory of masked training against full fine-tuning and LoRA, all in one run.

Variants (each in a fresh subprocess, so peak RSS is its own): full FT, LoRA (peft, r=8, α=16, all
linear layers), and masked training with random CoreSets of the same budget (default 5% of parameters)
at tensor, row and element granularity with dense gradient masks (``row``, ``element``), and with
sparse trainable deltas (``row-sparse``, ``head-sparse`` — heads on attention projections, rows on the
other matrices, as ``score --granularity head`` does — and ``element-sparse``). Model: a Llama built
from a config (default hidden 512, 8 layers, vocab 32000: ~58M parameters), fp32 on CPU, AdamW.

Memory is reported three ways:
  * training state = parameters + gradients + optimizer state + gradient masks / delta indices +
    sparse deltas (bytes, exact);
  * trainable state = the same without the model's own weights: what training adds on top of
    inference (gradients, optimizer state, masks, indices, deltas) — the issue-13 goal's measure;
  * peak RSS of the worker process (ru_maxrss) and its growth over the RSS right after building the
    model (activations, allocator caches and the state above).

Ratios are against full FT measured in the same run. This machine is shared: step times are medians
of per-step *process CPU time* (wall time is reported too), variants run round-robin, and --repeats
re-runs every variant (the lowest median is kept).

    python bench/masked_training.py                      # ~5-10 min on 2 idle CPU cores (8 variants x 2)
    python bench/masked_training.py --hidden 768 --json bench-results.json
    python bench/masked_training.py --variants full,full+ckpt,row-sparse,row-sparse+ckpt  # +ckpt: gradient checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("full", "lora", "tensor", "row", "element", "row-sparse", "head-sparse", "element-sparse")
SPARSE_GOALS = {"trainable state": 0.15, "peak RSS": 0.75, "step time (cpu)": 1.0}  # × full FT, issue 13


# --------------------------------------------------------------------------------------------------
# Worker: one variant, one process
# --------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build_model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or int(a.hidden * 8 / 3) // 32 * 32,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64,
                      max_position_embeddings=max(512, a.seq), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def _random_coreset(model, granularity: str, ratio: float, seed: int):
    """Random CoreSet with ``ratio`` of all parameters (tensor: whole tensors, greedily up to the
    budget; row/head/element: that share of every matrix; head: attention heads of 64 on the
    q/k/v (output axis) and o (input axis) projections, rows elsewhere)."""
    import torch

    from trace_transfer.coreset import ELEMENT, CoreSet, UnitLayout

    g = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters())
    masks, layouts = {}, {}
    if granularity == "tensor":
        budget = ratio * sum(p.numel() for _, p in named)
        used = 0
        for i in torch.randperm(len(named), generator=g).tolist():
            name, p = named[i]
            if used + p.numel() <= budget:
                masks[name], layouts[name] = torch.tensor([True]), UnitLayout()
                used += p.numel()
    else:
        for name, p in named:
            if p.dim() != 2:
                continue
            if granularity == "element":
                layout = ELEMENT
            elif granularity == "head" and "self_attn" in name:
                layout = UnitLayout.heads(64, axis=1 if "o_proj" in name else 0)
            else:
                layout = UnitLayout.rows()
            n = layout.num_units(tuple(p.shape))
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.randperm(n, generator=g)[: max(1, round(ratio * n))]] = True
            masks[name], layouts[name] = m, layout
    return CoreSet.from_unit_masks(masks, layouts, model, metadata={"strategy": "random", "granularity": granularity})


def _state_bytes(model, opt, extra: int = 0, delta_bytes: int = 0) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()
    p_bytes = sum(p.numel() * p.element_size() for p in params) - delta_bytes  # the model's own weights
    g_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    o_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if hasattr(t, "numel") and t.dim() > 0)
    trainable = delta_bytes + g_bytes + o_bytes + extra
    return {"param_bytes": p_bytes, "delta_bytes": delta_bytes, "grad_bytes": g_bytes, "optim_bytes": o_bytes,
            "mask_bytes": extra, "trainable_state_bytes": trainable, "state_bytes": p_bytes + trainable}


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    model = _build_model(a)
    total = sum(p.numel() for p in model.parameters())
    rss_model = _rss_bytes()
    mask_bytes, delta_bytes, handle = 0, 0, None
    variant, checkpointed = a.worker.removesuffix("+ckpt"), a.worker.endswith("+ckpt")
    if variant == "full":
        groups, trainable = [{"params": list(model.parameters()), "weight_decay": 0.01}], total
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        groups, trainable = [{"params": params, "weight_decay": 0.01}], sum(p.numel() for p in params)
    else:
        from trace_transfer.train.masking import apply_coreset

        granularity, _, sparse = variant.partition("-")
        cs = _random_coreset(model, granularity, a.ratio, a.seed)
        handle = apply_coreset(model, cs, masking=sparse or "dense")
        groups, trainable, mask_bytes = handle.param_groups(0.01), handle.num_trainable(), handle.mask_bytes()
        delta_bytes = handle.delta_bytes()
    # fused: one kernel per step; the foreach path is ~8x slower on CPU and slower still where v = 0
    # (sqrt of exact zeros takes a slow path on this CPU), which would charge masking for a CPU quirk.
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=a.optimizer == "fused", foreach=a.optimizer == "foreach")
    if checkpointed:  # the training loop's own switch (TrainConfig.gradient_checkpointing)
        from trace_transfer.train.loop import TrainConfig, enable_gradient_checkpointing

        enable_gradient_checkpointing(model, TrainConfig(gradient_checkpointing=True))
    g = torch.Generator().manual_seed(a.seed)
    data = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=g) for _ in range(4)]
    times, cpu_times, state = [], [], {}
    for step in range(a.warmup + a.steps):
        x = data[step % len(data)]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if step == a.warmup + a.steps - 1:
            state = _state_bytes(model, opt, mask_bytes, delta_bytes)  # grads now; optimizer state after step 1+
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if handle is not None:
        handle.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"variant": a.worker, "total_params": total, "trainable_params": trainable,
            "step_s": statistics.median(times), "step_times": times,
            "cpu_s": statistics.median(cpu_times), "cpu_times": cpu_times, **state,
            "peak_rss": peak, "rss_after_build": rss_model, "rss_growth": peak - rss_model}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _run_variant(variant: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
        if k not in ("worker", "variants", "json", "repeats") and v is not None
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--intermediate", type=int, default=None, help="default: 8/3 × hidden, rounded to 32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (allocations, caches)")
    ap.add_argument("--ratio", type=float, default=0.05, help="CoreSet budget as a share of all parameters")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker; 1 keeps CPU time free of OpenMP spin-waiting on a busy machine")
    ap.add_argument("--optimizer", choices=["fused", "foreach"], default="fused", help="AdamW implementation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant; the lowest median CPU time is kept")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None, help="also write all figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return

    variants = a.variants.split(",")
    if "full" not in variants:
        variants.insert(0, "full")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(a.repeats):  # round robin: a change in the machine's load hits every variant alike
        for v in variants:
            r = _run_variant(v, a)
            runs[v].append(r)
            print(f"  [{rep + 1}/{a.repeats}] {v:14s} cpu {r['cpu_s']:.3f}s/step  wall {r['step_s']:.3f}s/step  "
                  f"state {_mib(r['state_bytes'])} MiB  peak RSS {_mib(r['peak_rss'])} MiB", file=sys.stderr)
    results = {v: min(rs, key=lambda r: r["cpu_s"]) for v, rs in runs.items()}
    base = results["full"]
    print(f"\nmodel: Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}: {base['total_params'] / 1e6:.1f}M "
          f"parameters, fp32, CPU ({a.threads} thread(s)); batch {a.batch} × {a.seq} tokens; AdamW ({a.optimizer}); "
          f"median of {a.steps} steps after {a.warmup} warm-up, best of {a.repeats} run(s); "
          f"CoreSets: random, {a.ratio:.0%} budget")
    print("time: 'cpu' = process CPU time per step (robust on a shared machine), 'wall' = elapsed\n")
    head = ["variant", "trainable", "cpu s", "× full", "wall s", "× full", "state MiB", "× full",
            "trainable state MiB", "× full", "(delta", "grad", "optim", "mask/index)", "peak RSS MiB", "× full",
            "RSS growth MiB", "× full"]
    rows = []
    for v, r in results.items():
        rows.append([v, f"{r['trainable_params'] / r['total_params']:.2%}", f"{r['cpu_s']:.3f}",
                     f"{r['cpu_s'] / base['cpu_s']:.2f}", f"{r['step_s']:.3f}", f"{r['step_s'] / base['step_s']:.2f}",
                     _mib(r["state_bytes"]), f"{r['state_bytes'] / base['state_bytes']:.2f}",
                     _mib(r["trainable_state_bytes"]),
                     f"{r['trainable_state_bytes'] / base['trainable_state_bytes']:.3f}", _mib(r["delta_bytes"]),
                     _mib(r["grad_bytes"]), _mib(r["optim_bytes"]), _mib(r["mask_bytes"]), _mib(r["peak_rss"]),
                     f"{r['peak_rss'] / base['peak_rss']:.2f}", _mib(r["rss_growth"]),
                     f"{r['rss_growth'] / base['rss_growth']:.2f}"])
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    checks = []
    if "tensor" in results:
        t = results["tensor"]
        checks.append(("tensor ≤ full FT step time (cpu)", t["cpu_s"] <= base["cpu_s"]))
        checks.append(("tensor ≤ full FT training state", t["state_bytes"] <= base["state_bytes"]))
        checks.append(("tensor ≤ full FT peak RSS", t["peak_rss"] <= base["peak_rss"]))
    if "element" in results:
        checks.append(("element ≤ 1.15 × full FT step time (cpu)", results["element"]["cpu_s"] <= 1.15 * base["cpu_s"]))
    for v in (v for v in results if v.endswith("-sparse")):
        r = results[v]
        got = {"trainable state": r["trainable_state_bytes"] / base["trainable_state_bytes"],
               "peak RSS": r["peak_rss"] / base["peak_rss"], "step time (cpu)": r["cpu_s"] / base["cpu_s"]}
        for what, goal in SPARSE_GOALS.items():
            checks.append((f"{v} {what} {got[what]:.2f} ≤ {goal} × full FT", got[what] <= goal))
    print()
    for label, ok in checks:
        print(f"{'met' if ok else 'MISSED'}: {label}")
    if a.json:
        from trace_transfer.checkpoint import write_json_atomic

        write_json_atomic(a.json, {"args": {k: v for k, v in vars(a).items() if k != "worker"}, "best": results,
                                   "runs": runs})


if __name__ == "__main__":
    main()
