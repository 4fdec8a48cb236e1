"""Masked ZeRO-3 training throughput against full fine-tuning on the same model, under DeepSpeed.

Each variant runs in its own ``torchrun`` launch (fresh process group, fresh CUDA memory): full FT,
then random CoreSets of the same budget (default 5 % of the parameters) at tensor granularity and at
element granularity (``apply_coreset``'s default masking: sparse δ for cores up to half a tensor).
Every launch trains through :func:`trace_transfer.train.ds.deepspeed_train` with the shipped
``examples/deepspeed/ds_zero3.json`` and reports tokens/s over the steps after the warm-up, the peak
GPU memory (``torch.cuda.max_memory_allocated``) and the planner's estimate for the same setup.

The goal (issue 12): tensor-granularity cores at >= 0.95x full FT tokens/s; element reported.

    torchrun --nproc_per_node 1 bench/zero3_throughput.py --worker full      # one variant
    python bench/zero3_throughput.py --gpus 1 --json out.json               # every variant (GPU)
    python bench/zero3_throughput.py --tiny --json out.json                 # CPU plumbing check (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "tensor", "element")
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512, "batch": 2, "seq": 32, "steps": 3,
        "warmup": 1}


def worker(a: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from masked_training import _random_coreset  # one random-CoreSet recipe for both benchmarks

    from trace_transfer.models import tiny_config
    from trace_transfer.plan import Hardware, Setup, Trainable, core_trainable, model_shape, train_memory
    from trace_transfer.train.ds import deepspeed_train
    from trace_transfer.train.loop import TrainConfig
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available() and not a.tiny
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(0)
    cfg = tiny_config("llama", a.layers, a.hidden, a.heads, a.kv_heads, vocab_size=a.vocab)
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
    coreset = None if a.worker == "full" else _random_coreset(model, a.worker, a.ratio, 0)
    g = torch.Generator().manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", 1))
    data = [{"input_ids": (x := torch.randint(4, a.vocab, (a.batch, a.seq), generator=g)), "labels": x,
             "attention_mask": torch.ones_like(x)} for _ in range(world * 4)]
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    steps = a.warmup + a.steps
    tcfg = TrainConfig(lr=1e-5, max_steps=steps, batch_size=a.batch, seq_len=a.seq, warmup_ratio=0.0,
                       precision="bf16" if cuda else "fp32")
    deepspeed_train(model, lambda _: data, tcfg, str(ROOT / "examples" / "deepspeed" / "ds_zero3.json"),
                    coreset=coreset, on_step=on_step)
    seconds = stamps[-1] - stamps[a.warmup - 1] if a.warmup else stamps[-1] - stamps[0]
    measured = a.steps if a.warmup else a.steps - 1
    tokens = measured * a.batch * a.seq * world
    shape = model_shape(cfg.to_dict())
    tr = (Trainable("full", shape.params, shape.matmul_params) if a.worker == "full"
          else core_trainable(shape, a.ratio, a.worker, "params", "sparse" if a.worker != "tensor" else "dense"))
    est = train_memory(shape, tr, Setup("deepspeed", zero=3, world=world, bf16=cuda, micro_batch=a.batch,
                                        seq_len=a.seq), Hardware(gpus_per_node=world))
    return {"variant": a.worker, "params": shape.params, "world": world, "device": "cuda" if cuda else "cpu",
            "tokens_per_s": tokens / seconds, "seconds": seconds, "steps": measured,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "planned_gpu_bytes": est["total"] - est["per_gpu"]["overhead"]}


def _launch(variant: str, a: argparse.Namespace) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.gpus}", "--master_addr=127.0.0.1",
            f"--master_port={port}", __file__, "--worker", variant]
    for k in ("hidden", "layers", "heads", "kv_heads", "vocab", "batch", "seq", "steps", "warmup", "ratio"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.tiny:
        argv.append("--tiny")
    env = {**os.environ}
    if a.tiny:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ~1.0B parameters: Llama, hidden 2048, 18 layers, vocab 32000 (0.89B in the layers, 0.13B embeddings).
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per GPU")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    ap.add_argument("--ratio", type=float, default=0.05, help="CoreSet budget as a share of all parameters")
    ap.add_argument("--gpus", type=int, default=1, help="ranks per launch")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU ranks (gloo): checks the plumbing only")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
    if a.worker:
        result = worker(a)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(result), flush=True)
        return
    variants = a.variants.split(",")
    if variants[0] != "full":
        variants = ["full", *[v for v in variants if v != "full"]]
    results = [_launch(v, a) for v in variants]
    base = results[0]["tokens_per_s"]
    print(f"model: Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}: {results[0]['params'] / 1e9:.2f}B "
          f"parameters; ZeRO-3 x{a.gpus} ({results[0]['device']}), micro-batch {a.batch} x {a.seq}; random CoreSets "
          f"of {a.ratio:.0%}; {a.steps} steps after {a.warmup} warm-up")
    print(f"{'variant':<9}{'tokens/s':>11}{'x full':>8}{'peak GiB':>10}{'planned GiB':>13}")
    for r in results:
        peak = f"{r['peak_gpu_bytes'] / 2**30:.1f}" if r["peak_gpu_bytes"] else "-"
        print(f"{r['variant']:<9}{r['tokens_per_s']:>11.0f}{r['tokens_per_s'] / base:>8.2f}{peak:>10}"
              f"{r['planned_gpu_bytes'] / 2**30:>13.1f}")
    tensor = next((r for r in results if r["variant"] == "tensor"), None)
    if tensor:
        ratio = tensor["tokens_per_s"] / base
        print(f"{'met' if ratio >= 0.95 else 'MISSED'}: tensor cores at {ratio:.2f}x full FT tokens/s (goal >= 0.95x)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
