"""The pieces every config shares: a dataclass field that carries its own help text, the check
of its allowed values, the rebuild of a config from a dict, and the cache folder.

Each concern keeps its own config beside its code (:mod:`adapter_repair.model.config`,
:mod:`adapter_repair.measure.config`, :mod:`adapter_repair.repair.config`,
:mod:`adapter_repair.beds.config`, :mod:`adapter_repair.hub.config`,
:mod:`adapter_repair.hub.bot.config`); this module sits below all of them. Configs import
nothing heavy (torch is imported inside methods), so ``--help`` is instant, and the CLI builds
its click options from the fields (:mod:`adapter_repair.cli.options`), so the help is written
once and the Python API and the command line never disagree.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    cli: bool = True,
    metavar: str | None = None,
    envvar: str | None = None,
) -> Any:
    """A dataclass field with help text (and, for strings, the allowed values).

    Args:
        default: the default value.
        help: one or two sentences for ``--help`` and the API docs.
        choices: the allowed values of a string setting.
        cli: whether the CLI exposes it as an option.
        metavar: the placeholder shown in ``--help``.
        envvar: an environment variable the CLI reads the value from when not given.
    """
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "choices": tuple(choices) if choices else None,
            "cli": cli,
            "metavar": metavar,
            "envvar": envvar,
        },
    )


def check_choices(config: Any) -> None:
    """Raise ValueError for a string field outside its declared choices."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")


def cache_root() -> Path:
    """``$ADAPTER_REPAIR_CACHE``, else ``~/.cache/adapter-repair``: the beds' worlds, the bench
    caches and the bot's SQLite queue live under it."""
    env = os.environ.get("ADAPTER_REPAIR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adapter-repair"


def config_from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from ``dataclasses.asdict`` output (nested configs too): how
    a worker hands its settings to the process that runs a job."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = hints.get(f.name)
        if isinstance(value, dict) and isinstance(sub, type) and dataclasses.is_dataclass(sub):
            value = config_from_dict(sub, value)
        kwargs[f.name] = value
    return cls(**kwargs)
