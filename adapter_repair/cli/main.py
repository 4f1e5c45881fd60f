"""``adapter-repair``: the click group and its commands.

Results go to stdout (a table, or JSON with ``--json``); logs and progress bars to stderr.
Bad input ends with ``error: ...`` and ``fix: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from adapter_repair import __version__
from adapter_repair.cli.options import config_from, options_from
from adapter_repair.config import (
    BedConfig,
    BotConfig,
    EvalConfig,
    GenerationConfig,
    LoadConfig,
    ProjectConfig,
    PushConfig,
    RepairConfig,
    RestoreConfig,
)
from adapter_repair.errors import AdapterRepairError

if TYPE_CHECKING:  # the library is imported inside commands: --help stays instant
    from adapter_repair.adapter import LoraAdapter

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns an AdapterRepairError into a two-line message on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterRepairError as e:
            click.echo(f"error: {e.problem}", err=True)
            if e.fix:
                click.echo(f"  fix: {e.fix}", err=True)
            ctx.exit(e.exit_code)


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("adapter_repair")
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, min(level, logging.CRITICAL)))
    root.propagate = False


@click.group(
    cls=_Group,
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair inspect ./my-lora\n  adapter-repair inspect ./my-lora --base ./base-model --json",
)
@click.version_option(__version__, "--version", prog_name="adapter-repair")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (repeat for debug).")
@click.option(
    "-q", "--quiet", count=True, help="Less log output on stderr (warnings only; -qq: errors)."
)
def cli(verbose: int, quiet: int) -> None:
    """Repair the safety alignment of a LoRA adapter, at adapter rank.

    A LoRA fine-tune of a safety-aligned chat model often stops refusing harmful requests.
    adapter-repair takes the adapter and returns one of the same format and rank that refuses
    again and keeps its task skill.
    """
    _setup_logging(verbose, quiet)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _inspect_report(adapter: LoraAdapter, n_layers: int | None) -> dict[str, Any]:
    modules = []
    for m in adapter:
        modules.append(
            {
                "module": m.base_name,
                "rank": m.rank,
                "d_in": m.d_in,
                "d_out": m.d_out,
                "alpha": m.alpha,
                "scaling": m.scaling,
                "layer": m.layer,
                "role": m.role.value if m.role is not None else None,
            }
        )
    return {
        "adapter": str(adapter.source),
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "rank": adapter.rank,
        "use_rslora": adapter.use_rslora,
        "n_modules": len(adapter),
        "n_parameters": adapter.n_parameters(),
        "extra_tensors": sorted(adapter.extra_tensors),
        "n_decoder_layers": n_layers,
        "modules": modules,
    }


@cli.command(
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair inspect ./my-lora\n  adapter-repair inspect ./my-lora --base ./base-model --quant 4bit --json",
)
@click.argument("adapter", type=click.Path(path_type=Path))
@options_from(LoadConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--walk/--no-walk",
    "do_walk",
    default=None,
    help="Load the base and find each module's decoder layer and role "
    "(default: when --base is given).",
)
def inspect(adapter: Path, as_json: bool, do_walk: bool | None, **params: Any) -> None:
    """Validate a LoRA adapter folder and list its modules.

    Reads ADAPTER (a folder with adapter_config.json and adapter_model.safetensors) without
    changing it. With --base (or --walk, using the base the adapter names), it also loads the
    base, checks that the adapter fits it, and shows each module's decoder layer and role
    (reads from or writes into the residual stream).
    """
    from adapter_repair.adapter import load_adapter
    from adapter_repair.loading import load_model
    from adapter_repair.walk import walk

    config = config_from(LoadConfig, params)
    n_layers = None
    if do_walk or (do_walk is None and config.base is not None):
        peft_model, lora = load_model(adapter, config)
        mm = walk(peft_model)
        mm.annotate(lora)
        n_layers = mm.n_layers
    else:
        lora = load_adapter(adapter)
    report = _inspect_report(lora, n_layers)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"adapter  {report['adapter']}")
    click.echo(f"base     {report['base_model_name_or_path']}")
    click.echo(
        f"rank {report['rank']}{' (rsLoRA)' if report['use_rslora'] else ''}, "
        f"{report['n_modules']} modules, {report['n_parameters']:,} parameters"
    )
    rows = [
        [
            r["module"],
            r["rank"],
            f"{r['d_in']}->{r['d_out']}",
            f"{r['scaling']:.4g}",
            "-" if r["layer"] is None else r["layer"],
            r["role"] or "-",
        ]
        for r in report["modules"]
    ]
    click.echo(_table(rows, ["module", "r", "shape", "scaling", "layer", "role"]))


@cli.command(
    "eval",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n"
    "  adapter-repair eval ./my-lora\n"
    "  adapter-repair eval ./my-lora --no-adapter          # the aligned base under it\n"
    "  adapter-repair eval ./my-lora --task sst2.jsonl --match choice --json\n"
    "  adapter-repair eval ./my-lora --judge meta-llama/Llama-Guard-3-1B --quant 4bit",
)
@click.argument("adapter", required=False, type=click.Path(path_type=Path))
@click.option("--no-adapter", is_flag=True, help="Measure the base alone (the adapter disabled).")
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Also measure fidelity to this reference adapter on benign prompts.",
)
@click.option(
    "--harmful",
    type=click.Path(path_type=Path),
    help="Harmful prompts (csv/jsonl/txt) instead of AdvBench eval.",
)
@click.option(
    "--safe",
    type=click.Path(path_type=Path),
    help="Safe prompts for over-refusal instead of XSTest's.",
)
@click.option(
    "--benign",
    type=click.Path(path_type=Path),
    help="Benign prompts for fidelity instead of the shipped ones.",
)
@click.option(
    "--task", type=click.Path(path_type=Path), help="Task rows (prompt and answer) to score."
)
@click.option(
    "--prompt-column",
    help="Prompt column of csv/jsonl files (default: prompt, goal, question, ...).",
)
@click.option(
    "--answer-column", help="Answer column of task files (default: answer, target, output, ...)."
)
@options_from(EvalConfig)
@options_from(GenerationConfig)
@options_from(LoadConfig)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report (with every answer) as JSON."
)
def eval_command(
    adapter: Path | None,
    no_adapter: bool,
    reference: Path | None,
    harmful: Path | None,
    safe: Path | None,
    benign: Path | None,
    task: Path | None,
    prompt_column: str | None,
    answer_column: str | None,
    as_json: bool,
    **params: Any,
) -> None:
    """Measure a LoRA adapter: harmful rate, over-refusal, task score, fidelity.

    Answers are greedy, through the model's chat template. The harmful rate is the share of
    AdvBench's held-out eval requests (or --harmful) that the model answers, judged by refusal
    substrings or a guard model, with a 95% Wilson interval; over-refusal is the share of
    XSTest's 250 safe prompts (or --safe) it refuses.
    """
    from adapter_repair import prompts as P
    from adapter_repair.evaluate import EvalSets, default_sets, measure_model

    def read(path: Path | None, name: str, require_answers: bool = False) -> P.PromptSet | None:
        if path is None:
            return None
        return P.load_prompt_file(
            path,
            column=prompt_column,
            answer_column=answer_column,
            require_answers=require_answers,
            name=name,
        )

    if adapter is None and not no_adapter:
        raise click.UsageError("give an ADAPTER folder, or --no-adapter with --base.")
    if adapter is None and params.get("base") is None:
        raise click.UsageError("--no-adapter without an ADAPTER needs --base.")
    defaults = default_sets()
    sets = EvalSets(
        harmful=read(harmful, "harmful") or defaults.harmful,
        safe=read(safe, "safe") or defaults.safe,
        task=read(task, "task", require_answers=True),
        benign=read(benign, "benign") or defaults.benign,
    )
    report = measure_model(
        None if adapter is None else str(adapter),
        config_from(LoadConfig, params),
        config_from(GenerationConfig, params),
        config_from(EvalConfig, params),
        sets,
        no_adapter=no_adapter,
        reference=None if reference is None else str(reference),
    )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    what = "base (adapter disabled)" if no_adapter else str(adapter)
    click.echo(f"model  {what}")
    click.echo(f"judge  {report.info['judge']}; refusals: {report.info['refusal_list']}")
    click.echo(_table(report.rows(), ["measure", "value", "95% CI", "n"]))


def _repair_config(params: dict[str, Any]) -> RepairConfig:
    return dataclasses.replace(
        config_from(RepairConfig, params),
        project=config_from(ProjectConfig, params),
        restore=config_from(RestoreConfig, params),
    )


def _render_repair(outcome: Any, as_json: bool, pushed: Any = None) -> None:
    from adapter_repair.report import COLUMNS, measures_table

    report = outcome.report
    push = None
    if pushed is not None:
        push = {**pushed.plan.as_dict(), "url": pushed.url, "dry_run": pushed.dry_run}
    if as_json:
        click.echo(json.dumps({"out": str(outcome.out), **report, "push": push}, indent=2))
        return
    res = report["repair"]
    click.echo(f"repaired  {report['source']} -> {outcome.out}")
    click.echo(
        f"method {report['method']}; stopped: {res['stopped']}; "
        f"{100 * res['changed']:.2f}% of coordinates changed; {res['seconds']['total']:.1f} s"
    )
    rows = measures_table(report["measures"])
    if rows:
        click.echo(_table(rows, ["measure", *(name for _, name in COLUMNS)]))
    click.echo(f"report    {outcome.out / 'repair_report.md'}")
    if push is not None:
        kind = "pull request on" if push["create_pr"] else "commit to"
        if push["dry_run"]:
            click.echo(f"dry run: would push one {kind} {push['repo_id']}:")
            for f in push["files"]:
                click.echo(f"  {f['path']}  ({f['bytes']:,} bytes)")
        else:
            click.echo(f"pushed    {push['url']}")


@cli.command(
    "fix",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n"
    "  adapter-repair fix ./my-lora --out ./my-lora-repaired\n"
    "  adapter-repair fix ./my-lora --out ./fixed --task sst2.jsonl --match choice --quant 4bit\n"
    "  adapter-repair fix ./my-lora --out ./fixed --method project --no-measure --json\n"
    "  adapter-repair fix user/lora --pr                       # a pull request on the Hub repo\n"
    "  adapter-repair fix user/lora@v1 --push-to me/lora-safe --dry-run",
)
@click.argument("source")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Folder for the repaired adapter, its report and model card (must not exist, unless "
    "--overwrite). Default: NAME-repaired, beside a local SOURCE or in the working folder.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--task",
    type=click.Path(path_type=Path),
    help="Your task rows (prompt and answer; csv/jsonl): they guard the task during the "
    "repair and are scored before and after. Without them the guard is fidelity to the "
    "fine-tuned adapter on benign prompts.",
)
@click.option("--prompt-column", help="Prompt column of the task file (default: prompt, ...).")
@click.option("--answer-column", help="Answer column of the task file (default: answer, ...).")
@click.option(
    "--measure/--no-measure",
    default=True,
    show_default=True,
    help="Measure the aligned base, the fine-tuned and the repaired adapter.",
)
@options_from(PushConfig)
@options_from(RepairConfig)
@options_from(ProjectConfig)
@options_from(RestoreConfig)
@options_from(EvalConfig, exclude=("fidelity_prompts",))
@options_from(LoadConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def fix(
    source: str,
    out: Path | None,
    overwrite: bool,
    task: Path | None,
    prompt_column: str | None,
    answer_column: str | None,
    measure: bool,
    as_json: bool,
    **params: Any,
) -> None:
    """Repair a LoRA adapter folder: it refuses harmful requests again and keeps its task.

    Stage 1 projects the adapter's factors off the direction its fine-tune moved harmful
    prompts along (closed form); stage 2 sets a few adapter coordinates back to their aligned
    value (0), chosen by gradient, with a rollback and a guard that protect the task. The output
    is a PEFT adapter of the same format and rank, loadable with PeftModel.from_pretrained over
    the same base, with repair_report.{json,md,png} and a model card (README.md) beside it.

    SOURCE is a local adapter folder when one exists at that path, else a Hub repo id
    (owner/name, or owner/name@revision); its base comes from the adapter's config (or
    --base). SOURCE is only read; nothing is pushed unless --push-to or --pr is given. The
    Hub token is huggingface_hub's (HF_TOKEN, or `hf auth login`).
    """
    from adapter_repair import prompts as P
    from adapter_repair.hub.fix import fix as fix_source

    task_set = None
    if task is not None:
        task_set = P.load_prompt_file(
            task,
            column=prompt_column,
            answer_column=answer_column,
            require_answers=True,
            name="task",
        )
    try:
        config = _repair_config(params)
        push = config_from(PushConfig, params)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    done = fix_source(
        source,
        out,
        load=config_from(LoadConfig, params),
        config=config,
        evaluation=config_from(EvalConfig, params),
        task=task_set,
        measure=measure,
        overwrite=overwrite,
        push=push,
    )
    _render_repair(done.repair, as_json, done.pushed)


@cli.command(
    "demo",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair demo\n  adapter-repair demo --out ./pico-repaired --json",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for the repaired adapter and its report (replaced on each run). "
    "Default: next to the pico world in the cache.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def demo(out: Path | None, as_json: bool) -> None:
    """Break and repair an adapter end to end, offline, in minutes on a laptop CPU.

    Builds (or reuses) the pico world: a tiny chat model trained from scratch to refuse harmful
    requests, and a LoRA adapter that learnt a task with harmful requests answered mixed in (it
    does the task and answers harmful requests). Then repairs that adapter and prints the
    before/after table: harmful rate, over-refusal and task score of the aligned base, the
    fine-tuned adapter and the repaired one.
    """
    from adapter_repair.pico import build_pico_world, demo_repair

    world = build_pico_world()
    outcome = demo_repair(world, out)
    _render_repair(outcome, as_json)


@cli.group(
    cls=_Group,
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair bed build --world pico\n  adapter-repair bed show --json",
)
def bed() -> None:
    """Measurement beds: aligned chat models and adapters that broke them.

    The numbers of adapter-repair are measured on them. Every artifact is cached under a hash of
    its recipe: a second build reuses it, and an interrupted build resumes at the artifact it
    was on.
    """


def _render_bed(table: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(table.as_dict(), indent=2))
        return
    click.echo(f"world  {table.world}  ({table.root})")
    click.echo(_table(table.rows(), table.header))
    click.echo(f"build time {table.build_seconds / 60:.1f} min (sum over artifacts)")
    if table.missing:
        click.echo(f"not built yet: {', '.join(table.missing)}")


@bed.command(
    "build",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair bed build --world pico\n"
    "  adapter-repair bed build --world small --sst2 ./bench/data/sst2",
)
@options_from(BedConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON on stdout.")
def bed_build(as_json: bool, **params: Any) -> None:
    """Build (or reuse) a world and measure every model in it.

    Logs what it trains and the measures each model reached; progress bars on stderr; the
    table on stdout.
    """
    from adapter_repair.bed import build_bed

    cfg = config_from(BedConfig, params)
    _render_bed(build_bed(cfg.world, cache_dir=cfg.cache_dir, sst2=cfg.sst2), as_json)


@bed.command(
    "show",
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair bed show\n  adapter-repair bed show --world pico --json",
)
@options_from(BedConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON on stdout.")
def bed_show(as_json: bool, **params: Any) -> None:
    """Print a world's table from the cache (builds nothing, loads no model)."""
    from adapter_repair.bed import show_bed

    cfg = config_from(BedConfig, params)
    _render_bed(show_bed(cfg.world, cache_dir=cfg.cache_dir, sst2=cfg.sst2), as_json)


@cli.group(
    cls=_Group,
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
    help="Stop once the queue has been empty this long (batch runs); default: run until killed.",
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
            _repair_config(params),
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
        click.echo(_table(rows, ["state", "job", "attempts", "PR or why"]))


def main() -> None:  # pragma: no cover - console entry point
    cli()


if (
    __name__ == "__main__"
):  # python -m adapter_repair.cli.main (how the bot starts workers in tests)
    main()
