"""The webhook receiver: a FastAPI app that takes Hub webhooks and enqueues a job for each
update of a model repo's main branch.

It makes no Hub call and runs no repair, so it answers within milliseconds: it checks the
``X-Webhook-Secret`` header in constant time (401 without one, 403 for a wrong one), parses the
body with huggingface_hub's ``WebhookPayload`` (400 when it does not parse), and records the job
(repo, commit sha) once: the same webhook delivered again finds the record and queues nothing.
Discussion and PR events (the bot's own PRs among them) are not updates of main and are
ignored; the commit a merge of the bot's PR makes is recognised by the worker.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from huggingface_hub import WebhookPayload
from pydantic import ValidationError

from adapter_repair.hub.bot.queue import Queue
from adapter_repair.hub.bot.store import job_id
from adapter_repair.version import __version__

logger = logging.getLogger(__name__)
MAIN = "refs/heads/main"
RETRY_AFTER = 30  #: seconds the Hub is asked to wait before delivering a webhook again


def main_update(payload: WebhookPayload, body: dict[str, Any] | None = None) -> str | None:
    """The new commit sha of a model repo's main branch, when ``payload`` is such an update:
    from ``updatedRefs``, else the repo's head. The Hub sends the head as ``repo.headSha``,
    which ``WebhookPayload`` (its field is ``head_sha``, with no alias) does not read, so it is
    taken from the raw ``body`` too."""
    if payload.repo.type != "model":
        return None
    if payload.event.scope != "repo.content" or payload.event.action != "update":
        return None
    if payload.updatedRefs is not None:
        for ref in payload.updatedRefs:
            if ref.ref == MAIN and ref.newSha and set(ref.newSha) != {"0"}:
                return ref.newSha
        return None
    if payload.repo.head_sha:
        return payload.repo.head_sha
    repo = (body or {}).get("repo")
    head = repo.get("headSha") if isinstance(repo, dict) else None
    return head if isinstance(head, str) and head else None


def create_app(queue: Queue, secret: str) -> FastAPI:
    """The receiver over ``queue``, checking webhooks against ``secret``."""
    if not secret:
        raise ValueError("the webhook secret must not be empty")
    app = FastAPI(title="adapter-repair bot", version=__version__)
    expected = secret.encode()

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        given = request.headers.get("x-webhook-secret")
        if given is None:
            return JSONResponse({"error": "missing X-Webhook-Secret header"}, status_code=401)
        if not hmac.compare_digest(given.encode(), expected):
            return JSONResponse({"error": "wrong X-Webhook-Secret"}, status_code=403)
        body = await request.body()
        try:
            payload = WebhookPayload.model_validate_json(body)
        except (ValidationError, ValueError) as e:
            n = e.error_count() if isinstance(e, ValidationError) else 1
            return JSONResponse(
                {"error": f"not a Hub webhook payload ({n} problem(s))"}, status_code=400
            )
        sha = main_update(payload, json.loads(body))
        if sha is None:
            return JSONResponse({"status": "ignored", "why": "not an update of a model's main"})
        repo = payload.repo.name
        jid = job_id(repo, sha)
        try:  # storage blocks (a disk sync, a round trip): off the event loop
            added = await run_in_threadpool(queue.store.add, repo, sha)
        except Exception as e:  # not recorded: the Hub must deliver it again
            logger.warning("could not record %s (%s: %s): answered 503", jid, type(e).__name__, e)
            return JSONResponse(
                {"error": "the job store is unavailable; deliver this webhook again"},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        if not added:
            return JSONResponse({"status": "duplicate", "job": jid})
        try:
            await run_in_threadpool(queue.enqueue, jid)
        except Exception as e:  # recorded: the workers' sweep re-sends a job left queued
            logger.warning("recorded %s but could not enqueue it (%s); the sweep will", jid, e)
        logger.info("queued %s", jid)
        return JSONResponse({"status": "queued", "job": jid}, status_code=202)

    @app.get("/health", response_model=None)
    def health() -> dict[str, Any] | JSONResponse:
        try:
            counts = queue.store.counts()
        except Exception as e:
            return JSONResponse(
                {"status": "unavailable", "error": f"job store: {type(e).__name__}"},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        return {"status": "ok", "queue_depth": counts.get("queued", 0), "jobs": counts}

    return app
