"""Reproduction benchmark: TRACE against the controls a reviewer would demand, over seeds and sizes.

Two parts, both resumable (rerunning skips what is done):

1. **Method vs controls on the synthetic stream** (math → medical → code), driven through
   ``bench/stream_comparison.py`` once per (model size, seed): full FT swept over learning rates (the
   plasticity-matched control), LoRA, joint, replay, TRACE with LF / CS CoreSets and **random CoreSets
   of the same budget and granularity**, strict isolation, general-core protection and CPI-FT.
   Aggregated as mean ± std over seeds: plasticity (R[j][j], just learned), retention (R[T][j] for
   j < T), AA, BWT, FWT and the drop of the never-trained base skills; drawn as the
   **stability–plasticity plot** (one point per method, the full-FT lr sweep as a curve).
2. **Small-to-large transfer**: the demo pipeline (char Llama source → deeper, wider BPE Qwen3 target)
   with TRACE-LF/CS and random cores on the target itself and Transfer-LF/CS from the source, over
   the same seeds; reports the Transfer − TRACE gap and the Jaccard overlap of transferred and
   target-native CoreSets against the overlap two random CoreSets of that budget would have.

    python bench/reproduce.py --work runs --seeds 0,1,2 --sizes 192x4,256x6 --frontier-large
    python bench/reproduce.py --work runs --aggregate-only     # tables + plot from what exists

3. **Transfer against cheap target passes** (``bench/transfer_frontier.py``): native trace-lf, transfer
   budgets refined by each signal, transfer at tensor granularity, the profile ablation, the source-free
   cheap pass and random cores, each with its target cost (``<work>/frontier/frontier.md``).

Writes ``<work>/reproduce.json``, ``<work>/reproduce.md`` and ``<work>/stability_plasticity.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SIZE = (192, 4)  # the stream_comparison default base: d=192, 4 layers (~1.6M parameters)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def size_dir(work: Path, hidden: int, layers: int) -> Path:
    return work / ("stream" if (hidden, layers) == DEFAULT_SIZE else f"stream-d{hidden}-l{layers}")


def run_stream(work: Path, sizes: list[tuple[int, int]], seeds: list[int], threads: int) -> None:
    for hidden, layers in sizes:
        for seed in seeds:
            # Always invoked: stream_comparison resumes, so finished configurations cost only a reload
            # and configurations added since the last run get done.
            d = size_dir(work, hidden, layers)
            logfile = work / f"{d.name}.seed{seed}.log"
            log(f"stream d={hidden} L={layers} seed {seed}: bench/stream_comparison.py (log: {logfile})")
            cmd = [sys.executable, str(HERE / "stream_comparison.py"), "--work", str(d), "--seed", str(seed),
                   "--hidden", str(hidden), "--layers", str(layers), "--threads", str(threads)]
            with logfile.open("a") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def run_frontier(work: Path, seeds: list[int], large: bool) -> None:
    """Part 3: the cost-accuracy frontier of transfer (``bench/transfer_frontier.py``), on the demo pair
    and, with ``large``, on a larger pair (source 4x192 -> target 6x256)."""
    runs = [(work / "frontier", [])] + ([(work / "frontier-large", ["--source-size", "192x4", "--target-size", "256x6"])]
                                        if large else [])
    for d, extra in runs:
        log(f"transfer frontier -> {d} (log: {d}.log)")
        cmd = [sys.executable, str(HERE / "transfer_frontier.py"), "--work", str(d), "--seeds", ",".join(map(str, seeds)),
               *extra]
        with Path(f"{d}.log").open("a") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def run_transfer(work: Path, seeds: list[int]) -> Path:
    from trace_transfer.pipeline.demo import load_preset
    from trace_transfer.pipeline.run import run_pipeline

    cfg = load_preset("demo")
    methods = list(dict.fromkeys([*cfg.methods, "trace-random"]))
    cfg = cfg.model_copy(update={"seeds": seeds, "methods": methods})
    run_dir = work / "demo"
    run_pipeline(cfg, run_dir, base_dir=Path.cwd(), say=log)
    return run_dir


# ---------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------


def _mean_std(xs: list[float]) -> tuple[float, float] | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def per_run_figures(m: dict) -> dict[str, float | None]:
    """Plasticity, retention, AA, BWT, FWT and base-skill drop of one run's accuracy matrix."""
    R = m["R"]
    T = len(m["tasks"])
    rows = R[1:]  # R[0] = base model
    plast = [rows[j][j] for j in range(T)] if len(rows) == T else None
    retention = [rows[-1][j] for j in range(T - 1)] if len(rows) == T else None
    mon = m.get("monitor") or {}
    drop = None
    if mon.get("rows"):
        drop = mon["rows"][0][0] - mon["rows"][-1][0]  # first monitored task: the whole general mixture
    return {
        "plasticity": sum(plast) / T if plast else None,
        "retention": sum(retention) / len(retention) if retention else None,
        "aa": m["metrics"]["aa"],
        "bwt": m["metrics"].get("bwt"),
        "fwt": m["metrics"].get("fwt"),
        "general_drop": drop,
        "final": rows[-1],
    }


