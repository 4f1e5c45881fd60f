"""One bot job, run in a process of its own (``python -m adapter_repair.hub.bot.job``): check
the repo at the commit, pull, measure, repair, and open a pull request (a discussion that says
what was measured when the repair fell short of its target); write the outcome as
JSON to the file the worker names.

The worker that started it holds the job's lease; this process only checks that the record is
still its worker's before each side effect, and looks on the Hub for what an earlier attempt
may have done before it died (a PR for this commit, a discussion for this reason), so that a
reclaimed job never pushes twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from adapter_repair.errors import (
    AdapterFormatError,
    AdapterRepairError,
    BaseMismatchError,
    NothingToRepair,
    UnsupportedAdapterError,
    UnsupportedModelError,
)
from adapter_repair.hub.bot.config import BotConfig
from adapter_repair.hub.bot.queue import open_queue
from adapter_repair.hub.bot.store import JobStore
from adapter_repair.hub.card import weights_line
from adapter_repair.hub.config import PushConfig
from adapter_repair.hub.errors import BaseUnreachableError, HubError, hub_errors, scrub
from adapter_repair.hub.fix import commit_message, fix
from adapter_repair.hub.push import plan_push, pr_marker, push
from adapter_repair.hub.task import TaskSourceError
from adapter_repair.measure.config import EvalConfig
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.report import COLUMNS, measures_table, verdict
from adapter_repair.settings import config_from_dict

logger = logging.getLogger(__name__)
TITLE_PREFIX = "adapter-repair:"


@dataclass(frozen=True)
class JobSettings:
    """What a worker hands each job: its configs."""

    bot: BotConfig
    load: LoadConfig
    repair: RepairConfig
    evaluation: EvalConfig

    def to_json(self) -> str:
        return json.dumps({k: dataclasses.asdict(v) for k, v in self.__dict__.items()})

    @classmethod
    def from_json(cls, text: str) -> JobSettings:
        d = json.loads(text)
        return cls(
            config_from_dict(BotConfig, d["bot"]),
            config_from_dict(LoadConfig, d["load"]),
            config_from_dict(RepairConfig, d["repair"]),
            config_from_dict(EvalConfig, d["evaluation"]),
        )


@dataclass(frozen=True)
class Outcome:
    """How a job ended: done (a PR), skipped (why), failed (why), or transient (retry)."""

    state: str
    detail: str
    url: str | None = None
    transient: bool = False


def marker(sha: str) -> str:
    """In the bot's PR titles: which commit was repaired (the same marker ``fix --pr`` uses)."""
    return pr_marker(sha)


@functools.cache
def _me(api: HfApi) -> str:
    with hub_errors("check the bot's token", "(whoami)"):
        return str(api.whoami()["name"])


def _find_discussion(api: HfApi, repo: str, *, title_part: str, pr: bool) -> str | None:
    """The URL of an open-or-not discussion or PR by this token's user whose title has
    ``title_part`` (what an earlier attempt of the job may have opened before it died)."""
    me = _me(api)
    with hub_errors("list the repo's discussions", repo):
        found = (
            api.get_repo_discussions(repo, author=me, discussion_type="pull_request")
            if pr
            else api.get_repo_discussions(repo, author=me, discussion_type="discussion")
        )
        for d in found:
            if title_part in d.title:
                return str(d.url)
    return None


def impossible_reason(e: AdapterRepairError) -> str | None:
    """A short reason for a repair that cannot be done (one discussion each), else None."""
    if isinstance(e, BaseUnreachableError):
        return "base model unreachable"
    if isinstance(e, HubError):
        return None
    if isinstance(e, BaseMismatchError | UnsupportedModelError):
        return "unsupported architecture"
    if isinstance(e, UnsupportedAdapterError):
        return "not a LoRA adapter adapter-repair supports"
    if isinstance(e, AdapterFormatError):
        return "pickle weights only" if "pickle" in e.problem else "malformed adapter"
    return None


