"""`trace-transfer` command line: thin glue over the library.

Each sub-command lives in its own module under ``trace_transfer/cli/`` and exposes a click object
named ``command``. Modules keep heavy imports (torch, transformers, numpy and the library modules that
load them) inside the command body, so ``trace-transfer --help`` and ``CMD --help`` load no torch
(tests/cli/test_help.py checks every command). Commands do not catch library errors: the group
(``_errors.Group``) turns every ``TraceTransferError`` into ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import importlib
import logging
import os

import click

from trace_transfer.cli._errors import Group

# Order is the order shown by --help.
_COMMAND_MODULES = [
    "demo",
    "run",
    "plan",
    "tiny_model",
    "pretrain",
    "probe",
    "score",
    "coreset",
    "cka",
    "map_layers",
    "rules",
    "transfer",
    "refine",
    "finetune",
    "eval",
    "verify_frozen",
    "cluster",
    "cpi_ft",
    "merge",
    "delta",
]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="trace-transfer")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug, with the traceback of an Error).")
def main(verbose: int) -> None:
    """trace-transfer: find, isolate and transfer task-specific core parameters of LLMs.

    \b
    Example (the typical flow):
      trace-transfer tiny-model --arch llama --out tiny
      trace-transfer probe --model tiny --task synthetic:math --out probes/math
      trace-transfer score --strategy lf --probe probes/math --ratio 0.05 --out cores
      trace-transfer finetune --model tiny --stage synthetic:math:cores/math.coreset.safetensors --out run
    """
    if verbose < 2:  # transformers' per-load tqdm bars drown our own progress lines; -vv brings them back
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # accelerate imports DeepSpeed (when installed, e.g. with the test extras) inside every
    # save_pretrained, and DeepSpeed then warns that it found no GPU: noise for commands that never use
    # it. A filter on its logger outlives the logger's own set-up at import; DeepSpeed runs still log.
    logging.getLogger("DeepSpeed").addFilter(_no_accelerator_autodetect_warning)


def _no_accelerator_autodetect_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def _register() -> None:
    # Strict on purpose: a command module that fails to import must fail loudly, not vanish from --help.
    for name in _COMMAND_MODULES:
        main.add_command(importlib.import_module(f"{__name__}.{name}").command)


_register()
