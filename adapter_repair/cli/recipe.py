"""``fix --config FILE``: every repair setting from a file, so that a repair can be rerun.

A recipe is TOML, YAML or JSON. Its sections follow the report's ``config`` record
(``load``, ``repair`` with ``restore`` and ``project`` inside, ``evaluation``, ``push``), and
``source`` and ``task`` say what is repaired and which rows guard it; keys may also stand at
the top level. A ``repair_report.json`` is a recipe too: ``fix --config
out/repair_report.json --out again`` reruns the repair it reports (the same source commit, base
commit, task file and settings). Options given on the command line, or by their environment
variables, win over the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from adapter_repair.errors import AdapterRepairError

#: what a recipe may hold beyond the config dataclasses' fields
EXTRA_KEYS = ("source", "task", "prompt_column", "answer_column", "card_task", "measure")
#: sections that only group keys (their names are not settings)
SECTIONS = ("load", "repair", "restore", "project", "evaluation", "push")


class RecipeError(AdapterRepairError):
    """A --config file that cannot be used as given."""


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    if suffix == ".json":
        return json.loads(text)
    raise RecipeError(
        f"--config {path}: unknown file type {suffix or '(none)'}.",
        "Give a .toml, .yaml or .json file, or a repair_report.json.",
    )


def _from_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """A repair_report.json as a recipe: its resolved settings, the source and base pinned
    to the commits it repaired, and the task file it was given."""
    recipe: dict[str, Any] = dict(report["config"])
    prov = report.get("provenance") or {}
    source, sha = prov.get("source") or report.get("source"), prov.get("source_sha")
    if source:
        recipe["source"] = f"{source}@{sha}" if sha else source
    load = dict(recipe.get("load") or {})
    if prov.get("base_sha"):  # the Hub base at the commit repaired over, not a cache path
        load.update(base=prov["base"], base_revision=prov["base_sha"])
    recipe["load"] = load
    task = prov.get("task")
    if task:  # a Hub dataset is pinned to the commit the repair read
        hub = task.get("hub")
        recipe["task"] = f"hub:{hub}@{task['sha']}:{task['split']}" if hub else task.get("path")
        recipe["prompt_column"] = task.get("prompt_column")
        recipe["answer_column"] = task.get("answer_column")
    else:  # it ran without task rows: so does its rerun, whatever the card names by then
        recipe["card_task"] = False
    return recipe


def _flatten(node: Mapping[str, Any], known: set[str], where: str, out: dict[str, Any]) -> None:
    for key, value in node.items():
        name = str(key).replace("-", "_")
        if name in SECTIONS and isinstance(value, Mapping):
            _flatten(value, known, f"{where}{name}.", out)
        elif name in known:
            out[name] = value
        else:
            raise RecipeError(
                f"--config: unknown setting {where}{key}.",
                "Use the option names of `adapter-repair fix --help` without the dashes "
                f"(e.g. max_steps), at the top level or under {', '.join(SECTIONS)}.",
            )


def read_recipe(path: Path, known: Iterable[str]) -> dict[str, Any]:
    """``{setting: value}`` from the recipe at ``path``; ``known`` are the setting names
    (the options' parameter names) a recipe may set."""
    if not path.is_file():
        raise RecipeError(f"--config {path}: no such file.", "Check the path.")
    try:
        data = _parse(path)
    except RecipeError:
        raise
    except Exception as e:  # the parsers' own errors say where the file is malformed
        raise RecipeError(
            f"--config {path} could not be read: {e}", "Fix the file's syntax."
        ) from e
    if not isinstance(data, Mapping):
        raise RecipeError(
            f"--config {path} holds no mapping of settings.", "Write key = value settings."
        )
    if "config" in data and "repair" in data and "tool_version" in data:
        data = _from_report(data)
    out: dict[str, Any] = {}
    _flatten(data, set(known) | set(EXTRA_KEYS), "", out)
    return {k: v for k, v in out.items() if v is not None}


def apply_recipe(ctx: click.Context, params: dict[str, Any], recipe: Mapping[str, Any]) -> None:
    """Put ``recipe``'s values into ``params`` where the command line (or an environment
    variable) gave none, each checked by its option's own type."""
    by_name = {p.name: p for p in ctx.command.params if p.name}
    for name, value in recipe.items():
        source = ctx.get_parameter_source(name)
        if source not in (None, click.core.ParameterSource.DEFAULT):
            continue  # the command line wins
        param = by_name.get(name)
        if param is None:
            params[name] = value
            continue
        try:
            params[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise RecipeError(
                f"--config: {name} = {value!r}: {e.message}", "Fix the value in the file."
            ) from e


def known_settings(*configs: type[Any]) -> set[str]:
    """The field names of the config dataclasses a recipe may set."""
    return {f.name for c in configs for f in dataclasses.fields(c)}
