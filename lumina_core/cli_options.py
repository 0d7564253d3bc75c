"""Command-line options built from an option dataclass, and the dataclass built back from parsed arguments.

The dataclass stays the single source of names, types, defaults and validation (its ``__post_init__``);
a parser never retypes them. A field's help, choices and flag come from its metadata::

    top_k: int = field(default=4096, metadata={"help": "image codes kept per step", "flag": "--top-k"})

Every option's argparse default is None ("not typed"), so a later layer (a model folder's own
settings, say) can fill what the user left out before the dataclass's defaults apply:
``from_args(SamplingConfig, args, fill=model_defaults)``.

Types understood: int, float, str, bool (``--flag`` for a False default, ``--flag/--no-flag`` for a
True one), ``X | None`` of those, ``Literal[...]`` (its values become the choices) and ``tuple[int, ...]``
(comma-separated). A field without a default is a required option.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, Mapping, Optional, TypeVar

from .errors import InputError

T = TypeVar("T")

# The one map of dtype names a command line accepts (short form -> torch's name).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: Optional[str]) -> Any:
    """The torch dtype of a ``DTYPES`` name (short or torch's own), or None for None (the loader decides)."""
    if name is None:
        return None
    import torch

    full = DTYPES.get(name, name)
    if full not in DTYPES.values():
        raise InputError(f"unknown dtype {name!r}; allowed: {sorted(DTYPES)} (or {sorted(DTYPES.values())})")
    return getattr(torch, full)


def gib_budget(text: str) -> float:
    """argparse type of a memory budget in GiB: a number > 0 (a budget of 0 or less fits nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory budget must be more than 0 GiB")
    return value


def _fields(cls: type, only: Optional[Iterable[str]], exclude: Iterable[str]) -> list[dataclasses.Field]:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    for name in [*(only or ()), *exclude]:
        if name not in names:
            raise KeyError(f"{cls.__name__} has no field {name!r}")
    if only is not None:
        wanted = list(only)
        fields = sorted((f for f in fields if f.name in wanted), key=lambda f: wanted.index(f.name))
    excluded = set(exclude)
    return [f for f in fields if f.name not in excluded]


def _base_type(hint: Any) -> Any:
    """``X`` from ``X``, ``Optional[X]`` or ``X | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 1,2,2,4), got {text!r}") from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def flag_of(f: dataclasses.Field) -> str:
    """The option's flag: the field's ``metadata["flag"]``, else ``--`` + its name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                only: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
                default_note: Optional[Mapping[str, str]] = None) -> None:
    """Add one option per field of dataclass ``cls`` (all of them, or ``only`` those, minus ``exclude``).

    Help ends with the field's default, or with ``default_note[name]`` where another layer decides
    the default (e.g. "the model's").
    """
    hints = typing.get_type_hints(cls)
    notes = dict(default_note or {})
    for f in _fields(cls, only, exclude):
        kind = _base_type(hints[f.name])
        default = _default_of(f)
        help_text = f.metadata.get("help", "")
        note = notes.get(f.name)
        if note is None and not any(default is v for v in (dataclasses.MISSING, None, False)):
            note = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        if note:
            help_text = f"{help_text} (default: {note})" if help_text else f"default: {note}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif typing.get_origin(kind) is tuple:
            kwargs["type"] = _int_tuple
        elif kind in (int, float, str):
            kwargs["type"] = kind
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {kind!r}")
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        parser.add_argument(flag_of(f), **kwargs)


def typed(cls: type, args: argparse.Namespace, *, only: Optional[Iterable[str]] = None,
          exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of ``cls`` the user typed on the command line (their parsed values)."""
    return {f.name: getattr(args, f.name) for f in _fields(cls, only, exclude)
            if getattr(args, f.name, None) is not None}


def from_args(cls: type[T], args: argparse.Namespace, *, fill: Optional[Mapping[str, Any]] = None,
              only: Optional[Iterable[str]] = None, exclude: Iterable[str] = (), **fixed: Any) -> T:
    """Build ``cls`` from parsed args: typed values, else ``fill`` (e.g. a model's settings), else the field default.

    ``fixed`` values win over all three. The dataclass validates itself; its ValueError becomes an
    InputError (a user's mistake: one line, exit 2 on the CLI).
    """
    values = {name: value for name, value in (fill or {}).items()
              if name in {f.name for f in dataclasses.fields(cls)}}
    values.update(typed(cls, args, only=only, exclude=exclude))
    values.update(fixed)
    try:
        return cls(**values)
    except InputError:
        raise
    except ValueError as error:
        raise InputError(str(error)) from None

