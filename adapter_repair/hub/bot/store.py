"""Job records of the bot, one per (repo, commit sha), kept in the queue's own storage.

huey has no acknowledgements: a message a worker has taken is gone from the queue, so a worker
killed mid-job would lose it. The record is what makes a job durable: it is ``queued``, then
``running`` under an owner that renews a lease (its heartbeat); any worker that finds a running
job whose heartbeat is older than the lease puts it back to ``queued`` and enqueues it again
(:meth:`JobStore.reclaim`, a compare-and-set, so one reclaimer wins). Every transition is
such a compare-and-set; a job ends ``done`` (a PR url), ``skipped`` or ``failed`` (why).

Two stores with one behaviour: SQLite (a table in huey's own database file) and Redis (hashes
beside huey's keys, transitions in Lua so they are atomic on the server, stamped with the
server's clock so that workers whose clocks disagree judge leases alike).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

STATES = ("queued", "running", "done", "skipped", "failed")
FINAL = ("done", "skipped", "failed")


def job_id(repo: str, sha: str) -> str:
    """The key of a job: one per repo and commit."""
    return f"{repo}@{sha}"


@dataclass(frozen=True)
class Job:
    """One job record."""

    id: str
    repo: str
    sha: str
    state: str
    owner: str | None
    heartbeat: float
    attempts: int
    detail: str
    pr_url: str | None
    created: float
    updated: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JobStore(ABC):
    """Job records with compare-and-set transitions (see the module docstring)."""

    @abstractmethod
    def add(self, repo: str, sha: str) -> bool:
        """Record a new queued job; False when (repo, sha) has a record already."""

    @abstractmethod
    def get(self, jid: str) -> Job | None: ...

    @abstractmethod
    def claim(self, jid: str, owner: str) -> bool:
        """queued -> running under ``owner`` (attempts + 1); False when not queued."""

    @abstractmethod
    def heartbeat(self, jid: str, owner: str) -> bool:
        """Renew ``owner``'s lease; False when the job is no longer its own."""

    @abstractmethod
    def finish(
        self, jid: str, owner: str, state: str, detail: str, pr_url: str | None = None
    ) -> bool:
        """running (``owner``) -> done / skipped / failed; or back to queued (a retry)."""

    @abstractmethod
    def reclaim(self, jid: str, lease: float) -> bool:
        """running with a heartbeat older than ``lease`` seconds -> queued; False otherwise."""

    @abstractmethod
    def touch(self, jid: str, older_than: float) -> bool:
        """A queued job last changed more than ``older_than`` seconds ago: mark it changed now
        and return True (once per period, whoever asks), so that its message is sent again;
        False otherwise."""

    @abstractmethod
    def forget(self, key: str) -> None:
        """Undo :meth:`once` for ``key`` (its side effect failed; a later attempt may do it)."""

    @abstractmethod
    def jobs(self) -> list[Job]: ...

    @abstractmethod
    def once(self, key: str) -> bool:
        """True the first time ``key`` is seen, then False (one discussion per repo and
        reason)."""

    def now(self) -> float:
        """The clock the records are stamped with."""
        return time.time()

    def expired(self, lease: float) -> list[str]:
        """Running jobs whose heartbeat is older than ``lease`` seconds."""
        now = self.now()
        return [j.id for j in self.jobs() if j.state == "running" and j.heartbeat < now - lease]

    def stale(self, older_than: float) -> list[str]:
        """Queued jobs unchanged for ``older_than`` seconds: their message may have been lost
        (a crash between recording a job and enqueueing it, a failed enqueue)."""
        now = self.now()
        return [j.id for j in self.jobs() if j.state == "queued" and j.updated < now - older_than]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for j in self.jobs():
            out[j.state] += 1
        return out


_COLUMNS = "id, repo, sha, state, owner, heartbeat, attempts, detail, pr_url, created, updated"


