"""The sandbox that runs model-generated programs (the ``code_exec`` metric).

    >>> from trace_transfer.evaluation.sandbox import detect, run_in_sandbox
    >>> iso = detect()                      # strongest isolation that works here, decided once
    >>> run_in_sandbox("assert 1 + 1 == 2", iso, timeout=5).status
    'passed'

Layers, each where the OS allows it: namespaces (bubblewrap, else ``unshare``) cut the network and
make the filesystem read-only with an empty tmpfs as work dir; resource limits bound CPU time,
memory, processes, file size and open files; a per-run uid (as root), a new session and PID
namespace let us kill every process of a program, and bounded waits make sure nothing blocks us.
"""

from trace_transfer.evaluation.sandbox.isolation import ENV_MECHANISM, MECHANISMS, Isolation, Limits
from trace_transfer.evaluation.sandbox.runner import ExecResult, detect, run_in_sandbox

__all__ = ["detect", "run_in_sandbox", "ExecResult", "Isolation", "Limits", "MECHANISMS", "ENV_MECHANISM"]