def run_job(jid: str, owner: str, settings: JobSettings, api: HfApi) -> Outcome:
    """The pipeline of one job (see the module docstring)."""
    queue = open_queue(settings.bot.queue_url())
    job = queue.store.get(jid)
    if job is None:
        return Outcome("failed", f"no record for job {jid}")
    repo, sha = job.repo, job.sha
    title = f"{TITLE_PREFIX} restore refusals {marker(sha)}"
    try:
        with hub_errors(f"read {repo}", repo):
            info = api.model_info(repo, revision=sha, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        names = set(siblings)
        if "adapter_config.json" not in names:
            return Outcome("skipped", "not a PEFT adapter (no adapter_config.json)")
        existing = _find_discussion(api, repo, title_part=marker(sha), pr=True)
        if existing:
            return Outcome("done", "a pull request for this commit was open already", existing)
        with hub_errors(f"read {repo}", repo):
            commits = api.list_repo_commits(repo, revision=sha)
        if commits and commits[0].title.startswith(TITLE_PREFIX):
            return Outcome("skipped", "the commit is adapter-repair's own (a merged PR)")
        weights = siblings.get("adapter_model.safetensors")
        digest = weights.lfs.sha256 if weights is not None and weights.lfs else None
        if "README.md" in names and digest:
            card = Path(_download(api, repo, sha, "README.md")).read_text(encoding="utf-8")
            if weights_line(digest) in card:
                return Outcome("skipped", "already repaired by adapter-repair (same weights)")
        with tempfile.TemporaryDirectory(prefix="adapter-repair-job-") as tmp:
            out = Path(tmp) / "repaired"
            run = functools.partial(
                fix,
                f"{repo}@{sha}",
                out,
                load=settings.load,
                config=settings.repair,
                evaluation=settings.evaluation,
                push=PushConfig(),
                api=api,
                min_harmful=settings.bot.threshold,
                local_base=False,  # the uploader's config must not name files on this machine
            )
            try:  # the task rows of the dataset the card names guard the task
                done = run()
            except TaskSourceError as e:  # unreadable: the fidelity guard, said in the report
                logger.warning("%s: %s; guarding with fidelity instead", repo, e.problem)
                done = run(card_task=False)
            if not queue.store.heartbeat(jid, owner):  # False too when the record is gone
                return Outcome("failed", "the job's lease was lost during the repair")
            if not done.repair.result.reached:
                # A repair that fell short is not offered as one: say what was measured.
                line = verdict(done.repair.report["repair"])
                title = f"{TITLE_PREFIX} could not repair {marker(sha)}"
                body = (
                    f"The adapter-repair bot measured this commit's LoRA adapter answering "
                    f"harmful requests its base refuses, and its repair did not reach the "
                    f"target: {line}.\n\n{_measures_text(done.repair.report)}"
                )
                url = _discuss_once(api, queue.store, repo, f"{repo}|unrepaired|{sha}", title, body)
                return Outcome("skipped", line, url)
            existing = _find_discussion(api, repo, title_part=marker(sha), pr=True)
            if existing:
                return Outcome("done", "a pull request for this commit was open already", existing)
            plan = plan_push(
                done.repair.out,
                repo,
                create_pr=True,
                message=f"{title}: {commit_message(done.repair.report).split(': ', 1)[1]}",
                description="Opened by the adapter-repair bot: this commit's LoRA adapter "
                "answers harmful requests its base refuses. The PR holds the repaired adapter "
                "(same format and rank); see the card's repair section and repair_report.md.",
            )
            pushed = push(api, done.repair.out, plan, parent_commit=sha)
            return Outcome("done", "pull request opened", pushed.url)
    except NothingToRepair as e:
        url = None
        if settings.bot.comment_clean:
            title = f"{TITLE_PREFIX} checked {marker(sha)}: no repair needed"
            url = _discuss_once(api, queue.store, repo, f"{repo}|clean|{sha}", title, e.problem)
        return Outcome("skipped", e.problem, url)
    except AdapterRepairError as e:
        if isinstance(e, HubError) and e.transient:
            return Outcome("failed", f"{e.problem}", transient=True)
        reason = impossible_reason(e)
        if reason is None:
            return Outcome("failed", e.problem)
        title = f"{TITLE_PREFIX} cannot repair this adapter ({reason})"
        url = _discuss_once(
            api, queue.store, repo, f"{repo}|{reason}", title, f"{e.problem}\n\n{e.fix}"
        )
        return Outcome("skipped", f"cannot repair: {reason}: {e.problem}", url)


def _measures_text(report: dict[str, Any]) -> str:
    """The before/after table of a report as Markdown (empty when nothing was measured)."""
    rows = measures_table(report.get("measures") or {})
    if not rows:
        return ""
    head = "| measure | " + " | ".join(name for _, name in COLUMNS) + " |"
    return "\n".join([head, "|---|---|---|---|", *("| " + " | ".join(r) + " |" for r in rows)])


def _download(api: HfApi, repo: str, sha: str, name: str) -> str:
    from huggingface_hub import hf_hub_download

    with hub_errors(f"download {name}", repo):
        return str(
            hf_hub_download(repo, name, revision=sha, endpoint=api.endpoint, token=api.token)
        )


def _discuss_once(
    api: HfApi, store: JobStore, repo: str, key: str, title: str, body: str
) -> str | None:
    """Open the discussion ``title`` unless this repo has it (on the Hub, or claimed by a
    concurrent job through ``store.once``); a failed attempt releases the claim, so a retry
    opens it."""
    if _find_discussion(api, repo, title_part=title, pr=False) or not store.once(key):
        return None
    try:
        with hub_errors("open a discussion", repo, writing=True):
            d = api.create_discussion(repo, title=title, description=body)
    except BaseException:
        store.forget(key)
        raise
    return str(d.url)


def store_unreachable(e: BaseException) -> bool:
    """Whether ``e`` is the job store (Redis, SQLite) failing for a while: a retry, never a
    permanent failure."""
    import sqlite3

    try:
        from redis import exceptions as redis_errors
    except ImportError:  # pragma: no cover - redis is a dependency of the Redis queue
        return isinstance(e, sqlite3.OperationalError)
    return isinstance(
        e, sqlite3.OperationalError | redis_errors.ConnectionError | redis_errors.TimeoutError
    )


def main(argv: list[str] | None = None, *, death_signal: bool = True) -> None:
    ap = argparse.ArgumentParser(
        description="Run one adapter-repair bot job (the worker starts it)."
    )
    ap.add_argument("job")
    ap.add_argument("owner")
    ap.add_argument("settings", help="file with the JobSettings as JSON")
    ap.add_argument("result", help="file to write the Outcome to, as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    if not death_signal:
        logger.warning("PR_SET_PDEATHSIG is not available: this job outlives a killed worker")
    settings = JobSettings.from_json(Path(args.settings).read_text(encoding="utf-8"))
    try:
        outcome = run_job(args.job, args.owner, settings, HfApi())
    except AdapterRepairError as e:  # a Hub error outside the pipeline's own handling
        outcome = Outcome("failed", e.problem, transient=getattr(e, "transient", False))
    except Exception as e:
        if store_unreachable(e):  # the queue's storage is down for a while: try again
            logger.warning("job %s: the job store is unreachable (%s)", args.job, e)
            outcome = Outcome("failed", scrub(f"job store unreachable: {e}"), transient=True)
        else:  # recorded with its reason rather than as a bare exit code
            logger.exception("job %s failed", args.job)
            outcome = Outcome("failed", scrub(f"{type(e).__name__}: {e}"))
    Path(args.result).write_text(json.dumps(outcome.__dict__), encoding="utf-8")


if __name__ == "__main__":
    main()
