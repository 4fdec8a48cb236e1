"""Small-to-large transfer against the cheap alternatives, with the target cost of each (issue 11).

On the demo pair (the settings of ``trace_transfer/pipeline/presets/demo.yaml``: char Llama 3x96 source,
BPE Qwen3 4x128 target, both pretrained on the base mixture; math -> medical -> code; rows, 5 %):

| method | what chooses the target's units | target passes per task |
|---|---|---|
| trace-lf | the target's own probe (warm start + Fisher) | probe steps + Fisher batches |
| transfer-{fisher,saliency,microprobe} | source budgets per slot, units by the cheap signal | K (+ S) |
| transfer-tensor | source scored per tensor, mapped exactly | 0 |
| transfer-profile | the ablation: row profiles resampled by relative position | 0 |
| cheap-lf | no source: global top 5 % by the micro-probe signal | S + K |
| trace-random | random rows, same budget | 0 |
| trace-lf-tensor, trace-random-tensor | transfer-tensor's controls: the target's own probe / random tensors, whole tensors | probe / 0 |

Every method is fine-tuned with the sequential runner (``trace``) over the seeds; the table gives the
average accuracy (%) ± std over seeds and the target cost relative to a native probe. Resumable: what
exists under ``--work`` is reused.

    python bench/transfer_frontier.py --work runs/frontier --seeds 0,1,2
    python bench/transfer_frontier.py --work runs/frontier-large --seeds 0 --source-size 192x4 --target-size 256x6
    # the same pretrained pair, every probe / CKA / refine pass redone at probe seed 1:
    python bench/transfer_frontier.py --work runs/frontier-large-p1 --models-from runs/frontier-large --probe-seed 1 \
        --seeds 0 --source-size 192x4 --target-size 256x6

Writes ``<work>/frontier.json``, ``<work>/frontier.md`` and ``<work>/cost_accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "trace_transfer" / "pipeline" / "presets" / "demo.yaml"
METHODS = ["trace-lf", "transfer-fisher", "transfer-saliency", "transfer-microprobe", "transfer-tensor",
           "transfer-profile", "cheap-lf", "trace-random", "trace-lf-tensor", "trace-random-tensor"]
SIGNALS = {"fisher": dict(signal="fisher", batches=16, steps=0), "saliency": dict(signal="saliency", batches=16, steps=0),
           "microprobe": dict(signal="microprobe", batches=4, steps=4)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def done(path: Path) -> bool:
    return path.exists()


def models(work: Path, cfg: dict, sizes: dict, models_from: Path | None = None) -> dict[str, str]:
    from trace_transfer.models import build_tiny_model
    from trace_transfer.train.pretrain import pretrain

    if models_from is not None and not (work / "models").exists():
        (work / "models").symlink_to((models_from / "models").resolve(), target_is_directory=True)
    out = {}
    for side in ("source", "target"):
        b = {**cfg[side]["build"], **sizes.get(side, {})}
        pre = cfg[side]["pretrain"]
        base, final = work / "models" / side, work / "models" / f"{side}-pretrained"
        if not done(final / "config.json"):
            log(f"build + pretrain {side} {b['arch']} {b['layers']}x{b['hidden']}")
            build_tiny_model(b["arch"], base, layers=b["layers"], hidden=b["hidden"], heads=b["heads"],
                             kv_heads=b["kv_heads"], tokenizer=b["tokenizer"], seed=b["seed"])
            pretrain(base, final, steps=pre["steps"], batch_size=pre["batch_size"], lr=pre["lr"], seq_len=pre["seq_len"],
                     seed=b["seed"], overwrite=True)
        out[side] = str(final)
    return out


def probes(work: Path, cfg: dict, m: dict, tasks: list[str], seed: int = 0) -> dict[str, dict[str, Path]]:
    from trace_transfer.probe import ProbeConfig, probe

    p = cfg["probe"]
    out: dict[str, dict[str, Path]] = {}
    for side in ("source", "target"):
        for task in tasks:
            d = work / "probe" / side / task.split(":")[-1]
            if not done(d / "probe.json"):
                log(f"probe {side} {task}")
                make = getattr(ProbeConfig, "from_flat", ProbeConfig)  # ProbeConfig may nest a TrainConfig
                probe(m[side], task, d, make(max_steps=p["max_steps"], lr=p["lr"], batch_size=p["batch_size"],
                                             seq_len=p["seq_len"], fisher_batches=p["fisher_batches"],
                                             max_examples=p["max_examples"], seed=seed))
            out.setdefault(side, {})[task] = d
    return out


def cores(work: Path, cfg: dict, m: dict, pr: dict, tasks: list[str], seed: int = 0) -> dict[str, dict[str, Path]]:
    """Per method, per task: the CoreSet file, plus its target cost in passes (in ``costs.json``)."""
    from trace_transfer.cka import compute_cka, load_probe_texts
    from trace_transfer.cka.layermap import LayerMap, map_layers
    from trace_transfer.refine import RefineConfig, refine
    from trace_transfer.scoring import coreset_filename, score
    from trace_transfer.transfer import SlotBudgets, transfer

    ratio = cfg["scoring"]["ratio"]
    files: dict[str, dict[str, Path]] = {k: {} for k in METHODS}
    cost_file = work / "costs.json"
    costs = json.loads(cost_file.read_text()) if cost_file.exists() else {}

    def scored(name: str, side: str, strategy: str, granularity: str) -> Path:
        d = work / "cores" / name
        if not all(done(d / coreset_filename(t.split(":")[-1])) for t in tasks):
            log(f"score {name}")
            score([pr[side][t] for t in tasks], strategy, ratio, d, granularity=granularity, budget="params", seed=seed)
        return d

    native, rnd = scored("target-lf", "target", "lf", "row"), scored("target-random", "target", "random", "row")
    src_rows, src_tensor = scored("source-lf", "source", "lf", "row"), scored("source-lf-tensor", "source", "lf", "tensor")
    # transfer-tensor's controls: at tensor granularity the comparison is with whole-tensor cores too.
    native_tensor = scored("target-lf-tensor", "target", "lf", "tensor")
    rnd_tensor = scored("target-random-tensor", "target", "random", "tensor")

    lm_path = work / "layer_map.json"
    if not done(lm_path):
        lmc = cfg["layer_map"]
        res = compute_cka(m["source"], m["target"], load_probe_texts(lmc["probes"])[: lmc["max_probes"]], work / "cka",
                          progress=False)
        lm = map_layers(res, lmc["method"], bootstrap=lmc["bootstrap"])
        chosen = lm if lm.informative else LayerMap.relative_depth(lm.num_source_layers, lm.num_target_layers)
        chosen.verdict = lm.verdict
        chosen.provenance["cka_map"] = lm.to_dict()
        chosen.save(lm_path)
        log(f"layer map: {chosen.method} ({lm.verdict['reason']})")

    for t in tasks:
        key = t.split(":")[-1]
        fname = coreset_filename(key)
        probe_info = json.loads((pr["target"][t] / "probe.json").read_text())
        native_passes = probe_info["train"]["steps"] + probe_info["fisher"]["batches"]
        files["trace-lf"][t], files["trace-random"][t] = native / fname, rnd / fname
        costs.setdefault("trace-lf", {})[key] = native_passes
        costs.setdefault("trace-random", {})[key] = 0
        costs.setdefault("native", {})[key] = native_passes
        files["trace-lf-tensor"][t], files["trace-random-tensor"][t] = native_tensor / fname, rnd_tensor / fname
        costs.setdefault("trace-lf-tensor", {})[key] = native_passes
        costs.setdefault("trace-random-tensor", {})[key] = 0
        # Budgets from the source's row core; the tensor core and the profile ablation as CoreSets.
        bpath = work / "cores" / "budgets" / f"{key}.budgets.json"
        if not done(bpath):
            b, _ = transfer(src_rows / fname, m["source"], m["target"], lm_path)
            bpath.parent.mkdir(parents=True, exist_ok=True)
            b.save(bpath)
        for name, src, carry in (("transfer-tensor", src_tensor, "exact"), ("transfer-profile", src_rows, "profile")):
            out = work / "cores" / name / fname
            if not done(out):
                out.parent.mkdir(parents=True, exist_ok=True)
                cs, _ = transfer(src / fname, m["source"], m["target"], lm_path, carry=carry, budget="params")
                cs.save(out)
            files[name][t] = out
            costs.setdefault(name, {})[key] = 0
        p = cfg["probe"]
        common = dict(lr=p["lr"], batch_size=p["batch_size"], seq_len=p["seq_len"], max_examples=p["max_examples"],
                      ratio=ratio, seed=seed)
        for name, sig, budgets in [*((f"transfer-{s}", s, bpath) for s in SIGNALS), ("cheap-lf", "microprobe", None)]:
            out = work / "cores" / name / fname
            if not done(out):
                log(f"refine {name} {t}")
                out.parent.mkdir(parents=True, exist_ok=True)
                cs, c = refine(m["target"], t, SlotBudgets.load(budgets) if budgets else None,
                               RefineConfig(**SIGNALS[sig], **common), native=pr["target"][t])
                cs.save(out)
            files[name][t] = out
            from trace_transfer.coreset import CoreSet

            costs.setdefault(name, {})[key] = CoreSet.load(out).metadata["cost"]["forward_backward"]
    cost_file.write_text(json.dumps(costs, indent=2))
    return files


def finetune(work: Path, cfg: dict, m: dict, files: dict, tasks: list[str], seeds: list[int], methods: list[str]) -> None:
    from trace_transfer.train.loop import TrainConfig
    from trace_transfer.train.methods import MethodOptions, Stage
    from trace_transfer.train.runner import run_sequence

    tr, ev = cfg["training"], cfg["eval"]
    for seed in seeds:
        for method in methods:
            d = work / "finetune" / method / f"seed{seed}"
            if done(d / "results.json") and json.loads((d / "results.json").read_text()).get("metrics"):
                continue
            log(f"fine-tune {method} seed {seed}")
            stages = [Stage(t, str(files[method][t])) for t in tasks]
            run_sequence(m["target"], stages, "trace", d,
                         TrainConfig(lr=tr["lr"], max_steps=tr["max_steps"], batch_size=tr["batch_size"],
                                     seq_len=tr["seq_len"], seed=seed),
                         eval_limit=ev["limit"], eval_batch_size=ev["batch_size"], resume=True,
                         options=MethodOptions())
            for p in d.glob("stage_*/*.safetensors"):
                p.unlink()  # results are what is compared; weights of 8 methods x seeds would only fill the disk


def aggregate(work: Path, methods: list[str], seeds: list[int]) -> dict:
    costs = json.loads((work / "costs.json").read_text())
    native = statistics.mean(costs["native"].values())
    rows = {}
    for method in methods:
        aas = []
        for seed in seeds:
            f = work / "finetune" / method / f"seed{seed}" / "results.json"
            if f.exists():
                r = json.loads(f.read_text())
                if r.get("metrics") and r["metrics"].get("aa") is not None:
                    aas.append(100 * r["metrics"]["aa"])
        passes = statistics.mean(costs[method].values()) if method in costs else None
        rows[method] = {"aa": aas, "mean": statistics.mean(aas) if aas else None,
                        "std": statistics.stdev(aas) if len(aas) > 1 else 0.0 if aas else None,
                        "passes": passes, "relative_cost": passes / native if passes is not None else None}
    lm = json.loads((work / "layer_map.json").read_text())
    return {"rows": rows, "native_passes": native, "seeds": seeds, "layer_map": lm["method"], "verdict": lm.get("verdict")}


def write(work: Path, agg: dict) -> None:
    lines = [f"Layer map: {agg['layer_map']} ({(agg.get('verdict') or {}).get('reason', 'no verdict')})", "",
             "| method | avg % | seeds | target passes / task | vs native probe |", "|---|---:|---:|---:|---:|"]
    for name, r in agg["rows"].items():
        avg = "n/a" if r["mean"] is None else f"{r['mean']:.1f} ± {r['std']:.1f}"
        rel = "n/a" if r["relative_cost"] is None else f"{100 * r['relative_cost']:.0f} %"
        lines.append(f"| {name} | {avg} | {len(r['aa'])} | {r['passes'] if r['passes'] is not None else 'n/a'} | {rel} |")
    (work / "frontier.md").write_text("\n".join(lines) + "\n")
    (work / "frontier.json").write_text(json.dumps(agg, indent=2))
    print("\n".join(lines))
    try:
        from trace_transfer.report.plots import plot_cost_accuracy

        plot_cost_accuracy({k: (r["relative_cost"], r["mean"], r["std"]) for k, r in agg["rows"].items()
                            if r["mean"] is not None and r["relative_cost"] is not None}, work / "cost_accuracy.png")
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--source-size", help="HIDDENxLAYERS of the source (default: the demo's)")
    ap.add_argument("--target-size", help="HIDDENxLAYERS of the target (default: the demo's)")
    ap.add_argument("--max-steps", type=int, help="override training.max_steps (a quick check)")
    ap.add_argument("--eval-limit", type=int, help="override eval.limit (a quick check)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny pretraining, probes and training")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--probe-seed", type=int, default=0,
                    help="seed of every probe, random core and refine pass (the fine-tuning seeds are --seeds)")
    ap.add_argument("--models-from", type=Path, help="reuse the pretrained pair of another --work directory")
    args = ap.parse_args()
    cfg = yaml.safe_load(PRESET.read_text())
    if args.quick:
        for side in ("source", "target"):
            cfg[side]["pretrain"]["steps"] = 20
        cfg["probe"].update(max_steps=4, fisher_batches=4, max_examples=128)
        cfg["layer_map"].update(max_probes=48, bootstrap=3)
        cfg["training"]["max_steps"], cfg["eval"]["limit"] = 3, 4
    if args.max_steps:
        cfg["training"]["max_steps"] = args.max_steps
    if args.eval_limit:
        cfg["eval"]["limit"] = args.eval_limit
    sizes = {}
    for side, s in (("source", args.source_size), ("target", args.target_size)):
        if s:
            h, layers = (int(x) for x in s.split("x"))
            sizes[side] = {"hidden": h, "layers": layers}
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    tasks = cfg["tasks"]
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.aggregate_only:
        import torch

        torch.set_num_threads(1)
        m = models(args.work, cfg, sizes, args.models_from)
        pr = probes(args.work, cfg, m, tasks, args.probe_seed)
        files = cores(args.work, cfg, m, pr, tasks, args.probe_seed)
        finetune(args.work, cfg, m, files, tasks, seeds, methods)
    write(args.work, aggregate(args.work, methods, seeds))


if __name__ == "__main__":
    main()
