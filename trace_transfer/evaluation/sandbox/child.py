"""The sandbox's first code inside the child: isolate, limit, then run the program.

Never imported by trace-transfer: its source is passed to ``python -I -S -c`` (see ``process.py``), so
it may use the standard library only. Argument 1 is a JSON object:

``program`` (path, read before anything is hidden), ``cwd`` (where the program runs), ``mounts``
(set up the filesystem view: we are root of fresh user+mount namespaces), ``hide`` (directories to
cover with empty tmpfs), ``disk`` (tmpfs size in bytes), ``init`` (we are PID 1 of a fresh PID
namespace: fork the program and reap), ``deadline`` (wall seconds the init allows), ``limits``
(``{"CPU": n, "AS": n, ...}``, names of ``resource.RLIMIT_*``).

Exit status 125 with a ``tt-sandbox-setup:`` line on stderr means the sandbox could not be built;
the parent then refuses to run anything (fail closed).
"""

import json
import os
import sys

SETUP_FAILED = 125

# <linux/mount.h>, <linux/prctl.h>, <linux/securebits.h>, <linux/capability.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_NOATIME, MS_NODIRATIME = 32, 4096, 1024, 2048
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
ST_RELATIME = 4096
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 24, 28, 38
# NOROOT (+locked): uid 0 gets no capabilities at exec; NO_CAP_AMBIENT_RAISE (+locked).
SECUREBITS = 0b11000011
CAP_VERSION_3 = 0x20080522


def _fail(msg):
    os.write(2, ("tt-sandbox-setup: " + msg + "\n").encode())
    os._exit(SETUP_FAILED)


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _mount(src, target, fstype, flags, data=None):
    ctypes, libc = _libc()
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _mount_points():
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as \ooo
            points.append(raw.encode().decode("unicode_escape").encode("latin-1").decode())
    return points


def _isolate_filesystem(cfg):
    """Every mount read-only and nosuid; empty tmpfs over the secrets and the work dir."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for point in sorted(set(_mount_points()), key=len):
        try:
            f = os.statvfs(point).f_flag
        except OSError:
            continue  # covered by a later mount: not reachable by path
        # Flags the outer namespace set are locked: a remount must repeat them or it is refused.
        keep = f & (MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if f & ST_RELATIME else 0)
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)
        except OSError as exc:
            if not os.statvfs(point).f_flag & MS_RDONLY:
                _fail(f"cannot make {point} read-only: {exc}")
    for d in cfg["hide"]:
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk']},mode=1777")


def _drop_capabilities():
    """Root inside the user namespace keeps no capability, now or after an exec."""
    ctypes, libc = _libc()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    if libc.prctl(PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) != 0:
        _fail(f"cannot lock securebits: {os.strerror(ctypes.get_errno())}")
    header = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        _fail(f"cannot drop capabilities: {os.strerror(ctypes.get_errno())}")
    with open("/proc/self/status") as f:
        eff = [ln.split()[1] for ln in f if ln.startswith("CapEff:")]
    if not eff or int(eff[0], 16):
        _fail("capabilities still present after capset")


def _set_limits(limits):
    import resource

    for name, value in limits.items():
        if name == "CPU":  # soft limit sends SIGXCPU, the hard one a second later SIGKILL
            resource.setrlimit(resource.RLIMIT_CPU, (value, value + 1))
        else:
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))


def _serve_as_init(deadline):
    """PID 1: run the program as our child, reap every orphan, exit with the program's status.

    Our exit makes the kernel kill every process left in the namespace, escaped or not. The alarm is
    a second deadline that holds even if the parent evaluator dies: a sleeping program uses no CPU.
    """
    import signal

    pid = os.fork()
    if pid == 0:
        return
    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))
    signal.alarm(max(1, int(deadline)))
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if done == pid:
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def main():
    cfg = json.loads(sys.argv[1])
    try:
        with open(cfg["program"], "rb") as f:
            source = f.read()
    except OSError as exc:
        _fail(f"cannot read the program: {exc}")
    try:
        if cfg["mounts"]:
            _isolate_filesystem(cfg)
            _drop_capabilities()
        os.chdir(cfg["cwd"])
        path = os.path.join(cfg["cwd"], "program.py")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(source)
        os.umask(0o077)
        _set_limits(cfg["limits"])
    except OSError as exc:
        _fail(str(exc))
    if cfg["init"]:
        _serve_as_init(cfg["deadline"])
    import runpy

    sys.argv = [path]
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    main()
