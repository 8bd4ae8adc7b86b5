"""Switches read from the environment at each call, parsed in one place.

The runtime reads its KVGEN_* switches at every call (tests and users change
them between calls), so the reading must be cheap: `os.environ.get` costs
0.5-1.5 us a name (it encodes the key, then goes through Mapping.get's
try/except), several times a call. `reader` reads a fixed set of names in one
go from the dict that os.environ keeps underneath (on POSIX CPython,
`os.environ._data`, keyed by the encoded names and updated by every
`os.environ[...] = ...` and `del`, which is what monkeypatch.setenv/delenv do),
about 30 ns a name; where that dict is absent (another platform or
interpreter, or os.environ replaced), it falls back to os.environ.get.
Values are parsed by cached functions: a call pays for parsing only when a
value changes, and an invalid value raises its UsageError every time it is read.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Union

from .errors import UsageError

_FLAGS = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}

Raw = Optional[Union[str, bytes]]  # a variable's value as read: str, or bytes from the fast read; None if unset

# POSIX CPython: os.environ is an os._Environ over a dict of bytes names and values.
_BYTES_ENVIRON = (os.name == "posix" and type(os.environ) is os._Environ
                  and isinstance(getattr(os.environ, "_data", None), dict))


def reader(names: tuple[str, ...]) -> Callable[[], tuple[Raw, ...]]:
    """A function returning the raw values of `names` (None where unset), in
    order, read now: parse them with `text` or `flag`."""
    keys = tuple(os.fsencode(name) for name in names)

    def read() -> tuple[Raw, ...]:
        environ = os.environ
        if _BYTES_ENVIRON and type(environ) is os._Environ:
            return tuple(map(environ._data.get, keys))
        return tuple(map(environ.get, names))

    return read


def text(raw: Raw) -> str:
    """A raw value as the stripped, lower-case text the switches compare ('' if unset)."""
    if raw is None:
        return ""
    return (os.fsdecode(raw) if isinstance(raw, bytes) else raw).strip().lower()


@functools.lru_cache(maxsize=256)
def flag(name: str, raw: Raw, default: bool) -> bool:
    """The boolean switch `name` whose raw value is `raw` (unset or empty: `default`)."""
    value = text(raw)
    if not value:
        return default
    if value not in _FLAGS:
        raise UsageError(f"{name}={value!r}: expected 1 or 0 (or on/off, true/false, yes/no)")
    return _FLAGS[value]


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable `name` (unset or empty: `default`)."""
    return flag(name, os.environ.get(name), default)
