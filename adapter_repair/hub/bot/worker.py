"""The bot's worker: drains the queue, one job per child process, under a lease.

Each job runs in a process of its own (``adapter_repair.hub.bot.job``): a job that hangs is
killed at its timeout, a repair's memory (a GPU's) is freed when it ends, and the child dies
with its worker (it asks for PR_SET_PDEATHSIG itself and exits if its worker is already
gone), so a killed worker leaves no orphan still pushing. While
the child runs, the worker renews the job's lease; a worker that dies stops renewing, and any
other worker reclaims the job once the lease has expired. Transient Hub errors are retried with
backoff; everything else ends the job as skipped or failed, with the reason in its record.
"""

from __future__ import annotations

import dataclasses
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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter_repair.hub.bot.job import JobSettings, Outcome, store_unreachable
from adapter_repair.hub.bot.queue import Queue, open_queue, set_handler

logger = logging.getLogger(__name__)
#: the longest pause between retries while the queue's storage is unreachable (seconds)
MAX_BACKOFF = 10.0


class Worker:
    """``concurrency`` threads, each taking the next job off ``queue`` and running it."""

    def __init__(self, queue: Queue, settings: JobSettings, *, poll: float = 0.5) -> None:
        self.queue = queue
        # the jobs open the queue this worker drains, whatever its default would be there
        self.settings = dataclasses.replace(
            settings, bot=dataclasses.replace(settings.bot, queue=queue.url)
        )
        self.bot = self.settings.bot
        self.poll = poll
        self.stop = threading.Event()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._last_reclaim = 0.0
        self._reclaim_lock = threading.Lock()
        self.handled = 0

    def owner(self) -> str:
        """A fresh owner for each claim: a fencing token, so that a claim by this thread after
        a lost lease is not mistaken for the earlier one."""
        return f"{self.name}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"

    def reclaim(self) -> int:
        """Put back every job whose worker stopped renewing its lease; at most every quarter
        lease. Returns how many."""
        with self._reclaim_lock:
            if time.time() - self._last_reclaim < self.bot.lease / 4:
                return 0
            self._last_reclaim = time.time()
        n = 0
        store = self.queue.store
        for jid in store.expired(self.bot.lease):
            if store.reclaim(jid, self.bot.lease):
                logger.warning("reclaimed %s: its worker stopped renewing the lease", jid)
                self.queue.enqueue(jid)
                n += 1
        # a queued record whose message was lost (a crash between recording and enqueueing):
        # send it again; a duplicate message is harmless (the claim is a compare-and-set)
        stale_after = self.bot.stale_after()
        for jid in store.stale(stale_after):
            if store.touch(jid, stale_after):
                logger.warning("re-sent %s: queued for long without being taken", jid)
                self.queue.enqueue(jid)
                n += 1
        return n

    def unfinished(self) -> int:
        """Jobs queued (a retry waiting for its time included) or running anywhere: while
        there are any, a batch worker is not idle. A retry scheduled for later is no message
        yet, and a job whose worker lost the store is reclaimed only when its lease ends."""
        counts = self.queue.store.counts()
        return counts["queued"] + counts["running"]

    def run(self, max_idle: float | None = None) -> None:
        """Run ``concurrency`` threads until :attr:`stop` is set (or, with ``max_idle``, until
        no message has come for that long while no job was queued or running)."""
        set_handler(self.handle)
        threads = [
            threading.Thread(target=self._loop, args=(max_idle,), daemon=True)
            for _ in range(self.bot.concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _backoff(self, failures: int) -> float:
        """The pause after ``failures`` store or queue errors in a row: doubling from the
        poll interval, at most MAX_BACKOFF."""
        return min(MAX_BACKOFF, self.poll * 2**failures)

    def _loop(self, max_idle: float | None) -> None:
        """Take jobs until stopped. An error of the queue or the store (Redis restarting, a
        locked SQLite file) is logged and waited out with a growing pause, never the end of
        the loop: the clients reconnect on their next call."""
        idle_since = time.time()
        failures = 0
        while not self.stop.is_set():
            try:
                self.reclaim()
                task = self.queue.next()
                if task is None:
                    if max_idle is not None and time.time() - idle_since > max_idle:
                        if not self.unfinished():
                            return
                        idle_since = time.time()  # a retry is scheduled, or a job runs
                    self.stop.wait(self.poll)
                else:
                    self.queue.huey.execute(task)  # calls self.handle(job id)
                    idle_since = time.time()
                failures = 0
            except Exception as e:
                failures += 1
                pause = self._backoff(failures)
                logger.warning(
                    "queue or store error (%s: %s); retrying in %.1f s",
                    type(e).__name__,
                    e,
                    pause,
                )
                self.stop.wait(pause)
                idle_since = time.time()  # an outage is not idleness

    def handle(self, jid: str) -> None:
        """Claim job ``jid``, run it in a child process, record how it ended."""
        store = self.queue.store
        owner = self.owner()
        job = store.get(jid)
        if job is None or not store.claim(jid, owner):
            return  # done already, or another worker has it: a duplicate message
        self.handled += 1
        if job.attempts + 1 > self.bot.max_attempts:
            gave_up = f"gave up after {job.attempts} attempts"
            self._record(jid, lambda: store.finish(jid, owner, "failed", gave_up))
            return
        logger.info("job %s: started (attempt %d)", jid, job.attempts + 1)
        outcome = self._run_child(jid, owner)
        if outcome.transient and job.attempts < self.bot.retries:
            delay = self.bot.retry_delay * 2**job.attempts
            detail = f"retry in {delay:.0f} s: {outcome.detail}"
            if self._record(jid, lambda: store.finish(jid, owner, "queued", detail)):
                self.queue.enqueue(jid, delay=delay)
                logger.warning("job %s: %s; retry in %.0f s", jid, outcome.detail, delay)
            return
        state = "failed" if outcome.transient else outcome.state
        if self._record(jid, lambda: store.finish(jid, owner, state, outcome.detail, outcome.url)):
            logger.info("job %s: %s (%s) %s", jid, state, outcome.detail, outcome.url or "")
        else:
            logger.warning("job %s: its lease was lost; its outcome is not recorded", jid)

    def _record(self, jid: str, finish: Callable[[], bool]) -> bool:
        """Record how a job ended, waiting out an outage of the store (Redis restarting, a
        locked SQLite file) with a growing pause. Giving up would leave the job ``running``
        until its lease expires, and a worker that exits when idle would never see it
        reclaimed; the finish is a compare-and-set on the owner, so a late one after a
        reclaim is refused, not applied twice. Returns what ``finish`` returned; False when
        the worker is stopped first (the lease then brings the job back)."""
        failures = 0
        while True:
            try:
                return finish()
            except Exception as e:
                if not store_unreachable(e):
                    raise
                failures += 1
                pause = self._backoff(failures)
                logger.warning(
                    "job %s: cannot record its end, the store is unreachable (%s); retrying "
                    "in %.1f s",
                    jid,
                    e,
                    pause,
                )
                if self.stop.wait(pause):
                    return False

    def _run_child(self, jid: str, owner: str) -> Outcome:
        """Run the job in a child process (its own session: a Ctrl-C meant for the worker
        does not fail the job) and renew the lease while it runs. Settings go through a file,
        not argv, so that a queue URL with a password does not show in ps."""
        with tempfile.TemporaryDirectory(prefix="adapter-repair-job-") as tmp:
            result = Path(tmp) / "outcome.json"
            settings = Path(tmp) / "settings.json"
            settings.write_text(self.settings.to_json(), encoding="utf-8")
            cmd = [sys.executable, "-m", "adapter_repair.hub.bot.jobmain", jid, owner]
            cmd += [str(settings), str(result)]
            env = {**os.environ, "ADAPTER_REPAIR_WORKER_PID": str(os.getpid())}
            child = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                outcome = self._watch(child, jid, owner)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            if outcome is not None:
                return outcome
            if child.returncode < 0:  # killed by a signal (OOM killer, a crash): try again
                return Outcome(
                    "failed", f"the job process was killed (signal {-child.returncode})",
                    transient=True,
                )  # fmt: skip
            if child.returncode != 0 or not result.is_file():
                return Outcome("failed", f"the job process exited with code {child.returncode}")
            data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
            return Outcome(**data)

    def _watch(self, child: subprocess.Popen[bytes], jid: str, owner: str) -> Outcome | None:
        """Wait for ``child``, renewing the lease; an Outcome when it must be stopped."""
        started = last_beat = time.time()
        beat = max(0.05, self.bot.lease / 4)
        while True:
            try:
                child.wait(timeout=beat)
                return None
            except subprocess.TimeoutExpired:
                pass
            try:
                if not self.queue.store.heartbeat(jid, owner):
                    return Outcome("failed", "the job's lease was lost")
                last_beat = time.time()
            except Exception as e:  # the store is unreachable for a while: keep trying
                logger.warning("job %s: heartbeat failed (%s)", jid, e)
                if time.time() - last_beat > self.bot.lease:
                    return Outcome("failed", "the job's lease was lost (store unreachable)")
            if time.time() - started > self.bot.job_timeout:
                return Outcome("failed", f"timed out after {self.bot.job_timeout:.0f} s")


def check_worker_token() -> str:
    """A worker opens PRs: refuse to start without a token that can write. Returns the
    bot's user name."""
    from huggingface_hub import HfApi

    from adapter_repair.hub.push import writer

    return str(writer(HfApi(), "open pull requests as the bot")["name"])


def run_worker(queue_url: str, settings: JobSettings, *, max_idle: float | None = None) -> Worker:
    """Run a worker on ``queue_url`` until interrupted (or idle for ``max_idle`` seconds)."""
    check_worker_token()
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
