"""lumina_core.cli_options: parsers built from option dataclasses, and the dataclass built back."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from lumina_core.cli_options import add_options, from_args, typed
from lumina_core.errors import InputError


@dataclass(frozen=True)
class Options:
    data: str = field(metadata={"help": "input folder"})
    steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps"})
    warmup: int = field(default=0, metadata={"help": "warm-up steps"})
    lr: float = field(default=2e-5, metadata={"help": "learning rate"})
    mode: Literal["fast", "slow"] = "fast"
    precision: str = field(default="bf16", metadata={"choices": ("bf16", "fp32")})
    grad_checkpointing: bool = True
    coupled: bool = field(default=False, metadata={"flag": "--coupled", "help": "coupled noise"})
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def _parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_options(parser, Options, **kwargs)
    return parser


def test_round_trip_types_defaults_and_flags():
    args = _parser().parse_args(["--data", "d", "--steps", "7", "--lr", "0.5", "--mode", "slow",
                                 "--no-grad-checkpointing", "--coupled", "--ch-mult", "1,2"])
    assert from_args(Options, args) == Options(data="d", steps=7, lr=0.5, mode="slow", grad_checkpointing=False,
                                               coupled=True, ch_mult=(1, 2))
    assert from_args(Options, _parser().parse_args(["--data", "d"])) == Options(data="d")


def test_untyped_options_are_none_and_fill_comes_before_the_field_default():
    args = _parser().parse_args(["--data", "d", "--lr", "0.1"])
    assert args.steps is None and args.coupled is None and args.grad_checkpointing is None
    assert typed(Options, args) == {"data": "d", "lr": 0.1}
    built = from_args(Options, args, fill={"lr": 9.0, "steps": 3, "not_a_field": 1})
    assert built.lr == 0.1 and built.steps == 3   # typed beats fill; fill beats the default
    assert from_args(Options, args, lr=4.0).lr == 4.0   # fixed values win over all


def test_choices_required_and_help_from_metadata(capsys):
    parser = _parser(default_note={"lr": "the model's"})
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d", "--precision", "fp16"])
    with pytest.raises(SystemExit):
        parser.parse_args([])   # --data has no default: required
    capsys.readouterr()
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "learning rate (default: the model's)" in text
    assert "warm-up steps (default: 0)" in text
    assert "input folder" in text and "{fast,slow}" in text and "default: 1,2,2,4" in text
    assert "coupled noise --ch-mult" in text   # a False switch needs no default in its help


def test_validation_stays_in_the_dataclass_and_becomes_an_input_error():
    args = _parser().parse_args(["--data", "d", "--lr", "-1"])
    with pytest.raises(InputError, match="lr must be > 0"):
        from_args(Options, args)


def test_only_and_exclude_select_fields():
    parser = _parser(only=["lr", "steps"])
    assert {a.dest for a in parser._actions} == {"help", "lr", "steps"}
    parser = _parser(exclude=["data"])
    assert "data" not in {a.dest for a in parser._actions}
    with pytest.raises(KeyError):
        _parser(only=["nope"])


def test_memory_budget_must_be_a_positive_number_of_gib():
    import argparse

    from lumina_core.cli_options import gib_budget

    assert gib_budget("11.6") == 11.6
    for bad, message in (("0", "more than 0 GiB"), ("-1", "more than 0 GiB"), ("abc", "not a number of GiB")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            gib_budget(bad)
