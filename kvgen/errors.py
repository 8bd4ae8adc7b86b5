"""The user's mistakes, told apart from the toolkit's bugs."""

from __future__ import annotations


class UsageError(ValueError):
    """A user mistake -- a bad argument, environment variable, path or setup:
    reported as one line (what is wrong and what is accepted), exit status 2
    at the CLI. Anything else escaping the CLI is a bug and keeps its traceback."""
