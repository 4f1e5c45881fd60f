"""``adapter-repair bot``: the Hub CI bot's receiver, workers and status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from adapter_repair.cli.common import CONTEXT, Group, repair_config, text_table
from adapter_repair.cli.options import config_from, options_from
from adapter_repair.errors import AdapterRepairError
from adapter_repair.hub.bot.config import BotConfig
from adapter_repair.measure.config import EvalConfig
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import ProjectConfig, RepairConfig, RestoreConfig


@click.group(
    cls=Group,
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n"
    "  ADAPTER_REPAIR_WEBHOOK_SECRET=s3cret adapter-repair bot serve --port 8000\n"
    "  HF_TOKEN=hf_... adapter-repair bot worker --queue redis://localhost:6379/0\n"
    "  adapter-repair bot status --json",
)
def bot() -> None:
    """The Hub CI bot: a webhook receiver, a durable queue and workers that open repair PRs.

    `serve` takes Hub webhooks and queues one job per update of a model repo's main branch;
    `worker` checks each repo, repairs LoRA adapters that answer harmful requests and opens a
    pull request (never a push to main); `status` lists the jobs by state. The queue is huey
    on SQLite by default, on Redis with --queue redis://... for many workers.
    """


@bot.command(
    "serve",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n"
    "  ADAPTER_REPAIR_WEBHOOK_SECRET=s3cret adapter-repair bot serve\n"
    "  adapter-repair bot serve --host 0.0.0.0 --port 8080 --queue redis://localhost:6379/0",
)
@click.option(
    "--secret",
    envvar="ADAPTER_REPAIR_WEBHOOK_SECRET",
    show_envvar=True,
    required=True,
    help="The webhook's secret, as set on the Hub (checked against X-Webhook-Secret).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@options_from(BotConfig, exclude=tuple(f for f in BotConfig.__dataclass_fields__ if f != "queue"))
def bot_serve(secret: str, host: str, port: int, **params: Any) -> None:
    """Receive Hub webhooks on POST /webhook; GET /health reports the queue depth and jobs."""
    import uvicorn

    from adapter_repair.hub.bot.queue import open_queue
    from adapter_repair.hub.bot.receiver import create_app

    cfg = _bot_config(params)
    app = create_app(open_queue(cfg.queue_url()), secret)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _bot_config(params: dict[str, Any]) -> BotConfig:
    try:
        return config_from(BotConfig, params)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


@bot.command(
    "worker",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n"
    "  HF_TOKEN=hf_... adapter-repair bot worker\n"
    "  adapter-repair bot worker --queue redis://gpu-queue:6379/0 --threshold 0.2 --quant 4bit",
)
@click.option(
    "--exit-when-idle",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Stop once no job has come for this long and none is queued (a retry waiting "
    "included) or running (batch runs); default: run until killed.",
)
@options_from(BotConfig)
@options_from(RepairConfig)
@options_from(ProjectConfig)
@options_from(RestoreConfig)
@options_from(EvalConfig, exclude=("fidelity_prompts",))
@options_from(LoadConfig)
def bot_worker(exit_when_idle: float | None, **params: Any) -> None:
    """Run jobs: check the repo, pull, measure, repair, open a PR (or one discussion saying
    why not). The token is huggingface_hub's (HF_TOKEN, `hf auth login`); the repair settings
    are those of `adapter-repair fix`."""
    from adapter_repair.hub.bot.job import JobSettings
    from adapter_repair.hub.bot.worker import run_worker

    cfg = _bot_config(params)
    try:
        settings = JobSettings(
            cfg,
            config_from(LoadConfig, params),
            repair_config(params),
            config_from(EvalConfig, params),
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    worker = run_worker(cfg.queue_url(), settings, max_idle=exit_when_idle)
    click.echo(f"worker stopped after {worker.handled} job(s)")


@bot.command(
    "status",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair bot status\n"
    "  adapter-repair bot status --queue redis://localhost:6379/0 --json",
)
@options_from(BotConfig, exclude=tuple(f for f in BotConfig.__dataclass_fields__ if f != "queue"))
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON on stdout.")
def bot_status(as_json: bool, **params: Any) -> None:
    """The jobs by state (queued, running, done, skipped, failed), and the queue's depth."""
    from adapter_repair.hub.bot.queue import open_queue

    url = _bot_config(params).queue_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite://")).is_file():
        raise AdapterRepairError(
            f"no bot queue at {url}.",
            "Pass the --queue (or ADAPTER_REPAIR_QUEUE) that `bot serve` and `bot worker` use.",
        )
    queue = open_queue(url)
    jobs = sorted(queue.store.jobs(), key=lambda j: j.updated)
    counts = queue.store.counts()
    if as_json:
        payload = {
            "queue_depth": queue.depth(),
            "counts": counts,
            "jobs": [j.as_dict() for j in jobs],
        }
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(
        f"queue depth {queue.depth()}; " + ", ".join(f"{state} {n}" for state, n in counts.items())
    )
    rows = [[j.state, j.id, j.attempts, j.pr_url or j.detail] for j in jobs[-50:]]
    if rows:
        click.echo(text_table(rows, ["state", "job", "attempts", "PR or why"]))
