"""The code-execution sandbox against hostile programs, under every isolation that works here.

Each case ends within its timeout plus the start-up allowance and the reaping grace, and leaves no
process behind (found in /proc by a marker the program puts in its descendants' argv). Mechanisms
that do not work on this machine are skipped with the reason; each guarantee is asserted where the
mechanism gives it and skipped, with the reason, where it does not.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from trace_transfer.data import Example
from trace_transfer.errors import ConfigError
from trace_transfer.evaluation import metrics as M
from trace_transfer.evaluation.code_exec import ENV_ALLOW, check_tasks_consent, run_program
from trace_transfer.evaluation.sandbox import ENV_MECHANISM, MECHANISMS, Limits, detect, run_in_sandbox
from trace_transfer.evaluation.sandbox.runner import REAP_GRACE_S, STARTUP_ALLOWANCE_S

SLACK_S = 1.5  # scheduling noise on a loaded 2-core CI machine


@pytest.fixture(scope="module", params=MECHANISMS)
def iso(request):
    try:
        return detect(request.param)
    except ConfigError as exc:
        pytest.skip(str(exc))


def _run(program: str, iso, timeout: float, **limits):
    t0 = time.monotonic()
    r = run_in_sandbox(program, iso, timeout, Limits(**limits))
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + STARTUP_ALLOWANCE_S + REAP_GRACE_S + SLACK_S, f"took {elapsed:.1f}s"
    assert r.leftover == 0
    return r


def _alive_with(marker: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{p}/stat", "rb") as f2:
                        if f2.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                            pids.append(int(p))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _sleeper(marker: str) -> str:
    """Source of a child argv that sleeps a minute and carries ``marker``."""
    return f"[sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}]"


def test_passing_and_failing_programs(iso):
    assert _run("assert sum([1, 2]) == 3\n", iso, 5).status == "passed"
    r = _run("assert 1 == 2\n", iso, 5)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_setsid_child_keeping_stderr_open_neither_blocks_nor_survives(iso):
    marker = f"tt-setsid-{uuid.uuid4().hex}"
    program = (f"import subprocess, sys\nsubprocess.Popen({_sleeper(marker)}, stderr=sys.stderr, "
               f"start_new_session=True)\nprint('spawned', file=sys.stderr)\n")
    r = _run(program, iso, 5)
    assert r.status == "passed" and "spawned" in r.stderr
    assert _alive_with(marker) == []


def test_sleeping_program_times_out_and_is_killed(iso):
    marker = f"tt-sleep-{uuid.uuid4().hex}"
    program = f"import subprocess, sys, time\nsubprocess.Popen({_sleeper(marker)})\ntime.sleep(60)\n"
    assert _run(program, iso, 1).status == "timeout"
    assert _alive_with(marker) == []


def test_fork_loop_is_bounded_by_the_process_limit(iso):
    marker = f"tt-fork-{uuid.uuid4().hex}"
    program = (
        "import os, sys, time\nn = 0\nwhile n < 10000:\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n"
        f"        os.execv(sys.executable, {_sleeper(marker)})\n    n += 1\n"
        "print('forks', n, file=sys.stderr, flush=True)\ntime.sleep(60)\n"
    )
    r = _run(program, iso, 1, processes=16)
    assert r.status == "timeout"
    forks = int(r.stderr.split("forks")[1].split()[0])
    assert forks < 16
    assert _alive_with(marker) == []


def test_file_bomb_is_bounded_by_the_file_size_limit(iso):
    program = ("import sys\nn = 0\nwith open('bomb', 'wb') as f:\n    while n < 64:\n"
               "        f.write(b'x' * (1 << 20)); f.flush(); n += 1\n")
    r = _run(program, iso, 5, file_mb=4)
    assert r.status == "failed" and "File too large" in r.stderr


def test_write_outside_the_work_dir(iso, tmp_path):
    target = tmp_path / "open"
    target.mkdir()
    if iso.filesystem:
        # World-writable on the host: only the sandbox's read-only view can stop the write.
        target.chmod(0o777)
        tmp_path.chmod(0o755)
    elif iso.dedicated_uid:
        target.chmod(0o755)  # owned by root: the program's unused uid may not write here
    else:
        pytest.skip(f"{iso.mechanism}: no filesystem isolation and the program runs as our own uid")
    program = (f"import os, sys\nopen('mine.txt', 'w').write('ok')\nprint(os.getcwd(), file=sys.stderr)\n"
               f"try:\n    open({str(target / 'pwned')!r}, 'w').write('x')\nexcept OSError:\n    sys.exit(7)\n")
    r = _run(program, iso, 5)
    assert not (target / "pwned").exists()
    # Blocked (read-only, denied) or confined (the path is an empty tmpfs inside): never on the host.
    assert r.returncode in (0, 7)
    cwd = r.stderr.strip().splitlines()[0]
    if iso.mechanism == "none":
        assert not os.path.exists(cwd), "the throwaway work dir was not removed"


def test_network_is_unreachable(iso):
    if not iso.network:
        pytest.skip(f"{iso.mechanism}: no network namespace here ({iso.reason})")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        r = _run(program, iso, 5)
        assert r.status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()


def test_nothing_runs_without_consent(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    flag = tmp_path / "ran"
    with pytest.raises(ConfigError, match="--allow-code-exec") as exc:
        run_program(f"open({str(flag)!r}, 'w')\n", timeout=5)
    assert "\n" not in str(exc.value) and ENV_ALLOW in str(exc.value)
    assert not flag.exists()
    monkeypatch.setenv(ENV_ALLOW, "1")
    assert run_program("pass\n", timeout=5).passed


def test_prompt_code_runs_only_in_the_sandbox(monkeypatch, tmp_path):
    """A dataset's prompt is code too: refused without consent, and never run on the host."""
    flag = tmp_path / "from_prompt"
    tmp_path.chmod(0o777)
    prompt = f"open({str(flag)!r}, 'w').write('host')\ndef add(a, b):\n"
    ex = Example(prompt, "", tests="assert add(1, 2) == 3\n")
    task = type("T", (), {"name": "evil", "metric": "code_exec", "eval_examples": lambda self, limit=None: [ex]})()
    monkeypatch.setattr(M, "generate", lambda m, t, prompts, **kw: ["    return a + b\n"] * len(prompts))
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    with pytest.raises(ConfigError, match="--allow-code-exec"):
        check_tasks_consent([task])
    with pytest.raises(ConfigError, match="--allow-code-exec"):
        M.evaluate(None, None, task)
    assert not flag.exists()
    r = M.evaluate(None, None, task, allow_code_exec=True)
    assert r.details["sandbox"]["mechanism"] in MECHANISMS
    if r.details["sandbox"]["filesystem"]:
        assert not flag.exists()  # the prompt's write failed inside; the program ran nowhere else


