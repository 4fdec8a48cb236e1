"""The bad-input battery (issue 10): commands x faults, grouped by the artifact that is broken.

Every case runs the real CLI in-process on a copy of one small artifact tree (conftest.py) and is
judged by _harness.outcome: the expected exit code, one `Error:` line naming the culprit, no
traceback, every pre-existing file byte-identical, no empty directory left behind.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from battery._faults import (chain, edit_json, edit_text, is_root, non_utf8, poison, read_only, remove, st_header,
                             st_raw_header, st_tensors, truncate, write)
from battery._harness import FT_RUN, Case, run_case

CS = "cores/math.coreset.safetensors"
CS2 = "cores/code.coreset.safetensors"
PROBE = ["--max-steps", "1", "--fisher-batches", "1", "--max-examples", "8", "--batch-size", "4", "--seq-len", "32"]
FT = ["--max-steps", "1", "--batch-size", "4", "--seq-len", "32", "--eval-limit", "2"]
MODEL_ST = "llama/model.safetensors"


def probe(model="llama", task="synthetic:math", out="p_new", *extra):
    return ["probe", "--model", model, "--task", task, "--out", out, *PROBE, *extra]


def finetune(model="llama", stage=f"synthetic:math:{CS}", out="ft_new", *extra):
    return ["finetune", "--model", model, "--stage", stage, "--out", out, *FT, *extra]


def evaluate(model="llama", task="synthetic:math", *extra):
    return ["eval", "--model", model, "--task", task, "--limit", "2", "--batch-size", "2", *extra]


def score(*probes, ratio="0.1", out="cores_new", strategy="lf", extra=()):
    args = ["score", "--strategy", strategy, "--ratio", ratio, "--out", out, *extra]
    for p in probes or ("p_math",):
        args += ["--probe", p]
    return args


def cka(source="llama", target="qwen3", out="cka_new", *extra):
    return ["cka", "--source", source, "--target", target, "--out", out, "--max-probes", "8", "--max-length", "16",
            *extra]


def transfer(coreset=CS, source="llama", target="qwen3", layer_map="layer_map.json", out="t.coreset.safetensors",
             *extra):
    return ["transfer", "--coreset", coreset, "--source", source, "--target", target, "--layer-map", layer_map,
            "--out", out, *extra]


def merge(*models, out="merged", method="lerp", extra=()):
    args = ["merge", method, "--out", out, *extra]
    for m in models or ("llama", "ft/stage_1"):
        args += ["--model", m]
    return args


def extract(base="llama", tuned="ft/stage_1", coreset=CS, out="delta_new"):
    return ["delta", "extract", "--base", base, "--tuned", tuned, "--coreset", coreset, "--out", out]


def apply(base="llama", delta="delta", out="rebuilt"):
    return ["delta", "apply", "--base", base, "--delta", delta, "--out", out]


def revert(tuned="ft/stage_1", delta="delta", out="rebuilt"):
    return ["delta", "revert", "--tuned", tuned, "--delta", delta, "--out", out]


def verify(base="llama", tuned="ft/stage_1", coreset=CS):
    return ["verify-frozen", "--base", base, "--tuned", tuned, "--coreset", coreset]


def _other_depth_model(w):
    from trace_transfer.models import build_tiny_model
    build_tiny_model("qwen3", w / "qwen3_deep", layers=4, hidden=48, heads=4, kv_heads=2, tokenizer="char", seed=0)


def _different_base(w):
    """A copy of the base whose embedding differs (the delta patches only MLP/attention tensors)."""
    import shutil
    shutil.copytree(w / "llama", w / "llama2")
    st_tensors("llama2/model.safetensors", lambda t: t.__setitem__(
        "model.embed_tokens.weight", t["model.embed_tokens.weight"] + 1.0))(w)


def _no_nan_scores(w):
    from trace_transfer.coreset import CoreSet
    cs = CoreSet.load(w / "cores_new/math.coreset.safetensors")
    for n in cs.names():
        s = cs.score(n)
        assert s is None or bool(torch.isfinite(s).all()), n


# -- model dir ---------------------------------------------------------------------------------------------
MODEL_FAULTS = {
    "missing": (None, "nope"),
    "truncated-weights": (truncate(MODEL_ST), "model.safetensors"),
    "garbage-weights": (write(MODEL_ST, b"not a safetensors file at all"), "model.safetensors"),
    "empty-dir": (chain(remove("llama"), lambda w: (w / "llama").mkdir()), "llama"),
    "bad-config-json": (write("llama/config.json", "{not json"), "config.json"),
    "no-weights": (remove(MODEL_ST), "llama"),
}
MODEL_CMDS = {
    "probe": lambda m: probe(model=m),
    "finetune": lambda m: finetune(model=m),
    "eval": lambda m: evaluate(model=m),
    "cka": lambda m: cka(source=m),
    "delta-extract": lambda m: extract(base=m),
    "merge": lambda m: merge(m, "ft/stage_1"),
    "verify-frozen": lambda m: verify(base=m),
}
# "./nope" and not "nope": a bare name is a hub id, and looking it up offline costs ~50 s of retries.
MODEL_DIR = [Case(f"{c}-{f}", cmd("./nope" if f == "missing" else "llama"), culprit, setup,
                  code=2 if f == "missing" and c in ("merge", "delta-extract", "verify-frozen") else None)  # click's
             for c, cmd in MODEL_CMDS.items() for f, (setup, culprit) in MODEL_FAULTS.items()     # exists=True
             if not (c == "verify-frozen" and f == "bad-config-json")]
MODEL_DIR += [
    # verify-frozen compares weights only: a broken config.json is not its concern
    Case("verify-frozen-bad-config-json-ok", verify(), None, write("llama/config.json", "{not json")),
    Case("transfer-bad-target-config", transfer(), "config.json", write("qwen3/config.json", "{not json")),
    Case("transfer-missing-source", transfer(source="./nope"), "nope"),
    Case("merge-input-without-config", merge("llama", "ft/stage_1"), "config.json", remove("llama/config.json")),
    Case("delta-apply-truncated-base", apply(), "model.safetensors", truncate(MODEL_ST)),
    Case("delta-revert-truncated-tuned", revert(), "model.safetensors", truncate("ft/stage_1/model.safetensors")),
    Case("tiny-model-existing-out", ["tiny-model", "--arch", "llama", "--out", "llama"], "llama"),
]

# -- CoreSet -------------------------------------------------------------------------------------------------
CORESET_FAULTS = {
    "bad-header-json": (st_raw_header(CS, "{broken"), "math.coreset.safetensors"),
    "header-missing-tensors": (st_header(CS, lambda d: d.pop("tensors")), "math.coreset.safetensors"),
    "unknown-layout": (st_header(CS, lambda d: [t["layout"].__setitem__("kind", "diagonal")
                                                 for t in d["tensors"].values() if "layout" in t]),
                       "math.coreset.safetensors"),
    "truncated": (truncate(CS), "math.coreset.safetensors"),
    "not-safetensors": (write(CS, "hello"), "math.coreset.safetensors"),
    "counts-disagree-with-masks": (st_header(CS, lambda d: [t.__setitem__("selected", t["selected"] + 7)
                                                             for t in d["tensors"].values() if "selected" in t]),
                                   "math.coreset.safetensors"),
    "masks-tampered": (st_tensors(CS, lambda t: [v.zero_() for k, v in t.items() if k.startswith("mask/")]),
                       "math.coreset.safetensors"),
    "swapped-layout": (st_header(CS, lambda d: [t["layout"].__setitem__("axis", 1 - t["layout"]["axis"])
                                                 for t in d["tensors"].values()
                                                 if t.get("layout", {}).get("kind") == "axis"]),
                       "math.coreset.safetensors"),
}
CORESET_CMDS = {
    "coreset-show": lambda: ["coreset", "show", CS],
    "coreset-stats": lambda: ["coreset", "stats", CS, CS2],
    "finetune": lambda: finetune(),
    "transfer": lambda: transfer(),
    "delta-extract": lambda: extract(),
    "verify-frozen": lambda: verify(),
    "merge-restricted": lambda: merge(extra=("--coreset", CS)),
}
CORESET = [Case(f"{c}-{f}", cmd(), culprit, setup)
           for c, cmd in CORESET_CMDS.items() for f, (setup, culprit) in CORESET_FAULTS.items()]
CORESET += [
    Case("finetune-coreset-of-other-model", finetune(stage="synthetic:math:t.coreset.safetensors"),
         "t.coreset.safetensors", lambda w: _transfer_to_qwen(w)),
    Case("finetune-missing-coreset", finetune(stage="synthetic:math:cores/nope.coreset.safetensors"),
         "nope.coreset.safetensors"),
    Case("delta-extract-coreset-other-model", extract(coreset="t.coreset.safetensors"), "t.coreset.safetensors",
         lambda w: _transfer_to_qwen(w)),
]


def _transfer_to_qwen(w):
    """t.coreset.safetensors: a CoreSet of the other model (qwen3) in the tree."""
    from trace_transfer.checkpoint import open_checkpoint
    from trace_transfer.coreset import CoreSet
    r = open_checkpoint(w / "qwen3")
    name = r.names()[0]
    CoreSet.from_masks({name: torch.ones(r.shape(name), dtype=torch.bool)}, r).save(w / "t.coreset.safetensors")


# -- probe dir -----------------------------------------------------------------------------------------------
PROBE_FAULTS = {
    "nan-delta": (poison("p_math/delta.safetensors", math.nan), "delta.safetensors"),
    "inf-delta": (poison("p_math/delta.safetensors", math.inf), "delta.safetensors"),
    "nan-fisher": (poison("p_math/fisher.safetensors", math.nan), "fisher.safetensors"),
    "negative-fisher": (poison("p_math/fisher.safetensors", -1.0), "fisher.safetensors"),
    "truncated-delta": (truncate("p_math/delta.safetensors"), "delta.safetensors"),
    "missing-fisher": (remove("p_math/fisher.safetensors"), "fisher.safetensors"),
    "bad-probe-json": (write("p_math/probe.json", "{oops"), "probe.json"),
    "missing-probe-json": (remove("p_math/probe.json"), "probe.json"),
}
PROBE_CMDS = {
    "score-lf": lambda: score("p_math"),
    "score-cs": lambda: score("p_math", "p_code", "p_medical", strategy="cs"),
    "score-magnitude": lambda: score("p_math", strategy="magnitude"),
}
PROBE_DIR = [Case(f"{c}-{f}", cmd(), culprit, setup)
             for c, cmd in PROBE_CMDS.items() for f, (setup, culprit) in PROBE_FAULTS.items()
             if not (c in ("score-magnitude", "score-cs") and "fisher" in f)]  # they read no Fisher
PROBE_DIR += [
    Case("score-probe-dir-missing", score("nope"), "nope"),
    Case("score-probe-is-empty-dir", score("empty"), "empty", lambda w: (w / "empty").mkdir()),
    Case("score-ratio-tiny", score(ratio="1e-9"), "ratio"),
    Case("score-ratio-zero", score(ratio="0"), "ratio"),
    Case("score-ratio-negative", score(ratio="-0.1"), "ratio"),
    Case("score-ratio-above-one", score(ratio="1.5"), "ratio"),
    Case("score-cs-two-probes", score("p_math", "p_code", strategy="cs"), "cs"),
    Case("score-unknown-strategy", score(strategy="nope"), "nope"),
    Case("score-ok", score(), None, check=_no_nan_scores),
]

# -- task spec / jsonl ---------------------------------------------------------------------------------------
TASK_FAULTS = {
    "non-utf8-spec": (non_utf8("task.yaml"), "task.yaml"),
    "bad-yaml": (write("task.yaml", "name: [unclosed\n"), "task.yaml"),
    "unknown-key": (edit_text("task.yaml", "name: adds", "name: adds\nnmae: x"), "nmae"),
    "invalid-regex": (edit_text("task.yaml", "'([0-9]+)'", "'([0-9]+'"), "regex"),
    "data-path-is-dir": (edit_text("task.yaml", "rows.jsonl", "cores"), "cores"),
    "data-missing": (edit_text("task.yaml", "rows.jsonl", "gone.jsonl"), "gone.jsonl"),
    "empty-jsonl": (write("rows.jsonl", ""), "rows.jsonl"),
    "non-utf8-jsonl": (write("rows.jsonl", b'{"prompt": "caf\xe9", "response": "1"}\n' * 8), "rows.jsonl"),
    "bad-json-line": (write("rows.jsonl", '{"prompt": "a", "response": "1"}\n{oops\n' * 6), "rows.jsonl"),
    "null-response": (write("rows.jsonl", "".join(json.dumps({"prompt": f"q{i}", "response": None}) + "\n"
                                                  for i in range(8))), "response"),
    "missing-response": (write("rows.jsonl", "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(8))),
                         "response"),
    "spec-missing": (remove("task.yaml"), "task.yaml"),
}
TASK_CMDS = {
    "probe": lambda: probe(task="task.yaml"),
    "eval": lambda: evaluate(task="task.yaml"),
    "finetune": lambda: finetune(stage="task.yaml") + ["--method", "full"],
}
TASKS = [Case(f"{c}-{f}", cmd(), culprit, setup)
         for c, cmd in TASK_CMDS.items() for f, (setup, culprit) in TASK_FAULTS.items()]
TASKS += [
    # click's range check: a usage error (exit 2) naming the option
    Case("eval-negative-limit", ["eval", "--model", "llama", "--task", "synthetic:math", "--limit", "-2"], "--limit",
         code=2),
    Case("finetune-negative-eval-limit", finetune(out="ft_new") + ["--eval-limit", "-1"], "--eval-limit", code=2),
    Case("finetune-negative-max-steps", finetune(out="ft_new") + ["--max-steps", "-3"], "--max-steps", code=2),
    Case("probe-negative-max-steps", probe() + ["--max-steps", "-3"], "--max-steps", code=2),
    Case("unknown-synthetic-task", probe(task="synthetic:nope"), "nope"),
]

# -- rule files ----------------------------------------------------------------------------------------------
RULE_FAULTS = {
    "non-utf8": (non_utf8("rules.yaml"), "rules.yaml"),
    "bad-yaml": (write("rules.yaml", "family: [x\n"), "rules.yaml"),
    "unknown-key": (edit_text("rules.yaml", "family: llama", "family: llama\nfamly: x"), "famly"),
    "empty": (write("rules.yaml", ""), "rules.yaml"),
    "wrong-format": (edit_text("rules.yaml", "format: 1", "format: 99"), "rules.yaml"),
}
RULE_CMDS = {
    "rules-check": lambda: ["rules", "check", "llama", "--rules", "rules.yaml"],
    "transfer": lambda: transfer() + ["--rules", "rules.yaml"],
}
RULES = [Case(f"{c}-{f}", cmd(), culprit, setup)
         for c, cmd in RULE_CMDS.items() for f, (setup, culprit) in RULE_FAULTS.items()]
RULES += [Case("rules-init-existing-out", ["rules", "init", "llama", "--out", "rules.yaml"], "rules.yaml")]

# -- pipeline YAML -------------------------------------------------------------------------------------------
PIPE_FAULTS = {
    "non-utf8": (non_utf8("pipeline.yaml"), "pipeline.yaml"),
    "bad-yaml": (write("pipeline.yaml", "name: [x\n"), "pipeline.yaml"),
    "empty": (write("pipeline.yaml", ""), "pipeline.yaml"),
    "unknown-key": (edit_text("pipeline.yaml", "name: bat", "name: bat\nnmae: x"), "nmae"),
    "unknown-method": (edit_text("pipeline.yaml", "methods: [full]", "methods: [fulll]"), "fulll"),
    "missing-model": (edit_text("pipeline.yaml", "{model: llama}", "{model: ./nope}"), "nope"),
    "bad-ratio": (edit_text("pipeline.yaml", "ratio: 0.1", "ratio: 7"), "ratio"),
    "missing": (remove("pipeline.yaml"), "pipeline.yaml"),
}
PIPELINE = [Case(f"{c}-{f}", ["run", "pipeline.yaml", *extra], culprit, setup)
            for c, extra in (("check", ["--check"]), ("run", ["--out", "run_new"]))
            for f, (setup, culprit) in PIPE_FAULTS.items()]
PIPELINE += [
    # schema problem (unknown key) and a semantic one (unknown method) must both be reported
    Case("check-reports-all", ["run", "pipeline.yaml", "--check"], "fulll",
         chain(edit_text("pipeline.yaml", "name: bat", "name: bat\nnmae: x"),
               edit_text("pipeline.yaml", "methods: [full]", "methods: [fulll]"))),
    Case("check-reports-files-with-schema-errors", ["run", "pipeline.yaml", "--check"], "gone.yaml",
         chain(edit_text("pipeline.yaml", "name: bat", "name: bat\nnmae: x"),
               edit_text("pipeline.yaml", "synthetic:code]", "gone.yaml]"))),
    Case("run-force-unknown-step", ["run", "pipeline.yaml", "--out", "run_new", "--force", "nosuchstep"],
         "nosuchstep"),
    Case("run-into-foreign-dir", ["run", "pipeline.yaml", "--out", "ft"], "ft"),
]

# -- layer map / CKA files -----------------------------------------------------------------------------------
LAYER_MAP = [
    Case("map-layers-truncated-cka", ["map-layers", "--cka", "cka", "--out", "lm2.json"], "cka.safetensors",
         truncate("cka/cka.safetensors")),
    # cka.json is the human-readable copy; the matrix and its provenance live in cka.safetensors
    Case("map-layers-without-cka-json-ok", ["map-layers", "--cka", "cka", "--out", "lm2.json"], None,
         remove("cka/cka.json")),
    Case("map-layers-bad-cka-header", ["map-layers", "--cka", "cka", "--out", "lm2.json"], "cka.safetensors",
         st_raw_header("cka/cka.safetensors", "{")),
    Case("map-layers-truncated-kernels", ["map-layers", "--cka", "cka", "--out", "lm2.json", "--bootstrap", "3"],
         "kernels.safetensors", truncate("cka/kernels.safetensors")),
    Case("map-layers-empty-dir", ["map-layers", "--cka", "empty", "--out", "lm2.json"], "empty",
         lambda w: (w / "empty").mkdir()),
    Case("map-layers-existing-out", ["map-layers", "--cka", "cka", "--out", "layer_map.json"], "layer_map.json"),
    Case("transfer-layer-map-bad-json", transfer(), "layer_map.json", write("layer_map.json", "{")),
    Case("transfer-layer-map-no-entries", transfer(), "layer_map.json",
         edit_json("layer_map.json", lambda d: [d.pop(k) for k in ("reverse", "forward")])),
    Case("transfer-layer-map-without-reverse-ok", transfer(), None,
         edit_json("layer_map.json", lambda d: d.pop("reverse"))),  # documented: derived from forward
    Case("transfer-layer-map-other-depth", transfer(target="qwen3_deep"), "layer_map.json", _other_depth_model),
    Case("transfer-layer-map-out-of-range", transfer(), "layer_map.json",
         edit_json("layer_map.json", lambda d: d["reverse"].__setitem__("1", 9))),
    Case("transfer-ratio-zero", transfer() + ["--ratio", "0"], "ratio"),
    Case("transfer-ratio-negative", transfer() + ["--ratio", "-1"], "ratio"),
    Case("transfer-existing-out", transfer(out=CS2) + ["--carry", "exact"], "code.coreset.safetensors"),
    Case("cka-missing-target", cka(target="./nope"), "nope"),
    Case("cka-bad-probes-file", cka() + ["--probes", "rows.jsonl"], "rows.jsonl", write("rows.jsonl", "")),
    Case("cka-missing-probes-file", cka() + ["--probes", "gone.jsonl"], "gone.jsonl"),
]

# -- delta files ---------------------------------------------------------------------------------------------
DELTA_FAULTS = {
    "truncated-delta": (truncate("delta/task_delta.safetensors"), "task_delta.safetensors"),
    "bad-delta-json": (write("delta/delta.json", "{"), "delta.json"),
    "missing-delta-json": (remove("delta/delta.json"), "delta.json"),
    "missing-tensors": (remove("delta/task_delta.safetensors"), "task_delta.safetensors"),
    "wrong-format": (edit_json("delta/delta.json", lambda d: d.__setitem__("format", "x")), "delta.json"),
}
DELTA = [Case(f"{c}-{f}", cmd(), culprit, setup)
         for c, cmd in (("apply", apply), ("revert", revert)) for f, (setup, culprit) in DELTA_FAULTS.items()]
DELTA += [
    Case("apply-base-differs-elsewhere", apply(base="llama2"), "llama2", _different_base),
    Case("revert-onto-base-not-tuned", revert(tuned="llama"), "llama"),
    Case("apply-ok", apply(), None),
    Case("extract-tuned-missing-config", extract(), "config.json", remove("ft/stage_1/config.json")),
]

# -- output dirs ---------------------------------------------------------------------------------------------
IMPORTANT = write("ft/stage_9/important.bin", b"precious")
OUT_DIRS = [
    Case("finetune-fresh-into-dir-with-foreign-stage", finetune(out="ft"), "ft", IMPORTANT),
    Case("finetune-fresh-into-finished-run", finetune(out="ft"), "ft"),
    Case("finetune-into-dir-with-foreign-files", finetune(out="stuff"), "stuff",
         chain(write("stuff/stage_2/x.bin", b"x"), write("stuff/results.json", "{}"))),
    Case("finetune-resume-other-run", finetune(out="ft", stage=f"synthetic:code:{CS2}") + ["--resume"], "ft"),
    # killed after stage 1 (stage_2 gone), then the second stage's CoreSet replaced before the resume
    Case("finetune-resume-coreset-replaced", FT_RUN + ["--resume"], "code.coreset.safetensors",
         chain(remove("ft/stage_2"), lambda w: (w / CS2).write_bytes((w / CS).read_bytes()))),
    Case("finetune-resume-truncated-stage", FT_RUN + ["--resume"], "stage_1",
         chain(remove("ft/stage_2"), truncate("ft/stage_1/model.safetensors"))),
    Case("finetune-resume-finished-run", FT_RUN + ["--resume"], None),
    Case("finetune-rerun-without-resume", FT_RUN, "--resume"),
    Case("finetune-out-is-file", finetune(out="task.yaml"), "task.yaml", code=2),  # click's own check
    Case("finetune-out-under-file", finetune(out="task.yaml/run"), "task.yaml"),
    Case("probe-existing-out", probe(out="p_math"), "p_math"),
    Case("probe-out-under-file", probe(out="task.yaml/p"), "task.yaml"),
    Case("score-existing-out", score(out="cores"), "math.coreset.safetensors"),
    Case("score-out-under-file", score(out="task.yaml/c"), "task.yaml"),
    Case("cka-existing-out", cka(out="cka"), "cka"),
    Case("merge-existing-out", merge(out="ft/stage_1"), "stage_1"),
    Case("merge-out-under-file", merge(out="task.yaml/m"), "task.yaml"),
    Case("delta-extract-existing-out", extract(out="delta"), "delta"),
    Case("delta-apply-existing-out", apply(out="ft/stage_1"), "stage_1"),
    Case("delta-revert-existing-out", revert(out="llama"), "llama"),
    Case("delta-apply-out-under-file", apply(out="task.yaml/r"), "task.yaml"),
    Case("probe-existing-out-force", probe(out="p_new") + ["--force"], None, write("p_new/old.txt", "x")),
    Case("score-existing-out-force", score(out="cores") + ["--force"], None, changes=("cores/",)),
    Case("merge-existing-out-force", merge(out="m2") + ["--force"], None, write("m2/config.json", "{}"),
         changes=("m2/",)),
    Case("delta-apply-existing-out-force", apply(out="r2") + ["--force"], None, write("r2/x", "x")),
]
if not is_root():  # root writes through a read-only mode; the under-a-file cases cover it then
    OUT_DIRS += [
        Case("probe-read-only-out", probe(out="ro/p"), "ro", read_only("ro")),
        Case("finetune-read-only-out", finetune(out="ro/r"), "ro", read_only("ro")),
        Case("score-read-only-out", score(out="ro/c"), "ro", read_only("ro")),
    ]

GROUPS = {"model_dir": MODEL_DIR, "coreset": CORESET, "probe_dir": PROBE_DIR, "task": TASKS, "rules": RULES,
          "pipeline": PIPELINE, "layer_map": LAYER_MAP, "delta": DELTA, "out_dirs": OUT_DIRS}
ALL = [(g, c) for g, cases in GROUPS.items() for c in cases]


def test_battery_size():
    assert len(ALL) >= 150, len(ALL)


@pytest.mark.parametrize(("group", "case"), ALL, ids=[f"{g}/{c.id}" for g, c in ALL])
def test_bad_input(group, case, work):
    run_case(case, work, group)
