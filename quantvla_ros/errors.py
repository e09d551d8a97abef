"""The one base class of every error a user can cause: a bad path, flag, parameter, checkpoint,
artifact, bag or message.

Each is raised with one sentence that names the input and what to do, and the `quantvla`
command prints just that sentence. Anything else that escapes (a ValueError from a wrong
tensor shape passed by our own code, a TypeError) is a bug and keeps its traceback.
Subclassing ValueError keeps `except ValueError` callers working.
"""

from __future__ import annotations


class QuantVLAError(ValueError):
    """An input the user gave cannot be used; the message says which and what to do."""
