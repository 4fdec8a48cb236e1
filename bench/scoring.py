"""Benchmark: streaming LF scoring of a multi-GB sharded Δ/Fisher pair vs a raw sequential read.

Builds a synthetic probe directory (Llama-shaped fp32 tensors: TinyLlama-1.1B widths, a few layers,
embeddings and lm_head; sharded with an index) of at least ``--size-gb`` GB of Δ + Fisher in a temp
directory, then measures, each scoring run in a fresh child process (so its peak RSS is its own):

- raw sequential read of the same files (``readinto`` a 64 MB buffer) — the baseline;
- LF at tensor granularity, reading the files (``use_tensor_stats=False``) and from the probe's
  per-tensor reductions (what a normal run does at tensor granularity);
- LF at element granularity with the probe's recorded normalisation ranges (a 1/32 sample + one
  full pass) and without them (one more full pass for the ranges).

Throughput = bytes of Δ + Fisher in scope / wall time. The page cache cannot be dropped here, so every
file is read once beforehand and all measurements run warm, baseline included. Prints the machine
load too: the machine may be shared. Never gates CI.

Usage:
    python bench/scoring.py [--size-gb 2.2] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def build(root: Path, size_gb: float) -> Path:
    import torch

    from trace_transfer.checkpoint import ShardedWriter, write_json_atomic

    per_layer = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * INTER * HIDDEN + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, -(-int(size_gb * 1e9 / 8 - fixed) // per_layer))  # 8 bytes per parameter (Δ + F)
    shapes = llama_shapes(layers)
    d = root / "probe"
    g = torch.Generator().manual_seed(0)
    stats = {}
    with ShardedWriter(d, "delta", max_shard_bytes=512 << 20) as wd, ShardedWriter(d, "fisher", max_shard_bytes=512 << 20) as wf:
        for i, (name, shape) in enumerate(shapes.items()):
            delta = torch.randn(shape, generator=g).mul_(1e-4 * (1 + i % 7))
            fisher = torch.rand(shape, generator=g).pow_(4).mul_(1e-6 * (1 + i % 5))
            a = delta.abs()
            stats[name] = {"delta_rms": float(delta.double().pow(2).mean().sqrt()), "fisher_mean": float(fisher.double().mean()),
                           "delta_absmin": float(a.min()), "delta_absmax": float(a.max()),
                           "fisher_min": float(fisher.min()), "fisher_max": float(fisher.max())}
            wd.add(name, delta)
            wf.add(name, fisher)
    write_json_atomic(d / "fisher_tensor.json", {"tensors": stats})
    write_json_atomic(d / "probe.json", {"task": "bench", "model": "synthetic-llama", "tensors": list(shapes),
                                         "fisher": {"mode": "batch", "at": "probe"}})
    return d


def data_files(d: Path) -> list[Path]:
    return sorted([*d.glob("delta*.safetensors"), *d.glob("fisher*.safetensors")])


def raw_read(files: list[Path]) -> float:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss, which a child inherits from the
    parent across fork/exec, VmHWM belongs to the process's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, probe_dir: str, out_dir: str) -> None:
    """One measurement in a fresh process; prints JSON with seconds and peak RSS."""
    import torch

    from trace_transfer.scoring import score

    files = data_files(Path(probe_dir))
    rss_before = peak_rss_mb()
    extra: dict = {}
    t = time.perf_counter()
    if mode == "raw":
        raw_read(files)
    else:
        gran, stats = {"tensor-files": ("tensor", False), "tensor-stats": ("tensor", True),
                       "element": ("element", True), "element-no-stats": ("element", False)}[mode]
        if mode == "element-no-stats":
            os.rename(Path(probe_dir) / "fisher_tensor.json", Path(probe_dir) / "fisher_tensor.json.off")
        try:
            cs = score([probe_dir], "lf", 0.05, out_dir, granularity=gran, scope="all", use_tensor_stats=stats)["bench"]
        finally:
            if mode == "element-no-stats":
                os.rename(Path(probe_dir) / "fisher_tensor.json.off", Path(probe_dir) / "fisher_tensor.json")
        extra = {"selected": cs.metadata["selected_params"], "budget": cs.metadata["budget_target"]}
    seconds = time.perf_counter() - t
    print(json.dumps({"mode": mode, "seconds": seconds, "rss_mb": peak_rss_mb(), "rss_before_mb": rss_before, **extra}))


def run_child(mode: str, probe_dir: Path, out_dir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(probe_dir), str(out_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.2, help="Δ + Fisher size to generate (>= 2 GB for the target)")
    ap.add_argument("--dir", default=None, help="where to build the temp probe (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best is reported)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PROBE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    root = Path(tempfile.mkdtemp(prefix="tt-bench-scoring-", dir=args.dir))
    try:
        load0 = os.getloadavg()
        t = time.perf_counter()
        d = build(root, args.size_gb)
        files = data_files(d)
        total = sum(f.stat().st_size for f in files)
        print(f"built {total / 1e9:.2f} GB of Δ + Fisher in {len(files)} shards ({time.perf_counter() - t:.0f} s): {d}")
        print(f"machine: {os.cpu_count()} CPUs, load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
        raw_read(files)  # warm the page cache for every measurement, baseline included
        print("page cache: all files read once beforehand; every measurement below runs warm\n")
        results = {}
        for mode in ("raw", "tensor-files", "tensor-stats", "element", "element-no-stats", "raw"):
            runs = [run_child(mode, d, root / "cores") for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            best["rss_mb"] = max(r["rss_mb"] for r in runs)
            results.setdefault(mode, []).append(best)
        raw_s = min(r["seconds"] for r in results["raw"])
        raw_gbs = total / raw_s / 1e9
        print(f"{'measurement':<34}{'seconds':>9}{'GB/s':>8}{'vs raw':>8}{'peak RSS MB':>13}  notes")
        labels = {
            "raw": "raw sequential read (readinto)",
            "tensor-files": "LF tensor, reading Δ+F files",
            "tensor-stats": "LF tensor, probe reductions",
            "element": "LF element, probe ranges",
            "element-no-stats": "LF element, no recorded ranges",
        }
        passes = {"tensor-files": "1 pass", "tensor-stats": "json only", "element": "1/32 sample + 1 pass",
                  "element-no-stats": "range pass + 1/32 sample + 1 pass"}
        for mode, runs in results.items():
            r = runs[0] if mode != "raw" else min(runs, key=lambda x: x["seconds"])
            gbs = total / r["seconds"] / 1e9
            note = passes.get(mode, "")
            if "selected" in r:
                unit = "tensors" if mode.startswith("tensor") else "params"
                note += f"; {r['selected']:,} params selected, budget {r['budget']:,} {unit}"
            print(f"{labels[mode]:<34}{r['seconds']:>9.2f}{gbs:>8.2f}{gbs / raw_gbs:>8.2f}{r['rss_mb']:>13.0f}  {note}")
        load1 = os.getloadavg()
        print(f"\nload average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; baseline python+torch RSS "
              f"{results['raw'][0]['rss_mb']:.0f} MB (the raw-read child)")
        print("targets: element/tensor throughput >= 0.5x raw read; peak RSS < 1500 MB")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
