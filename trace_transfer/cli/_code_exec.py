"""``--allow-code-exec``: the opt-in every command that can evaluate a ``code_exec`` task offers.

The flag sets ``TRACE_TRANSFER_ALLOW_CODE_EXEC=1`` for the duration of the command, so the consent
also reaches the worker processes a command starts (torchrun, DeepSpeed), and restores it afterwards
(tests invoke many commands in one process). The variable's name is written out here rather than
imported: importing ``trace_transfer.evaluation`` loads torch, and ``--help`` must not
(tests/evaluation/test_sandbox.py checks that both names agree).
"""

from __future__ import annotations

import os

import click

ENV_ALLOW = "TRACE_TRANSFER_ALLOW_CODE_EXEC"

HELP = (
    "Allow running model-generated Python for code_exec tasks (like HF_ALLOW_CODE_EVAL; or set "
    f"{ENV_ALLOW}=1). WARNING: the code runs on this machine, sandboxed where the OS allows "
    "(bubblewrap or unshare: no network, read-only filesystem; else resource limits only); "
    "use a container or VM for untrusted models."
)


def _consent(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        before = os.environ.get(ENV_ALLOW)
        os.environ[ENV_ALLOW] = "1"

        def restore() -> None:
            if before is None:
                os.environ.pop(ENV_ALLOW, None)
            else:
                os.environ[ENV_ALLOW] = before

        ctx.call_on_close(restore)
    return value


allow_code_exec_option = click.option(
    "--allow-code-exec", is_flag=True, expose_value=False, callback=_consent, help=HELP
)
