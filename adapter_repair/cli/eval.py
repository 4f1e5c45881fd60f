"""``adapter-repair eval``: measure an adapter (harmful rate, over-refusal, task, fidelity)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from adapter_repair.cli.common import CONTEXT, text_table
from adapter_repair.cli.options import config_from, options_from
from adapter_repair.measure.config import EvalConfig, GenerationConfig
from adapter_repair.model.config import LoadConfig


@click.command(
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
@options_from(EvalConfig, exclude=("other_precision",))
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
    substrings or a guard model, with a 95% Wilson interval, and beside it the share of
    XSTest's 200 unsafe prompts it answers (another source's wording); over-refusal is the
    share of XSTest's 250 safe prompts (or --safe) it refuses.
    """
    from adapter_repair.measure import prompts as P
    from adapter_repair.measure.evaluate import EvalSets, default_sets, measure_model

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
        unsafe=defaults.unsafe,
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
    click.echo(text_table(report.rows(), ["measure", "value", "95% CI", "n"]))
