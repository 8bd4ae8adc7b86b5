"""What every kernel family's configuration shares: the arch rows, the flat
kernel ABI, and how a config's fields become its name and its plain values.

A family's config class (kvgen/families/<family>/config.py) is a frozen
dataclass whose fields are the generator's parameters, each declared once
with `param` (its tag in kernel names, its meaning, its default). Everything
downstream -- the kernel's name, its rendered source, its build cache key, its
manifest row -- is derived from a config, so a config that the templates
cannot serve is refused when it is made, and never reaches a compiler.

Imported by the runtime too (manifest rows store configs as plain dicts):
no torch, no jinja2, no CuteDSL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError


class ConfigError(UsageError):
    """A configuration the templates cannot serve."""


@dataclass(frozen=True)
class Arch:
    name: str
    compute_capability: tuple[int, int]  # the only devices its cubins run on
    max_smem_per_block: int


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        # sm_90a code uses Hopper-only features: it runs on 9.0 and nothing else.
        Arch("sm_90a", (9, 0), 227 * 1024),
    )
}


@dataclass(frozen=True)
class KernelParam:
    """One kernel argument of the flat ABI: a raw pointer or an integer."""

    name: str
    ctype: str  # C type; pointers end in '*'
    align: int = 0  # bytes the kernel assumes a pointer is aligned to

    @property
    def is_pointer(self) -> bool:
        return self.ctype.endswith("*")


_NO_DEFAULT = dataclasses.MISSING


def param(tag: str, doc: str, default: Any = _NO_DEFAULT) -> Any:
    """A generator parameter: `tag` is its short form in kernel names (empty:
    the value alone), `doc` its meaning and limits, `default` what a spec
    product that leaves it out gets."""
    return field(metadata={"tag": tag, "doc": doc, "default": default})


def parameters(config_class) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def check_types(config, types: dict[str, type]) -> None:
    for name, typ in types.items():
        value = getattr(config, name)
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise ConfigError(f"{name} must be {typ.__name__}, got {value!r}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; known: {sorted(choices) if isinstance(choices, dict) else list(choices)}")
