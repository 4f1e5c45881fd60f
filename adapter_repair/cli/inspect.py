"""``adapter-repair inspect``: validate an adapter folder and list its modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from adapter_repair.cli.common import CONTEXT, text_table
from adapter_repair.cli.options import config_from, options_from
from adapter_repair.model.config import LoadConfig

if TYPE_CHECKING:  # the library is imported inside the command: --help stays instant
    from adapter_repair.adapter import LoraAdapter


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


@click.command(
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
    from adapter_repair.model.loading import load_model
    from adapter_repair.model.walk import walk

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
    click.echo(text_table(rows, ["module", "r", "shape", "scaling", "layer", "role"]))
