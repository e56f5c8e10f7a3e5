"""Command-line options made from dataclass fields, so that each setting is declared once.

A field declared with option() carries its default, its help text and, where the command line differs
from the field, its flag (`pairs` is `--queries`) or its choices. add_options() turns every such field
into an argparse option (name, default, type, choices, help) and from_options() builds the dataclass
back from the parsed arguments: a default changed in the dataclass changes the command line.
Range checks stay in the dataclass's __post_init__, the one place they are made.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


def option(help: str, default: Any = dataclasses.MISSING, *, flag: str | None = None,
           choices: tuple | None = None, cli: bool = True) -> Any:
    """A dataclass field that is also a command-line option (cli=False: a field only, set by the caller)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli})


def off_or_float(text: str) -> float | None:
    """An optional number on the command line: 'off' or 'none' for None."""
    return None if text.lower() in ("none", "off") else float(text)


def option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def flag_of(cls, name: str) -> str:
    """The command-line flag of field `name`."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.metadata.get("flag") or "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for field in option_fields(cls):
        flag = flag_of(cls, field.name)
        kind, optional = _unwrap_optional(hints[field.name])
        required = field.default is dataclasses.MISSING
        help_text = field.metadata["help"].replace("%", "%%")  # argparse %-formats help
        if kind is bool:  # a switch: absent means False
            if field.default is not False:
                raise TypeError(f"{cls.__name__}.{field.name}: a command-line switch must default to False")
            parser.add_argument(flag, dest=field.name, action="store_true", help=help_text)
            continue
        parse = off_or_float if (kind is float and optional) else kind
        if parse is off_or_float:
            help_text += "; 'off' turns it off"
        if not required and field.default not in (None, ""):
            help_text += " (default: %(default)s)"
        choices = field.metadata.get("choices")
        metavar = None if choices else flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, dest=field.name, type=parse, required=required, choices=choices, metavar=metavar,
                            default=None if required else field.default, help=help_text)


def from_options(cls, args: argparse.Namespace, **others):
    """`cls` from the parsed option fields, plus the fields that are not options (`others`)."""
    return cls(**{f.name: getattr(args, f.name) for f in option_fields(cls)}, **others)


def _unwrap_optional(kind) -> tuple[type, bool]:
    """(the type, whether None is allowed) of `X` or `X | None`."""
    optional = False
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind, optional = (args[0] if len(args) == 1 else kind), True
    if kind not in (int, float, str, bool, Path):
        raise TypeError(f"no command-line parser for {kind}")
    return kind, optional
