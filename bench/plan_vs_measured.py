"""The planner's estimates against what a CPU training step actually holds, on models built from config.

For each architecture (a Llama and a Qwen3 with q_norm/k_norm, both grouped-query) and each of full
fine-tuning and a whole-tensor core, one subprocess builds the model, trains a few AdamW steps with the
project's own loop (fp32 on CPU, as ``trace-transfer finetune`` runs there) and measures:

* **saved activations**: bytes of every tensor autograd saves for backward during one forward + loss
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters excluded) plus the logits
  the model returns — against ``plan.activation_bytes`` (with and without gradient checkpointing);
* **model states**: parameters + gradients + AdamW state after a step, exact bytes — against the
  planner's params + grads + optimizer terms;
* **peak RSS growth** over the RSS after building the model — against the planner's total less the
  parameters and its fixed overhead (the allocator, matmul workspaces and Python are what is left).

Ratios are measured/estimated in the same run. CPU runs exercise fp32 (no autocast), i.e. the formulas
with e = 4; bf16 on GPU is the same count with e = 2 (see docs/PLANNER.md).

    python bench/plan_vs_measured.py                    # ~1-2 min on 2 CPU cores
    python bench/plan_vs_measured.py --hidden 512 --layers 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ARCHS = ("llama", "qwen3")
VARIANTS = ("full", "tensor")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a: argparse.Namespace) -> dict:
    import torch

    from trace_transfer.models import tiny_config
    from trace_transfer.plan import Setup, activation_bytes, core_trainable, model_shape, train_memory
    from trace_transfer.plan.hardware import Hardware
    from trace_transfer.train.loop import TrainConfig, causal_lm_loss, train
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = tiny_config(a.arch, a.layers, a.hidden, a.heads, a.kv_heads, vocab_size=a.vocab)
    cfg.use_cache = False
    config = cfg.to_dict()
    shape = model_shape(config, a.arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if a.variant == "tensor":
        tr = core_trainable(shape, a.ratio, "tensor", "tensors", "dense")
        sizes = sorted(((p.numel(), n) for n, p in model.named_parameters() if ".layers." in n), reverse=True)
        core = {n for _, n in sizes[: int(a.ratio * len(sizes))]}  # the planner's upper bound: the largest
        for n, p in model.named_parameters():
            p.requires_grad_(n in core)
    else:
        from trace_transfer.plan import Trainable

        tr = Trainable("full", shape.params, shape.matmul_params)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(4, a.vocab, (a.batch, a.seq), generator=g)}
    batch["labels"] = batch["input_ids"].clone()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])

    def saved_bytes() -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
        held = out.logits.untyped_storage()
        if held.data_ptr() not in seen:
            seen[held.data_ptr()] = held.nbytes()
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return sum(seen.values())

    act = saved_bytes()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    act_ckpt = saved_bytes()
    model.gradient_checkpointing_disable()

    rss0 = _rss()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tcfg = TrainConfig(lr=1e-4, max_steps=a.steps, batch_size=a.batch, seq_len=a.seq, precision="fp32", warmup_ratio=0.0)
    opt_params = [p for p in model.parameters() if p.requires_grad]
    states: dict[str, int] = {}

    def after() -> None:  # gradients are zeroed (set to None) after the step: count them from the shapes
        if states:
            return
        import gc

        for obj in gc.get_objects():
            if isinstance(obj, torch.optim.Optimizer):
                states["optimizer"] = sum(v.numel() * v.element_size() for s in obj.state.values()
                                          for v in s.values() if torch.is_tensor(v) and v.dim() > 0)

    train(model, lambda _: [batch] * a.steps, tcfg, params=opt_params, steps=a.steps, after_step=after)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak0)
    grads = sum(p.numel() * p.element_size() for p in opt_params)
    params = sum(p.numel() * p.element_size() for p in model.parameters())

    hw = Hardware()
    setup = Setup("single", bf16=False, micro_batch=a.batch, seq_len=a.seq)
    est = train_memory(shape, tr, setup, hw)
    pg = est["per_gpu"]
    est_act = activation_bytes(shape, a.batch * a.seq, a.seq, 4, 4, False)
    est_ckpt = activation_bytes(shape, a.batch * a.seq, a.seq, 4, 4, True)
    est_growth = est["total"] - pg["params"] - pg["overhead"]
    return {
        "arch": a.arch, "variant": a.variant, "params": shape.params, "trainable": tr.grad_params,
        "tokens": a.batch * a.seq,
        "activations": {"measured": act, "estimated": est_act},
        "activations_ckpt": {"measured": act_ckpt, "estimated": est_ckpt},
        "states": {"measured": params + grads + states.get("optimizer", 0),
                   "estimated": pg["params"] + pg["grads"] + pg["optimizer"]},
        "rss_growth": {"measured": peak - rss0, "estimated": est_growth},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="llama", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    results = []
    for arch in ARCHS:
        for variant in VARIANTS:
            argv = [sys.executable, __file__, "--worker", "--arch", arch, "--variant", variant]
            for k in ("hidden", "layers", "heads", "kv_heads", "vocab", "batch", "seq", "steps", "ratio"):
                argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'model':<14}{'quantity':<18}{'measured MiB':>13}{'planned MiB':>13}{'ratio':>8}")
    for r in results:
        for q in ("activations", "activations_ckpt", "states", "rss_growth"):
            m, e = r[q]["measured"], r[q]["estimated"]
            print(f"{r['arch'] + ' ' + r['variant']:<14}{q:<18}{m / 2**20:>13.1f}{e / 2**20:>13.1f}{m / e:>8.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
