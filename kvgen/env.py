"""Switches read from the environment at each call, parsed in one place."""

from __future__ import annotations

import os

from .errors import UsageError

_FLAGS = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable `name` (unset or empty: `default`)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _FLAGS:
        raise UsageError(f"{name}={value!r}: expected 1 or 0 (or on/off, true/false, yes/no)")
    return _FLAGS[value]
