"""``adapter-repair fix``: repair an adapter folder or Hub repo, and push it when asked.

The help shows the options most runs need first, then the rest in sections (cloup's option
groups): repair, the stage-2 and stage-1 settings (named by the method that runs them),
measurement, loading and the Hub. Every setting is checked before torch is imported, so a bad
value is said at once, in the ``error:`` / ``fix:`` form, naming its option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import cloup

from adapter_repair.cli.common import CONTEXT, render_repair, repair_config, settings_error
from adapter_repair.cli.options import config_from, option_decorators
from adapter_repair.cli.progress import RunProgress
from adapter_repair.cli.recipe import RecipeError, apply_recipe, known_settings, read_recipe
from adapter_repair.hub.config import HUB_PREFIX, PushConfig
from adapter_repair.measure.config import EvalConfig, GenerationConfig
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import ProjectConfig, RepairConfig, RestoreConfig

COMMON_PUSH = ("pr", "push_to", "dry_run")


@cloup.command(
    "fix",
    context_settings=CONTEXT,
    align_option_groups=False,
    epilog="\b\nExamples:\n"
    "  adapter-repair fix ./my-lora --out ./my-lora-repaired\n"
    "  adapter-repair fix ./my-lora --task sst2.jsonl --match choice --quant 4bit\n"
    "  adapter-repair fix user/lora --pr                 # a pull request on the Hub repo\n"
    "  adapter-repair fix user/lora@v1 --push-to me/lora-safe --dry-run\n"
    "  adapter-repair fix --config my-lora-repaired/repair_report.json --out again  # rerun",
)
@click.argument("source", required=False)
@cloup.option_group(
    "Common options",
    click.option(
        "--out",
        type=click.Path(path_type=Path),
        help="Folder for the repaired adapter, its report and card (must not exist, unless "
        "--overwrite). Default: NAME-repaired beside a local SOURCE, or here.",
    ),
    click.option(
        "--task",
        metavar="FILE|hub:ID",
        help="Your task rows (prompt and answer; csv or jsonl: prompt/answer, chat messages, "
        "Alpaca), split into fit, guard and score rows; at least 32, hundreds for a steady "
        "guard. hub:owner/dataset[@rev][:split] takes them from a Hub dataset. Default: the "
        "dataset the adapter's card names (datasets:), else fidelity on benign prompts.",
    ),
    *option_decorators(PushConfig, only=COMMON_PUSH),
    *option_decorators(LoadConfig, only=("quant",)),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    click.option(
        "--config",
        "recipe",
        type=click.Path(path_type=Path),
        help="Settings from a TOML/YAML/JSON file, or a repair_report.json to rerun that "
        "repair; options given here win.",
    ),
)
@cloup.option_group(
    "Task rows and output",
    click.option("--prompt-column", help="Prompt column of the task rows (default: found)."),
    click.option("--answer-column", help="Answer column of the task rows (default: found)."),
    click.option(
        "--card-task/--no-card-task",
        default=True,
        show_default=True,
        help="Without --task, take the task rows from the dataset the adapter's card names.",
    ),
    click.option("--overwrite", is_flag=True, help="Replace --out if it exists."),
)
@cloup.option_group("Repair", *option_decorators(RepairConfig))
@cloup.option_group(
    "Stage 2, restoration (runs with --method restore, the default, or both)",
    *option_decorators(RestoreConfig),
)
@cloup.option_group(
    "Stage 1, projection (runs only with --method project or both)",
    *option_decorators(ProjectConfig),
)
@cloup.option_group(
    "Measurement",
    click.option(
        "--measure/--no-measure",
        default=True,
        show_default=True,
        help="Measure the aligned base, the fine-tuned and the repaired adapter.",
    ),
    *option_decorators(EvalConfig, exclude=("fidelity_prompts",)),
)
@cloup.option_group("Loading", *option_decorators(LoadConfig, exclude=("quant",)))
@cloup.option_group("Hub", *option_decorators(PushConfig, exclude=COMMON_PUSH))
@click.pass_context
def fix(
    ctx: click.Context,
    source: str | None,
    as_json: bool,
    recipe: Path | None,
    **params: Any,
) -> None:
    """Repair a LoRA adapter: it refuses harmful requests again and keeps its task.

    SOURCE is a local adapter folder, or a Hub repo (owner/name[@revision]). The output is a
    PEFT adapter of the same format and rank, loadable with PeftModel.from_pretrained over the
    same base, with repair_report.{json,md,png} and a model card beside it. SOURCE is only
    read; nothing is pushed unless --pr or --push-to is given.
    """
    if recipe is not None:
        configs = (RepairConfig, RestoreConfig, ProjectConfig, EvalConfig, LoadConfig, PushConfig)
        known = known_settings(*configs) | {p.name for p in ctx.command.params if p.name}
        values = read_recipe(recipe, known)
        recorded = values.pop("source", None)
        if source is None and recorded is not None:
            source = str(recorded)
        apply_recipe(ctx, params, values)  # typed by each option
    out: Path | None = params.pop("out")
    task_arg: str | None = params.pop("task")
    if source is None:
        raise RecipeError(
            "no SOURCE: give the adapter to repair.",
            "Pass a local adapter folder or a Hub repo id (owner/name), or --config with a "
            "recipe that names one.",
        )
    # every setting checked before torch or the Hub client is imported
    try:
        config = repair_config(params)
        push = config_from(PushConfig, params)
        load = config_from(LoadConfig, params)
        evaluation = config_from(EvalConfig, params)
    except ValueError as e:
        raise settings_error(e, ctx) from e

    from adapter_repair.measure import prompts as P

    task_set, dataset = None, None
    task = None if task_arg is None or task_arg.startswith(HUB_PREFIX) else Path(task_arg)
    if task_arg is not None and task is None:
        from adapter_repair.hub.task import DatasetRef

        dataset = DatasetRef.parse(task_arg)
    if task is not None:
        task_set = P.load_prompt_file(
            task,
            column=params.get("prompt_column"),
            answer_column=params.get("answer_column"),
            require_answers=True,
            name="task",
        )
        # too few rows for fit, guard and score: said now, before any download or load
        P.split_task(task_set, stratify=evaluation.match == "choice")
    from adapter_repair.hub.fix import fix as fix_source

    with RunProgress(ctx, config) as progress:
        done = fix_source(
            source,
            out,
            load=load,
            config=config,
            evaluation=evaluation,
            # one bar for the whole run (RunProgress): none per generated set
            generation=GenerationConfig(config.max_new_tokens, config.batch_size, progress=False),
            task=task_set,
            task_file=(
                None
                if task is None
                else {
                    "path": str(task.resolve()),
                    "prompt_column": params.get("prompt_column"),
                    "answer_column": params.get("answer_column"),
                }
            ),
            task_dataset=dataset,
            card_task=params["card_task"],
            task_columns=(params.get("prompt_column"), params.get("answer_column")),
            measure=params["measure"],
            overwrite=params["overwrite"],
            push=push,
            on_step=progress.step,
            on_phase=progress.phase,
        )
    render_repair(done.repair, as_json, done.pushed, done.push_skipped)
