"""Process supervision: nothing of the job outlives it, and a signal ends it cleanly.

`python -m sdg_job run …` is a tiny supervisor (light imports only, before config or Ray): it becomes a child
subreaper, runs the real driver as its child (same argv, DRIVER_ENV set) with PR_SET_PDEATHSIG=SIGTERM, forwards
SIGTERM/SIGHUP/SIGINT (and SIGUSR1 as SIGTERM) to it, returns its exit code, and then ends every process still left
under it (Ray's dashboard and runtime-env agents, a worker being started: they are orphaned when a local Ray's
driver is killed, and a subreaper inherits them) or carrying its mark in their environment (JOB_ENV: the few that
escape the tree while it is being ended). So even SIGKILL of the process the user started leaves nothing:
the driver gets SIGTERM and shuts down cleanly, and what a SIGKILLed driver leaves is reaped by the supervisor.

`Signals` is the driver's side: the first SIGTERM/SIGINT/SIGHUP raises `Interrupt` where the job can be stopped,
later ones never cut the clean-up short.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

DRIVER_ENV = "SDG_JOB_DRIVER"  # set in the driver: it runs under a supervisor
# Set to "<pid>:<start time>" of the supervisor in the driver's environment: every process the job starts inherits
# it, so the supervisor finds what of the job is left even where it escaped its tree (reparented to PID 1 while it
# was being ended, or started by a process that was dying).
JOB_ENV = "SDG_JOB_SUPERVISOR"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SI_KERNEL = 0x80  # si_code of a signal sent by the kernel, e.g. the terminal's Ctrl-C to its foreground group
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
# srun answers a SIGTERM by killing its step but forwards SIGUSR1 to the task: the Slurm script sends SIGUSR1 to ask
# for the clean stop that SIGTERM means, and the supervisor passes it on as SIGTERM.
AS_SIGTERM = signal.SIGUSR1
TERM_GRACE_S = 3.0  # leftover processes get SIGTERM, then SIGKILL after this long
CLEANUP_BOUND_S = 30.0


def prctl(option: int, value: int) -> bool:
    """Linux prctl(2); False where it does not exist or fails."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _live_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if gone or a zombie (a zombie is
    already dead: its parent, here often a PID 1 that reaps lazily, has yet to collect it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _live_stat(entry)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """Every live process below `root`, read from /proc (empty where there is no /proc)."""
    if not os.path.isdir("/proc"):
        return []
    children, out, todo = _children_map(), [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """Live processes (pid → command line) whose environment has name=value, this one aside."""
    found = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{name}={value}".encode() in environ.split(b"\0") and start_time(int(entry)) is not None:
            found[int(entry)] = cmdline.strip()
    return found


def start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot); None if it is gone or a zombie."""
    fields = _live_stat(pid)
    return None if fields is None else fields[19]


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def end_processes(find: Callable[[], list[int]], bound_s: float = CLEANUP_BOUND_S) -> list[int]:
    """SIGTERM what `find()` returns, SIGKILL it after TERM_GRACE_S; again until nothing is left or `bound_s`
    has passed. Returns the pids that were signalled."""
    deadline, signalled = time.monotonic() + bound_s, []
    while (pids := find()) and time.monotonic() < deadline:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
                    os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
            signalled += pids
            grace = time.monotonic() + (TERM_GRACE_S if sig == signal.SIGTERM else 2.0)
            while time.monotonic() < min(grace, deadline):
                _reap()
                if not (pids := [p for p in find() if p in pids]):
                    break
                time.sleep(0.1)
            if not pids:
                break
    return sorted(set(signalled))


def supervise(command: list[str]) -> int:
    """Run `command` (the driver) as a child and return its exit code (128 + signal if it was killed); then end
    every process left below this one."""
    me = os.getpid()
    token = f"{me}:{start_time(me)}"
    subreaper = prctl(PR_SET_CHILD_SUBREAPER, 1)
    wanted = {*FORWARDED, AS_SIGTERM, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # taken with sigtimedwait below: nothing runs in a handler
    pid = os.fork()
    if pid == 0:  # the driver
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != me:  # the supervisor died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
            os.execve(command[0], command, {**os.environ, DRIVER_ENV: "1", JOB_ENV: token})
        finally:
            os._exit(127)
    code = None
    while code is None:
        info = signal.sigtimedwait(wanted, 1.0)
        if info is not None and info.si_signo != signal.SIGCHLD:
            # The terminal's Ctrl-C already reached the driver (same foreground process group): don't double it.
            if not (info.si_signo == signal.SIGINT and info.si_code == SI_KERNEL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM if info.si_signo == AS_SIGTERM else info.si_signo)
            continue
        with contextlib.suppress(ChildProcessError):
            while True:
                done, status = os.waitpid(-1, os.WNOHANG)
                if done == 0:
                    break
                if done == pid:
                    code = os.waitstatus_to_exitcode(status)
    end_processes(lambda: sorted({*descendants(me), *processes_with_env(JOB_ENV, token)}))
    if subreaper:
        _reap()  # the last of them died as zombies of this process
    return 128 - code if code < 0 else code


def snapshot() -> dict[int, str]:
    """This process's descendants with their start times, to end later whatever of them is still running."""
    return {pid: t for pid in descendants(os.getpid()) if (t := start_time(pid)) is not None}


def end_snapshot(taken: dict[int, str]) -> list[int]:
    """End the processes of `taken` still running (same pid and start time: a recycled pid is left alone). The
    driver does this itself because its supervisor may be gone (killed: the driver got SIGTERM from PDEATHSIG)."""
    return end_processes(lambda: [pid for pid, t in taken.items() if start_time(pid) == t])


class Interrupt(KeyboardInterrupt):
    """Raised in the main thread by the first SIGTERM/SIGINT/SIGHUP. A KeyboardInterrupt because Ray's blocking
    calls (ray.get, ray.wait, ray.init) stop only for that one, and no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """SIGTERM (Slurm's time limit, preemption, scancel), SIGINT and SIGHUP in the driver. The first one raises
    `Interrupt` while `interruptible()`, or at its next entry; every one is only noted otherwise, so a second
    SIGTERM (Slurm signals every process of the step, and the supervisor forwards its own) never cuts the clean-up
    short."""

    HANDLED = (*FORWARDED, AS_SIGTERM)  # Slurm signals every process of a step: the driver gets SIGUSR1 too

    def __init__(self) -> None:
        self.received: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def install(self) -> Signals:
        """(Re)install the handlers: ray.init replaces the SIGTERM one with its own."""
        for sig in self.HANDLED:
            previous = signal.signal(sig, self._handle)
            if previous != self._handle:
                self._previous.setdefault(sig, previous)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        signum = signal.SIGTERM if signum == AS_SIGTERM else signum
        if self.received is None:
            self.received = signum
            if self.armed:
                raise Interrupt(signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.armed = True
        try:
            if self.received is not None:
                raise Interrupt(self.received)
            yield
        finally:
            self.armed = False
