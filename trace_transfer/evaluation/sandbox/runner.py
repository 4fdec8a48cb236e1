"""Run one program in the sandbox with bounded waits, and leave no process of it behind.

No pipes: the program's stderr goes to a file, so a descendant that keeps it open (``setsid`` and
sleep) cannot block us; we wait only for our direct child, with a timeout, then kill its process
group, the namespace (``unshare --kill-child`` / ``bwrap --die-with-parent`` kill the PID namespace's
init, and with it every process inside) and any survivor found in ``/proc`` by its uid (as root) or
by the marker in its environment.

No ``preexec_fn`` either: programs run from a thread pool, where ``preexec_fn`` can deadlock, so the
limits are set by ``child.py`` inside the child, and the uid switch by ``subprocess`` itself.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from trace_transfer.errors import ConfigError, SandboxError
from trace_transfer.evaluation.sandbox.isolation import (
    ENV_MECHANISM,
    MECHANISMS,
    Isolation,
    Limits,
    build_command,
)

logger = logging.getLogger(__name__)

SETUP_FAILED = 125
MARKER_VAR = "TT_SANDBOX_ID"
# Seconds we allow for killing and reaping after a timeout; nothing waits longer than this.
REAP_GRACE_S = 2.0
# Namespace set-up and interpreter start-up are not the program's time: on a loaded 2-core machine
# they take up to ~0.5 s, which would turn a 1 s budget into a coin toss.
STARTUP_ALLOWANCE_S = 1.0
# Programs of a root caller run as uids from here on, one per run: never a real account, and a
# per-run uid makes RLIMIT_NPROC count only this program's processes and lets us find every one.
_UID_BASE = 1_600_000_000
_uid_counter = itertools.count()
_detect_lock = threading.Lock()
_detected: dict[str, Isolation] = {}
_PROBE = """
import socket, sys
names = sorted(n for _, n in socket.if_nameindex())
if names != ["lo"]:
    sys.exit(f"network interfaces visible: {names}")
try:
    open("/.tt-sandbox-probe", "w")
    sys.exit("/ is writable")
except OSError:
    pass
"""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``status`` is ``passed``, ``failed`` or ``timeout``.

    ``leftover`` counts processes of the program still alive after the reaping grace (should be 0).
    """

    status: str
    returncode: int | None
    stderr: str = ""
    leftover: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _next_uid() -> int:
    # Unique among this host's evaluators (pid) and this process's concurrent runs (counter); a leftover
    # of an earlier run with the same uid cannot exist: every run reaps its uid before it returns.
    return _UID_BASE + (os.getpid() % 65536) * 4096 + next(_uid_counter) % 4096


def _proc_pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _processes(uid: int | None = None, marker: str | None = None) -> list[int]:
    """Live (not zombie) processes owned by ``uid`` or carrying ``marker`` in their environment."""
    found = []
    needle = f"{MARKER_VAR}={marker}".encode() if marker else None
    for pid in _proc_pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            if uid is not None:
                with open(f"/proc/{pid}/status") as f:
                    real = next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))
                hit = real == uid
            else:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    hit = needle in f.read().split(b"\0")
        except (OSError, IndexError, StopIteration, ValueError):
            continue
        if hit:
            found.append(pid)
    return found


