"""What the sandbox can isolate on this machine, and the command line that does it.

Three mechanisms, strongest first:

* ``bwrap`` (bubblewrap, when installed): fresh user, network, PID, IPC, UTS and mount namespaces;
  the whole filesystem read-only, empty tmpfs over ``/tmp``, ``/var/tmp``, ``/run`` and the caller's
  home; the sandbox dies with its parent.
* ``unshare`` (util-linux): the same namespaces through ``unshare -r``; ``child.py`` remounts every
  mount read-only and nosuid, covers the same directories with tmpfs, drops every capability and,
  as PID 1 of the new PID namespace, reaps and ends the whole tree when the program exits.
* ``none``: resource limits only (and, as root, an unused uid): no network or filesystem isolation.

Which one works is decided once per process by running a probe program through it (see
``runner.detect``), because an installed tool is not a working one (user namespaces may be disabled).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

MECHANISMS = ("bwrap", "unshare", "none")
# Forces one mechanism (or "auto"); a forced mechanism that does not work is an error, not a fallback.
ENV_MECHANISM = "TRACE_TRANSFER_SANDBOX"
# Where the program runs inside a namespace sandbox: a fresh, size-limited tmpfs.
INNER_CWD = "/tmp"
CHILD_SOURCE = (Path(__file__).with_name("child.py")).read_text()


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program (``resource.setrlimit`` in the child; CPU seconds follow the timeout)."""

    memory_mb: int = 2048  # RLIMIT_AS
    processes: int = 32  # RLIMIT_NPROC: threads count too
    file_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write (stderr included)
    open_files: int = 64  # RLIMIT_NOFILE
    disk_mb: int = 64  # size of each tmpfs with namespace isolation (work dir, /tmp, home)

    def rlimits(self, cpu_s: int, processes_base: int = 0) -> dict[str, int]:
        mib = 1024 * 1024
        out = {"CPU": cpu_s, "NPROC": processes_base + self.processes, "FSIZE": self.file_mb * mib,
               "NOFILE": self.open_files, "CORE": 0}
        if self.memory_mb > 0:
            out["AS"] = self.memory_mb * mib
        return out


@dataclass(frozen=True)
class Isolation:
    """What a sandboxed program is isolated from, as recorded in evaluation results."""

    mechanism: str  # bwrap | unshare | none
    network: bool
    filesystem: bool
    pid_namespace: bool
    dedicated_uid: bool  # we are root: programs run as an otherwise unused uid
    interpreter: str
    python: str
    reason: str = ""  # why the stronger mechanisms were not used

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.mechanism == "none":
            who = "an unused uid" if self.dedicated_uid else "your uid"
            return (f"no network or filesystem isolation ({self.reason or 'forced'}): programs run as {who} "
                    f"under resource limits only")
        return f"{self.mechanism}: no network, read-only filesystem, own PID namespace"


def hidden_dirs() -> list[str]:
    """Directories a program must not read: secrets in the caller's home, other users' temp files."""
    dirs = ["/tmp", "/var/tmp", "/run", "/dev/shm"]
    home = os.path.expanduser("~")
    if home not in ("/", "") and os.path.isdir(home):
        dirs.append(home)
    return dirs


def build_command(mechanism: str, interpreter: str, host_program: str, host_cwd: str,
                  limits: dict[str, int], disk_bytes: int, deadline_s: float) -> list[str]:
    """The argv that runs ``host_program`` under ``mechanism`` (the child's config goes in argv[-1])."""
    import json

    cfg = {"program": host_program, "cwd": host_cwd, "mounts": False, "hide": [], "disk": disk_bytes,
           "init": False, "deadline": deadline_s, "limits": limits}
    python = [interpreter, "-I", "-S", "-c", CHILD_SOURCE]
    if mechanism == "none":
        return python + [json.dumps(cfg)]
    if mechanism == "unshare":
        cfg.update(cwd=INNER_CWD, mounts=True, hide=hidden_dirs(), init=True)
        return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net", "--pid", "--fork",
                "--mount", "--mount-proc", "--ipc", "--uts", "--kill-child", "--propagation", "private", "--",
                *python, json.dumps(cfg)]
    if mechanism == "bwrap":
        inner_program = f"{INNER_CWD}/program.py"
        cfg.update(cwd=INNER_CWD, program=inner_program)
        cmd = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
               "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        for d in hidden_dirs():
            if d != "/dev/shm":  # --dev made a fresh one
                cmd += ["--size", str(disk_bytes), "--tmpfs", d]
        cmd += ["--ro-bind", host_program, inner_program, "--chdir", INNER_CWD, "--"]
        return cmd + python + [json.dumps(cfg)]
    raise ValueError(f"unknown sandbox mechanism {mechanism!r}; expected one of {MECHANISMS}")
