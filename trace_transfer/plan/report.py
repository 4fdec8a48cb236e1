"""A plan as an 80-column plain-text table (pipes and logs stay readable) and as JSON."""

from __future__ import annotations

import json
from typing import Any

from trace_transfer.plan.hardware import GiB
from trace_transfer.plan.planner import Plan, StepPlan

WIDTH = 80
COLUMNS = [("step", 19, "<"), ("trains", 11, "<"), ("GiB/GPU", 7, ">"), ("ckpt", 5, ">"), ("host", 5, ">"),
           ("time", 9, ">"), ("verdict", 17, "<")]
_SHORT = (("ZeRO-3 x", "Z3x"), ("grad ckpt", "ckpt"), ("offload opt+param", "off:opt+p"), ("offload opt", "off:opt"),
          (" + ", "+"), ("device_map", "dmap"))


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if n < 10 * size else 1}f}{unit}"
    return str(int(n))


def fmt_seconds(lo_hi: tuple[float, float] | None) -> str:
    if not lo_hi:
        return "?"
    lo, hi = lo_hi
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if hi >= size:
            return f"{lo / size:.{1 if lo < 10 * size else 0}f}-{hi / size:.{1 if hi < 10 * size else 0}f}{unit}"
    return f"{lo:.0f}-{hi:.0f}s"


def _gib(x: float | None) -> str:
    if not x:
        return "-"
    return f"{x / GiB:.1f}" if x < 100 * GiB else f"{x / GiB:.0f}"


def _verdict_short(s: StepPlan) -> str:
    """The verdict in the table's width; the full text follows the table."""
    v = s.verdict
    if v.startswith("fits only with "):
        return "fits w/ ckpt:true"
    if v.startswith("needs ") and "more GPUs" in v:
        return "+" + v.split()[1] + " GPUs"
    v = v.removeprefix("needs ")
    for long, short in _SHORT:
        v = v.replace(long, short)
    return v


def _trains(s: StepPlan) -> str:
    if s.trainable_params is None:
        return "-"
    words = s.trains.split()
    kind = {"complement": "compl", "tensor": "tens"}.get(words[0], words[0])
    if words[-1] in ("dense", "sparse"):
        kind += "/" + words[-1][0]
    return f"{fmt_count(s.trainable_params)} {kind}"


def rows(plan: Plan) -> list[list[str]]:
    out = []
    for s in plan.steps:
        mem = s.memory
        per_gpu = mem.get("total") if s.kind in ("train", "inference") else None
        ckpt = None
        if s.kind == "train":  # both figures whatever the config runs: the columns keep their meaning
            states = mem["total"] - mem["per_gpu"]["activations"]
            # A probe's peak is the largest of its phases (probe_memory), which gives both totals itself.
            per_gpu = mem.get("total_no_ckpt", states + mem["activations_no_ckpt"])
            ckpt = mem.get("total_ckpt", states + mem["activations_ckpt"])
        out.append([s.name + (f" x{s.count}" if s.count > 1 and s.kind == "train" and " x" not in s.name else ""),
                    _trains(s), _gib(per_gpu), ("*" if s.gradient_checkpointing else "") + _gib(ckpt),
                    _gib(mem.get("host_per_node")), fmt_seconds(s.seconds), _verdict_short(s)])
    return out


def render(plan: Plan) -> str:
    """The plan as text: header, table (≤ 80 columns), then one line per step that needs a change."""
    lines = [f"plan for {plan.name}: " + ", ".join(f"{side} {m.ref} ({fmt_count(m.params)})"
                                                  for side, m in plan.models.items()),
             f"on {plan.hardware.describe()}"]
    lines = [line for text in lines for line in _wrap(text)]
    head = [name for name, _, _ in COLUMNS]
    table = [head, *rows(plan)]
    for r in table:
        cells = []
        for (name, width, align), cell in zip(COLUMNS, r):
            cell = cell if len(cell) <= width else cell[: width - 1] + "…"
            cells.append(cell.ljust(width) if align == "<" else cell.rjust(width))
        lines.append(" ".join(cells).rstrip())
        if r is head:
            lines.append(" ".join("-" * w for _, w, _ in COLUMNS))
    lines.append("GiB/GPU: as configured, without gradient checkpointing; ckpt: the same with it")
    lines.append("(verdicts follow the config's training./probe.gradient_checkpointing; *: on);")
    lines.append("host: GiB per node; time: one run of the step (xN: N runs); /d dense, /s sparse.")
    for s in plan.steps:
        for text in _details(s):
            lines += _wrap(text, indent="    ")
    lines.append("assumptions:")
    for a in plan.assumptions:
        lines += _wrap(f"- {a}", indent="  ")
    return "\n".join(lines)


def _details(s: StepPlan) -> list[str]:
    out = []
    if s.kind == "train":
        out.append(f"{s.name}: {s.setup}; " + ", ".join(f"{k} {_gib(v)}" for k, v in s.memory["per_gpu"].items() if v)
                   + (f"; methods: {', '.join(s.methods)}" if s.methods else ""))
    if s.suggestion:
        m = s.suggestion_memory or {}
        out.append(f"{s.name}: {s.verdict} -> {_gib(m.get('total'))} GiB/GPU, "
                   f"host {_gib(m.get('host_per_node'))} GiB/node")
    out += [f"{s.name}: {n}" for n in s.notes]
    return out


def _wrap(text: str, indent: str = "  ") -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False) or [""]


def to_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
