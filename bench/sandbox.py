"""Benchmark: cost of the code_exec sandbox per program, against a bare subprocess in the same run.

- baseline: what code_exec did before the sandbox: ``python -I`` in a temp dir, its own session,
  stderr through a pipe, no namespaces and no reaping.
- each mechanism that works here (``none``, ``unshare``, ``bwrap``): ``run_programs`` as the metric
  calls it, same programs, same worker count.

The programs are HumanEval-sized (a function and three asserts), so the figure is the fixed
per-program overhead; model generation dominates a real evaluation.

Run:  python bench/sandbox.py                 (about 20 s on 2 CPU cores)
      python bench/sandbox.py --programs 40 --workers 4
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from trace_transfer.errors import ConfigError
from trace_transfer.evaluation.code_exec import run_programs
from trace_transfer.evaluation.sandbox import MECHANISMS, detect

PROGRAM = ("def add(a, b):\n    return a + b\n\n"
           "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(0, 0) == 0\n")


def _bare(program: str, timeout: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                              timeout=timeout)
        return proc.returncode


def _timed(fn) -> float:
    fn()  # warm-up: detection, page cache
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the "no isolation" warning of the none mechanism is expected here
    progs = [PROGRAM] * args.programs

    def bare():
        with ThreadPoolExecutor(args.workers) as pool:
            assert all(rc == 0 for rc in pool.map(lambda p: _bare(p, 10), progs))

    base = _timed(bare)
    print(f"{args.programs} programs, {args.workers} workers")
    print("| runner | seconds | per program | ratio vs bare |\n|---|---:|---:|---:|")
    print(f"| bare subprocess | {base:.2f} | {base / args.programs * 1000:.0f} ms | 1.00 |")
    for mech in MECHANISMS:
        try:
            detect(mech)
        except ConfigError as exc:
            print(f"| {mech} | unavailable: {exc} | | |")
            continue

        def sandboxed(m=mech):
            assert all(r.passed for r in run_programs(progs, timeout=10, workers=args.workers,
                                                      allow_code_exec=True, sandbox=m))

        t = _timed(sandboxed)
        print(f"| sandbox {mech} | {t:.2f} | {t / args.programs * 1000:.0f} ms | {t / base:.2f} |")


if __name__ == "__main__":
    main()
