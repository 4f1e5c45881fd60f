"""Frozen dataclass configs whose fields carry their own help text.

The help is written once, here, and the CLI builds its click options from the fields
(:mod:`adapter_repair.cli.options`), so the Python API and the command line never disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with help text (and, for strings, the allowed values).

    Args:
        default: the default value.
        help: one or two sentences for ``--help`` and the API docs.
        choices: the allowed values of a string setting.
        cli: whether the CLI exposes it as an option.
        metavar: the placeholder shown in ``--help``.
    """
    return dataclasses.field(
        default=default,
        metadata={"help": help, "choices": tuple(choices) if choices else None, "cli": cli, "metavar": metavar},
    )


def check_choices(config: Any) -> None:
    """Raise ValueError for a string field outside its declared choices."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
