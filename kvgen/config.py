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
    """A build target. A cubin arch (sm_*) runs on exactly its compute
    capability; a PTX arch (compute_*) is the fallback the driver JIT-compiles
    for any GPU at or above its capability that has no cubin of its own."""

    name: str
    compute_capability: tuple[int, int]
    max_smem_per_block: int
    flavour: str  # which inline-PTX helper flavour its kernels use (FLAVOURS)
    ptx: bool = False  # a PTX fallback target, not a cubin

    @property
    def pdl(self) -> bool:
        """griddepcontrol (programmatic dependent launch) exists from sm_90 on."""
        return self.compute_capability >= (9, 0)

    @property
    def gpu_arch(self) -> str:
        """The target CuteDSL compiles for: compute_80 PTX is sm_80's PTX."""
        return self.name.replace("compute_", "sm_")

    def serves(self, capability: tuple[int, int] | None) -> bool:
        if capability is None:
            return False
        return capability >= self.compute_capability if self.ptx else capability == self.compute_capability


# The inline-PTX helper flavours (templates/ptx_helpers.py.j2), each with the
# lowest PTX target its instructions assemble for:
#   integer: e4m3 decoded and encoded with integer, prmt and fma.bf16x2 operations (sm_80 on)
#   hopper:  cvt.*.e4m3x2 and mul.rn.bf16x2 (sm_90 on)
FLAVOURS = {"integer": "compute_80", "hopper": "compute_90"}

KIB = 1024
ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch("sm_80", (8, 0), 163 * KIB, "integer"),  # A100
        Arch("sm_86", (8, 6), 99 * KIB, "integer"),  # A10, A40, RTX 30
        Arch("sm_89", (8, 9), 99 * KIB, "integer"),  # L4, L40S, RTX 40
        Arch("sm_90a", (9, 0), 227 * KIB, "hopper"),  # H100, H200
        Arch("sm_100a", (10, 0), 227 * KIB, "hopper"),  # B200, GB200
        Arch("sm_103a", (10, 3), 227 * KIB, "hopper"),  # B300, GB300
        Arch("sm_120a", (12, 0), 99 * KIB, "hopper"),  # RTX PRO 6000, RTX 50
        Arch("sm_121a", (12, 1), 99 * KIB, "hopper"),  # DGX Spark
        Arch("compute_80", (8, 0), 99 * KIB, "integer", ptx=True),  # the fallback for newer GPUs
        Arch("compute_90", (9, 0), 99 * KIB, "hopper", ptx=True),
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


def param(tag: str, doc: str, default: Any = _NO_DEFAULT, named_at_default: bool = True) -> Any:
    """A generator parameter: `tag` is its short form in kernel names (empty:
    the value alone), `doc` its meaning and limits, `default` what a spec
    product that leaves it out gets. A parameter added after kernels shipped
    is left out of the names of configs at its default (`named_at_default=False`),
    so that the kernels that shipped before it keep their names."""
    return field(metadata={"tag": tag, "doc": doc, "default": default, "named_at_default": named_at_default})


def parameters(config_class) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def unnamed_defaults(config_class) -> dict[str, Any]:
    """The parameters added after a family's kernels shipped (named_at_default=False),
    each at its default: what a manifest row or tuned rule older than one means."""
    return {f.name: f.metadata["default"] for f in dataclasses.fields(config_class)
            if not f.metadata["named_at_default"]}


def lane_groups(lanes_needed: int) -> int:
    """How many groups a warp's 32 lanes split into when each group needs
    `lanes_needed` lanes, rounded up to a power of two (1: the whole warp, for
    32 or more). The readers' and writers' tokens_per_step both come from here."""
    lanes = 1 << (lanes_needed - 1).bit_length()
    return 32 // min(lanes, 32)


def check_types(config, types: dict[str, type]) -> None:
    for name, typ in types.items():
        value = getattr(config, name)
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise ConfigError(f"{name} must be {typ.__name__}, got {value!r}")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; known: {sorted(choices) if isinstance(choices, dict) else list(choices)}")


class FamilyConfig:
    """What every family's config class shares. A family's config is a frozen
    dataclass deriving from this, its first field `format` (a Format row),
    every other field a generator parameter declared with `param`; it defines
    `family`, `spec_table`, `template`, `params` and `_check`."""

    family: str
    format: Any
    arch: str
    num_warps: int
    pdl: bool

    def __post_init__(self) -> None:
        from .formats import Format

        if isinstance(self.format, dict):  # from plain values (a manifest row, a worker's argument)
            object.__setattr__(self, "format", Format.from_dict(self.format))
        if not isinstance(self.format, Format):
            raise ConfigError(f"format must be a kvgen.formats.Format, got {self.format!r}")
        self._check()
        if self.pdl and not self.arch_row.pdl:
            raise ConfigError(f"pdl=True needs griddepcontrol (sm_90 and newer); {self.arch} is compute capability "
                              f"{'.'.join(map(str, self.arch_row.compute_capability))}")

    def _check(self) -> None:
        raise NotImplementedError

    # ---- derived, never stored ------------------------------------------------
    @property
    def name(self) -> str:
        """Canonical, human-readable, unique per config: every field appears
        (the format by its name and value count)."""
        parts = [self.family, self.format.name, f"f{self.format.values}"]
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if not f.metadata["named_at_default"] and value == f.metadata["default"]:
                continue
            parts.append(f"{f.metadata['tag']}{int(value) if isinstance(value, bool) else value}")
        return "_".join(parts)

    @property
    def filename(self) -> str:
        return f"{self.name}.py"

    @property
    def fp8_dim(self) -> int:
        return self.format.values

    @property
    def data_bytes(self) -> int:
        return self.format.data_bytes

    @property
    def arch_row(self) -> Arch:
        return ARCHS[self.arch]

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "format": self.format.to_dict()}

    @classmethod
    def from_product(cls, point: dict[str, Any]):
        """The configs at one point of a spec product (a family may expand a point)."""
        yield cls(**point)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {sorted(unknown)}; known: {sorted(known)}")
        missing = known - set(values)
        if missing:
            raise ConfigError(f"missing config field(s): {sorted(missing)}")
        return cls(**values)
