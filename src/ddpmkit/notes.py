"""Notes to the user: what the library decided on its own (files skipped, folders read once...).

Library code calls `note(message)` instead of `warnings.warn`: a note is one plain line, never a
Python warning with a source line under it. By default it goes to stderr as "ddpmkit: note: ...";
the command line prints it as "ddpmkit COMMAND: note: ..." (`notes_to`), and tests collect them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

_said: set[str] = set()


def _to_stderr(message: str) -> None:
    """Each note once per process: a script that loads the same folder ten times hears it once."""
    if message not in _said:
        _said.add(message)
        print(f"ddpmkit: note: {message}", file=sys.stderr)


_handler: Callable[[str], None] = _to_stderr


def note(message: str) -> None:
    """Tell the user one thing in one line (whitespace, newlines in file names included, collapsed)."""
    _handler(" ".join(str(message).split()))


@contextlib.contextmanager
def notes_to(handler: Callable[[str], None]) -> Iterator[None]:
    """Send the notes made inside the block to `handler(message)` instead."""
    global _handler
    previous, _handler = _handler, handler
    try:
        yield
    finally:
        _handler = previous


@contextlib.contextmanager
def collect_notes() -> Iterator[list[str]]:
    """The notes made inside the block, in a list (and not printed)."""
    collected: list[str] = []
    with notes_to(collected.append):
        yield collected
