"""Command line: `python -m lumina_core generate --model FOLDER_OR_REPO --prompt "..."`, `... memory --config 7b`.

Each sub-command is one entry of COMMANDS: (help, add its arguments, run it -> exit status). A
user's mistake (InputError, or a ValueError of a setting) prints `error: ...` and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from .batchgen.cli import (AUTO_MODEL, OFFICIAL_MODEL, OFFICIAL_SAMPLING, add_generate_arguments,
                           apply_model_defaults, choose_model, generate_command)
from .memory_cli import MEMORY_HELP, add_memory_arguments, run_memory


def _generate(args: argparse.Namespace) -> int:
    args.model = choose_model(args.model, args.download)
    apply_model_defaults(args)
    return generate_command(args)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("generate images and write PNGs (settings in their metadata); defaults come from the model",
                 add_generate_arguments, _generate),
    "memory": (MEMORY_HELP, add_memory_arguments, run_memory),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="python -m lumina_core", description="Lumina-mGPT 2.0 from the shell.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; bad settings exit with status 2 and a one-line message naming what is allowed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError) as e:  # InputError derives from ValueError
        parser.exit(2, f"error: {e}\n")


__all__ = ["AUTO_MODEL", "COMMANDS", "OFFICIAL_MODEL", "OFFICIAL_SAMPLING", "apply_model_defaults", "build_parser",
           "choose_model", "main"]

if __name__ == "__main__":
    sys.exit(main())
