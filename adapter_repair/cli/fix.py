"""``adapter-repair fix``: repair an adapter folder or Hub repo, and push it when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapter_repair.cli.common import CONTEXT, render_repair, repair_config
from adapter_repair.cli.options import config_from, options_from
from adapter_repair.hub.config import PushConfig
from adapter_repair.measure.config import EvalConfig
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import ProjectConfig, RepairConfig, RestoreConfig


@click.command(
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
    help="Your task rows (prompt and answer; csv/jsonl), split by a hash of the prompt into "
    "fit rows (the task loss the repair protects), guard rows (the guard) and score rows (the "
    "before/after task score): at least 32 rows, hundreds for a steady guard. Without them the "
    "guard is fidelity to the fine-tuned adapter on benign prompts.",
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
    from adapter_repair.hub.fix import fix as fix_source
    from adapter_repair.measure import prompts as P

    task_set = None
    if task is not None:
        task_set = P.load_prompt_file(
            task,
            column=prompt_column,
            answer_column=answer_column,
            require_answers=True,
            name="task",
        )
        # too few rows for fit, guard and score: said now, before any download or load
        P.split_task(task_set, stratify=params.get("match") == "choice")
    try:
        config = repair_config(params)
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
    render_repair(done.repair, as_json, done.pushed, done.push_skipped)
