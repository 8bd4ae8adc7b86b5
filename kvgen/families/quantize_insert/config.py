"""The quantize-and-insert (writer) family's configuration: every generator
parameter, named once, and the kernel ABI.

The writer reads bf16 rows of k and writes records of the same Format rows the
readers read (kvgen/formats.py). One warp writes one token at a time, or
several where a row has 16 chunks or fewer (tokens_per_step: one per lane
group): each lane loads 16-byte chunks (8 values) of the row, the lanes of a
scale group reduce its amax with butterfly shuffles, and each lane packs its
values with the shared inline-PTX helpers. Imported by the runtime too: no
torch, no jinja2.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import ARCHS, ConfigError, FamilyConfig, KernelParam, check_choice, check_types, lane_groups, param
from ...formats import Format

SLOT_DTYPES = {"int32": "int32_t*", "int64": "int64_t*"}
# (value kind, scale kind) pairs the template encodes, each by its rule in docs/semantics.md.
ENCODINGS = (("e4m3", "ue8m0"), ("e4m3", "f32"), ("e2m1", "e4m3"))  # slot_mapping's dtype: one kernel each, no cast
MAX_TOKENS_PER_WARP = 8
MAX_BLOCK_SIZE = 1024
# What the template can move: each lane handles at most three 16-byte chunks
# (8 bf16 values) of a row; a scale group spans a power-of-two number of lanes.
MAX_HEAD_DIM = 3 * 32 * 8
# Warps an SM holds at most (Hopper's 64; the other archs in service hold 48 or 64).
MAX_OCCUPANCY_WARPS = 64


def tokens_per_step(fmt: Format) -> int:
    """Tokens a warp writes at once: its 32 lanes split into groups of the
    fewest lanes (a power of two) that hold a row's 16-byte chunks, one each --
    two for the 128-value indexer rows, one (the whole warp) for every row of
    more than 128 values. Derived from the format, never chosen: the template
    and the launch grid both ask here."""
    return lane_groups(fmt.head_dim // 8)


@dataclass(frozen=True)
class QuantizeInsertConfig(FamilyConfig):
    """One specialisation of the quantize-and-insert K cache kernel."""

    format: Format = param("", "the cache record format (a kvgen.formats.Format row)")
    block_size: int = param("b", f"tokens per cache page: a power of two, 1..{MAX_BLOCK_SIZE}")
    tokens_per_warp: int = param("t", f"tokens a warp (each lane group) loads before it writes the first, "
                                      f"1..{MAX_TOKENS_PER_WARP} (loads in flight)", default=1)
    num_warps: int = param("w", "warps per CTA, 1..32; tokens_per_step tokens per warp at a time", default=4)
    slot_dtype: str = param("", "slot_mapping's dtype: int32 or int64 (a kernel for each)")
    pdl: bool = param("p", "programmatic dependent launch: griddepcontrol.wait before any global access, then "
                           "launch_dependents", default=True)
    arch: str = param("", "target architecture (a row of kvgen.config.ARCHS)", default="sm_90a")
    pow2_scale: bool = param("u", "float32 scales only: round each scale up to a power of two (the indexer's "
                                  "scale_fmt='ue8m0')", default=False, named_at_default=False)
    occupancy_warps: int = param("o", "warps an SM must be able to hold at once: the compiler caps a thread's "
                                      f"registers to fit them (32: 64 registers); 0: no cap; a multiple of num_warps "
                                      f"up to {MAX_OCCUPANCY_WARPS}", default=0, named_at_default=False)

    family = "qik"  # class attributes, not fields: the kernel family's name prefix,
    spec_table = "quantize_insert"  # its table in a spec file,
    template = "quantize_insert.py.j2"  # and its template

    def _check(self) -> None:
        _check(self)

    @property
    def params(self) -> tuple[KernelParam, ...]:
        return KERNEL_PARAMS[self.slot_dtype]

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.format)

    @property
    def smem_bytes(self) -> int:
        return 0


def _check(c: QuantizeInsertConfig) -> None:
    check_types(c, {"block_size": int, "tokens_per_warp": int, "num_warps": int, "slot_dtype": str, "pdl": bool,
                    "arch": str, "pow2_scale": bool, "occupancy_warps": int})
    check_choice("arch", c.arch, ARCHS)
    check_choice("slot_dtype", c.slot_dtype, SLOT_DTYPES)
    f = c.format
    if (f.value_kind, f.scale_kind) not in ENCODINGS:
        raise ConfigError(f"format {f.name}: the quantize_insert template writes {sorted(ENCODINGS)} "
                          f"(value kind, scale kind), not {(f.value_kind, f.scale_kind)}")
    if c.pow2_scale and f.scale_kind != "f32":
        raise ConfigError(f"pow2_scale applies to float32 scales; format {f.name}'s are {f.scale_kind} "
                          "(UE8M0 scales are powers of two already)")
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
    if c.occupancy_warps and (c.occupancy_warps % c.num_warps or not c.num_warps <= c.occupancy_warps
                              <= MAX_OCCUPANCY_WARPS):
        raise ConfigError(f"occupancy_warps={c.occupancy_warps} must be 0 or a multiple of num_warps "
                          f"({c.num_warps}) up to {MAX_OCCUPANCY_WARPS}")


def _kernel_params(slot_ctype: str) -> tuple[KernelParam, ...]:
    return (
        KernelParam("k", "__nv_bfloat16*", 16),  # the values to quantize, [T, values] (rows k_stride apart)
        KernelParam("tail", "__nv_bfloat16*", 16),  # the tail copied verbatim, [T, tail]: k + values, or k_pe
        KernelParam("k_cache", "uint8_t*", 16),
        KernelParam("slot_mapping", slot_ctype, 4),  # slot or -1: token skipped
        KernelParam("k_stride", "int64_t"),  # elements between rows of k
        KernelParam("tail_stride", "int64_t"),  # elements between rows of tail
        KernelParam("page_stride", "int64_t"),  # bytes between pages
        KernelParam("num_tokens", "int32_t"),  # slot_mapping.shape[0]: tokens past it are not written
    )


# The kernel ABI for each slot_mapping dtype (only the slots' C type differs). Named here once: the
# template renders it, the manifest records it, the op names its launch values after it.
KERNEL_PARAMS: dict[str, tuple[KernelParam, ...]] = {
    dtype: _kernel_params(ctype) for dtype, ctype in SLOT_DTYPES.items()}
