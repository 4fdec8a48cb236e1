"""Runs one battery case in-process and judges it.

A case passes when the command (1) exits with the expected code, (2) on error prints exactly one
``Error:`` line (a ConfigError may add its ``  - problem`` lines) that names the culprit, (3) shows
no Python traceback, (4) leaves every pre-existing file byte-identical and (5) on error leaves no
new empty directory behind. ``BATTERY_LOG=<file>`` appends each case's outcome as a JSON line (used
to count outcomes before and after a change).
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from click.testing import CliRunner

from trace_transfer.cli import main


# The finished two-stage run in the fixture tree (ft/); a case re-running it resumes the same run.
FT_RUN = ["finetune", "--model", "llama", "--stage", "synthetic:math:cores/math.coreset.safetensors", "--stage",
          "synthetic:code:cores/code.coreset.safetensors", "--max-steps", "1", "--batch-size", "4", "--seq-len", "32",
          "--eval-limit", "2", "--out", "ft"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def invoke_ok(*args: str):
    res = invoke(*args)
    if res.exit_code != 0:
        detail = "".join(traceback.format_exception(res.exception)) if res.exception else ""
        raise AssertionError(f"{args[0]} failed ({res.exit_code}):\n{res.output}\n{detail}")
    return res


def tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    id: str
    argv: list[str]
    culprit: str | None = None  # substring the Error: line must contain (None: exit 0 expected)
    setup: Callable[[Path], None] | None = None
    code: int | None = None  # expected exit code [default: 1 with a culprit, else 0]
    check: Callable[[Path], None] | None = None  # extra assertion on success
    changes: tuple[str, ...] = ()  # path prefixes the command may overwrite (the --force cases)
    marks: list = field(default_factory=list)


def outcome(case: Case, w: Path) -> tuple[str, str]:
    """Run the case in ``w`` (the cwd) and classify: ok, traceback, silent, wrong-exit, unclear, lost, leftover."""
    if case.setup:
        case.setup(w)
    before = tree(w)
    res = invoke(*case.argv)
    after = tree(w)
    out = res.output
    want = case.code if case.code is not None else (0 if case.culprit is None else 1)
    lost = [k for k, v in before.items() if after.get(k) != v and not k.startswith(case.changes or ("\0",))]
    if lost:
        return "lost", f"pre-existing changed or removed: {lost[:5]}\n{out[-1500:]}"
    if res.exception is not None and not isinstance(res.exception, SystemExit) or "Traceback" in out:
        tb = "".join(traceback.format_exception(res.exception)) if res.exception else out
        return "traceback", tb[-2500:]
    if case.culprit is None:
        if res.exit_code != want:
            return "wrong-exit", f"exit {res.exit_code}, wanted {want}\n{out[-2000:]}"
        if case.check:
            try:
                case.check(w)
            except AssertionError as exc:
                return "silent", f"result check failed: {exc}"
        return "ok", ""
    if res.exit_code == 0:
        return "silent", f"exit 0, wanted an error naming {case.culprit!r}\n{out[-1500:]}"
    if res.exit_code != want:
        return "wrong-exit", f"exit {res.exit_code}, wanted {want}\n{out[-1500:]}"
    lines = out.splitlines()
    errs = [i for i, line in enumerate(lines) if line.startswith("Error:")]
    if len(errs) != 1:
        return "unclear", f"{len(errs)} Error: lines\n{out[-1500:]}"
    i = errs[0]
    block = [lines[i]] + [ln for ln in lines[i + 1:] if ln.startswith("  - ")]
    if case.culprit not in "\n".join(block) and case.culprit not in lines[i]:
        return "unclear", f"error does not name {case.culprit!r}: {out[-1500:]}"
    left = [k for k, v in after.items() if k not in before and v == "dir" and not any(
        o.startswith(k + "/") for o in after)]
    if left:
        return "leftover", f"new empty dirs left behind: {left}"
    return "ok", ""


def run_case(case: Case, w: Path, group: str) -> None:
    kind, detail = outcome(case, w)
    log = os.environ.get("BATTERY_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"group": group, "case": case.id, "outcome": kind}) + "\n")
    assert kind == "ok", f"[{kind}] {' '.join(case.argv)}\n{detail}"
