"""Click options built from the config dataclasses, so each setting's help is written once."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")


def _click_type(hint: Any, choices: tuple[str, ...] | None) -> Any:
    if choices:
        return click.Choice(choices)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {int: int, float: float, str: str}.get(base, str)


def options_from(cls: type[Any], *, exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate a click command with one option per CLI field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)

    def decorate(fn: F) -> F:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude or not f.metadata.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            if hint is bool:
                decl = f"{flag}/--no-{flag[2:]}"
                fn = click.option(
                    decl, f.name, default=f.default, show_default=True, help=f.metadata["help"]
                )(fn)
                continue
            fn = click.option(
                flag,
                f.name,
                type=_click_type(hint, f.metadata.get("choices")),
                default=f.default,
                show_default=f.default is not None,
                metavar=f.metadata.get("metavar"),
                envvar=f.metadata.get("envvar"),
                show_envvar=f.metadata.get("envvar") is not None,
                help=f.metadata["help"],
            )(fn)
        return fn

    return decorate


def config_from(cls: type[C], params: Mapping[str, Any]) -> C:
    """Build ``cls`` from the parsed click parameters that name its fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in params.items() if k in names})
