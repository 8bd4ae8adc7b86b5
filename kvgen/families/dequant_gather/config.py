"""The dequantize-and-gather family's configuration: every generator
parameter, named once, and the kernel ABI.

A `DequantGatherConfig` is a frozen value; its record format is embedded (a
`kvgen.formats.Format` row), so a config carries everything its kernel needs
into a build worker, a manifest row and the runtime, with no registry to
consult. Imported by the runtime too: no torch, no jinja2, no CuteDSL.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ...config import ARCHS, ConfigError, FamilyConfig, KernelParam, check_choice, check_types, lane_groups, param
from ...formats import Format

# How a request's tokens are split over its CTAs' warps.
#   strided:    warp k of CTA y takes tokens (y*W + k) + n*(Y*W)  (the seed's order)
#   contiguous: CTA y takes one contiguous span of tokens, its warps interleaved
#   ballot:     sparse only: warps grid-stride over chunks of ballot_chunk slots, read
#               with one load a lane; a warp ballot marks the valid ones and only
#               those enter the ring, so -1 slots cost no pipeline step
#   compact:    sparse only: CTAs grid-stride over chunks of ballot_chunk slots a warp; each
#               warp ballots its slots, the CTA compacts the chunk's valid ones in shared
#               memory (slot order), and its warps take the entries in turn through their
#               rings: no step for a negative slot, and a chunk's records spread evenly over
#               its warps (BENCHMARKS.md, log 32)
#   page_run:   dense: a request's y-th CTA of Y takes its runs y, y + Y, ... of run_tokens
#               consecutive tokens of one page: one block-table lookup a run, two bulk
#               copies (cp.async.bulk, sm_90+) move the run's contiguous data rows and
#               scale rows into shared memory behind an mbarrier, then all warps decode
#               and store the run's contiguous output rows; CTAs are numbered
#               request-major, so those resident at once stream a few requests
#               (BENCHMARKS.md, log 30). Raw packed gathers too: CTA y takes chunks
#               y, y + Y, ... of run_tokens consecutive output rows, a thread a row:
#               each finds its row's page, a warp's rows split into runs of one
#               request inside one page, one bulk copy a run, each thread its row's
#               scale bytes; then all threads store the chunk (logs 33, 36)
#   direct:     bf16 gathers (a bf16 tail copied bit for bit), no shared memory. A
#               record is direct_lanes(format) lanes' work, a lane an output chunk of
#               8 values (16 bytes) a pass; a lane group locates its num_stages records
#               (slot or block-table loads; packed: a request search a block), then
#               loads their value words and scales straight into registers, then
#               decodes and stores them all, so num_stages records a lane group are
#               in flight. Warps stride over blocks of num_stages records a group: a
#               request's warps (dense), or the whole grid's (sparse, packed)
#               (BENCHMARKS.md, logs 46, 48, 49)
SCHEDULES = ("strided", "contiguous", "ballot", "compact", "page_run", "direct")
BALLOT_CHUNKS = (4, 8, 16, 32)
CHUNKED_SCHEDULES = ("ballot", "compact")  # the schedules whose warps read ballot_chunk slots at once
# The schedules whose rows may store with the streaming policy (evict_first):
# the ones the sparse gathers' rules choose among, measured, shipped and tested
# on the GPU (the dense rows of the ring and page runs gained nothing; log 52).
EVICT_FIRST_SCHEDULES = ("compact", "direct")

# Which tokens a call gathers.
#   dense:  request r's last gather_len tokens through its block-table row -> out[r, offset + t]
#   sparse: global slots (page * block_size + row) -> out row i; slot -1 leaves row i untouched
#   packed: out row t <- request r's position t - starts[r] (+ seq_starts[r]), r the last request
#           with starts[r] <= t (vLLM's cp_gather_* ops: requests packed one after another)
INDEXING = ("dense", "sparse", "packed")
GATHER_MODES = {"dense": (False, True), "sparse": (False,), "packed": (False,)}  # gather_lens values per indexing
# What a kernel writes for each token.
#   bf16: the decoded row (head_dim bf16 values)
#   raw:  the record's value bytes and scale bytes, undecoded, to two outputs (packed only)
OUTPUTS = ("bf16", "raw")

MAX_STAGES = 16
MAX_BLOCK_SIZE = 1024
# What the template can move: each lane copies at most three 16-byte pieces of
# a record and stores at most three 16-byte chunks (8 bf16) of an output row.
MAX_PIECES_PER_LANE = 3
MAX_RECORD_BYTES = MAX_PIECES_PER_LANE * 32 * 16
MAX_HEAD_DIM = MAX_PIECES_PER_LANE * 32 * 8
MAX_TOKENS_PER_STEP = 8
# Packed indexing: a CTA stages up to this many requests' starts and seq_starts
# (two int32 each) in shared memory, so each row's request search reads shared
# memory (BENCHMARKS.md, log 23); calls with more requests search global memory.
STAGED_REQS = 512


def copy_pieces(fmt: Format) -> tuple[int, int]:
    """(16-byte pieces a record is staged in from its data row -- or, inline, from
    the record itself --, 16-byte pieces of its scale row; 0 where the scale row
    is one copy smaller than 16 bytes, or inline)."""
    inline = fmt.placement == "inline"
    src = (fmt.record_bytes if inline else fmt.data_bytes) // 16
    return src, (0 if inline or fmt.scale_bytes < 16 else fmt.scale_bytes // 16)


@functools.lru_cache(maxsize=None)  # asked by each launch grid of a direct row
def direct_lanes(fmt: Format) -> int:
    """The direct schedule's lanes a record: one a 16-byte output chunk (8
    values), at most the warp's 32 (then each lane takes several chunks); a
    power of two, so a warp moves 32 // direct_lanes records a pass."""
    return 32 // lane_groups(fmt.head_dim // 8)