def aggregate_stream(work: Path, sizes: list[tuple[int, int]]) -> dict:
    out = {}
    for hidden, layers in sizes:
        d = size_dir(work, hidden, layers)
        # Per seed: the full run's file and every subset run's (``--only``: ``*.Nconfigs.json``), merged by
        # configuration; a configuration in several files is taken from the full run, else the last subset.
        by_seed: dict[str, dict[str, dict]] = {}
        seeds, params, stream = [], None, None
        for f in sorted(d.glob("stream_comparison*.json"), key=lambda f: ("configs" not in f.name, f.name)):
            parts = f.name.removesuffix(".json").split(".")
            seed_key = next((p for p in parts if p.startswith("seed")), "seed0")
            data = json.loads(f.read_text())
            if seed_key not in by_seed:
                seeds.append(data["settings"]["seed"])
            by_seed.setdefault(seed_key, {}).update(data["matrices"])
            params = params or (data.get("base_provenance") or {}).get("num_parameters")
            stream = stream or data["stream"]
        if not by_seed:
            continue
        per_config: dict[str, list[dict]] = {}
        for matrices in by_seed.values():
            for name, m in matrices.items():
                per_config.setdefault(name, []).append(per_run_figures(m))
        table = {}
        for name, runs in per_config.items():
            keys = ("plasticity", "retention", "aa", "bwt", "fwt", "general_drop")
            table[name] = {k: _mean_std([r[k] for r in runs]) for k in keys} | {"n": len(runs)}
            T = len(runs[0]["final"])
            table[name]["final"] = [_mean_std([r["final"][j] for r in runs]) for j in range(T)]
        out[f"d{hidden}-L{layers}"] = {"seeds": sorted(seeds), "num_parameters": params, "table": table,
                                       "tasks": stream}
    return out


def aggregate_transfer(run_dir: Path) -> dict | None:
    from trace_transfer.coreset import SUFFIX, CoreSet, overlap_stats
    from trace_transfer.report.summary import summarise

    if not (run_dir / "finetune").exists():
        return None
    results: dict[str, list[dict]] = {}
    seeds: set[int] = set()
    for method_dir in sorted((run_dir / "finetune").iterdir()):
        for seed_dir in sorted(method_dir.glob("seed*")):
            f = seed_dir / "results.json"
            if f.exists():
                results.setdefault(method_dir.name, []).append(json.loads(f.read_text()))
                seeds.add(int(seed_dir.name.removeprefix("seed")))
    summary = summarise(None, results)
    jaccard = {}
    for strategy in ("lf", "cs"):
        tdir, ndir = run_dir / "cores" / f"transfer-{strategy}", run_dir / "cores" / f"target-{strategy}"
        for f in sorted(tdir.glob("*" + SUFFIX)):
            native = ndir / f.name
            if native.exists():
                a, b = CoreSet.load(f), CoreSet.load(native)
                r = b.ratio()
                jaccard[f"{strategy}/{f.name.split('.')[0]}"] = {
                    "jaccard": overlap_stats(a, b)["overall"]["jaccard"],
                    "random_expectation": r / (2 - r),  # two independent random sets of share r
                }
    gaps = {}
    for strategy in ("lf", "cs"):
        tr, na = summary["methods"].get(f"transfer-{strategy}"), summary["methods"].get(f"trace-{strategy}")
        if tr and na and tr["aa"][0] is not None and na["aa"][0] is not None:
            gaps[strategy] = tr["aa"][0] - na["aa"][0]
    return {"summary": summary, "jaccard": jaccard, "transfer_minus_trace_aa": gaps, "seeds": sorted(seeds)}


def _f(ms, signed=False) -> str:
    if not ms:
        return "n/a"
    m, s = ms
    body = f"{m:+.3f}" if signed else f"{m:.3f}"
    return body + (f" ± {s:.3f}" if s else "")


