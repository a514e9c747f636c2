"""One driver per run dir: a lease file with a heartbeat, since file locks are unreliable on Lustre and NFS.

`<run_dir>/lease.json` names the driver that holds the run dir (host, pid, Slurm job and restart count) and is
rewritten atomically every HEARTBEAT_S by a daemon thread. Another driver refuses the run dir while the lease is
live; it takes it over once stale: no heartbeat for EXPIRY_S, a holder pid gone from this very host (same boot),
or an earlier incarnation of the same Slurm job (a requeue: the old allocation is gone). A holder shutting down
(SIGTERM, Ctrl-C, killed supervisor) marks its lease `releasing`; a new driver waits for it instead of refusing,
so "kill, then run the same command again" just works.

Taking a free run dir's lease is a link(2) of a private temp file onto the lease path: atomic and exclusive on NFS
and Lustre too, so two drivers starting at once cannot both win. Taking over a stale lease is claimed the same
way, by linking a claim file named after that lease's token: only the driver whose claim lands replaces the lease,
and the lease path is never empty meanwhile, so no third driver can create one beside it.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdg_job.errors import RecipeError
from sdg_job.store import atomic_write
from sdg_job.supervise import start_time

LEASE_FILE = "lease.json"
HEARTBEAT_S = 10.0
EXPIRY_S = 60.0
RELEASE_WAIT_S = 120.0  # how long a new driver waits for a holder that is shutting down
TAKEOVER_STALL_S = 10.0  # a takeover takes milliseconds: an older claim was left by a driver that died in it
log = logging.getLogger("sdg_job")


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """Containers on one host may share its name but not its pids: a pid is checked only in its own namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_gone(pid: int, started: str | None) -> str | None:
    """Is the holder's process gone from this host (or its pid now another process's)?"""
    if not os.path.isdir("/proc"):  # no start times to compare: is the pid there at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} is gone"
        except PermissionError:
            pass
        return None
    now = start_time(pid)
    if now is None:
        return f"pid {pid} is gone"
    if started and now != started:
        return f"pid {pid} is another process now"
    return None


def _slurm_restart(holder: dict) -> int:
    try:
        return int(holder.get("slurm_restart_count") or 0)
    except ValueError:
        return 0


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why `holder`'s lease no longer binds anyone (None: it is live). Seen from this process and host."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat_at", 0))
    if age > EXPIRY_S:
        return f"no heartbeat for {age:.0f}s"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", 0))
        if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
            return "its host has rebooted"
        if holder.get("pid_namespace") == _pid_namespace() and (gone := _pid_gone(pid, holder.get("pid_start"))):
            return gone
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        ours = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if _slurm_restart(holder) < ours:
            return f"Slurm job {job} was requeued (restart {_slurm_restart(holder)} < {ours})"
    return None


def describe(holder: dict[str, Any]) -> str:
    slurm = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    age = time.time() - float(holder.get("heartbeat_at", 0))
    return f"host {holder.get('host')} pid {holder.get('pid')}{slurm}, last heartbeat {age:.0f}s ago"