class SqliteJobStore(JobStore):
    """Records in a table of huey's SQLite file; each transition one conditional UPDATE."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._local = threading.local()
        with self._conn() as c:
            c.execute(
                "create table if not exists adapter_repair_jobs (id text primary key, repo text,"
                " sha text, state text, owner text, heartbeat real, attempts integer, detail"
                " text, pr_url text, created real, updated real)"
            )
            c.execute("create table if not exists adapter_repair_once (key text primary key)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.filename, timeout=30, isolation_level=None)
            conn.execute("pragma journal_mode=wal")
            self._local.conn = conn
        return conn

    def _update(self, sql: str, *args: Any) -> bool:
        return self._conn().execute(sql, args).rowcount == 1

    def add(self, repo: str, sha: str) -> bool:
        now = time.time()
        return self._update(
            f"insert or ignore into adapter_repair_jobs ({_COLUMNS})"
            " values (?, ?, ?, 'queued', null, 0, 0, '', null, ?, ?)",
            job_id(repo, sha),
            repo,
            sha,
            now,
            now,
        )

    def get(self, jid: str) -> Job | None:
        row = (
            self._conn()
            .execute(f"select {_COLUMNS} from adapter_repair_jobs where id = ?", (jid,))
            .fetchone()
        )
        return Job(*row) if row else None

    def claim(self, jid: str, owner: str) -> bool:
        now = time.time()
        return self._update(
            "update adapter_repair_jobs set state = 'running', owner = ?, heartbeat = ?,"
            " attempts = attempts + 1, updated = ? where id = ? and state = 'queued'",
            owner,
            now,
            now,
            jid,
        )

    def heartbeat(self, jid: str, owner: str) -> bool:
        return self._update(
            "update adapter_repair_jobs set heartbeat = ? where id = ? and state = 'running'"
            " and owner = ?",
            time.time(),
            jid,
            owner,
        )

    def finish(
        self, jid: str, owner: str, state: str, detail: str, pr_url: str | None = None
    ) -> bool:
        if state not in (*FINAL, "queued"):
            raise ValueError(f"not a final state: {state}")
        return self._update(
            "update adapter_repair_jobs set state = ?, detail = ?, pr_url = ?, owner = null,"
            " updated = ? where id = ? and state = 'running' and owner = ?",
            state,
            detail,
            pr_url,
            time.time(),
            jid,
            owner,
        )

    def reclaim(self, jid: str, lease: float) -> bool:
        now = time.time()
        return self._update(
            "update adapter_repair_jobs set state = 'queued', owner = null, detail = ?,"
            " updated = ? where id = ? and state = 'running' and heartbeat < ?",
            f"reclaimed: its worker stopped renewing the lease ({lease:.0f} s)",
            now,
            jid,
            now - lease,
        )

    def touch(self, jid: str, older_than: float) -> bool:
        now = time.time()
        return self._update(
            "update adapter_repair_jobs set updated = ? where id = ? and state = 'queued'"
            " and updated < ?",
            now,
            jid,
            now - older_than,
        )

    def forget(self, key: str) -> None:
        self._conn().execute("delete from adapter_repair_once where key = ?", (key,))

    def jobs(self) -> list[Job]:
        rows = self._conn().execute(f"select {_COLUMNS} from adapter_repair_jobs").fetchall()
        return [Job(*r) for r in rows]

    def once(self, key: str) -> bool:
        return self._update("insert or ignore into adapter_repair_once (key) values (?)", key)


# Redis: each transition a Lua script, atomic on the server, timed by the server's clock (so
# that workers on machines whose clocks disagree judge leases alike).
_NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"
_ADD = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'repo', ARGV[2], 'sha', ARGV[3], 'state', 'queued',
           'owner', '', 'heartbeat', 0, 'attempts', 0, 'detail', '', 'pr_url', '',
           'created', now, 'updated', now)
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
)
_CLAIM = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[1], 'heartbeat', now,
           'updated', now)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 1
"""
)
_HEARTBEAT = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat', now)
return 1
"""
)
_FINISH = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'detail', ARGV[3], 'pr_url', ARGV[4],
           'owner', '', 'updated', now)
return 1
"""
)
_TOUCH = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'updated')) >= now - tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'updated', now)
return 1
"""
)
_RECLAIM = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'heartbeat')) >= now - tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', '', 'detail', ARGV[2], 'updated', now)
return 1
"""
)


class RedisJobStore(JobStore):
    """Records as Redis hashes (``adapter-repair:job:ID``) indexed by a set."""

    prefix = "adapter-repair"

    def __init__(self, url: str) -> None:
        import redis

        self.r = redis.Redis.from_url(url, decode_responses=True)
        self._add = self.r.register_script(_ADD)
        self._claim = self.r.register_script(_CLAIM)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._finish = self.r.register_script(_FINISH)
        self._reclaim = self.r.register_script(_RECLAIM)
        self._touch = self.r.register_script(_TOUCH)

    def now(self) -> float:
        sec, usec = self.r.time()
        return float(sec) + float(usec) / 1e6

    def _key(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}"

    def add(self, repo: str, sha: str) -> bool:
        jid = job_id(repo, sha)
        keys = [self._key(jid), f"{self.prefix}:jobs"]
        return bool(self._add(keys=keys, args=[jid, repo, sha]))

    def get(self, jid: str) -> Job | None:
        h: dict[str, str] = self.r.hgetall(self._key(jid))  # type: ignore[assignment]
        if not h or "id" not in h:
            return None
        return Job(
            id=h["id"],
            repo=h["repo"],
            sha=h["sha"],
            state=h["state"],
            owner=h.get("owner") or None,
            heartbeat=float(h.get("heartbeat") or 0),
            attempts=int(h.get("attempts") or 0),
            detail=h.get("detail") or "",
            pr_url=h.get("pr_url") or None,
            created=float(h["created"]),
            updated=float(h["updated"]),
        )

    def claim(self, jid: str, owner: str) -> bool:
        return bool(self._claim(keys=[self._key(jid)], args=[owner]))

    def heartbeat(self, jid: str, owner: str) -> bool:
        return bool(self._heartbeat(keys=[self._key(jid)], args=[owner]))

    def finish(
        self, jid: str, owner: str, state: str, detail: str, pr_url: str | None = None
    ) -> bool:
        if state not in (*FINAL, "queued"):
            raise ValueError(f"not a final state: {state}")
        return bool(self._finish(keys=[self._key(jid)], args=[owner, state, detail, pr_url or ""]))

    def reclaim(self, jid: str, lease: float) -> bool:
        why = f"reclaimed: its worker stopped renewing the lease ({lease:.0f} s)"
        return bool(self._reclaim(keys=[self._key(jid)], args=[lease, why]))

    def touch(self, jid: str, older_than: float) -> bool:
        return bool(self._touch(keys=[self._key(jid)], args=[older_than]))

    def forget(self, key: str) -> None:
        self.r.delete(f"{self.prefix}:once:{key}")

    def jobs(self) -> list[Job]:
        ids: set[str] = self.r.smembers(f"{self.prefix}:jobs")  # type: ignore[assignment]
        return [j for j in (self.get(i) for i in sorted(ids)) if j is not None]

    def once(self, key: str) -> bool:
        return bool(self.r.set(f"{self.prefix}:once:{key}", 1, nx=True))
