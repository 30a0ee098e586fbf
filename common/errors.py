"""The one base class of expected user errors.

An `OspError` is a mistake a user can fix (a wrong path, setting, layout or input file): entry points
print its message as one line and exit non-zero. Everything else (a shape bug, an out-of-memory, a
collective failure) is a bug or an environment failure and keeps its traceback.
"""
from __future__ import annotations


class OspError(Exception):
    """An expected user error: one line naming the file or setting and the fix, no traceback."""
