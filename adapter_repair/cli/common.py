"""What the commands share: the group class that turns library errors into two lines and
exit code 2, click's context settings, the plain-text table, the repair settings built from
the parsed options, and the rendering of a repair's outcome."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

import click

from adapter_repair.cli.options import config_from
from adapter_repair.errors import NOT_REPAIRED_EXIT_CODE, AdapterRepairError
from adapter_repair.repair.config import ProjectConfig, RepairConfig, RestoreConfig

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Group(click.Group):
    """Turns an AdapterRepairError into a two-line message on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterRepairError as e:
            click.echo(f"error: {e.problem}", err=True)
            if e.fix:
                click.echo(f"  fix: {e.fix}", err=True)
            ctx.exit(e.exit_code)


def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def repair_config(params: dict[str, Any]) -> RepairConfig:
    return dataclasses.replace(
        config_from(RepairConfig, params),
        project=config_from(ProjectConfig, params),
        restore=config_from(RestoreConfig, params),
    )


def settings_error(error: ValueError, ctx: click.Context) -> AdapterRepairError:
    """A config's ValueError ("rate must be in (0, 1]; got -1.0") as the project's two-line
    error, naming the options ("--rate must be ...") rather than the fields."""
    message = str(error)
    flags = {p.name: p.opts[0] for p in ctx.command.params if p.name and p.opts}
    # the names stand before the values ("...; got -1.0"): only there are words options
    head, sep, tail = message.partition("; got")
    if " must " in head:
        head = re.sub(r"\b[a-z][a-z_]*\b", lambda m: flags.get(m.group(0), m.group(0)), head)
    return AdapterRepairError(
        head + sep + tail,
        f"Change the value; `adapter-repair {ctx.command.name} --help` says what each option takes.",
    )


def push_command(report: dict[str, Any], out: Any) -> str:
    """The command that pushes a repaired folder: a pull request on the Hub repo it came
    from, else a repo of the user's own (huggingface_hub's CLI, installed with us)."""
    prov = report.get("provenance") or {}
    if prov.get("source_sha"):  # pulled from the Hub
        return f"hf upload {prov['source']} {out} --create-pr"
    return f"hf upload YOUR_NAME/{out.name} {out}"


def render_repair(
    outcome: Any, as_json: bool, pushed: Any = None, push_skipped: str | None = None
) -> None:
    """The repair's result on stdout; its first line says whether it reached its target. A
    repair that did not ends the command with exit code 3 (NOT_REPAIRED_EXIT_CODE), after
    everything is written."""
    from adapter_repair.repair.report import COLUMNS, measures_table, task_guard, verdict

    report = outcome.report
    res = report["repair"]
    push = None
    if pushed is not None:
        push = {**pushed.plan.as_dict(), "url": pushed.url, "dry_run": pushed.dry_run}
    if as_json:
        payload = {"out": str(outcome.out), **report, "push": push, "push_skipped": push_skipped}
        click.echo(json.dumps(payload, indent=2))
    else:
        line = verdict(res)
        word, detail = line.split(": ", 1)
        click.echo(f"{word}  {report['source']} -> {outcome.out}: {detail}")
        click.echo(
            f"method {report['method']}; stopped: {res['stopped']}; "
            f"{100 * res.get('zeroed', 0.0):.2f}% of coordinates restored to 0, "
            f"{100 * res['changed']:.2f}% changed; "
            f"{res['seconds']['total']:.1f} s"
        )
        click.echo(task_guard(report))
        rows = measures_table(report["measures"])
        header = ["measure", *(name for _, name in COLUMNS)]
        if rows:
            click.echo(f"measured over the base loaded as {report['quant']}:")
            click.echo(text_table(rows, header))
        other = report.get("other_precision")
        if other:
            click.echo(f"over the base at the other precision ({other['quant']}):")
            click.echo(text_table(measures_table(other), header))
        out = outcome.out
        click.echo(f"adapter   {out}")
        click.echo(f"report    {out / 'repair_report.md'} (and .json)")
        if (out / "repair_report.png").is_file():
            click.echo(f"plot      {out / 'repair_report.png'}")
        if push is None and not push_skipped and res.get("reached"):
            click.echo(f"push it   {push_command(report, out)}")
        if push_skipped:
            click.echo(push_skipped)
        if push is not None:
            kind = "pull request on" if push["create_pr"] else "commit to"
            if push["dry_run"]:
                click.echo(f"dry run: would push one {kind} {push['repo_id']}:")
                for f in push["files"]:
                    click.echo(f"  {f['path']}  ({f['bytes']:,} bytes)")
            else:
                click.echo(f"pushed    {push['url']}")
    if not res.get("reached"):
        click.get_current_context().exit(NOT_REPAIRED_EXIT_CODE)
