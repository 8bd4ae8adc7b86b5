"""The quantize-and-insert (writer) family's configuration: every generator
parameter, named once, and the kernel ABI.

The writer reads bf16 rows of k and writes records of the same Format rows the
readers read (kvgen/formats.py). One warp writes one token: each lane loads
16-byte chunks (8 values) of the row, the lanes of a scale group reduce its
amax with butterfly shuffles, and each lane packs its values to e4m3 with the
shared inline-PTX helpers. Imported by the runtime too: no torch, no jinja2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...config import ARCHS, Arch, ConfigError, KernelParam, check_choice, check_types, param
from ...formats import Format

SLOT_DTYPES = {"int32": "int32_t*", "int64": "int64_t*"}  # slot_mapping's dtype: one kernel each, no cast
MAX_TOKENS_PER_WARP = 8
MAX_BLOCK_SIZE = 1024
# What the template can move: each lane handles at most two 16-byte chunks (8
# bf16 values) of a row; a scale group spans a power-of-two number of lanes.
MAX_HEAD_DIM = 2 * 32 * 8


@dataclass(frozen=True)
class QuantizeInsertConfig:
    """One specialisation of the quantize-and-insert K cache kernel."""

    format: Format = param("", "the cache record format (a kvgen.formats.Format row)")
    block_size: int = param("b", f"tokens per cache page: a power of two, 1..{MAX_BLOCK_SIZE}")
    tokens_per_warp: int = param("t", f"tokens a warp loads before it writes the first, 1..{MAX_TOKENS_PER_WARP} "
                                      "(loads in flight)", default=1)
    num_warps: int = param("w", "warps per CTA, 1..32; one token per warp at a time", default=4)
    slot_dtype: str = param("", "slot_mapping's dtype: int32 or int64 (a kernel for each)")
    pdl: bool = param("p", "programmatic dependent launch: griddepcontrol.wait before any global access, then "
                           "launch_dependents", default=True)
    arch: str = param("", "target architecture (a row of kvgen.config.ARCHS)", default="sm_90a")

    family = "qik"  # class attributes, not fields: the kernel family's name prefix,
    spec_table = "quantize_insert"  # its table in a spec file,
    template = "quantize_insert.py.j2"  # and its template

    def __post_init__(self) -> None:
        if isinstance(self.format, dict):
            object.__setattr__(self, "format", Format.from_dict(self.format))
        _check(self)

    @property
    def name(self) -> str:
        parts = [self.family, self.format.name, f"f{self.format.values}"]
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
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
    def params(self) -> tuple[KernelParam, ...]:
        return (
            KernelParam("k", "__nv_bfloat16*", 16),
            KernelParam("k_cache", "uint8_t*", 16),
            KernelParam("slot_mapping", SLOT_DTYPES[self.slot_dtype], 4),  # slot or -1: token skipped
            KernelParam("k_stride", "int64_t"),  # elements between rows of k
            KernelParam("page_stride", "int64_t"),  # bytes between pages
            KernelParam("num_tokens", "int32_t"),  # slot_mapping.shape[0]: tokens past it are not written
        )

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def smem_bytes(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "format": self.format.to_dict()}

    @classmethod
    def from_product(cls, point: dict[str, Any]):
        yield cls(**point)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "QuantizeInsertConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {sorted(unknown)}; known: {sorted(known)}")
        missing = known - set(values)
        if missing:
            raise ConfigError(f"missing config field(s): {sorted(missing)}")
        return cls(**values)


def _check(c: QuantizeInsertConfig) -> None:
    if not isinstance(c.format, Format):
        raise ConfigError(f"format must be a kvgen.formats.Format, got {c.format!r}")
    check_types(c, {"block_size": int, "tokens_per_warp": int, "num_warps": int, "slot_dtype": str, "pdl": bool,
                    "arch": str})
    check_choice("arch", c.arch, ARCHS)
    check_choice("slot_dtype", c.slot_dtype, SLOT_DTYPES)
    if c.pdl and not c.arch_row.pdl:
        raise ConfigError(f"pdl=True needs griddepcontrol (sm_90 and newer); {c.arch} is compute capability "
                          f"{'.'.join(map(str, c.arch_row.compute_capability))}")
    f = c.format
    if (f.value_kind, f.scale_kind, f.placement) != ("e4m3", "ue8m0", "page_split"):
        raise ConfigError(f"format {f.name}: the quantize_insert template writes page-split e4m3 values with UE8M0 "
                          f"scales, not {f.placement} {f.value_kind} with {f.scale_kind}")
    lanes = f.scale_group // 8
    if f.scale_group % 8 or f.tail % 8 or lanes & (lanes - 1) or lanes > 32:
        raise ConfigError(f"format {f.name}: the template handles values in chunks of 8 over a power of two of lanes, "
                          f"so scale_group ({f.scale_group}) must be 8 times a power of two up to 256 and tail "
                          f"({f.tail}) a multiple of 8")
    if f.head_dim > MAX_HEAD_DIM:
        raise ConfigError(f"format {f.name}: the template writes rows of at most {MAX_HEAD_DIM} values, "
                          f"not {f.head_dim}")
    if not 1 <= c.block_size <= MAX_BLOCK_SIZE or c.block_size & (c.block_size - 1):
        raise ConfigError(f"block_size={c.block_size} must be a power of two in 1..{MAX_BLOCK_SIZE}")
    if not 1 <= c.tokens_per_warp <= MAX_TOKENS_PER_WARP:
        raise ConfigError(f"tokens_per_warp={c.tokens_per_warp} must be in 1..{MAX_TOKENS_PER_WARP}")
    if not 1 <= c.num_warps <= 32:
        raise ConfigError(f"num_warps={c.num_warps} must be in 1..32")
