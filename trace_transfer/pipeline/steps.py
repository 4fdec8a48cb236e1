"""Content-addressed pipeline steps: skip what is done, redo what changed.

Each step owns a directory under the run directory. When it finishes it writes ``step.json`` (last,
atomically) holding the hash of its inputs: parameters, the code version, and the ``step.json``
hashes of the steps it consumed. A rerun whose inputs hash the same skips the step, so an
interrupted or extended run resumes where it stopped; changing a parameter redoes that step and
everything downstream, because their input hashes change too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_transfer._version import __version__, versions
from trace_transfer.checkpoint import write_json_atomic

logger = logging.getLogger(__name__)

STEP_FILE = "step.json"
# Written into a run directory when a pipeline claims it: a later run may resume there, and a
# directory without it (and not empty) belongs to someone else and is never written into.
RUN_MARKER = ".trace-transfer-pipeline"
# The top level of every step name run_pipeline uses (``--force`` takes these or longer prefixes).
STEP_FAMILIES = ("models", "probe", "cores", "cka", "layermap", "finetune", "report")
# Test hook: a step name (or prefix) whose step is hard-killed (SIGKILL, no cleanup) once its body
# has returned, before step.json marks it done; used by tests/test_faults.py.
KILL_ENV = "TRACE_TRANSFER_KILL_STEP"


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys; paths as strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_hash(name: str, params: dict[str, Any], dep_hashes: dict[str, str]) -> str:
    """A step's input hash: its parameters, the hashes of the steps it consumes, the tool version.
    Computed from the config alone, so a dry run knows every step's hash without running any."""
    return stable_hash({"name": name, "params": params, "deps": dep_hashes, "tool": __version__})


@dataclass
class StepRecord:
    name: str
    dir: Path
    hash: str
    skipped: bool
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)


class StepRunner:
    """Runs named steps in a run directory with skip-if-done semantics.

    Args:
        run_dir: where every step's directory lives.
        force: step names (or name prefixes, e.g. ``probe`` for ``probe/source/math``) to redo; a
            step consuming a step redone in this invocation is redone too.
        on_event: callback ``(message)`` for progress output.
        families: the known top levels of step names; a ``force`` entry outside them is an error.
        only: step names (or prefixes) to run; every other step must be done already or is left
            pending (``[wait]``), and a selected step consuming a pending one is refused. This is how a
            cluster script runs the steps one at a time (``trace-transfer run --dry-run`` prints them).

    Raises:
        ConfigError: ``run_dir`` holds files of something else (not empty, no run marker), or a
            ``force`` entry names no step family.
    """

    def __init__(self, run_dir: Path, force: tuple[str, ...] = (), on_event: Callable[[str], None] | None = None,
                 families: tuple[str, ...] | None = None, only: tuple[str, ...] = ()):
        from trace_transfer.checkpoint import check_output
        from trace_transfer.errors import ConfigError

        unknown = [f for f in (*force, *only) if families is not None and f.strip("/").split("/")[0] not in families]
        if unknown:
            raise ConfigError(f"--force {unknown[0]!r}: no such step; steps are named {', '.join(families)} "
                              f"or a longer prefix such as cores/target-lf or finetune/full")
        self.run_dir = Path(run_dir)
        check_output(self.run_dir, force=True, what="run directory")  # under a file, read-only: fail now
        if self.run_dir.is_dir() and not (self.run_dir / RUN_MARKER).exists():
            foreign = sorted(p.name for p in self.run_dir.iterdir() if p.name not in (families or STEP_FAMILIES))
            if foreign:
                raise ConfigError(f"--out {self.run_dir} is not a pipeline run directory (it holds "
                                  f"{', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); choose a new "
                                  f"--out (nothing was changed)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RUN_MARKER).touch()
        self.force = tuple(force)
        self.only = tuple(only)
        self._pending: set[str] = set()  # not done, not selected by `only`
        self.records: dict[str, StepRecord] = {}
        self._ran: set[str] = set()  # steps executed in this invocation: their dependents must follow
        self.say = on_event or (lambda msg: logger.info(msg))

    def _forced(self, name: str) -> bool:
        return _matches(name, self.force)

    def selected(self, name: str) -> bool:
        """Whether this invocation may run step ``name`` (every step unless ``only`` narrows it)."""
        return not self.only or _matches(name, self.only)

    def step(
        self,
        name: str,
        params: dict[str, Any],
        fn: Callable[[Path], dict[str, Any] | None],
        depends: list[str] = (),
        resumable: bool = False,
    ) -> StepRecord:
        """Run ``fn(step_dir)`` unless ``step_dir/step.json`` records the same input hash.

        ``fn`` returns a small JSON-able dict stored in step.json (paths relative to the step dir
        are fine); it must write its artifacts under ``step_dir``. ``resumable=True`` keeps a
        partial directory of an interrupted attempt with the same inputs, for bodies that resume
        themselves (the sequential runner continues after its last complete stage).
        """
        dep_hashes = {d: self.records[d].hash for d in depends}
        h = step_hash(name, params, dep_hashes)
        step_dir = self.run_dir / name
        marker = step_dir / STEP_FILE
        upstream_redone = any(d in self._ran for d in depends)
        if marker.exists() and not self._forced(name) and not upstream_redone:
            try:
                done = json.loads(marker.read_text())
            except json.JSONDecodeError:
                done = {}
            if done.get("hash") == h:
                rec = StepRecord(name, step_dir, h, True, 0.0, done.get("result", {}))
                self.records[name] = rec
                self.say(f"[skip] {name} (done, inputs unchanged)")
                return rec
        if not self.selected(name):
            self._pending.add(name)
            self.say(f"[wait] {name} (not done; not selected by --only)")
            self.records[name] = StepRecord(name, step_dir, h, True, 0.0, {})
            return self.records[name]
        waiting = [d for d in depends if d in self._pending]
        if waiting:
            from trace_transfer.errors import ConfigError

            raise ConfigError(f"step {name} consumes {waiting[0]}, which is not done; run it first "
                              f"(--only {waiting[0]})")
        attempt = step_dir / ".attempt"
        same_inputs = attempt.exists() and attempt.read_text() == h
        if step_dir.exists() and not (resumable and same_inputs and not upstream_redone):  # stale output of an earlier attempt
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True, exist_ok=True)
        attempt.write_text(h)
        self.say(f"[run ] {name}")
        t0 = time.perf_counter()
        result = fn(step_dir) or {}
        seconds = time.perf_counter() - t0
        if os.environ.get(KILL_ENV) and name.startswith(os.environ[KILL_ENV]):
            # The worst moment to die: every artifact written, step.json not yet (the rerun must redo it).
            os.kill(os.getpid(), signal.SIGKILL)
        write_json_atomic(
            marker,
            {"name": name, "hash": h, "params": params, "depends": dep_hashes, "result": result,
             "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()},
        )
        rec = StepRecord(name, step_dir, h, False, seconds, result)
        self.records[name] = rec
        self._ran.add(name)
        self.say(f"[done] {name} in {seconds:.1f}s")
        return rec


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f.rstrip("/") + "/") for f in prefixes)
