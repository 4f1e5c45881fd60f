"""The bot's queue: huey on SQLite by default (one machine, nothing to install), on Redis by
one setting (many workers on many machines drain one queue), and the job records beside it in
the same storage (:mod:`adapter_repair.hub.bot.store`).

A queue URL names both: ``sqlite:///path/bot.db`` or ``redis://host:port/db``. The huey task
carries a job id only; what it does is the handler the worker process installs
(:func:`set_handler`), so the receiver can enqueue without importing the repair stack.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huey import Huey, RedisHuey, SqliteHuey

from adapter_repair.errors import AdapterRepairError
from adapter_repair.hub.bot.store import JobStore, RedisJobStore, SqliteJobStore

QUEUE_NAME = "adapter-repair-bot"
_handler: Callable[[str], None] | None = None


def set_handler(handler: Callable[[str], None] | None) -> None:
    """What a dequeued job runs in this process (the worker sets it)."""
    global _handler
    _handler = handler


def _run(jid: str) -> None:
    if _handler is None:
        raise RuntimeError(
            "no job handler in this process: run jobs with `adapter-repair bot worker`."
        )
    _handler(jid)


@dataclass
class Queue:
    """huey (the messages) and the job store (the records), on one storage."""

    url: str
    huey: Huey
    store: JobStore
    task: Any  # huey's TaskWrapper of _run

    def enqueue(self, jid: str, delay: float | None = None) -> None:
        """A message for job ``jid`` (its record must exist), now or ``delay`` seconds on."""
        if delay:
            self.task.schedule(args=(jid,), delay=delay)
        else:
            self.huey.enqueue(self.task.s(jid))

    def next(self) -> Any | None:
        """The next message due, or None: scheduled retries that are due join the queue
        first (huey's consumer would do this; the bot's worker runs its own loop)."""
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        for task in self.huey.read_schedule(now):
            self.huey.enqueue(task)
        while (task := self.huey.dequeue()) is not None:
            if self.huey.ready_to_run(task, now):
                return task
            self.huey.add_schedule(task)  # a retry not due yet
        return None

    def depth(self) -> int:
        """Jobs waiting (their records queued, retries scheduled included): jobs, not
        messages, since a job may have more than one message on the way (a re-send after a
        long wait, a reclaim)."""
        return int(self.store.counts().get("queued", 0))


def open_queue(url: str) -> Queue:
    """The queue and job store at ``url`` (``sqlite:///path`` or ``redis://...``)."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = Path(parsed.netloc + parsed.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        huey: Huey = SqliteHuey(QUEUE_NAME, filename=str(path), utc=True)
        store: JobStore = SqliteJobStore(str(path))
    elif parsed.scheme in ("redis", "rediss", "unix"):
        huey = RedisHuey(QUEUE_NAME, url=url, utc=True)
        store = RedisJobStore(url)
    else:
        raise AdapterRepairError(
            f"queue URL {url!r}: unknown scheme {parsed.scheme!r}.",
            "Use sqlite:///path/to/bot.db (one machine) or redis://host:6379/0 (many workers).",
        )
    task = huey.task(name="repair_job")(_run)
    return Queue(url, huey, store, task)
