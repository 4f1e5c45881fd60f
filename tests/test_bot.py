"""The Hub CI bot: the receiver (real uvicorn on loopback), the queue and its job records on
SQLite and on a real redis-server, workers that open PRs on the local Hub server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi

from adapter_repair.cli.main import cli
from adapter_repair.hub.bot.config import BotConfig
from adapter_repair.hub.bot.job import JobSettings
from adapter_repair.hub.bot.queue import Queue, open_queue
from adapter_repair.hub.bot.receiver import create_app
from adapter_repair.hub.bot.worker import Worker
from adapter_repair.measure.config import EvalConfig
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import RepairConfig, RestoreConfig
from tests.conftest import _free_port
from tests.test_hub import fresh, publish

ALICE = "hf_alicewrite0000000000"
BOT = "hf_botwrite000000000000"
SECRET = "s3cret-webhook"
#: quick jobs: projection, measures on 8 prompts of each set, 8 new tokens
#: (a target of 1: the random tiny model's repair always reaches it; no second precision's
#: measures: these tests are about the bot)
WORKER_FLAGS = ["--method", "project", "--probe-prompts", "8", "--guard-prompts", "8",
                "--max-new-tokens", "8", "--limit", "8", "--quant", "none",
                "--target", "1", "--no-other-precision"]  # fmt: skip


def settings(queue_url: str, target: float = 1.0, **bot: Any) -> JobSettings:
    return JobSettings(
        BotConfig(queue=queue_url, **{"lease": 3.0, "retry_delay": 0.5, **bot}),
        LoadConfig(quant="none"),
        RepairConfig(
            method="project", probe_prompts=8, check_prompts=16, guard_prompts=8, max_new_tokens=8,
            restore=RestoreConfig(target=target),
        ),
        EvalConfig(limit=8, other_precision=False),
    )  # fmt: skip


def payload(
    repo: str, sha: str, *, ref: str = "refs/heads/main", scope: str = "repo.content"
) -> dict[str, Any]:
    """A Hub webhook body as the Hub sends it for a push (or, with ``scope="discussion"``, a
    PR event)."""
    body: dict[str, Any] = {
        "event": {"action": "update", "scope": scope},
        "repo": {
            "id": "0" * 24,
            "owner": {"id": "1" * 24},
            "headSha": sha,
            "name": repo,
            "private": False,
            "type": "model",
            "url": {"web": f"https://huggingface.co/{repo}", "api": f"/api/models/{repo}"},
        },
        "webhook": {"id": "2" * 24, "version": 3},
        "updatedRefs": [{"ref": ref, "oldSha": "3" * 40, "newSha": sha}],
    }
    if scope == "discussion":
        del body["updatedRefs"]
        body["discussion"] = {
            "id": "4" * 24,
            "num": 1,
            "author": {"id": "5" * 24},
            "url": {"web": f"https://huggingface.co/{repo}/discussions/1"},
            "title": "adapter-repair: restore refusals",
            "isPullRequest": True,
            "status": "open",
        }
    return body


class Receiver:
    """The FastAPI app under a real uvicorn server on a loopback port, in a thread."""

    def __init__(self, queue: Queue, secret: str = SECRET) -> None:
        import uvicorn

        self.port = _free_port()
        config = uvicorn.Config(
            create_app(queue, secret), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def post(self, body: Any, secret: str | None = SECRET) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Webhook-Secret"] = secret
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/webhook", data=data, headers=headers
        )
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health") as r:
            return dict(json.loads(r.read()))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def sqlite_queue(tmp_path: Path) -> Queue:
    return open_queue(f"sqlite:///{tmp_path / 'bot.db'}")


@pytest.fixture
def receiver(sqlite_queue: Queue) -> Iterator[Receiver]:
    r = Receiver(sqlite_queue)
    yield r
    r.stop()


def test_receiver_checks_the_secret_and_the_payload_and_queues_nothing_otherwise(
    receiver: Receiver, sqlite_queue: Queue
) -> None:
    good = payload("alice/lora", "a" * 40)
    assert receiver.post(good, secret=None)[0] == 401
    assert receiver.post(good, secret="wrong")[0] == 403
    assert receiver.post(good, secret=SECRET[:-1])[0] == 403
    assert receiver.post(b"{not json", secret=SECRET)[0] == 400
    assert receiver.post({"event": {"action": "update"}}, secret=SECRET)[0] == 400
    assert receiver.post({**good, "repo": {"name": "x"}}, secret=SECRET)[0] == 400
    assert sqlite_queue.store.jobs() == [] and sqlite_queue.depth() == 0
    assert receiver.health()["queue_depth"] == 0


def test_receiver_queues_one_job_per_main_commit_and_ignores_the_rest(
    receiver: Receiver, sqlite_queue: Queue
) -> None:
    sha = "b" * 40
    answers = [receiver.post(payload("alice/lora", sha)) for _ in range(5)]
    assert answers[0] == (202, {"status": "queued", "job": f"alice/lora@{sha}"})
    assert all(a == (200, {"status": "duplicate", "job": f"alice/lora@{sha}"}) for a in answers[1:])
    ignored = [
        payload("alice/lora", "c" * 40, ref="refs/pr/1"),  # the bot's own PR branch
        payload("alice/lora", "d" * 40, scope="discussion"),  # the bot's own PR, opened
        {
            **payload("alice/data", "e" * 40),
            "repo": {**payload("alice/data", "e" * 40)["repo"], "type": "dataset"},
        },
    ]
    for body in ignored:
        assert receiver.post(body) == (
            200,
            {"status": "ignored", "why": "not an update of a model's main"},
        )
    assert [j.id for j in sqlite_queue.store.jobs()] == [f"alice/lora@{sha}"]
    health = receiver.health()
    assert health["queue_depth"] == 1 and health["jobs"]["queued"] == 1


def test_a_push_without_updated_refs_is_queued_by_the_repos_head_sha(
    receiver: Receiver, sqlite_queue: Queue
) -> None:
    """Some Hub deliveries carry no ``updatedRefs``: the head sha, which the Hub names
    ``repo.headSha``, is the commit (WebhookPayload's ``head_sha`` never reads it)."""
    sha = "f" * 40
    body = payload("alice/lora", sha)
    del body["updatedRefs"]
    assert receiver.post(body) == (202, {"status": "queued", "job": f"alice/lora@{sha}"})
    del body["repo"]["headSha"]  # nothing names a commit: nothing to queue
    assert receiver.post(body)[1]["status"] == "ignored"
    assert [j.id for j in sqlite_queue.store.jobs()] == [f"alice/lora@{sha}"]


@pytest.fixture
def bot_hub(hub: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The local Hub, with the bot's token as the token of this process and its jobs."""
    monkeypatch.setenv("HF_TOKEN", BOT)
    return hub


@pytest.fixture
def base_repo(bot_hub: Any, tiny_chat_dir: Path, tmp_path: Path) -> str:
    """A tiny chat base on the local Hub, under a fresh name."""
    base = fresh("alice/base")
    publish(bot_hub, base, tiny_chat_dir, tmp_path / "base")
    return base


def queued_lora(hub: Any, queue: Queue | None, base: str, adapter: Path, tmp: Path) -> str:
    """Publish a LoRA over ``base``; with ``queue``, record and enqueue its job. Returns the
    job id (repo@sha)."""
    repo = fresh("alice/lora")
    sha = publish(hub, repo, adapter, tmp, base_model_name_or_path=base)
    if queue is not None:
        assert queue.store.add(repo, sha)
        queue.enqueue(f"{repo}@{sha}")
    return f"{repo}@{sha}"


def test_one_upload_one_pr_and_the_bots_own_pr_and_its_merge_are_ignored(
    bot_hub: Any, sqlite_queue: Queue, receiver: Receiver, base_repo: str,
    tiny_chat_adapter_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    hub = bot_hub
    repo, sha = queued_lora(hub, None, base_repo, tiny_chat_adapter_dir, tmp_path).split("@")
    for _ in range(5):  # the Hub retries deliveries: one job, one PR
        receiver.post(payload(repo, sha))
    Worker(sqlite_queue, settings(sqlite_queue.url)).run(max_idle=1)
    (job,) = sqlite_queue.store.jobs()
    assert job.state == "done", job
    (pr,) = hub.pull_requests(repo)
    assert pr["author"] == "repair-bot" and job.pr_url and job.pr_url.endswith(f"/{pr['num']}")
    assert hub.commits(repo)[0]["oid"] == sha  # nothing pushed to main

    # the PR's own events, then its merge by the owner: no new job does anything
    assert receiver.post(payload(repo, "f" * 40, scope="discussion"))[1]["status"] == "ignored"
    HfApi(token=ALICE).merge_pull_request(repo, pr["num"])
    merged = hub.commits(repo)[0]["oid"]
    assert receiver.post(payload(repo, merged))[0] == 202
    Worker(sqlite_queue, settings(sqlite_queue.url)).run(max_idle=1)
    merge_job = sqlite_queue.store.get(f"{repo}@{merged}")
    assert merge_job is not None and merge_job.state == "skipped"
    assert "adapter-repair's own" in merge_job.detail
    assert len(hub.pull_requests(repo)) == 1 and len(hub.discussions(repo)) == 1

    # the owner's next commit keeps the repaired weights: recognised by their sha256 on the card
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "NOTES.md").write_text("merged the repair")
    later = hub.upload_folder(repo, notes, message="add notes")
    assert receiver.post(payload(repo, later))[0] == 202
    Worker(sqlite_queue, settings(sqlite_queue.url)).run(max_idle=1)
    later_job = sqlite_queue.store.get(f"{repo}@{later}")
    assert later_job is not None and later_job.state == "skipped"
    assert "same weights" in later_job.detail
    assert len(hub.pull_requests(repo)) == 1

    status = CliRunner().invoke(cli, ["bot", "status", "--queue", sqlite_queue.url, "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["counts"] == {
        "queued": 0, "running": 0, "done": 1, "skipped": 2, "failed": 0
    }  # fmt: skip


def test_a_card_dataset_that_cannot_be_read_falls_back_to_the_fidelity_guard_and_says_so(
    bot_hub: Any, sqlite_queue: Queue, base_repo: str, tiny_chat_adapter_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The bot cannot ask for a task file: a card naming a dataset that is not there still
    gets its PR, guarded by fidelity, and the PR's report says the task was not guarded."""
    hub = bot_hub
    folder = tmp_path / "card-lora"
    shutil.copytree(tiny_chat_adapter_dir, folder)
    (folder / "README.md").write_text("---\ndatasets:\n- alice/no-such-data\n---\n# lora\n")
    jid = queued_lora(hub, sqlite_queue, base_repo, folder, tmp_path)
    repo = jid.split("@")[0]
    Worker(sqlite_queue, settings(sqlite_queue.url)).run(max_idle=1)
    job = sqlite_queue.store.get(jid)
    assert job is not None and job.state == "done", job
    (pr,) = hub.pull_requests(repo)
    report = json.loads(hub.files(repo, f"refs/pr/{pr['num']}")["repair_report.json"])
    assert report["repair"]["settings"]["guard"] == "fidelity"
    assert not report.get("task_rows")
    assert "task" not in (report.get("provenance") or {})
    card = hub.files(repo, f"refs/pr/{pr['num']}")["README.md"].decode()
    assert "task guard: none" in card


def test_an_adapter_that_cannot_be_repaired_gets_one_discussion_per_reason(
    bot_hub: Any, sqlite_queue: Queue, tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    hub = bot_hub
    repo = fresh("alice/pickled")
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_chat_adapter_dir, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    hub.create_repo(repo)
    shas = [hub.upload_folder(repo, folder)]
    (folder / "notes.txt").write_text("a second commit")
    shas.append(hub.upload_folder(repo, folder))
    for sha in shas:
        assert sqlite_queue.store.add(repo, sha)
        sqlite_queue.enqueue(f"{repo}@{sha}")
    # the first try to open the discussion meets a 503: retried, and still opened once
    hub.fail_next("POST", rf"/api/models/{repo}/discussions$", mode="status", status=503)
    Worker(sqlite_queue, settings(sqlite_queue.url)).run(max_idle=2)
    jobs = sqlite_queue.store.jobs()
    assert [j.state for j in jobs] == ["skipped", "skipped"]
    assert all("pickle weights only" in j.detail for j in jobs)
    (discussion,) = hub.discussions(repo)
    assert not discussion["is_pr"] and "pickle weights only" in discussion["title"]
    assert hub.pull_requests(repo) == []


def test_a_repair_that_misses_its_target_gets_a_discussion_with_its_numbers_not_a_pr(
    bot_hub: Any, sqlite_queue: Queue, base_repo: str, tiny_chat_adapter_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    hub = bot_hub
    jid = queued_lora(hub, sqlite_queue, base_repo, tiny_chat_adapter_dir, tmp_path)
    repo = jid.split("@")[0]
    Worker(sqlite_queue, settings(sqlite_queue.url, target=0.0)).run(max_idle=1)
    job = sqlite_queue.store.get(jid)
    assert job is not None and job.state == "skipped", job
    assert job.detail.startswith("not repaired: probe harmful rate"), job.detail
    assert hub.pull_requests(repo) == []
    (discussion,) = hub.discussions(repo)
    assert not discussion["is_pr"] and "could not repair" in discussion["title"]
    assert job.pr_url and job.pr_url.endswith(f"/{discussion['num']}")


def worker_process(queue_url: str, *flags: str) -> subprocess.Popen[bytes]:
    """`adapter-repair bot worker` in a process of its own, as deployed."""
    env = {**os.environ, "HF_TOKEN": BOT}
    cmd = [sys.executable, "-m", "adapter_repair.cli.main", "-q", "bot", "worker",
           "--queue", queue_url, *WORKER_FLAGS, *flags]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_is_completed_by_another_with_one_pr(
    bot_hub: Any, sqlite_queue: Queue, base_repo: str, tiny_chat_adapter_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """kill -9 while the worker's PR commit is on the wire: the commit lands, the worker never
    records it; after the lease expires another worker takes the job, finds the PR on the Hub
    and records it instead of pushing again."""
    hub = bot_hub
    jid = queued_lora(hub, sqlite_queue, base_repo, tiny_chat_adapter_dir, tmp_path)
    repo = jid.split("@")[0]
    hub.stalled.clear()
    hub.fail_next("POST", rf"/api/models/{repo}/commit/", mode="stall", seconds=2)
    first = worker_process(sqlite_queue.url, "--lease", "3")
    try:
        assert hub.stalled.wait(120), "the worker never reached its push"
        job = sqlite_queue.store.get(jid)
        assert job is not None and job.state == "running"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    time.sleep(2.5)  # the stalled commit lands; nobody is told
    assert len(hub.pull_requests(repo)) == 1
    Worker(sqlite_queue, settings(sqlite_queue.url)).run(max_idle=4)
    job = sqlite_queue.store.get(jid)
    assert job is not None and job.state == "done" and job.attempts == 2, job
    (pr,) = hub.pull_requests(repo)  # exactly one
    assert job.pr_url and job.pr_url.endswith(f"/{pr['num']}")


@pytest.mark.slow
def test_two_workers_on_redis_drain_eight_jobs_none_lost_none_twice(
    bot_hub: Any, redis_url: str, base_repo: str, tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    """Eight jobs, each about 25 s on two cores, so each worker takes several (the restart
    test below drains twenty through two outages)."""
    hub = bot_hub
    queue = open_queue(redis_url)
    receiver = Receiver(queue)
    repos = []
    n = 8
    try:
        for _ in range(n):
            jid = queued_lora(hub, None, base_repo, tiny_chat_adapter_dir, tmp_path)
            repo, sha = jid.split("@")
            assert receiver.post(payload(repo, sha))[0] == 202
            repos.append(repo)
    finally:
        receiver.stop()
    workers = [worker_process(redis_url, "--exit-when-idle", "5") for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    handled = [int(o.split("after ")[1].split(" job")[0]) for o in outputs]
    assert sum(handled) == n and min(handled) > 0, handled  # both worked, none twice
    jobs = queue.store.jobs()
    assert len(jobs) == n and all(j.state == "done" and j.attempts == 1 for j in jobs), jobs
    assert [len(hub.pull_requests(r)) for r in repos] == [1] * n
    assert queue.depth() == 0


def test_a_transient_hub_error_is_retried_and_a_job_past_its_timeout_is_failed(
    bot_hub: Any, sqlite_queue: Queue, base_repo: str, tiny_chat_adapter_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    hub = bot_hub
    jid = queued_lora(hub, sqlite_queue, base_repo, tiny_chat_adapter_dir, tmp_path)
    repo = jid.split("@")[0]
    hub.fail_next("GET", rf"/api/models/{repo}/revision/", mode="status", status=503)
    Worker(sqlite_queue, settings(sqlite_queue.url)).run(max_idle=2)
    job = sqlite_queue.store.get(jid)
    assert job is not None and job.state == "done" and job.attempts == 2, job
    assert len(hub.pull_requests(repo)) == 1

    slow = queued_lora(hub, sqlite_queue, base_repo, tiny_chat_adapter_dir, tmp_path)
    Worker(sqlite_queue, settings(sqlite_queue.url, job_timeout=0.5)).run(max_idle=1)
    job = sqlite_queue.store.get(slow)
    assert job is not None and job.state == "failed" and "timed out" in job.detail, job
    assert hub.pull_requests(slow.split("@")[0]) == []


def test_the_bot_never_loads_a_local_base_named_by_an_uploaded_config_and_resends_lost_jobs(
    bot_hub: Any, sqlite_queue: Queue, tiny_chat_dir: Path, tiny_chat_adapter_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """An uploader's base_model_name_or_path that names a folder of the worker's machine is
    refused (one discussion says why); and a job recorded whose message was lost (a crash
    between record and enqueue) is sent again once it has been queued too long."""
    hub = bot_hub
    jid = queued_lora(hub, None, str(tiny_chat_dir), tiny_chat_adapter_dir, tmp_path)
    repo, sha = jid.split("@")
    assert sqlite_queue.store.add(repo, sha)  # recorded, never enqueued
    quick = settings(sqlite_queue.url, lease=0.4, retry_delay=0.1, retries=1)
    Worker(sqlite_queue, quick).run(max_idle=3)
    job = sqlite_queue.store.get(jid)
    assert job is not None and job.state == "skipped", job
    assert "base model unreachable" in job.detail and "not a Hub repo id" in job.detail
    (discussion,) = hub.discussions(repo)
    assert "base model unreachable" in discussion["title"]
    assert hub.pull_requests(repo) == []


@pytest.mark.slow
def test_an_adapter_that_still_refuses_is_skipped_silently_unless_asked_to_comment(
    bot_hub: Any, sqlite_queue: Queue, pico_world: Any, tmp_path: Path
) -> None:
    """A LoRA that changes nothing (B = 0, as PEFT initialises it) over the aligned pico base
    refuses like the base: under the threshold, the job is skipped with no word on the Hub;
    with --comment-clean, one discussion says so."""
    import dataclasses

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.models import lora_config

    hub = bot_hub
    base = fresh("alice/pico-base")
    hub.create_repo(base)
    hub.upload_folder(base, pico_world.base_dir)
    noop = tmp_path / "noop"
    model = AutoModelForCausalLM.from_pretrained(pico_world.base_dir)
    get_peft_model(model, lora_config()).save_pretrained(str(noop))
    jid = queued_lora(hub, sqlite_queue, base, noop, tmp_path)
    repo = jid.split("@")[0]
    quiet = settings(sqlite_queue.url, threshold=0.5)
    quiet = dataclasses.replace(
        quiet,
        repair=dataclasses.replace(quiet.repair, max_new_tokens=16),
        evaluation=EvalConfig(limit=16, other_precision=False),
    )
    Worker(sqlite_queue, quiet).run(max_idle=1)
    job = sqlite_queue.store.get(jid)
    assert job is not None and job.state == "skipped" and "nothing to repair" in job.detail, job
    assert hub.discussions(repo) == []

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "NOTES.md").write_text("a second commit")
    sha = hub.upload_folder(repo, notes)
    assert sqlite_queue.store.add(repo, sha)
    sqlite_queue.enqueue(f"{repo}@{sha}")
    talk = dataclasses.replace(quiet, bot=dataclasses.replace(quiet.bot, comment_clean=True))
    Worker(sqlite_queue, talk).run(max_idle=1)
    job = sqlite_queue.store.get(f"{repo}@{sha}")
    assert job is not None and job.state == "skipped" and job.pr_url, job
    (discussion,) = hub.discussions(repo)
    assert "no repair needed" in discussion["title"] and not discussion["is_pr"]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_job_store_transitions_are_compare_and_set(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same behaviour on both stores: one record per (repo, sha); one claimer; only the
    owner renews and finishes; a lapsed lease is reclaimed once; a stale queued job is touched
    once per period; once/forget."""
    url = (
        f"sqlite:///{tmp_path / 'bot.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("redis_url")
    )
    store = open_queue(url).store
    repo = fresh("alice/store")
    jid = f"{repo}@{'a' * 40}"
    assert store.add(repo, "a" * 40) and not store.add(repo, "a" * 40)
    assert store.claim(jid, "w1") and not store.claim(jid, "w2")
    assert store.heartbeat(jid, "w1") and not store.heartbeat(jid, "w2")
    assert not store.reclaim(jid, lease=60)  # alive
    time.sleep(0.3)
    assert jid in store.expired(0.2)
    assert store.reclaim(jid, lease=0.2) and not store.reclaim(jid, lease=0.2)
    assert not store.finish(jid, "w1", "done", "late")  # w1 lost it
    job = store.get(jid)
    assert job is not None and job.state == "queued" and job.attempts == 1
    time.sleep(0.3)
    assert jid in store.stale(0.2)
    assert store.touch(jid, 0.2) and not store.touch(jid, 0.2)
    assert store.claim(jid, "w2") and store.finish(jid, "w2", "done", "ok", "http://pr/1")
    job = store.get(jid)
    assert job is not None and (job.state, job.pr_url, job.attempts) == ("done", "http://pr/1", 2)
    assert store.counts()["done"] >= 1
    key = f"{repo}|reason"
    assert store.once(key) and not store.once(key)
    store.forget(key)
    assert store.once(key)


def test_a_worker_refuses_to_start_without_a_token_that_can_write(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    for token, message in [
        (None, "a Hugging Face token is needed to open pull requests as the bot"),
        ("hf_bobread0000000000000", "is read-only: it cannot open pull requests"),
    ]:
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        result = CliRunner().invoke(cli, ["bot", "worker", "--queue", url, "--exit-when-idle", "0"])
        assert result.exit_code == 2, result.output
        assert message in result.output and "fix:" in result.output
        assert "hf_bobread" not in result.output
    bad = CliRunner().invoke(cli, ["bot", "worker", "--queue", url, "--retries", "5"])
    assert bad.exit_code == 2 and "must be below max-attempts" in bad.output


def test_bot_status_refuses_a_queue_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    result = CliRunner().invoke(cli, ["bot", "status", "--queue", f"sqlite:///{missing}"])
    assert result.exit_code == 2 and "no bot queue at" in result.output and "fix:" in result.output
    assert not missing.exists()  # no empty queue created by a typo
    bad = CliRunner().invoke(cli, ["bot", "status", "--queue", "ftp://x"])
    assert bad.exit_code == 2 and "unknown scheme" in bad.output


# --- faults of the queue's storage (issue 18)


class RestartableRedis:
    """A redis-server of its own (appendonly on) that a test can stop and start again on the
    same port, as an operator's restart does."""

    def __init__(self, folder: Path) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: apt-get install -y redis-server")
        self.exe, self.folder, self.port = exe, folder, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)  # by its PID, as an operator would
        self.proc.wait(10)


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    (tmp_path / "redis").mkdir()
    r = RestartableRedis(tmp_path / "redis")
    yield r
    if r.proc is not None and r.proc.poll() is None:
        r.proc.terminate()
        r.proc.wait(10)


def test_the_queue_depth_counts_jobs_not_messages(sqlite_queue: Queue) -> None:
    assert sqlite_queue.store.add("alice/lora", "a" * 40)
    jid = f"alice/lora@{'a' * 40}"
    for _ in range(3):  # a re-send and a reclaim: more messages, one job
        sqlite_queue.enqueue(jid)
    assert sqlite_queue.depth() == 1


def test_a_webhook_the_store_cannot_record_gets_503_and_its_redelivery_one_job(
    sqlite_queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    real_add = sqlite_queue.store.add
    calls = {"n": 0}

    def flaky_add(repo: str, sha: str) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return real_add(repo, sha)

    monkeypatch.setattr(sqlite_queue.store, "add", flaky_add)
    receiver = Receiver(sqlite_queue)
    try:
        body = payload("alice/lora", "a" * 40)
        data = json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{receiver.port}/webhook",
            data=data,
            headers={"Content-Type": "application/json", "X-Webhook-Secret": SECRET},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 503 and e.value.headers["Retry-After"]
        assert receiver.post(body)[0] == 202  # the Hub delivers it again
        assert receiver.post(body)[1]["status"] == "duplicate"
    finally:
        receiver.stop()
    assert [j.id for j in sqlite_queue.store.jobs()] == [f"alice/lora@{'a' * 40}"]


def test_a_worker_loop_outlives_errors_of_its_queue(
    sqlite_queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def broken_next() -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return None

    monkeypatch.setattr(sqlite_queue, "next", broken_next)
    worker = Worker(sqlite_queue, settings(sqlite_queue.url), poll=0.01)
    worker.run(max_idle=0.3)
    assert calls["n"] > 3  # it went on past the three errors, and then stopped idle


def test_a_worker_records_a_jobs_end_once_redis_is_back_instead_of_leaving_it_running(
    restartable_redis: RestartableRedis,
) -> None:
    """The end of a job that comes while Redis is down is written when it returns: left
    ``running``, the job would wait a whole lease, and a worker that exits when idle would
    never see it reclaimed (a CI run lost a job that way)."""
    queue = open_queue(restartable_redis.url)
    worker = Worker(queue, settings(queue.url), poll=0.05)
    store = queue.store
    assert store.add("alice/lora", "b" * 40)
    jid = f"alice/lora@{'b' * 40}"
    owner = worker.owner()
    assert store.claim(jid, owner)
    restartable_redis.stop()
    result: list[bool] = []
    writer = threading.Thread(
        target=lambda: result.append(
            worker._record(jid, lambda: store.finish(jid, owner, "done", "ok", "http://pr/1"))
        )
    )
    writer.start()
    time.sleep(1.5)
    assert writer.is_alive() and not result  # still trying
    restartable_redis.start()
    writer.join(30)
    job = store.get(jid)
    assert result == [True] and job is not None
    assert (job.state, job.pr_url) == ("done", "http://pr/1")
    # a stopped worker gives up (the lease brings the job back); a wrong owner is refused
    other = f"alice/lora@{'c' * 40}"
    assert store.add("alice/lora", "c" * 40) and store.claim(other, owner)
    restartable_redis.stop()
    worker.stop.set()
    assert worker._record(other, lambda: store.finish(other, owner, "done", "x")) is False
    restartable_redis.start()
    assert worker._record(other, lambda: store.finish(other, "someone", "failed", "x")) is False
    job = store.get(other)
    assert job is not None and job.state == "running" and job.owner == owner


def test_a_batch_worker_waits_for_a_scheduled_retry_before_it_calls_itself_idle(
    sqlite_queue: Queue,
) -> None:
    """A retry scheduled for later is no message yet: a worker run with --exit-when-idle
    shorter than the retry's delay must still be there to run it."""
    store = sqlite_queue.store
    assert store.add("alice/lora", "d" * 40)
    jid = f"alice/lora@{'d' * 40}"
    sqlite_queue.enqueue(jid, delay=1.5)
    worker = Worker(sqlite_queue, settings(sqlite_queue.url), poll=0.05)
    ran: list[float] = []

    def handle(j: str) -> None:  # the job's work itself is not what this test is about
        owner = worker.owner()
        assert store.claim(j, owner) and store.finish(j, owner, "done", "ok")
        ran.append(time.time())

    worker.handle = handle  # type: ignore[method-assign,assignment]
    started = time.time()
    worker.run(max_idle=0.2)
    job = store.get(jid)
    assert job is not None and job.state == "done"
    assert len(ran) == 1 and ran[0] - started >= 1.4
    assert worker.unfinished() == 0


def test_a_job_that_cannot_read_the_store_is_a_retry_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from adapter_repair.hub.bot import job

    def unreachable(*_: Any, **__: Any) -> Any:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")

    monkeypatch.setattr(job, "run_job", unreachable)
    out = tmp_path / "outcome.json"
    cfg = tmp_path / "settings.json"
    cfg.write_text(settings(f"redis://127.0.0.1:{_free_port()}/0").to_json())
    job.main(["alice/lora@" + "a" * 40, "owner", str(cfg), str(out)])
    outcome = json.loads(out.read_text())
    assert outcome["transient"] is True and "job store unreachable" in outcome["detail"]


def test_a_job_process_whose_worker_is_gone_exits_before_importing_the_repair_stack() -> None:
    env = {**os.environ, "ADAPTER_REPAIR_WORKER_PID": "1"}  # not its parent
    cmd = [sys.executable, "-X", "importtime", "-m", "adapter_repair.hub.bot.jobmain", "j", "o",
           "s", "r"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "the worker that started this job is gone" in done.stderr
    assert " torch" not in done.stderr and "transformers" not in done.stderr


def test_bot_serve_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys; from adapter_repair.cli.main import cli; "
        "from adapter_repair.hub.bot.receiver import create_app; "
        "from adapter_repair.hub.bot.queue import open_queue; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.slow
def test_two_workers_ride_out_two_redis_restarts_and_a_webhook_in_the_outage(
    bot_hub: Any,
    restartable_redis: RestartableRedis,
    base_repo: str,
    tiny_chat_adapter_dir: Path,
    tmp_path: Path,
) -> None:
    hub, redis_server = bot_hub, restartable_redis
    queue = open_queue(redis_server.url)
    repos = []
    for _ in range(20):
        jid = queued_lora(hub, queue, base_repo, tiny_chat_adapter_dir, tmp_path)
        repos.append(jid.split("@")[0])
    workers = [worker_process(redis_server.url, "--exit-when-idle", "8") for _ in range(2)]
    receiver = Receiver(queue)
    try:
        late = queued_lora(hub, None, base_repo, tiny_chat_adapter_dir, tmp_path)
        repo, sha = late.split("@")
        for _ in range(2):
            time.sleep(4)
            redis_server.stop()
            status, _ = receiver.post(payload(repo, sha))  # a webhook during the outage
            assert status == 503
            time.sleep(2)
            assert all(w.poll() is None for w in workers)  # still running
            redis_server.start()
        assert receiver.post(payload(repo, sha))[0] == 202  # the Hub's redelivery
        repos.append(repo)
    finally:
        receiver.stop()
    outputs = [w.communicate(timeout=900)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    jobs = queue.store.jobs()
    assert len(jobs) == 21 and all(j.state == "done" for j in jobs), [
        (j.id, j.state, j.detail) for j in jobs if j.state != "done"
    ]
    assert [len(hub.pull_requests(r)) for r in repos] == [1] * 21
    assert queue.depth() == 0
