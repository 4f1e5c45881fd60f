"""``adapter-repair``: the click group; each command family lives in a module of its own
(:mod:`~adapter_repair.cli.fix`, :mod:`~adapter_repair.cli.eval`,
:mod:`~adapter_repair.cli.inspect`, :mod:`~adapter_repair.cli.demo`,
:mod:`~adapter_repair.cli.bed`, :mod:`~adapter_repair.cli.bot`).

Results go to stdout (a table, or JSON with ``--json``); logs and progress bars to stderr.
Bad input ends with ``error: ...`` and ``fix: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
import warnings

import click

from adapter_repair.cli.bed import bed
from adapter_repair.cli.bot import bot
from adapter_repair.cli.common import CONTEXT, Group
from adapter_repair.cli.demo import demo
from adapter_repair.cli.eval import eval_command
from adapter_repair.cli.fix import fix
from adapter_repair.cli.inspect import inspect
from adapter_repair.version import __version__


def _setup_logging(verbose: int, quiet: int) -> None:
    """Warnings by default, INFO with -v, DEBUG with -vv; -q errors only. Other libraries'
    notices that are not the user's business (bitsandbytes' missing optional CPU kernel
    on every import) only show with -vv."""
    level = logging.WARNING - 10 * verbose + 10 * quiet
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("adapter_repair")
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, min(level, logging.CRITICAL)))
    root.propagate = False
    logging.getLogger("bitsandbytes").setLevel(logging.WARNING if verbose >= 2 else logging.ERROR)
    if verbose < 2:  # PEFT asks every model a deprecated transformers attribute
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning
        )


@click.group(
    cls=Group,
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair inspect ./my-lora\n  adapter-repair inspect ./my-lora --base ./base-model --json",
)
@click.version_option(__version__, "--version", prog_name="adapter-repair")
@click.option("-v", "--verbose", count=True, help="Log what happens on stderr (INFO; -vv: debug).")
@click.option("-q", "--quiet", count=True, help="No progress bar; errors only on stderr.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Repair the safety alignment of a LoRA adapter, at adapter rank.

    A LoRA fine-tune of a safety-aligned chat model often stops refusing harmful requests.
    adapter-repair takes the adapter and returns one of the same format and rank that refuses
    again and keeps its task skill.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = {"verbose": verbose, "quiet": quiet}


for command in (inspect, eval_command, fix, demo, bed, bot):
    cli.add_command(command)


def main() -> None:  # pragma: no cover - console entry point
    cli()


if (
    __name__ == "__main__"
):  # python -m adapter_repair.cli.main (how the bot starts workers in tests)
    main()