def _reap(proc: subprocess.Popen, uid: int | None, marker: str) -> int:
    """Kill our child's group and every process of the run; wait at most REAP_GRACE_S. Returns survivors."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + REAP_GRACE_S
    try:
        proc.wait(timeout=REAP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    while True:
        alive = _processes(uid=uid) if uid is not None else _processes(marker=marker)
        if not alive or time.monotonic() > deadline:
            return len(alive)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)


def _own_process_count() -> int:
    """Processes of our uid now: RLIMIT_NPROC counts them all when the program keeps our uid."""
    return len(_processes(uid=os.getuid()))


def _spawn_ids(isolation: Isolation) -> tuple[int | None, dict]:
    if not isolation.dedicated_uid:
        return None, {}
    uid = _next_uid()
    return uid, {"user": uid, "group": uid, "extra_groups": []}


def run_in_sandbox(program: str, isolation: Isolation, timeout: float, limits: Limits = Limits()) -> ExecResult:
    """Run ``program`` (Python source) under ``isolation``; passed = exit status 0 within ``timeout``."""
    marker = uuid.uuid4().hex
    uid, ids = _spawn_ids(isolation)
    # The CPU limit backs up the wall clock (a busy loop should end as "timeout", not by SIGXCPU).
    cpu = max(1, math.ceil(timeout)) + 2
    # Without a user namespace the limit counts every process of the uid, not only the program's.
    base = _own_process_count() if isolation.mechanism == "none" and uid is None else 0
    rlimits = limits.rlimits(cpu, processes_base=base)
    with tempfile.TemporaryDirectory(prefix="tt-exec-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        program_path = work / "program.py"
        program_path.write_text(program)
        if uid is not None:
            for p in (Path(tmp), work, program_path):
                os.chown(p, uid, uid)
        cmd = build_command(isolation.mechanism, isolation.interpreter, str(program_path), str(work), rlimits,
                            limits.disk_mb * 1024 * 1024, math.ceil(timeout + STARTUP_ALLOWANCE_S + REAP_GRACE_S))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp" if isolation.mechanism != "none" else str(work),
               "TMPDIR": "/tmp" if isolation.mechanism != "none" else str(work), MARKER_VAR: marker}
        with open(Path(tmp) / "stderr", "w+b") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True, **ids)
            try:
                rc = proc.wait(timeout=timeout + STARTUP_ALLOWANCE_S)
            except subprocess.TimeoutExpired:
                rc = None
            leftover = _reap(proc, uid, marker)
            text = _tail(err)
    if rc == SETUP_FAILED and "tt-sandbox-setup:" in text:
        raise SandboxError(f"the {isolation.mechanism} sandbox could not be set up: "
                           f"{text.strip().splitlines()[-1]}; set {ENV_MECHANISM}=none to run without it")
    if leftover:
        logger.warning("code_exec sandbox: %d process(es) of a program survived SIGKILL for %.0fs", leftover, REAP_GRACE_S)
    status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
    return ExecResult(status, rc, text[-2000:], leftover)


def _tail(f, limit: int = 8000) -> str:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------
# Detection: what works here, decided once per process
# --------------------------------------------------------------------------------------------------


def _interpreters() -> list[str]:
    seen: list[str] = []
    for c in (getattr(sys, "_base_executable", None), sys.executable,
              shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if c and os.path.realpath(c) not in seen:
            seen.append(os.path.realpath(c))
    return seen


def _version_as(interpreter: str, ids: dict) -> str | None:
    try:
        r = subprocess.run([interpreter, "-I", "-S", "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True, timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin"}, **ids)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _base_isolation() -> Isolation:
    """The interpreter and uid programs run with: as root, an unused uid that can run a Python."""
    if _as_root():
        probe_uid = _next_uid()
        for interp in _interpreters():
            version = _version_as(interp, {"user": probe_uid, "group": probe_uid, "extra_groups": []})
            if version:
                return Isolation("none", False, False, False, True, interp, version)
        logger.warning("code_exec sandbox: no Python here is readable by an unprivileged uid; programs run as root")
    interp = _interpreters()[0]
    return Isolation("none", False, False, False, False, interp, _version_as(interp, {}) or "unknown")


def _try(mechanism: str, base: Isolation) -> tuple[Isolation | None, str]:
    tool = {"bwrap": "bwrap", "unshare": "unshare"}.get(mechanism)
    if tool and not shutil.which(tool):
        return None, f"{tool} is not installed"
    iso = Isolation(mechanism, True, True, True, base.dedicated_uid, base.interpreter, base.python)
    try:
        r = run_in_sandbox(_PROBE, iso, timeout=30)
    except SandboxError as exc:
        return None, str(exc)
    if not r.passed:
        last = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
        return None, f"{mechanism} probe failed: {last[0]}"
    return iso, ""


def detect(mechanism: str | None = None) -> Isolation:
    """The strongest working isolation (or the one named by ``mechanism`` / ``$TRACE_TRANSFER_SANDBOX``).

    Raises:
        ConfigError: a named mechanism is unknown or does not work here.
    """
    want = (mechanism or os.environ.get(ENV_MECHANISM) or "auto").strip().lower()
    if want not in (*MECHANISMS, "auto"):
        raise ConfigError(f"{ENV_MECHANISM}={want!r} is not a sandbox; choose one of auto, {', '.join(MECHANISMS)}")
    with _detect_lock:
        if want in _detected:
            return _detected[want]
        base = _detected.setdefault("base", _base_isolation())
        reasons = []
        for m in (MECHANISMS[:-1] if want == "auto" else (want,) if want != "none" else ()):
            iso, why = _try(m, base)
            if iso is not None:
                break
            reasons.append(why)
            if want != "auto":
                raise ConfigError(f"sandbox {want!r} does not work here: {why}; "
                                  f"use auto (unset {ENV_MECHANISM}) for the strongest one available")
        else:
            iso = Isolation("none", False, False, False, base.dedicated_uid, base.interpreter, base.python,
                            reason="; ".join(reasons) or "forced")
            logger.warning("code_exec sandbox: %s — run untrusted models' code in a container or VM", iso.describe())
        _detected[want] = iso
        return iso
