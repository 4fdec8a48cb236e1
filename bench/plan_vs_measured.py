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

``--probe`` measures the launched probe instead: ``torchrun`` starts 2 CPU ranks (DeepSpeed on CPU,
gloo) that each run ``probe_deepspeed`` under ZeRO-3 on a saved model, as a pipeline probe step does
under ``launch.deepspeed``, with every sequence exactly ``--seq`` tokens long. A thread on each rank
samples its RSS every 5 ms (after a warm-up probe of a 2-layer model
loads the imports, the process group and DeepSpeed's ops) and keeps the peak of each phase (load: ``zero.Init`` + θ0 snapshot; warm
start: engine + steps; fisher: the Fisher pass; write: per-element Fisher and Δ out), as growth over
the RSS before the call, against :func:`trace_transfer.plan.estimate.probe_memory` for the same setup
(its per-GPU phase totals less the fixed GPU overhead; load: its host term for one rank). It runs once
with and once without the per-element Fisher, so the accumulator's term is measured apart.

    python bench/plan_vs_measured.py                    # ~1-2 min on 2 CPU cores
    python bench/plan_vs_measured.py --hidden 512 --layers 8 --json out.json
    python bench/plan_vs_measured.py --probe --hidden 512 --layers 8 --seq 256 --batch 4   # ~2-4 min
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
    from trace_transfer.train.loop import TrainConfig, train
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


# ZeRO-3 as the pipeline's ds_zero3.json, on CPU in fp32 (no bf16 there); tiny tensors partitioned too.
PROBE_DS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_prefetch_bucket_size": 0},
            "steps_per_print": 1000, "wall_clock_breakdown": False}
PROBE_WORLD = 2


def probe_worker(a: argparse.Namespace) -> None:
    """One rank of the launched probe: peak RSS growth per phase, printed as one JSON line."""
    import torch

    torch.set_num_threads(1)
    import trace_transfer.probe.distributed as dist_probe
    import trace_transfer.train.ds as ds
    from trace_transfer.probe import ProbeConfig

    phase, peaks, done = ["load"], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            r = _rss()
            peaks[phase[0]] = max(peaks.get(phase[0], 0), r)
            time.sleep(0.005)

    def label(name: str, fn):
        def wrapped(*args, **kw):
            phase[0] = name
            return fn(*args, **kw)
        return wrapped

    # The phases, marked where the probe enters them (the sampler files each RSS reading under one).
    import deepspeed

    ds.deepspeed_train = label("warm start", ds.deepspeed_train)
    init = deepspeed.initialize

    def initialize(*args, **kw):  # the engine's own allocations, apart from the steps that follow
        phase[0] = "engine init"
        try:
            return init(*args, **kw)
        finally:
            phase[0] = "warm start"

    deepspeed.initialize = initialize
    dist_probe._partition_fisher = label("fisher", dist_probe._partition_fisher)
    dist_probe._write_fisher = label("write", dist_probe._write_fisher)
    dist_probe._write_delta = label("write", dist_probe._write_delta)
    work = Path(a.work)
    # Warm-up on a 2-layer model first: imports, the process group and DeepSpeed's ops stay resident, so
    # the measured probe's growth is its tensors (large freed tensors go back to the OS: glibc unmaps them).
    warm = ProbeConfig.from_flat(max_steps=1, batch_size=1, seq_len=16, precision="fp32", fisher_batches=1, seed=0)
    dist_probe.probe_deepspeed(str(work / "warmup"), str(work / "task.yaml"), work / "probe-warmup", warm,
                               ds_config=PROBE_DS)
    phase[0] = "load"
    cfg = ProbeConfig.from_flat(max_steps=a.steps, lr=1e-4, batch_size=a.batch // PROBE_WORLD, seq_len=a.seq,
                                precision="fp32", fisher_batches=a.steps, fisher_elements=a.fisher_elements, seed=0)
    rss0 = _rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    dist_probe.probe_deepspeed(str(work / "model"), str(work / "task.yaml"), work / f"probe-{a.fisher_elements}",
                               cfg, ds_config=PROBE_DS)
    done.set()
    thread.join()
    print(json.dumps({"rank": int(os.environ.get("RANK", "0")), "fisher_elements": a.fisher_elements,
                      "growth": {k: v - rss0 for k, v in peaks.items()}}))


