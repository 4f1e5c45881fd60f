"""``adapter-repair bed``: build and show the measurement beds."""

from __future__ import annotations

import json
from typing import Any

import click

from adapter_repair.beds.config import BedConfig
from adapter_repair.cli.common import CONTEXT, Group, text_table
from adapter_repair.cli.options import config_from, options_from


@click.group(
    cls=Group,
    context_settings=CONTEXT,
    epilog="\b\nExamples:\n  adapter-repair bed build --world pico\n  adapter-repair bed show --json",
)
def bed() -> None:
    """Measurement beds: aligned chat models and adapters that broke them.

    The numbers of adapter-repair are measured on them. Every artifact is cached under a hash of
    its recipe: a second build reuses it, and an interrupted build resumes at the artifact it
    was on.
    """


def _render_bed(bed_table: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(bed_table.as_dict(), indent=2))
        return
    click.echo(f"world  {bed_table.world}  ({bed_table.root})")
    click.echo(text_table(bed_table.rows(), bed_table.header))
    click.echo(f"build time {bed_table.build_seconds / 60:.1f} min (sum over artifacts)")
    if bed_table.missing:
        click.echo(f"not built yet: {', '.join(bed_table.missing)}")


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
    from adapter_repair.beds.bed import build_bed

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
    from adapter_repair.beds.bed import show_bed

    cfg = config_from(BedConfig, params)
    _render_bed(show_bed(cfg.world, cache_dir=cfg.cache_dir, sst2=cfg.sst2), as_json)
