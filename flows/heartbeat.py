"""Who runs a job, and whether it is still alive: the runner id and the heartbeat thread.

A job row names its runner (`host:pid:uuid`, one per flow call) and the time of its last heartbeat.
The runner's heartbeat thread touches `jobs.heartbeat_at` every VPTQ_HEARTBEAT_SECONDS (10 s); a
second command for the same job waits while the heartbeat is fresh and takes the job over only
when it is older than VPTQ_HEARTBEAT_TIMEOUT (60 s), or at once when the runner's process on this
host is dead (SIGKILL, OOM). A runner that lost its job (it was frozen, or cut off from the database
longer than the timeout) learns it at its next heartbeat and stops without writing to the row.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from datetime import datetime, timedelta

HEARTBEAT_SECONDS = 10.0
HEARTBEAT_TIMEOUT = 60.0


class JobLost(Exception):
    """Another process took this job over (its heartbeat had gone stale): stop, write nothing."""


def _seconds(name: str, default: float) -> float:
    from vptq.config import ConfigError

    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise ConfigError(f"{name}={raw}: use a number of seconds > 0")
    return value


def heartbeat_seconds() -> float:
    return _seconds("VPTQ_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)


def heartbeat_timeout() -> float:
    """How old a heartbeat may be before its job counts as abandoned (at least 3 heartbeats)."""
    return max(_seconds("VPTQ_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT), 3 * heartbeat_seconds())


def _pid_namespace() -> str:
    """This process's PID namespace (containers sharing a hostname, e.g. --network host, have their
    own): a pid is only meaningful within it."""
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino:x}"
    except OSError:
        return "0"


def new_runner_id() -> str:
    """`host:pid:ns.uuid`: this process (its PID namespace), and this call of it (two calls in one
    process are two runners)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_namespace()}.{uuid.uuid4().hex[:12]}"


def runner_gone(runner: str) -> bool:
    """True when `runner` is a process of this host (and PID namespace) that no longer exists, or
    is a zombie. A runner elsewhere, or one that cannot be parsed, is never called gone: its
    heartbeat decides."""
    import psutil

    host, pid, tail = (runner.split(":", 2) + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit() or tail.partition(".")[0] != _pid_namespace():
        return False
    if int(pid) == os.getpid():
        return False  # this very process: alive (a runner id is per call, the caller knows its own)
    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def stale_before(now: datetime) -> datetime:
    return now - timedelta(seconds=heartbeat_timeout())


class Heartbeat:
    """A daemon thread that beats for (job, runner) until closed; `check()` beats now and raises
    JobLost when the job is no longer this runner's."""

    def __init__(self, repo, job_id: int, runner: str, interval: float | None = None) -> None:
        self.repo, self.job_id, self.runner = repo, job_id, runner
        self.interval = interval or heartbeat_seconds()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        if not self.repo.beat_job(self.job_id, self.runner):
            self.lost.set()

    def _run(self) -> None:
        import logging

        while not self._stop.wait(self.interval) and not self.lost.is_set():
            try:
                self._beat()
            except Exception as e:  # a database hiccup: try again next time (the timeout is generous)
                logging.getLogger(__name__).warning("job %d heartbeat failed: %s", self.job_id, e)

    def check(self) -> None:
        """Beat now; JobLost when another process took the job over (or it stopped running)."""
        if not self.lost.is_set():
            self._beat()
        if self.lost.is_set():
            job = self.repo.get_job(self.job_id)
            who = f"taken over by {job.runner}" if job.runner != self.runner else f"{job.status}"
            raise JobLost(f"job {self.job_id} was {who} while this process ran it: this process stopped")