class Lease:
    """The run dir's lease, held by this process from `acquire()` to `release()` (or the context's end)."""

    def __init__(self, run_dir: Path, source: str = "run dir"):
        self.run_dir, self.source = run_dir, source
        self.path = run_dir / LEASE_FILE
        self.token = secrets.token_hex(8)
        self.info: dict[str, Any] = {}
        self.lost: str | None = None  # set by the heartbeat when another driver has taken the lease over
        self._stop = threading.Event()
        self._lock = threading.Lock()  # heartbeat and mark_releasing both rewrite the file
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn by a non-atomic copy or unreadable: judged by its age below

    def acquire(
        self, wait_releasing_s: float = RELEASE_WAIT_S, give_up: Callable[[], bool] = lambda: False
    ) -> Lease | None:
        """Take the lease or raise RecipeError naming the holder; writes nothing when refused. None if `give_up()`
        turned true while waiting for a holder that is shutting down (this driver got SIGTERM meanwhile)."""
        deadline = time.monotonic() + wait_releasing_s
        announced = False
        while True:
            holder = self.read()
            if holder is None:
                if self._create():
                    break
                continue  # another driver created it just now: judge that one
            if holder == {}:
                holder = {"heartbeat_at": self.path.stat().st_mtime} if self.path.exists() else {}
            reason = stale_reason(holder)
            if reason is not None:
                if self._take_over(holder):
                    log.warning("took over the run dir's stale lease (%s; %s)", describe(holder), reason)
                    break
                time.sleep(0.05)  # another driver is taking it over: judge its lease next
                continue
            if holder.get("releasing") and time.monotonic() < deadline:
                if give_up():
                    return None
                if not announced:
                    log.info("waiting for the previous driver to finish shutting down (%s)", describe(holder))
                    announced = True
                time.sleep(0.5)
                continue
            raise RecipeError(
                self.source,
                "",
                f"{self.run_dir} is in use by another driver ({describe(holder)}). Wait for it to end or stop it; "
                f"its lease expires {EXPIRY_S:.0f}s after its last heartbeat.",
            )
        self._thread = threading.Thread(target=self._heartbeat, name="sdg-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _record(self) -> dict[str, Any]:
        now = time.time()
        if not self.info:
            self.info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                "boot_id": _boot_id(),
                "pid_start": start_time(os.getpid()),
                "pid_namespace": _pid_namespace(),
                "acquired_at": now,
                "acquired": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        self.info["heartbeat_at"] = now
        return self.info

    def _create(self) -> bool:
        """Exclusive create: link a complete private file onto the lease path (fails if the path exists)."""
        return self._link_new(self.path, json.dumps(self._record(), indent=1) + "\n")

    def _link_new(self, path: Path, text: str) -> bool:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{LEASE_FILE}.{self.token}"
        atomic_write(tmp, text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, holder: dict[str, Any]) -> bool:
        """Replace the stale lease `holder` with ours, if this driver's claim on it is the one that lands and the
        lease is still that one. A claim older than TAKEOVER_STALL_S yields to a claim of the next level."""
        claims = f".{LEASE_FILE}.takeover.{holder.get('token')}."
        for level in itertools.count():
            claim = self.run_dir / f"{claims}{level}"
            if self._link_new(claim, self.token):
                break
            try:
                if time.time() - claim.stat().st_mtime < TAKEOVER_STALL_S:
                    return False
            except FileNotFoundError:  # its taker has just finished: look at the lease again
                return False
        try:
            now = self.read()
            if now is None or now.get("token") != holder.get("token"):
                return False
            atomic_write(self.path, json.dumps(self._record(), indent=1) + "\n")
            for left in self.run_dir.glob(f"{glob.escape(claims)}*"):
                left.unlink(missing_ok=True)  # by drivers that died taking over the lease now replaced
            return True
        finally:
            claim.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._beat():
                return

    def _beat(self, **extra: Any) -> bool:
        """Rewrite the lease if it is still ours; note the loss otherwise (the driver then stops)."""
        with self._lock:
            if self._stop.is_set() and not extra:
                return False
            holder = self.read()
            if holder is not None and holder != {} and holder.get("token") != self.token:
                self.lost = f"another driver took the run dir over: {describe(holder)}"
                log.error("lease lost: %s", self.lost)
                return False
            self.info.update(extra)
            try:
                atomic_write(self.path, json.dumps(self._record(), indent=1) + "\n")
            except OSError as e:  # shared storage hiccup: try again at the next beat, the expiry allows for it
                log.warning("could not renew the lease: %s", e)
            return True

    def mark_releasing(self) -> None:
        """Shutting down: a new driver on the same run dir waits for the release instead of refusing."""
        if self._thread is not None and self.lost is None:
            self._beat(releasing=True)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
        with self._lock:
            holder = self.read()
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
