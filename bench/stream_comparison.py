"""Measured comparison of continual-learning methods on the built-in synthetic stream.

Stream: math → medical → code (the paper's order), each a new *format* over a skill the base model
already masters (``trace_transfer.data.synthetic``). Base: a char-level Llama (4 layers, d=192,
~1.6M parameters) pretrained on ``synthetic:general`` with :func:`trace_transfer.train.pretrain.pretrain`.
Every configuration trains 150 steps per stage at batch 32 (the working regime bench/regime_check.py measures),
evaluates every task of the stream after every stage (``eval_limit`` examples each) and also
*monitors* the base skills (``synthetic:general``; never trained) to show general forgetting.

Configurations (all through ``trace_transfer.train.runner.run_sequence``, one call each):

* ``full`` at several learning rates (the control for "masks vs. simply a lower lr");
* ``lora`` (r=8, α=16, all linear layers, merged after each stage) at 3e-4 and 1e-3 — the paper's
  2e-5 barely moves a 1.6M-parameter model in 150 steps;
* ``joint`` (all three tasks mixed, 450 steps) and ``replay`` (10% of each earlier task mixed in);
* ``trace`` with LF, CS and random CoreSets of the *same budget* (row granularity, 5% of the
  parameters of each layer group, ``budget=params``), probed with a 1-epoch warm start; LF also with
  strict isolation and at a higher lr;
* the peers: ``trace`` on Spectrum cores (``score --strategy spectrum``: matrices by singular-value SNR
  of the base weights, same budget, filled matrix by matrix) and ``lisa`` (one random layer at a time,
  redrawn every 20 steps, embeddings and head always trained), each at 3e-4 and 1e-3 like ``trace``;
* ``general-core`` (LF core of ``synthetic:general`` frozen, complement trained) and ``cpi-ft``
  (``trace_transfer.surgery.cpi_ft``, paper settings: element core regions of 1%, τ = 0.1).

Prints the accuracy matrices and a summary table; writes ``<work>/stream_comparison.json``. Every
run is resumable: rerunning the script skips the configurations (and stages) already done.

    python bench/stream_comparison.py --work runs/stream --threads 1
    python bench/stream_comparison.py --only full-3e-4,trace-lf-3e-4   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STREAM = ["synthetic:math", "synthetic:medical", "synthetic:code"]
# n_eval=100 spreads the 100 evaluated examples evenly over the five skills (the eval split is grouped
# by skill, so a plain limit would only see the first skills).
MONITOR = ["synthetic:general?n_eval=100", "synthetic:general?skills=add&n_eval=100",
           "synthetic:general?skills=fact&n_eval=100"]


def configs(lrs_full: list[float]) -> list[dict]:
    out = [{"name": f"full-{lr:g}", "method": "full", "lr": lr} for lr in lrs_full]
    out += [
        {"name": "lora-3e-4", "method": "lora", "lr": 3e-4},
        {"name": "lora-0.001", "method": "lora", "lr": 1e-3},
        {"name": "joint-3e-4", "method": "joint", "lr": 3e-4},
        {"name": "replay-3e-4", "method": "replay", "lr": 3e-4, "replay_share": 0.1},
        {"name": "trace-lf-3e-4", "method": "trace", "lr": 3e-4, "cores": "lf"},
        {"name": "trace-cs-3e-4", "method": "trace", "lr": 3e-4, "cores": "cs"},
        {"name": "trace-random-3e-4", "method": "trace", "lr": 3e-4, "cores": "random"},
        {"name": "trace-lf-strict-3e-4", "method": "trace", "lr": 3e-4, "cores": "lf", "isolation": "strict"},
        {"name": "trace-lf-0.001", "method": "trace", "lr": 1e-3, "cores": "lf"},
        {"name": "trace-random-0.001", "method": "trace", "lr": 1e-3, "cores": "random"},
        # the peers at the same budget and lr sweep: Spectrum's SNR-ranked matrices as cores, and LISA
        {"name": "trace-spectrum-3e-4", "method": "trace", "lr": 3e-4, "cores": "spectrum"},
        {"name": "trace-spectrum-0.001", "method": "trace", "lr": 1e-3, "cores": "spectrum"},
        {"name": "lisa-3e-4", "method": "lisa", "lr": 3e-4},
        {"name": "lisa-0.001", "method": "lisa", "lr": 1e-3},
        # general-core protection: freeze the LF core scored on the base-skill mixture, train the rest
        {"name": "general-core-3e-4", "method": "general-core", "lr": 3e-4},
        # CPI-FT: per-task FT -> element core regions (1%) -> cluster -> transplant + SLERP -> frozen-core SFT
        {"name": "cpi-ft-3e-4", "method": "cpi-ft", "lr": 3e-4},
    ]
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_base(work: Path, base: str | None, seed: int, layers: int = 4, hidden: int = 192) -> Path:
    from trace_transfer.models import build_tiny_model
    from trace_transfer.train.pretrain import pretrain

    if base:
        return Path(base)
    path = work / "base"
    if (path / "model.safetensors").exists():
        return path
    tiny = work / "tiny"
    if not (tiny / "model.safetensors").exists():
        build_tiny_model("llama", tiny, layers=layers, hidden=hidden, heads=6 if hidden % 6 == 0 else 4, kv_heads=2,
                         tokenizer="char", seed=seed)
    log("pretraining the base on synthetic:general (2,400 steps, batch 32)")
    pretrain(tiny, path, steps=2400, batch_size=32, seed=seed)
    return path


def ensure_cores(work: Path, base: Path, args) -> dict[str, list[str]]:
    """Probe each stream task once, then score LF / CS / random / Spectrum CoreSets of one budget."""
    from trace_transfer.probe import ProbeConfig, probe
    from trace_transfer.scoring import coreset_filename, score

    probe_dirs = []
    for ref in STREAM:
        d = work / "probes" / ref.split(":")[1]
        if not (d / "probe.json").exists():
            log(f"probing {ref} (warm start: {args.probe_steps} steps at lr {args.probe_lr:g})")
            probe(str(base), ref, d, ProbeConfig.from_flat(lr=args.probe_lr, max_steps=args.probe_steps, batch_size=32,
                                                           seq_len=32, device="cpu", seed=args.seed))
        probe_dirs.append(d)
    cores = {}
    for strategy in ("lf", "cs", "random", "spectrum"):
        out = work / "cores" / (f"{strategy}-{args.granularity}-{args.ratio:g}"
                                + ("" if args.budget == "params" else f"-{args.budget}"))
        names = [json.loads((d / "probe.json").read_text()).get("task") for d in probe_dirs]
        paths = [out / coreset_filename(n) for n in names]
        if not all(p.exists() for p in paths):
            log(f"scoring {strategy} ({args.granularity}, ratio {args.ratio:g}, budget {args.budget})")
            result = score([str(d) for d in probe_dirs], strategy, args.ratio, out, granularity=args.granularity,
                           budget=args.budget, seed=args.seed)
            paths = [out / coreset_filename(t) for t in result]
        cores[strategy] = [str(p) for p in paths]
    # general-core protection: the LF core of the base-skill mixture (same budget and granularity)
    gd = work / "probes" / "general"
    if not (gd / "probe.json").exists():
        log("probing synthetic:general for general-core protection")
        probe(str(base), "synthetic:general", gd, ProbeConfig.from_flat(lr=args.probe_lr, max_steps=args.probe_steps,
                                                                        batch_size=32, seq_len=32, device="cpu",
                                                                        max_examples=1600, seed=args.seed))
    gout = work / "cores" / f"general-lf-{args.granularity}-{args.ratio:g}"
    if not (gout / coreset_filename("general")).exists():
        score([str(gd)], "lf", args.ratio, gout, granularity=args.granularity, budget=args.budget, seed=args.seed)
    cores["general"] = [str(gout / coreset_filename("general"))]
    return cores


def summarise(name: str, res: dict) -> dict:
    m = res["metrics"]
    R = res["R"]
    plast = [v for v in (m.get("plasticity") or []) if v is not None]
    mon = res.get("monitor") or {}
    return {
        "config": name,
        "final": R[-1],
        "aa": m["aa"],
        "bwt": m["bwt"],
        "fwt": m["fwt"],
        "mean_forgetting": m["mean_forgetting"],
        "plasticity": sum(plast) / len(plast) if plast else None,
        "monitor_before": mon.get("rows", [[]])[0] if mon else None,
        "monitor_final": mon.get("rows", [[]])[-1] if mon else None,
        # share of the model's parameters a stage could change (LoRA: adapter parameters / base total)
        "trainable_share": [_share(s["method_info"]) for s in res["per_stage"]],
        "seconds": sum(s["seconds"] for s in res["per_stage"]),
    }


def _share(info: dict) -> float | None:
    if info.get("trainable_share") is not None:
        return info["trainable_share"]
    if info.get("trainable_params") and info.get("total_params"):
        total = info["total_params"] - (info["trainable_params"] if "lora_r" in info else 0)
        return info["trainable_params"] / total
    return None


def fmt(v, signed=False):
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/stream")
    ap.add_argument("--base", default=None, help="a pretrained base model dir (default: <work>/base, built if absent)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--full-lrs", default="3e-4,1e-4,3e-5")
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--granularity", default="row")
    ap.add_argument("--budget", default="params", help="params | tensors (count of units)")
    ap.add_argument("--probe-lr", type=float, default=3e-4)
    ap.add_argument("--probe-steps", type=int, default=50, help="1 epoch of the 1,600 training examples at batch 32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed (data order, LoRA init); base, probes and CoreSets stay those of seed 0")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--layers", type=int, default=4, help="base model depth (scale trend)")
    ap.add_argument("--hidden", type=int, default=192, help="base model width (scale trend)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from trace_transfer._version import versions
    from trace_transfer.checkpoint import write_json_atomic
    from trace_transfer.evaluation.continual import format_matrix_markdown
    from trace_transfer.report.plots import plot_cpi_ft, plot_run
    from trace_transfer.train.loop import TrainConfig
    from trace_transfer.train.methods import MethodOptions, Stage
    from trace_transfer.train.runner import run_sequence

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = ensure_base(work, args.base, 0, layers=args.layers, hidden=args.hidden)
    cores = ensure_cores(work, base, argparse.Namespace(**{**vars(args), "seed": 0}))
    todo = configs([float(x) for x in args.full_lrs.split(",")])
    if args.only:
        wanted = set(args.only.split(","))
        todo = [c for c in todo if c["name"] in wanted]

    summaries, matrices = [], {}
    for c in todo:
        core_paths = cores.get(c.get("cores", ""), [None] * len(STREAM))
        stages = [Stage(t, p) for t, p in zip(STREAM, core_paths)]
        cfg = TrainConfig(lr=c["lr"], max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          warmup_ratio=0.03, seed=args.seed)
        opts = MethodOptions(isolation=c.get("isolation", "none"), replay_share=c.get("replay_share", 0.1),
                             general_coreset=cores["general"][0] if c["method"] == "general-core" else None)
        log(f"{c['name']}: {c['method']} at lr {c['lr']:g}")
        t1 = time.time()
        run_dir = work / "runs" / (c["name"] if args.seed == 0 else f"{c['name']}-seed{args.seed}")
        if c["method"] == "cpi-ft":
            from trace_transfer.surgery.cpi_ft import CpiFtConfig, cpi_ft

            r = cpi_ft(str(base), STREAM, run_dir, CpiFtConfig(), ft_cfg=cfg, eval_limit=args.eval_limit,
                       resume=True, progress=log)
            plot_cpi_ft(run_dir)
        else:
            r = run_sequence(str(base), stages, c["method"], run_dir, cfg, eval_limit=args.eval_limit,
                             resume=True, options=opts, monitor=MONITOR, progress=log)
            plot_run(run_dir)
        log(f"{c['name']}: done in {time.time() - t1:.0f}s, AA {r.metrics['aa']:.3f}")
        summaries.append(summarise(c["name"], r.results))
        matrices[c["name"]] = {"R": r.R, "row_labels": r.results["row_labels"], "tasks": r.results["tasks"],
                               "monitor": r.results.get("monitor"), "metrics": r.metrics,
                               "losses": [(s["first_loss"], s["last_loss"]) for s in r.results["per_stage"]]}

    # ---- print ----
    tasks = next(iter(matrices.values()))["tasks"] if matrices else []
    for name, m in matrices.items():
        print(f"\n### {name}\n")
        print(format_matrix_markdown(m["R"], m["tasks"], m["row_labels"]))
        mon = m["monitor"]
        if mon:
            print("\nmonitored base skills (never trained):\n")
            print(format_matrix_markdown(mon["rows"], mon["tasks"], m["row_labels"]))
    print("\n### Summary (final row, AA, BWT, FWT, forgetting, plasticity = mean R[j][j], base skills before → after)\n")
    print("| config | " + " | ".join(tasks) + " | AA | BWT | FWT | forgetting | plasticity | general | general-add "
          "| general-fact | trainable |")
    print("|---|" + "---:|" * (len(tasks) + 9))
    for s in summaries:
        mb, mf = s["monitor_before"] or [None] * 3, s["monitor_final"] or [None] * 3
        share = [x for x in s["trainable_share"] if x is not None]
        print(f"| {s['config']} | " + " | ".join(fmt(v) for v in s["final"])
              + f" | {fmt(s['aa'])} | {fmt(s['bwt'], True)} | {fmt(s['fwt'], True)} | {fmt(s['mean_forgetting'])}"
              + f" | {fmt(s['plasticity'])} | " + " | ".join(f"{fmt(a)}→{fmt(b)}" for a, b in zip(mb, mf))
              + f" | {(sum(share) / len(share)) if share else 1.0:.3f} |")

    result = {
        "stream": STREAM,
        "monitor": MONITOR,
        "settings": vars(args),
        "base": str(base),
        "base_provenance": json.loads((base / "trace_transfer.json").read_text()) if (base / "trace_transfer.json").exists() else None,
        "coresets": cores,
        "summaries": summaries,
        "matrices": matrices,
        "conventions": "R row 0 = base; BWT/FWT denominators T-1 (see trace_transfer.evaluation.continual)",
        "versions": versions(),
        "seconds": time.time() - t0,
    }
    suffix = "" if args.seed == 0 else f".seed{args.seed}"
    out = work / (f"stream_comparison{suffix}.json" if not args.only else f"stream_comparison{suffix}.{len(todo)}configs.json")
    write_json_atomic(out, result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
