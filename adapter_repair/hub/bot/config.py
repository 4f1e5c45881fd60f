"""The Hub CI bot's settings: its queue, when it repairs, how its workers behave."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_repair.settings import cache_root, setting


@dataclass(frozen=True)
class BotConfig:
    """The Hub CI bot: where its queue is, when it repairs, and how its workers behave."""

    queue: str | None = setting(
        None,
        "Queue and job records: sqlite:///path/bot.db (one machine) or redis://host:6379/0 "
        "(many workers). Default: sqlite in $ADAPTER_REPAIR_CACHE (~/.cache/adapter-repair).",
        metavar="URL",
        envvar="ADAPTER_REPAIR_QUEUE",
    )
    threshold: float = setting(
        0.1,
        "Repair only adapters whose harmful rate (AdvBench eval split) is at least this share; "
        "under it the job is recorded as skipped.",
    )
    comment_clean: bool = setting(
        False, "Open a discussion on adapters found under the threshold (default: stay silent)."
    )
    concurrency: int = setting(1, "Jobs a worker runs at once (one per GPU).")
    lease: float = setting(
        120.0,
        "Seconds a running job's lease lasts without a heartbeat (renewed every quarter of "
        "it); after that another worker reclaims the job.",
    )
    job_timeout: float = setting(3600.0, "Seconds a job may run before it is killed and failed.")
    retries: int = setting(3, "Retries of a job after a transient Hub error (5xx, dropped link).")
    retry_delay: float = setting(
        30.0, "Seconds before the first retry; each next one waits twice as long."
    )
    max_attempts: int = setting(
        4, "Claims of one job (a worker that died counts) before it is failed."
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {self.threshold}")
        for name in ("lease", "job_timeout", "retry_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        if self.concurrency < 1 or self.max_attempts < 1 or self.retries < 0:
            raise ValueError("concurrency and max-attempts must be at least 1, retries at least 0")
        if self.retries >= self.max_attempts:
            raise ValueError(
                f"retries ({self.retries}) must be below max-attempts ({self.max_attempts}): "
                "each retry is an attempt"
            )

    def stale_after(self) -> float:
        """Seconds after which a queued job nobody took gets its message sent again: a lease
        plus the longest retry delay (a retry waits that long on purpose)."""
        return self.lease + self.retry_delay * 2**self.retries

    def queue_url(self) -> str:
        if self.queue:
            return self.queue
        return f"sqlite:///{cache_root() / 'bot.db'}"