def markdown(stream: dict, transfer: dict | None) -> str:
    lines = []
    for size, block in stream.items():
        lines.append(f"### Stream, base {size} ({block['num_parameters']} parameters), seeds {block['seeds']}\n")
        lines.append("| config | n | " + " | ".join(block["tasks"]) + " | AA | plasticity | retention | BWT | FWT "
                     "| general drop |")
        lines.append("|---|---:|" + "---:|" * (len(block["tasks"]) + 6))
        for name, e in block["table"].items():
            lines.append(f"| {name} | {e['n']} | " + " | ".join(_f(v) for v in e["final"])
                         + f" | {_f(e['aa'])} | {_f(e['plasticity'])} | {_f(e['retention'])} | {_f(e['bwt'], True)} "
                           f"| {_f(e['fwt'], True)} | {_f(e['general_drop'], True)} |")
        lines.append("")
    if transfer:
        from trace_transfer.report.summary import markdown_table

        lines.append(f"### Small-to-large (demo pipeline), seeds {transfer['seeds']}\n")
        lines.append(markdown_table(transfer["summary"]))
        lines.append("\nTransfer − TRACE on the target (AA): " + ", ".join(
            f"{k.upper()} {v * 100:+.1f} points" for k, v in transfer["transfer_minus_trace_aa"].items()))
        lines.append("\n| CoreSet | Jaccard(transferred, target-native) | two random sets of that budget |")
        lines.append("|---|---:|---:|")
        for k, v in transfer["jaccard"].items():
            lines.append(f"| {k} | {v['jaccard']:.3f} | {v['random_expectation']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(stream: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(stream)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5.5), squeeze=False)
    for ax, (size, block) in zip(axes[0], stream.items()):
        t = block["table"]
        sweep = sorted((name for name in t if name.startswith("full-")), key=lambda k: float(k.split("-", 1)[1]))
        xs = [t[k]["plasticity"][0] for k in sweep if t[k]["plasticity"]]
        ys = [t[k]["retention"][0] for k in sweep if t[k]["retention"]]
        ax.plot(xs, ys, "-o", color="k", label="full FT, lr sweep")
        for k in sweep:
            if t[k]["plasticity"]:
                ax.annotate(k.split("-", 1)[1], (t[k]["plasticity"][0], t[k]["retention"][0]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        for name, e in t.items():
            if name in sweep or not e["plasticity"] or not e["retention"]:
                continue
            colour = ("tab:red" if "random" in name else "tab:blue" if "trace-lf" in name else
                      "tab:cyan" if "trace-cs" in name else "tab:green")
            ax.errorbar(e["plasticity"][0], e["retention"][0], xerr=e["plasticity"][1], yerr=e["retention"][1],
                        fmt="s", color=colour, capsize=2)
            ax.annotate(name, (e["plasticity"][0], e["retention"][0]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
        ax.set_xlabel("plasticity: mean R[j][j] (score right after learning task j)")
        ax.set_ylabel("retention: mean R[T][j], j < T (score at the end)")
        ax.set_title(f"base {size}, seeds {block['seeds']} (mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sizes", default="192x4", help="comma-separated HIDDENxLAYERS base sizes for the scale trend")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-transfer", action="store_true")
    ap.add_argument("--skip-frontier", action="store_true", help="skip part 3 (bench/transfer_frontier.py)")
    ap.add_argument("--frontier-large", action="store_true", help="part 3 also on source 4x192 -> target 6x256")
    ap.add_argument("--aggregate-only", action="store_true", help="no training: tables and plot from what exists")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    from trace_transfer._version import versions
    from trace_transfer.checkpoint import write_json_atomic

    if not args.aggregate_only:
        run_stream(work, sizes, seeds, args.threads)
        if not args.skip_transfer:
            run_transfer(work, seeds)
        if not args.skip_frontier:
            run_frontier(work, seeds, args.frontier_large)
    stream = aggregate_stream(work, sizes)
    transfer = None if args.skip_transfer else aggregate_transfer(work / "demo")
    md = markdown(stream, transfer)
    for name in ("frontier", "frontier-large"):  # part 3's tables, written by transfer_frontier.py
        if (work / name / "frontier.md").exists():
            md += f"\n## Transfer cost-accuracy frontier ({name})\n\n" + (work / name / "frontier.md").read_text()
    print(md)
    (work / "reproduce.md").write_text(md)
    if stream:
        plot(stream, work / "stability_plasticity.png")
    write_json_atomic(work / "reproduce.json", {"stream": stream, "transfer": transfer, "settings": vars(args),
                                                "versions": versions()})
    log(f"wrote {work / 'reproduce.md'}, {work / 'reproduce.json'}, {work / 'stability_plasticity.png'}")


if __name__ == "__main__":
    main()