def _probe_task(work: Path, tokenizer, seq: int, n: int) -> int:
    """A task whose every sequence is exactly ``seq`` tokens (the planner counts full sequences):
    prompts longer than that lose their oldest tokens and keep the response (``tokenize_examples``)."""
    from trace_transfer.data import load_task, tokenize_examples

    pad = "0123456789" * (seq // 10 + 2)
    rows = [{"prompt": f"{i:03d}:" + pad, "response": f"{i % 97:02d}"} for i in range(n)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "task.yaml").write_text("name: fixed-length\ndata: {files: {train: train.jsonl, eval: train.jsonl}}\n"
                                    "splits: {train: train, eval: eval}\nmetric: exact_match\n")
    feats = tokenize_examples(tokenizer, list(load_task(str(work / "task.yaml")).train_examples()), seq)
    lengths = {len(f["input_ids"]) for f in feats}
    if lengths != {seq}:
        raise SystemExit(f"expected every sequence at {seq} tokens, got lengths {sorted(lengths)}")
    return seq


def probe_main(a: argparse.Namespace) -> list[dict]:
    """Launch the 2-rank probe (with and without the per-element Fisher) and compare with the plan."""
    from trace_transfer.models import build_tiny_model, load_tokenizer
    from trace_transfer.plan import Setup, model_shape
    from trace_transfer.plan.estimate import DS_DEFAULTS, probe_memory, stage_start_host
    from trace_transfer.plan.hardware import Hardware

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        raise SystemExit("torchrun not found: the launched probe needs it")
    work = Path(tempfile.mkdtemp(prefix="plan-probe-"))
    try:
        model = build_tiny_model(a.arch, work / "model", layers=a.layers, hidden=a.hidden, heads=a.heads,
                                 kv_heads=a.kv_heads, vocab_size=a.vocab)
        build_tiny_model(a.arch, work / "warmup", layers=2, hidden=32, heads=4, kv_heads=2)
        seq = _probe_task(work, load_tokenizer(str(model)), a.seq, n=a.batch * a.steps)
        config = json.loads((model / "config.json").read_text())
        shape = model_shape(config, a.arch)
        results = []
        for elements in (True, False):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            argv = [torchrun, f"--nproc_per_node={PROBE_WORLD}", "--master_addr=127.0.0.1", f"--master_port={port}",
                    __file__, "--probe-worker", "--work", str(work), "--batch", str(a.batch), "--seq", str(seq),
                    "--steps", str(a.steps), *([] if elements else ["--no-fisher-elements"])]
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
            ranks = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"rank"')]
            hw = Hardware()
            setup = Setup("deepspeed", zero=3, world=PROBE_WORLD, bf16=False, micro_batch=a.batch // PROBE_WORLD,
                          global_batch=a.batch, seq_len=seq, buffers=dict(DS_DEFAULTS))
            est = probe_memory(shape, setup, hw, fisher_elements=elements, ranks_per_node=1)
            planned = {k: v - hw.overhead for k, v in est["phases"].items()}
            planned["load"] = stage_start_host(shape, 3, 1)  # rank 0: one tensor read + one gathered
            results.append({"fisher_elements": elements, "params": shape.params, "seq": seq,
                            "fisher_term": est["per_gpu"]["fisher"], "planned": planned,
                            "measured": {r["rank"]: r["growth"] for r in ranks}})
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_probe(results: list[dict]) -> None:
    print(f"launched probe, ZeRO-3 x{PROBE_WORLD} on CPU (fp32), {results[0]['params'] / 1e6:.2f}M parameters, "
          f"{results[0]['seq']} tokens per sequence; MiB of RSS growth per rank")
    print(f"{'fisher':<10}{'phase':<12}{'rank 0':>9}{'rank 1':>9}{'planned':>9}{'r0/plan':>9}")
    for r in results:
        for ph in ("load", "engine init", "warm start", "fisher", "write"):
            m = [r["measured"].get(k, {}).get(ph, 0) / 2**20 for k in sorted(r["measured"])]
            e = r["planned"].get(ph, r["planned"]["warm start"]) / 2**20
            print(f"{'elements' if r['fisher_elements'] else 'tensor':<10}{ph:<12}"
                  + "".join(f"{x:>9.1f}" for x in m) + f"{e:>9.1f}{m[0] / e:>9.2f}")
    on, off = results
    for rank in sorted(on["measured"]):
        diff = (on["measured"][rank]["fisher"] - off["measured"][rank]["fisher"]) / 2**20
        print(f"rank {rank}: Fisher pass with - without the per-element accumulator: {diff:.1f} MiB "
              f"(planned 4 B x params / {PROBE_WORLD} = {on['fisher_term'] / 2**20:.1f})")


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
    ap.add_argument("--probe", action="store_true", help="measure the launched 2-rank ZeRO-3 probe instead")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-fisher-elements", dest="fisher_elements", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="llama", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.probe_worker:
        probe_worker(a)
        return
    if a.probe:
        results = probe_main(a)
        print_probe(results)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(results, fh, indent=2)
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
