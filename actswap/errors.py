"""Errors raised by actswap.

Every error the library raises on purpose is an :class:`ActswapError`. Its
``exit_code`` is what the CLI exits with, so the mapping from failure kind to
exit code lives here and nowhere else:

* 2: the user's input or options are wrong (missing, unreadable, unrecognised
  or unsafe file; bad option; an output path that would clobber something).
* 1: anything else that failed (a conversion that could not be completed, an
  internal invariant that did not hold).

Messages are one line, name what was received, and say what to try.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class ActswapError(Exception):
    """Base class; ``exit_code`` is the CLI exit status for this failure."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line, always: the CLI prints exactly this to stderr.
        super().__init__(" ".join(str(message).split()))


class UserError(ActswapError):
    """The input, an option or an output path is not acceptable."""

    exit_code = 2


class UnrecognisedFormatError(UserError):
    """The path is not a model file actswap can read."""


class UnsupportedFormatError(UserError):
    """The format is recognised but not (yet) supported."""


class UnsafeModelError(UserError):
    """The model file asks to run code or import modules actswap does not trust."""


class LoadError(UserError):
    """The file looked like a model but the loader could not read it."""


class UnsupportedModelError(UserError):
    """The model is loaded but its structure cannot be rewritten soundly."""


class ConversionError(ActswapError):
    """The conversion could not be completed (exit 1)."""


class NonFiniteOutputError(ConversionError):
    """The converted model outputs NaN or Inf where the original does not (exit 1)."""


class DiskSpaceError(ActswapError):
    """The output does not fit on its disk; nothing was written (exit 1)."""


class OutOfMemoryError(ActswapError):
    """The work did not fit in memory; nothing was written (exit 1)."""


class InvariantError(ActswapError):
    """An invariant actswap promises did not hold; this is a bug (exit 1)."""


class RecoveryFailedError(ConversionError):
    """Accuracy recovery ended with a model that is not recovered: non-finite
    outputs, or an accuracy more than the allowed margin below the original's
    (exit 1). ``model`` holds the result for a caller that wants it anyway."""

    def __init__(self, message: str, model: object = None, result: object = None) -> None:
        super().__init__(message)
        self.model, self.result = model, result


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none):
    third-party errors are quoted in actswap's one-line messages this way."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def naming(path: Any) -> Iterator[None]:
    """An :class:`UnsupportedModelError` raised inside, whose message does not name
    ``path``, raised again with the path in front: a refusal names the file (the
    fuzzer's rule, issue 29), also when the engine that refused never saw it."""
    try:
        yield
    except UnsupportedModelError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"'{path}': {e}") from None
