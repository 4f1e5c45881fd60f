"""``adapter-repair demo``: break and repair an adapter of the pico world, offline."""

from __future__ import annotations

from pathlib import Path

import click

from adapter_repair.cli.common import CONTEXT, render_repair


@click.command(
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
    from adapter_repair.beds.demo import demo_repair
    from adapter_repair.beds.pico import PicoRecipe, build_pico_world
    from adapter_repair.settings import cache_root

    where = cache_root() / "pico" / PicoRecipe().key()
    if not (where / "manifest.json").is_file():
        click.echo(
            f"building the pico world first (once: about a minute on 2 CPU cores, cached in "
            f"{where}; set ADAPTER_REPAIR_CACHE to put it elsewhere)",
            err=True,
        )
    world = build_pico_world()
    outcome = demo_repair(world, out)
    render_repair(outcome, as_json)
