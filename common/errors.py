"""The one base class of expected user errors.

An `OspError` is a mistake a user can fix (a wrong path, setting, layout or input file): entry points
print its message as one line and exit non-zero. Everything else (a shape bug, an out-of-memory, a
collective failure) is a bug or an environment failure and keeps its traceback.

The two generic subclasses keep the built-in type that callers (and older `except` clauses) expect:
`ConfigError` is also a `ValueError` (a wrong setting or input value), `MissingFileError` is also a
`FileNotFoundError` (a path that does not exist), `UnavailableError` is also a `RuntimeError` (a device,
a package version or a peer node that the settings ask for is not there). Each stage's own error classes (DataError,
ShardError, EncodeError, ...) subclass `OspError` the same way.
"""

from __future__ import annotations


class OspError(Exception):
    """An expected user error: one line naming the file or setting and the fix, no traceback."""


class ConfigError(OspError, ValueError):
    """A wrong setting, argument or config file value."""


class MissingFileError(OspError, FileNotFoundError):
    """A file or folder the user named (or a run needs) does not exist."""


class UnavailableError(OspError, RuntimeError):
    """Something the settings ask for is not there: a device, a package version, a peer node."""


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its class name when the message is empty). An error that
    a DataLoader worker raised arrives re-raised as "Caught X in DataLoader worker ...\nOriginal
    Traceback ...\nX: message": its own message (the last line) is the one line."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Caught ") and len(lines) > 2 and lines[1].startswith("Original Traceback"):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]
