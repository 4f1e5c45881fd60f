"""The bot's worker: drains the queue, one job per child process, under a lease.

Each job runs in a process of its own (``adapter_repair.hub.bot.job``): a job that hangs is
killed at its timeout, a repair's memory (a GPU's) is freed when it ends, and the child dies
with its worker (PR_SET_PDEATHSIG), so a killed worker leaves no orphan still pushing. While
the child runs, the worker renews the job's lease; a worker that dies stops renewing, and any
other worker reclaims the job once the lease has expired. Transient Hub errors are retried with
backoff; everything else ends the job as skipped or failed, with the reason in its record.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from adapter_repair.hub.bot.job import JobSettings, Outcome
from adapter_repair.hub.bot.queue import Queue, open_queue, set_handler

logger = logging.getLogger(__name__)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL when its worker dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Worker:
    """``concurrency`` threads, each taking the next job off ``queue`` and running it."""

    def __init__(self, queue: Queue, settings: JobSettings, *, poll: float = 0.5) -> None:
        self.queue = queue
        self.settings = settings
        self.bot = settings.bot
        self.poll = poll
        self.stop = threading.Event()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._last_reclaim = 0.0
        self._reclaim_lock = threading.Lock()
        self.handled = 0

    def owner(self) -> str:
        return f"{self.name}:{threading.get_ident()}"

    def reclaim(self) -> int:
        """Put back every job whose worker stopped renewing its lease; at most every quarter
        lease. Returns how many."""
        with self._reclaim_lock:
            if time.time() - self._last_reclaim < self.bot.lease / 4:
                return 0
            self._last_reclaim = time.time()
        n = 0
        for jid in self.queue.store.expired(self.bot.lease):
            if self.queue.store.reclaim(jid, self.bot.lease):
                logger.warning("reclaimed %s: its worker stopped renewing the lease", jid)
                self.queue.enqueue(jid)
                n += 1
        return n

    def run(self, max_idle: float | None = None) -> None:
        """Run ``concurrency`` threads until :attr:`stop` is set (or, with ``max_idle``, until
        the queue has been empty that long)."""
        set_handler(self.handle)
        threads = [
            threading.Thread(target=self._loop, args=(max_idle,), daemon=True)
            for _ in range(self.bot.concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _loop(self, max_idle: float | None) -> None:
        idle_since = time.time()
        while not self.stop.is_set():
            self.reclaim()
            task = self.queue.next()
            if task is None:
                if max_idle is not None and time.time() - idle_since > max_idle:
                    return
                self.stop.wait(self.poll)
                continue
            self.queue.huey.execute(task)  # calls self.handle(job id)
            idle_since = time.time()

    def handle(self, jid: str) -> None:
        """Claim job ``jid``, run it in a child process, record how it ended."""
        store = self.queue.store
        owner = self.owner()
        job = store.get(jid)
        if job is None or not store.claim(jid, owner):
            return  # done already, or another worker has it: a duplicate message
        self.handled += 1
        if job.attempts + 1 > self.bot.max_attempts:
            store.finish(jid, owner, "failed", f"gave up after {job.attempts} attempts")
            return
        logger.info("job %s: started (attempt %d)", jid, job.attempts + 1)
        outcome = self._run_child(jid, owner)
        if outcome.transient and job.attempts < self.bot.retries:
            delay = self.bot.retry_delay * 2**job.attempts
            if store.finish(jid, owner, "queued", f"retry in {delay:.0f} s: {outcome.detail}"):
                self.queue.enqueue(jid, delay=delay)
                logger.warning("job %s: %s; retry in %.0f s", jid, outcome.detail, delay)
            return
        state = "failed" if outcome.state == "transient" else outcome.state
        if store.finish(jid, owner, state, outcome.detail, outcome.url):
            logger.info("job %s: %s (%s) %s", jid, state, outcome.detail, outcome.url or "")
        else:
            logger.warning("job %s: its lease was lost; its outcome is not recorded", jid)

    def _run_child(self, jid: str, owner: str) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="adapter-repair-job-") as tmp:
            result = Path(tmp) / "outcome.json"
            cmd = [
                sys.executable,
                "-m",
                "adapter_repair.hub.bot.job",
                jid,
                owner,
                self.queue.url,
                self.settings.to_json(),
                str(result),
            ]
            child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
            started = time.time()
            beat = max(0.05, self.bot.lease / 4)
            while True:
                try:
                    child.wait(timeout=beat)
                    break
                except subprocess.TimeoutExpired:
                    if not self.queue.store.heartbeat(jid, owner):
                        child.kill()
                        child.wait()
                        return Outcome("failed", "the job's lease was lost")
                    if time.time() - started > self.bot.job_timeout:
                        child.kill()
                        child.wait()
                        return Outcome("failed", f"timed out after {self.bot.job_timeout:.0f} s")
            if child.returncode != 0 or not result.is_file():
                return Outcome("failed", f"the job process exited with code {child.returncode}")
            data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
            return Outcome(**data)


def run_worker(queue_url: str, settings: JobSettings, *, max_idle: float | None = None) -> Worker:
    """Run a worker on ``queue_url`` until interrupted (or idle for ``max_idle`` seconds)."""
    worker = Worker(open_queue(queue_url), settings)

    def stop(*_: Any) -> None:
        worker.stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        worker.run(max_idle=max_idle)
    except KeyboardInterrupt:
        worker.stop.set()
    return worker