def direct_block_rows(fmt: Format, num_stages: int) -> int:
    """The direct schedule's block: a warp's num_stages rounds of its lane
    groups' records (the template's BLOCK_ROWS, the launch grid's rows a warp)."""
    return 32 // direct_lanes(fmt) * num_stages


@functools.lru_cache(maxsize=None)  # asked at every launch
def tokens_per_step(fmt: Format, output: str = "bf16") -> int:
    """Records a warp moves per ring step: 32 lanes split into groups of the
    fewest lanes (a power of two) that move a record with at most
    MAX_PIECES_PER_LANE 16-byte pieces each -- one group (the whole warp) for
    every record of 288 bytes or more, four for the 132-byte indexer's (eight
    for its raw gather), so a small record no longer costs a whole warp step.
    Derived from the format, never chosen: one place says it (the template and
    the launch grid both ask here)."""
    pieces = sum(copy_pieces(fmt))
    stores = fmt.value_bytes // 16 if output == "raw" else fmt.head_dim // 8
    need = max(-(-pieces // MAX_PIECES_PER_LANE), -(-stores // MAX_PIECES_PER_LANE), 1)
    if output == "raw":
        need = max(need, fmt.num_scales * fmt.scale_size)  # a lane per scale byte
    return min(lane_groups(need), MAX_TOKENS_PER_STEP)


@dataclass(frozen=True)
class DequantGatherConfig(FamilyConfig):
    """One specialisation of the dequantize-and-gather K cache kernel."""

    format: Format = param("", "the cache record format (a kvgen.formats.Format row): values, tail, scales")
    block_size: int = param("b", f"tokens per cache page: a power of two, 1..{MAX_BLOCK_SIZE}")
    num_stages: int = param("s", f"cp.async ring depth per warp (tokens in flight); direct: records a lane group "
                                 f"holds in registers at once; 1..{MAX_STAGES}")
    num_warps: int = param("w", "warps per CTA, 1..32", default=4)
    indexing: str = param("", "dense (block table), sparse (slot indices) or packed (requests one after another); "
                              "see INDEXING")
    gather_lens: bool = param("g", "dense: the kernel reads gather_lens (else gathers whole sequences); "
                                   "sparse: false", default=None)
    schedule: str = param("", "token-to-warp schedule (see SCHEDULES)", default="strided")
    pdl: bool = param("p", "programmatic dependent launch: griddepcontrol.wait before any global access, then "
                           "launch_dependents (the runtime may then launch it with PDL)", default=True)
    arch: str = param("", "target architecture (a row of kvgen.config.ARCHS)", default="sm_90a")
    output: str = param("", "bf16 (decoded rows) or raw (value and scale bytes; packed only); see OUTPUTS",
                        default="bf16", named_at_default=False)
    ballot_chunk: int = param("c", f"the ballot and compact schedules' chunk: slots a warp reads (one a lane) and "
                                   f"ballots at once, one of {BALLOT_CHUNKS}; the launch grid gives each warp "
                                   f"(ballot) or each CTA's num_warps warps (compact) one such chunk. Other "
                                   f"schedules: 32", default=32, named_at_default=False)
    run_tokens: int = param("r", "the page_run schedule's run: tokens a CTA moves at once, a power of two (dense: "
                                 "one that divides block_size; raw packed: at most num_warps * 32); other "
                                 "schedules: 0", default=0, named_at_default=False)
    evict_first: bool = param("e", f"bf16 output rows stored with the streaming cache policy (st.global.cs), their "
                                   f"lines the first L2 evicts (BENCHMARKS.md, log 52); the schedules "
                                   f"{', '.join(EVICT_FIRST_SCHEDULES)} only; default: write-back stores",
                              default=False, named_at_default=False)

    family = "dqgk"  # class attributes, not fields: the kernel family's name prefix,
    spec_table = "dequant_gather"  # its table in a spec file,
    template = "dequant_gather.py.j2"  # and its template

    def _check(self) -> None:
        _check(self)

    # ---- derived, never stored ------------------------------------------------
    @property
    def params(self) -> tuple[KernelParam, ...]:
        return KERNEL_PARAMS["raw" if self.output == "raw" else self.indexing]

    @property
    def stage_bytes(self) -> int:
        """One token record in shared memory (Format.offsets: page-split data row
        then scale row, or the inline record), 16-byte aligned."""
        return _round_up(self.format.record_bytes, 16)

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.format, self.output)

    @property
    def direct_lanes(self) -> int:
        return direct_lanes(self.format)

    @property
    def direct_block_rows(self) -> int:
        return direct_block_rows(self.format, self.num_stages)

    @property
    def copy_pieces(self) -> tuple[int, int]:
        return copy_pieces(self.format)

    @property
    def run_scale_bytes(self) -> int:
        """page_run: shared memory for the run's scale rows (dense; the raw packed
        gather's threads load theirs). A copy starts at the 16-byte boundary at or
        before its first scale row, which lies inside the run (a run's first row
        is on one: run_tokens * scale_bytes is a multiple of 16), so it never
        holds more than the run's rows."""
        return self.run_tokens * self.format.scale_bytes if self.indexing == "dense" else 0

    @property
    def smem_bytes(self) -> int:
        if self.schedule == "page_run" and self.indexing == "packed":
            # the chunk's data rows, one 8-byte mbarrier (16 with the staged starts' alignment), the staged starts
            return self.run_tokens * self.format.data_bytes + 16 + 8 * self.staged_reqs
        if self.schedule == "page_run":  # the run's data rows, its scale rows, one 8-byte mbarrier
            return self.run_tokens * self.format.data_bytes + self.run_scale_bytes + 8
        if self.schedule == "direct":  # registers only
            return 0
        ring = self.stage_bytes * self.tokens_per_step * self.num_stages * self.num_warps
        staged_rows = 4 * self.num_stages * self.num_warps if self.schedule == "ballot" else 0  # int32 per stage
        return ring + staged_rows + self.compact_bytes + 8 * self.staged_reqs

    @property
    def compact_bytes(self) -> int:
        """compact: the chunk's list (slot and out row, int32 each, per slot) and a count per warp."""
        if self.schedule != "compact":
            return 0
        return 8 * self.ballot_chunk * self.num_warps + _round_up(4 * self.num_warps, 16)

    @property
    def staged_reqs(self) -> int:
        """Requests whose starts and seq_starts a CTA stages in shared memory (packed
        only; not direct, whose warps hold up to 32 requests' starts in lanes and
        search global memory past that, once a block)."""
        return STAGED_REQS if self.indexing == "packed" and self.schedule != "direct" else 0

    @classmethod
    def from_product(cls, point: dict[str, Any]):
        """The configs at one point of a spec product; a gather_lens left out
        (None) takes every mode the indexing allows."""
        modes = (GATHER_MODES.get(point["indexing"], (False,)) if point["gather_lens"] is None
                 else (point["gather_lens"],))
        for gather_lens in modes:
            yield cls(**{**point, "gather_lens": gather_lens})


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _check(c: DequantGatherConfig) -> None:
    check_types(c, {"block_size": int, "num_stages": int, "num_warps": int, "indexing": str, "gather_lens": bool,
                    "schedule": str, "pdl": bool, "arch": str, "output": str, "ballot_chunk": int,
                    "run_tokens": int, "evict_first": bool})
    check_choice("arch", c.arch, ARCHS)
    check_choice("schedule", c.schedule, SCHEDULES)
    check_choice("indexing", c.indexing, INDEXING)
    check_choice("output", c.output, OUTPUTS)
    if c.gather_lens not in GATHER_MODES[c.indexing]:
        raise ConfigError("gather_lens applies to dense indexing only (sparse calls take slot indices, packed calls "
                          "request starts)")
    f = c.format
    if c.output == "raw" and (c.indexing != "packed" or f.placement != "page_split"):
        raise ConfigError("output='raw' (undecoded value and scale bytes) is built for packed indexing of page-split "
                          f"formats, not {c.indexing} indexing of {f.placement} format {f.name}")
    check_choice("ballot_chunk", c.ballot_chunk, BALLOT_CHUNKS)
    if c.ballot_chunk != 32 and c.schedule not in CHUNKED_SCHEDULES:
        raise ConfigError(f"ballot_chunk={c.ballot_chunk} applies to the ballot and compact schedules only, not "
                          f"{c.schedule}")
    if c.schedule in CHUNKED_SCHEDULES and (c.indexing != "sparse" or c.tokens_per_step != 1):
        raise ConfigError(f"schedule={c.schedule!r} is built for sparse gathers of one record a warp step (records "
                          f"of 288 bytes or more), not {c.indexing} indexing of format {f.name} "
                          f"({c.tokens_per_step} records a step)")
    if c.evict_first and (c.output != "bf16" or c.schedule not in EVICT_FIRST_SCHEDULES):
        raise ConfigError(f"evict_first applies to bf16 output rows of the {' and '.join(EVICT_FIRST_SCHEDULES)} "
                          f"schedules, not output={c.output!r} under {c.schedule}")
    if c.run_tokens and c.schedule != "page_run":
        raise ConfigError(f"run_tokens={c.run_tokens} applies to the page_run schedule only, not {c.schedule}")
    if f.scale_group % 8 or f.tail % 8:
        raise ConfigError(f"format {f.name}: the template handles values in chunks of 8 (one 16-byte store), so "
                          f"scale_group ({f.scale_group}) and tail ({f.tail}) must be multiples of 8")
    if f.head_dim > MAX_HEAD_DIM or f.record_bytes > MAX_RECORD_BYTES:
        raise ConfigError(f"format {f.name}: the template moves records of at most {MAX_RECORD_BYTES} bytes and output "
                          f"rows of at most {MAX_HEAD_DIM} values; this one has {f.record_bytes} and {f.head_dim}")
    if f.placement == "page_split" and f.scale_bytes > 16 and f.data_bytes // 16 + f.scale_bytes // 16 > 32 * 3:
        raise ConfigError(f"format {f.name}: too many 16-byte pieces per record")
    if not 1 <= c.block_size <= MAX_BLOCK_SIZE or c.block_size & (c.block_size - 1):
        raise ConfigError(f"block_size={c.block_size} must be a power of two in 1..{MAX_BLOCK_SIZE}")
    if not 1 <= c.num_stages <= MAX_STAGES:
        raise ConfigError(f"num_stages={c.num_stages} must be in 1..{MAX_STAGES}")
    if not 1 <= c.num_warps <= 32:
        raise ConfigError(f"num_warps={c.num_warps} must be in 1..32")
    if c.schedule == "page_run":
        _check_page_run(c)
    if c.schedule == "direct" and c.output != "bf16":
        raise ConfigError(f"schedule='direct' is built for bf16 gathers, not output={c.output!r}")
    if c.smem_bytes > c.arch_row.max_smem_per_block:
        what = (f"run_tokens={c.run_tokens} needs" if c.schedule == "page_run"
                else f"{c.num_stages} stages x {c.num_warps} warps need")
        raise ConfigError(f"{what} {c.smem_bytes} bytes of shared memory; {c.arch} allows "
                          f"{c.arch_row.max_smem_per_block}")


def _check_page_run(c: DequantGatherConfig) -> None:
    f = c.format
    if (c.indexing, c.output) not in (("dense", "bf16"), ("packed", "raw")):
        raise ConfigError(f"schedule='page_run' is built for dense bf16 gathers and raw packed ones, not "
                          f"{c.indexing} indexing with output={c.output!r}")
    if c.arch_row.flavour != "hopper":
        raise ConfigError(f"schedule='page_run' needs cp.async.bulk (sm_90 or later), not {c.arch}")
    if c.num_stages != 1:
        raise ConfigError(f"schedule='page_run' stages one run a CTA: num_stages must be 1, not {c.num_stages}")
    r = c.run_tokens
    if c.indexing == "packed":
        # Runs start on any row of a page: each is one bulk copy of whole data rows (16-byte multiples).
        if r < 1 or r & (r - 1) or r > c.threads:
            raise ConfigError(f"run_tokens={r} must be a power of two of at most {c.threads} (num_warps * 32): a "
                              f"thread locates one row")
        return
    if (f.placement, f.value_kind, f.scale_kind) != ("page_split", "e4m3", "ue8m0"):
        # The formats whose page_run rows were checked on a GPU (dsv4_584, v41_528).
        raise ConfigError(f"schedule='page_run' is built for page-split formats of e4m3 values with UE8M0 scales, "
                          f"not format {f.name} ({f.placement}, {f.value_kind} values, {f.scale_kind} scales)")
    if r < 1 or r & (r - 1) or c.block_size % r:
        raise ConfigError(f"run_tokens={r} must be a power of two that divides block_size={c.block_size}")
    if (r * f.scale_bytes) % 16:
        raise ConfigError(f"run_tokens={r}: a run's scale rows ({r} x {f.scale_bytes} bytes) must be a multiple of "
                          f"16 bytes, so that each run's scale rows start on a bulk copy's 16-byte boundary")


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
    "packed": (
        KernelParam("out", "__nv_bfloat16*", 16),
        KernelParam("k_cache", "uint8_t*", 16),
        KernelParam("block_table", "int32_t*", 4),
        KernelParam("starts", "int32_t*", 4),  # request r's first row; num_reqs (+1 when bounded) entries
        KernelParam("seq_starts", "int32_t*", 4),  # added to each request's positions; read only if has_seq_starts
        KernelParam("out_stride_row", "int64_t"),
        KernelParam("page_stride", "int64_t"),
        KernelParam("block_table_stride", "int64_t"),
        KernelParam("num_reqs", "int32_t"),
        KernelParam("num_rows", "int32_t"),  # out.shape[0]: no row is written past it
        KernelParam("bounded", "int32_t"),  # 1: rows >= starts[num_reqs] are not written
        KernelParam("has_seq_starts", "int32_t"),
    ),
    "raw": (  # packed indexing, undecoded bytes out
        KernelParam("out", "uint8_t*", 16),  # value bytes, [rows, value_bytes]
        KernelParam("out_scales", "uint8_t*", 4),  # scale bytes (no pad), [rows, num_scales * scale_size]
        KernelParam("k_cache", "uint8_t*", 16),
        KernelParam("block_table", "int32_t*", 4),
        KernelParam("starts", "int32_t*", 4),
        KernelParam("seq_starts", "int32_t*", 4),
        KernelParam("out_stride_row", "int64_t"),  # bytes
        KernelParam("scales_stride_row", "int64_t"),  # bytes
        KernelParam("page_stride", "int64_t"),
        KernelParam("block_table_stride", "int64_t"),
        KernelParam("num_reqs", "int32_t"),
        KernelParam("num_rows", "int32_t"),
        KernelParam("bounded", "int32_t"),
        KernelParam("has_seq_starts", "int32_t"),
    ),
}
