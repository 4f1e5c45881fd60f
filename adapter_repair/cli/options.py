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


def option_decorators(
    cls: type[Any], *, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> list[Callable[[F], F]]:
    """One click option per CLI field of dataclass ``cls`` (those in ``only`` when given, in
    its order; never those in ``exclude``), in field order: for :func:`options_from`, or to
    put into a help section with ``cloup.option_group``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    names = [n for n in (only if only is not None else fields) if n not in exclude]
    out: list[Callable[[F], F]] = []
    for name in names:
        f = fields[name]
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            out.append(
                click.option(
                    f"{flag}/--no-{flag[2:]}",
                    f.name,
                    default=f.default,
                    show_default=True,
                    help=f.metadata["help"],
                )
            )
            continue
        out.append(
            click.option(
                flag,
                f.name,
                type=_click_type(hint, f.metadata.get("choices")),
                default=f.default,
                show_default=f.default is not None,
                metavar=f.metadata.get("metavar"),
                envvar=f.metadata.get("envvar"),
                show_envvar=f.metadata.get("envvar") is not None,
                help=f.metadata["help"],
            )
        )
    return out


def options_from(cls: type[Any], *, exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate a click command with one option per CLI field of dataclass ``cls``."""

    def decorate(fn: F) -> F:
        for option in reversed(option_decorators(cls, exclude=exclude)):
            fn = option(fn)
        return fn

    return decorate


def config_from(cls: type[C], params: Mapping[str, Any]) -> C:
    """Build ``cls`` from the parsed click parameters that name its fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in params.items() if k in names})