def test_forcing_an_unknown_sandbox_is_a_config_error(monkeypatch):
    monkeypatch.setenv(ENV_MECHANISM, "chroot")
    with pytest.raises(ConfigError, match="auto, bwrap, unshare, none"):
        detect()


def test_isolation_is_recorded():
    iso = detect()
    d = iso.to_dict()
    assert d["mechanism"] in MECHANISMS and d["interpreter"] and d["python"]
    assert os.path.isfile(iso.interpreter)


# --------------------------------------------------------------------------------------------------
# The opt-in on the command line
# --------------------------------------------------------------------------------------------------


def test_cli_flag_names_the_same_variable_and_warns_in_help():
    from click.testing import CliRunner

    from trace_transfer.cli import _code_exec, main

    assert _code_exec.ENV_ALLOW == ENV_ALLOW
    for cmd in ("eval", "finetune", "run", "cpi-ft", "pretrain"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "--allow-code-exec" in out and "WARNING" in out, cmd


def test_cli_eval_of_a_code_task_needs_the_flag(tiny_llama, tmp_path, monkeypatch):
    import json

    import yaml
    from click.testing import CliRunner

    from trace_transfer.cli import main

    monkeypatch.delenv(ENV_ALLOW, raising=False)
    rows = [{"q": "def add(a, b):\n", "a": "    return a + b\n", "t": "assert add(1, 2) == 3\n"}] * 4
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "tinycode", "data": {"path": str(tmp_path / "code.jsonl")}, "splits": {"eval_fraction": 0.5},
            "fields": {"prompt": "q", "response": "a", "tests": "t"}, "metric": {"name": "code_exec", "timeout": 2},
            "generation": {"max_new_tokens": 2}}
    (tmp_path / "code.yaml").write_text(yaml.safe_dump(spec))
    args = ["eval", "--model", str(tiny_llama), "--task", str(tmp_path / "code.yaml"), "--limit", "1"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1
    errors = [ln for ln in refused.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in refused.output
    assert "'tinycode'" in errors[0] and "--allow-code-exec" in errors[0]
    ran = CliRunner().invoke(main, [*args, "--allow-code-exec", "--out", str(tmp_path / "r.json")])
    assert ran.exit_code == 0, ran.output
    assert ENV_ALLOW not in os.environ  # the consent ends with the command
    sandbox = json.loads((tmp_path / "r.json").read_text())["scores"]["tinycode"]["details"]["sandbox"]
    assert sandbox["mechanism"] in MECHANISMS
    # Training commands refuse before any work: no run directory, no training.
    ft = CliRunner().invoke(main, ["finetune", "--model", str(tiny_llama), "--stage", str(tmp_path / "code.yaml"),
                                   "--method", "full", "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert ft.exit_code == 1 and "--allow-code-exec" in ft.output and "Traceback" not in ft.output
    assert not (tmp_path / "run").exists()
