"""The one base class for a user's mistake: a bad file, value or setting.

Raise `InputError` (or a subclass) with a one-line message that names what was wrong, which file or
value, and what is allowed. Command lines print the message and exit 2 (never a traceback); nodes
show it as the node's error. Anything else that escapes is a bug, and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message is one line: what, where, what is allowed."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the user named, or that a model folder must hold, is not there (also a FileNotFoundError)."""
