"""Kernel configurations: every generator parameter, named once.

A `DequantGatherConfig` is a frozen value. Everything downstream -- the
kernel's name, its rendered source, its build cache key, its manifest row --
is derived from it, so a config that the templates cannot serve is refused
here, when it is made, and never reaches a compiler.

This module is imported by the runtime too (the manifest stores configs as
plain dicts), so it must stay free of jinja2, CuteDSL and torch.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import UsageError

HEAD_DIM = 512  # bf16 values written per token, for every layout served here


class ConfigError(UsageError):
    """A configuration the templates cannot serve (a ValueError)."""


@dataclass(frozen=True)
class Layout:
    """How one paged FP8 record is laid out in a cache page.

    A page holds `block_size` data rows (fp8 bytes, then the bf16 tail), then
    `block_size` scale rows of `scale_bytes` UE8M0 codes, one per
    `scale_group` fp8 values (unused codes pad the row).
    """

    name: str
    record_bytes: int  # k_cache.shape[-1]: data row + scale row
    fp8_dim: int  # the layout's fp8 value count; a config must match it
    scale_group: int
    scale_bytes: int

    def data_bytes(self, fp8_dim: int) -> int:
        return fp8_dim + 2 * (HEAD_DIM - fp8_dim)


# Rows of data, not an if-ladder: a new layout is a new row.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        # DeepSeek-V4: 448 fp8 + 64 bf16 (128 bytes), 7 scale codes + 1 pad.
        Layout("dsv4_584", record_bytes=584, fp8_dim=448, scale_group=64, scale_bytes=8),
        # DeepSeek-V4.1 MXFP8: 512 fp8, 16 scale codes (one per 32 values); no bf16 tail.
        Layout("v41_528", record_bytes=528, fp8_dim=512, scale_group=32, scale_bytes=16),
    )
}


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

# How a request's tokens are split over its CTAs' warps.
#   strided:    warp k of CTA y takes tokens (y*W + k) + n*(Y*W)  (the seed's order)
#   contiguous: CTA y takes one contiguous span of tokens, its warps interleaved
SCHEDULES = ("strided", "contiguous")

# Which tokens a call gathers.
#   dense:  request r's last gather_len tokens through its block-table row -> out[r, offset + t]
#   sparse: global slots (page * block_size + row) -> out row i; slot -1 leaves row i untouched
INDEXING = ("dense", "sparse")

MAX_STAGES = 16


def _param(tag: str, doc: str) -> Any:
    """A generator parameter: `tag` is its short form in kernel names."""
    return field(metadata={"tag": tag, "doc": doc})


@dataclass(frozen=True)
class DequantGatherConfig:
    """One specialisation of the dequantize-and-gather K cache kernel."""

    layout: str = _param("", "cache record layout (a row of LAYOUTS)")
    fp8_dim: int = _param("f", "fp8 values per token; the rest of HEAD_DIM is a bf16 tail")
    block_size: int = _param("b", "tokens per cache page (power of two)")
    num_stages: int = _param("s", "cp.async ring depth per warp (tokens in flight)")
    num_warps: int = _param("w", "warps per CTA; one token per warp per stage")
    indexing: str = _param("", "dense (block table) or sparse (slot indices); see INDEXING")
    gather_lens: bool = _param("g", "dense: kernel reads gather_lens (else gathers whole sequences)")
    schedule: str = _param("", "token-to-warp schedule (see SCHEDULES)")
    pdl: bool = _param("p", "programmatic dependent launch: griddepcontrol.wait before any global "
                            "access, then launch_dependents (the runtime may then launch it with PDL)")
    arch: str = _param("", "target architecture (a row of ARCHS)")

    family = "dqgk"  # class attribute, not a field: the kernel family's prefix

    def __post_init__(self) -> None:
        _check(self)

    # ---- derived, never stored ------------------------------------------------
    @property
    def name(self) -> str:
        """Canonical, human-readable, unique per config: every field appears."""
        parts = [self.family]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = int(value)
            parts.append(f"{f.metadata['tag']}{value}")
        return "_".join(parts)

    @property
    def filename(self) -> str:
        return f"{self.name}.py"

    @property
    def layout_row(self) -> Layout:
        return LAYOUTS[self.layout]

    @property
    def arch_row(self) -> Arch:
        return ARCHS[self.arch]

    @property
    def params(self) -> tuple["KernelParam", ...]:
        return KERNEL_PARAMS[self.indexing]

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def data_bytes(self) -> int:
        return self.layout_row.data_bytes(self.fp8_dim)

    @property
    def stage_bytes(self) -> int:
        """One token record in shared memory: data row, then scale row, 16-byte aligned."""
        return _round_up(self.data_bytes + self.layout_row.scale_bytes, 16)

    @property
    def smem_bytes(self) -> int:
        return self.stage_bytes * self.num_stages * self.num_warps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DequantGatherConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {sorted(unknown)}")
        return cls(**values)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _check(c: DequantGatherConfig) -> None:
    types = {"layout": str, "fp8_dim": int, "block_size": int, "num_stages": int, "num_warps": int,
             "indexing": str, "gather_lens": bool, "schedule": str, "pdl": bool, "arch": str}
    for name, typ in types.items():
        value = getattr(c, name)
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            raise ConfigError(f"{name} must be {typ.__name__}, got {value!r}")
    if c.layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {c.layout!r}; known: {sorted(LAYOUTS)}")
    if c.arch not in ARCHS:
        raise ConfigError(f"unknown arch {c.arch!r}; known: {sorted(ARCHS)}")
    if c.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {c.schedule!r}; known: {list(SCHEDULES)}")
    if c.indexing not in INDEXING:
        raise ConfigError(f"unknown indexing {c.indexing!r}; known: {list(INDEXING)}")
    if c.indexing == "sparse" and c.gather_lens:
        raise ConfigError("gather_lens applies to dense indexing only (sparse calls take slot indices)")
    layout = c.layout_row
    if c.fp8_dim <= 0 or c.fp8_dim % layout.scale_group:
        raise ConfigError(
            f"fp8_dim={c.fp8_dim} must be a positive multiple of the scale group "
            f"({layout.scale_group}) of layout {layout.name}")
    if c.fp8_dim % 16 or c.fp8_dim > HEAD_DIM:
        raise ConfigError(f"fp8_dim={c.fp8_dim} must be a multiple of 16 and at most {HEAD_DIM}")
    if c.fp8_dim != layout.fp8_dim:
        raise ConfigError(
            f"fp8_dim={c.fp8_dim} does not fit layout {layout.name}: its "
            f"{layout.record_bytes}-byte record holds fp8_dim={layout.fp8_dim}")
    if c.block_size < 1 or c.block_size & (c.block_size - 1):
        raise ConfigError(f"block_size={c.block_size} must be a power of two")
    if not 1 <= c.num_stages <= MAX_STAGES:
        raise ConfigError(f"num_stages={c.num_stages} must be in 1..{MAX_STAGES}")
    if not 1 <= c.num_warps <= 32:
        raise ConfigError(f"num_warps={c.num_warps} must be in 1..32")
    if c.smem_bytes > c.arch_row.max_smem_per_block:
        raise ConfigError(
            f"{c.num_stages} stages x {c.num_warps} warps need {c.smem_bytes} bytes of "
            f"shared memory; {c.arch} allows {c.arch_row.max_smem_per_block}")


# The seed design, as one point of the config space (the seed has no PDL).
SEED = DequantGatherConfig(layout="dsv4_584", fp8_dim=448, block_size=64, num_stages=4, num_warps=4,
                           indexing="dense", gather_lens=True, schedule="strided", pdl=False, arch="sm_90a")

# What `make build` ships: the union of these cross products. In each, a
# layout fixes fp8_dim and an indexing mode fixes the gather modes it takes.
_EVERY_BLOCK_SIZE = {
    "layout": tuple(LAYOUTS),
    "block_size": (16, 32, 64, 128, 256),
    "num_stages": (2, 4, 8),
    "num_warps": (4,),
    "schedule": ("strided",),
    "arch": ("sm_90a",),
}
_SPEED_ISSUE = {  # the block sizes of the speed issue's shapes, the seed's pipeline
    "layout": tuple(LAYOUTS),
    "indexing": ("dense",),
    "block_size": (64, 256),
    "num_stages": (4,),
    "num_warps": (4,),
    "schedule": ("strided",),
    "arch": ("sm_90a",),
}
BUILD_MATRIX: tuple[dict[str, tuple[Any, ...]], ...] = (
    # Every family, every block size. Sparse without PDL: griddepcontrol costs
    # each CTA ~70 ns of SM time, which a sparse grid of mostly -1 slots (CTAs
    # with nothing to do) cannot hide -- measured 12.5 -> 20.9 us at 65536 slots,
    # 3% valid (BENCHMARKS.md, log 5).
    {**_EVERY_BLOCK_SIZE, "indexing": ("dense",), "pdl": (True,)},
    {**_EVERY_BLOCK_SIZE, "indexing": ("sparse",), "pdl": (False,)},
    # The seed's design without PDL: the benchmark's baseline, and what
    # KVGEN_PDL=0 dispatches to where it exists.
    {**_SPEED_ISSUE, "pdl": (False,)},
    # Launch-shape candidates for tuning (BENCHMARKS.md).
    {**_SPEED_ISSUE, "layout": ("dsv4_584",), "num_warps": (4, 8), "schedule": SCHEDULES, "pdl": (True,)},
)
GATHER_MODES = {"dense": (False, True), "sparse": (False,)}


def build_matrix(matrix: tuple[dict[str, tuple[Any, ...]], ...] = BUILD_MATRIX) -> Iterator[DequantGatherConfig]:
    seen = set()
    for product in matrix:
        keys = list(product)
        for values in itertools.product(*(product[k] for k in keys)):
            axes = dict(zip(keys, values))
            for gather_lens in GATHER_MODES[axes["indexing"]]:
                config = DequantGatherConfig(fp8_dim=LAYOUTS[axes["layout"]].fp8_dim, gather_lens=gather_lens, **axes)
                if config not in seen:
                    seen.add(config)
                    yield config


@dataclass(frozen=True)
class KernelParam:
    """One kernel argument of the flat ABI: a raw pointer or an integer."""

    name: str
    ctype: str  # C type; pointers end in '*'
    align: int = 0  # bytes the kernel assumes a pointer is aligned to

    @property
    def is_pointer(self) -> bool:
        return self.ctype.endswith("*")


# The ABI of each indexing mode, in order. Named here once: the template
# renders it, the manifest records it, the loader packs launch arguments from
# the manifest. Strides are in elements of the pointed-to type; page_stride is in bytes.
KERNEL_PARAMS: dict[str, tuple[KernelParam, ...]] = {
    "dense": (
        KernelParam("out", "__nv_bfloat16*", 16),
        KernelParam("k_cache", "uint8_t*", 16),
        KernelParam("seq_lens", "int32_t*", 4),
        KernelParam("gather_lens", "int32_t*", 4),  # null when the config has gather_lens=0
        KernelParam("block_table", "int32_t*", 4),
        KernelParam("out_stride_req", "int64_t"),
        KernelParam("out_stride_row", "int64_t"),
        KernelParam("page_stride", "int64_t"),
        KernelParam("block_table_stride", "int64_t"),
        KernelParam("offset", "int32_t"),
        KernelParam("max_rows", "int32_t"),  # out.shape[1] - offset: no row is written past it
    ),
    "sparse": (
        KernelParam("out", "__nv_bfloat16*", 16),
        KernelParam("k_cache", "uint8_t*", 16),
        KernelParam("slot_indices", "int32_t*", 4),  # page * block_size + row, or -1: row untouched
        KernelParam("out_stride_row", "int64_t"),
        KernelParam("page_stride", "int64_t"),
        KernelParam("num_slots", "int32_t"),
    ),
}
