"""Inputs for tests, the golden corpus, the demo and the benchmark.

One place builds paged caches (written by a reference UE8M0 quantizer, or raw
random bytes), block tables (random physical page permutations, unused
entries poisoned) and poisoned outputs; one place compares outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .formats import Format

POISON_BF16 = 0x7FBF  # a NaN with a payload no backend produces: "never written"
POISON_PAGE = -0x55555556  # 0xAAAAAAAA as int32: an unused block-table entry


def as_format(fmt: "str | Format") -> Format:
    """A format by name, from the loaded kernel trees (the shipped formats, and any user tree's)."""
    if isinstance(fmt, Format):
        return fmt
    from .runtime.loader import registry

    registry().entries  # load the trees
    if fmt not in registry().formats:
        raise ValueError(f"no loaded kernel tree defines format {fmt!r}; known: {sorted(registry().formats)}")
    return registry().formats[fmt]


def quantize_ue8m0(k: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [n, 512] -> (data rows uint8 [n, data_bytes], scale rows uint8 [n, scale_bytes]).

    The reference UE8M0 quantizer: per group amax clamped at 1e-4,
    scale = 2^ceil(log2(amax / 448)), values clamped to +-448, cast to e4m3.
    """
    n = k.shape[0]
    device = k.device
    fp8_dim, group = fmt.values, fmt.scale_group
    x = k[:, :fp8_dim].float().reshape(n, fp8_dim // group, group)
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
    exponent = torch.ceil(torch.log2(amax / 448.0))
    q = (x / torch.exp2(exponent)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    data = torch.empty((n, fmt.data_bytes), dtype=torch.uint8, device=device)
    data[:, :fp8_dim] = q.reshape(n, fp8_dim).view(torch.uint8)
    data[:, fp8_dim:] = k[:, fp8_dim:].contiguous().view(torch.uint8).reshape(n, 2 * fmt.tail)
    codes = torch.zeros((n, fmt.scale_bytes), dtype=torch.uint8, device=device)
    codes[:, : fp8_dim // group] = (exponent.squeeze(-1) + 127).clamp(0, 255).to(torch.uint8)
    return data, codes


def write_pages(num_blocks: int, block_size: int, fmt: Format, data: torch.Tensor,
                codes: torch.Tensor, g: torch.Generator, page_pad: int = 0) -> torch.Tensor:
    """Pack per-token records (num_blocks*block_size of them; `data` [n, data_bytes]: the
    value bytes then the tail's, `codes` [n, scale_bytes]: the scales then pad bytes) into
    a paged uint8 cache [num_blocks, block_size, record_bytes] whose page stride is padded
    by `page_pad` bytes of junk, each part where the format's placement puts it
    (`Format.regions`: page_split data rows then scale rows; inline records of values,
    scales, tail). The junk comes from a generator seeded from `g`'s seed, so a case is the
    same whatever ran before it, and `g`'s own draws (block tables, slots) are those the
    golden digests were made with."""
    record = fmt.record_bytes
    page_bytes = block_size * record + page_pad
    assert page_bytes % 16 == 0, "pages must start 16 bytes apart (the kernels copy 16-byte pieces)"
    junk = torch.Generator(device=g.device).manual_seed(g.initial_seed() ^ 0x9AD)
    storage = torch.randint(0, 256, (num_blocks * page_bytes,), dtype=torch.uint8, generator=junk, device=data.device)
    parts = {"values": data[:, : fmt.value_bytes], "tail": data[:, fmt.value_bytes: fmt.data_bytes],
             "scales": codes[:, : fmt.scale_bytes]}
    for part, (base, row_stride, nbytes) in fmt.regions(block_size).items():
        if nbytes:
            rows = storage.as_strided((num_blocks, block_size, nbytes), (page_bytes, row_stride, 1), base)
            rows.copy_(parts[part].reshape(num_blocks, block_size, nbytes))
    return storage.as_strided((num_blocks, block_size, record), (page_bytes, record, 1))


# Plausible scales where no encoder is at hand (see make_cache): e4m3 scale bytes in this range
# (2^-3 .. 2^1), float32 scales |N(0, 1)| / 448 (floored at 2^-126).
E4M3_SCALE_BYTES = (0x30, 0x50)


def _records(k: torch.Tensor, fmt: Format, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [n, head_dim] -> (data uint8 [n, data_bytes], scale rows uint8 [n, scale_bytes]) for a format
    quantize_ue8m0 does not serve: by the writer's reference encoder where it has one
    (quantize_insert.reference.encode_records), else random value bytes (no NaN bytes) and plausible
    scales drawn from `g`, with k's tail."""
    from .families.quantize_insert import reference as writer

    n, device = k.shape[0], k.device
    tail = k[:, fmt.values:].contiguous().view(torch.uint8).reshape(n, fmt.tail_bytes)
    if hasattr(writer, "encode_records"):
        values, scales = writer.encode_records(k[:, : fmt.values], k[:, fmt.values:] if fmt.tail else None, fmt,
                                               pow2_scale=False)
    else:
        values = torch.randint(0, 256, (n, fmt.value_bytes), dtype=torch.uint8, generator=g, device=device)
        if fmt.value_kind == "e4m3":
            values = torch.where((values & 0x7F) == 0x7F, values - 1, values)  # 0x7F/0xFF (NaN) -> +-448
        used = fmt.num_scales * fmt.scale_size
        if fmt.scale_kind == "f32":
            mag = torch.randn((n, fmt.num_scales), generator=g, device=device).abs() / 448.0
            scales = mag.clamp(min=2.0 ** -126).contiguous().view(torch.uint8).reshape(n, used)
        else:
            low, high = E4M3_SCALE_BYTES
            scales = torch.randint(low, high + 1, (n, used), dtype=torch.uint8, generator=g, device=device)
    if scales.shape[1] < fmt.scale_bytes:  # zero pad bytes
        scales = torch.cat([scales, scales.new_zeros((n, fmt.scale_bytes - scales.shape[1]))], dim=1)
    return torch.cat([values, tail], dim=1), scales


def make_cache(num_blocks: int, block_size: int, fmt: Format, g: torch.Generator, raw_bytes: bool = False,
               page_pad: int = 0, value_scale: float = 1.0) -> torch.Tensor:
    """A paged cache of random records, on `g`'s device: quantized from random
    bf16 (e4m3 values with UE8M0 codes by quantize_ue8m0; other kinds by the
    writer's encoder, see _records), or raw random bytes (any byte, NaN and Inf
    scales included)."""
    n, device = num_blocks * block_size, g.device
    if raw_bytes:
        data = torch.randint(0, 256, (n, fmt.data_bytes), dtype=torch.uint8, generator=g,
                             device=device)
        codes = torch.randint(0, 256, (n, fmt.scale_bytes), dtype=torch.uint8, generator=g, device=device)
    else:
        k = (torch.randn((n, fmt.head_dim), generator=g, device=device) * value_scale).to(torch.bfloat16)
        if fmt.value_kind == "e4m3" and fmt.scale_kind == "ue8m0":
            data, codes = quantize_ue8m0(k, fmt)
        else:
            data, codes = _records(k, fmt, g)
    return write_pages(num_blocks, block_size, fmt, data, codes, g, page_pad)


@dataclass
class Case:
    """One call's arguments, on the CPU."""

    out: torch.Tensor
    k_cache: torch.Tensor
    seq_lens: torch.Tensor
    gather_lens: torch.Tensor | None
    block_table: torch.Tensor
    block_size: int
    offset: int
    meta: dict = field(default_factory=dict)

    def args(self, device: str | torch.device = "cpu", out: torch.Tensor | None = None):
        move = lambda t: None if t is None else _to(t, device)  # noqa: E731
        return (out if out is not None else move(self.out), move(self.k_cache), move(self.seq_lens),
                move(self.gather_lens), move(self.block_table), self.block_size, self.offset)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """Move keeping strides (padded pages, strided block tables) intact."""
    if t.device == torch.device(device):
        return t
    return clone_strided(t, device)


def whole_storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t`, flat, in t's dtype: a cache's padding and
    the bytes around its pages included (t.cpu() or t.flatten() keep only t's elements)."""
    return t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)


def clone_strided(t: torch.Tensor, device=None) -> torch.Tensor:
    """A copy of `t` and of the whole storage under it, with t's strides and
    offset (Tensor.clone packs a padded view densely: its padding is lost)."""
    copied = whole_storage(t).to(device or t.device, copy=True)
    return copied.as_strided(t.shape, t.stride(), t.storage_offset())


def make_case(*, seq_lens: list[int], block_size: int = 64, format: "str | Format" = "dsv4_584",
              gather_lens: list[int] | None = None, offset: int = 0, max_tokens: int | None = None,
              raw_bytes: bool = False, page_pad: int = 0, block_table_pad: int = 0,
              extra_pages: int = 3, seed: int = 0, value_scale: float = 1.0) -> Case:
    """A random call: pages in a random physical order, unused block-table
    entries poisoned, padded page stride and strided block table on request."""
    g = torch.Generator().manual_seed(seed)
    num_reqs = len(seq_lens)
    pages_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(pages_per_req) + extra_pages
    fmt = as_format(format)
    k_cache = make_cache(num_blocks, block_size, fmt, g, raw_bytes, page_pad, value_scale)

    block_table = random_block_table(pages_per_req, num_blocks, g, block_table_pad)

    rows = max([0, *(gather_lens if gather_lens is not None else seq_lens)])
    max_tokens = max_tokens if max_tokens is not None else offset + rows
    out = poisoned_out(num_reqs, max_tokens, head_dim=fmt.head_dim)
    return Case(
        out=out, k_cache=k_cache, seq_lens=torch.tensor(seq_lens, dtype=torch.int32).reshape(num_reqs),
        gather_lens=None if gather_lens is None else torch.tensor(gather_lens, dtype=torch.int32).reshape(num_reqs),
        block_table=block_table, block_size=block_size, offset=offset,
    )


def random_block_table(pages_per_req: list[int], num_blocks: int, g: torch.Generator, pad: int = 0) -> torch.Tensor:
    """int32 [requests, max pages + 1] on `g`'s device: each request's pages drawn
    from one random permutation of the cache's pages, every unused entry
    poisoned; rows `pad` entries apart (a strided table) on request."""
    width = max([1, *pages_per_req]) + 1
    storage = torch.full((len(pages_per_req), width + pad), POISON_PAGE, dtype=torch.int32, device=g.device)
    block_table = storage[:, :width]  # stride(0) = width + pad
    perm = torch.randperm(num_blocks, generator=g, device=g.device)
    used = 0
    for r, p in enumerate(pages_per_req):
        block_table[r, :p] = perm[used: used + p].to(torch.int32)
        used += p
    return block_table


@dataclass
class SparseCase:
    """One sparse call's arguments, on the CPU."""

    out: torch.Tensor
    k_cache: torch.Tensor
    slot_indices: torch.Tensor
    block_size: int

    def args(self, device: str | torch.device = "cpu", out: torch.Tensor | None = None):
        return (out if out is not None else _to(self.out, device), _to(self.k_cache, device),
                _to(self.slot_indices, device), self.block_size)


def make_sparse_case(*, num_slots: int, valid: float = 1.0, block_size: int = 64, format: "str | Format" = "dsv4_584",
                     raw_bytes: bool = False, page_pad: int = 0, out_shape: tuple[int, ...] | None = None,
                     extra_pages: int = 3, seed: int = 0, value_scale: float = 1.0) -> SparseCase:
    """Random global slots over the whole cache, a fraction `valid` of them real, the rest -1."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-num_slots // block_size) + extra_pages
    fmt = as_format(format)
    k_cache = make_cache(num_blocks, block_size, fmt, g, raw_bytes, page_pad, value_scale)
    slots = random_slots(num_slots, num_blocks * block_size, valid, g)
    out = poisoned_out(1, num_slots, head_dim=fmt.head_dim).reshape(*(out_shape or (num_slots,)), fmt.head_dim)
    return SparseCase(out=out, k_cache=k_cache, slot_indices=slots, block_size=block_size)


def random_slots(num_slots: int, cache_slots: int, valid: float, g: torch.Generator) -> torch.Tensor:
    """int32 slots drawn over the whole cache, on `g`'s device; a fraction
    `valid` of them real, the rest -1."""
    slots = torch.randint(0, max(cache_slots, 1), (num_slots,), generator=g, device=g.device, dtype=torch.int32)
    slots[torch.rand(num_slots, generator=g, device=g.device) >= valid] = -1
    return slots


POISON_BYTE = 0xA5  # what a raw gather's outputs hold before the call: "never written"


@dataclass
class PackedCase:
    """One packed call's arguments (vLLM's cp_gather_and_upconvert_fp8_kv_cache), on the CPU."""

    out: torch.Tensor  # bf16 [T, head_dim], poisoned; rows may be strided
    k_cache: torch.Tensor
    block_table: torch.Tensor
    workspace_starts: torch.Tensor  # int32 [batch_size]
    batch_size: int
    seq_starts: torch.Tensor | None  # int32 [batch_size] or None
    block_size: int

    def args(self, device: str | torch.device = "cpu", out: torch.Tensor | None = None):
        """The op's arguments, in vLLM's (and docs/semantics.md's) order:
        (src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)."""
        move = lambda t: None if t is None else _to(t, device)  # noqa: E731
        return (move(self.k_cache), out if out is not None else move(self.out), move(self.block_table),
                move(self.workspace_starts), self.batch_size, move(self.seq_starts))

    def reference_args(self, device: str | torch.device = "cpu", out: torch.Tensor | None = None):
        """The reference's and the oracle's arguments:
        (out, k_cache, block_table, starts, num_reqs, seq_starts, block_size)."""
        k_cache, out, block_table, starts, num_reqs, seq_starts = self.args(device, out)
        return out, k_cache, block_table, starts, num_reqs, seq_starts, self.block_size


@dataclass
class RawPackedCase:
    """One raw packed call's arguments (vLLM's cp_gather_indexer_k_quant_cache), on the CPU."""

    k_cache: torch.Tensor
    dst_k: torch.Tensor  # uint8 [T, value_bytes], poisoned with POISON_BYTE
    dst_scale: torch.Tensor  # uint8 [T, num_scales * scale_size], poisoned with POISON_BYTE
    block_table: torch.Tensor
    cu_seq_lens: torch.Tensor  # int32 [B + 1]
    block_size: int

    def args(self, device: str | torch.device = "cpu", dst_k: torch.Tensor | None = None,
             dst_scale: torch.Tensor | None = None):
        """The op's arguments, in vLLM's order: (kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)."""
        return (_to(self.k_cache, device), dst_k if dst_k is not None else _to(self.dst_k, device),
                dst_scale if dst_scale is not None else _to(self.dst_scale, device), _to(self.block_table, device),
                _to(self.cu_seq_lens, device))

    def reference_args(self, device: str | torch.device = "cpu", dst_k: torch.Tensor | None = None,
                       dst_scale: torch.Tensor | None = None):
        """The reference's and the oracle's arguments:
        (dst_k, dst_scale, k_cache, block_table, cu_seq_lens, block_size)."""
        k_cache, dst_k, dst_scale, block_table, cu_seq_lens = self.args(device, dst_k, dst_scale)
        return dst_k, dst_scale, k_cache, block_table, cu_seq_lens, self.block_size


def _pages_for(span: int, first: int, block_size: int) -> int:
    """Block-table columns a request needs to read positions first .. first + span - 1."""
    return -(-(first + span) // block_size) if span > 0 else 0


def make_packed_case(*, seq_lens: list[int], block_size: int = 64, format: "str | Format" = "v32_656",
                     seq_starts: list[int] | None = None, rows: int | None = None, workspace_gap: int = 0,
                     seed: int = 0, raw_bytes: bool = False, page_pad: int = 0, row_pad: int = 0,
                     extra_pages: int = 2, value_scale: float = 1.0) -> PackedCase:
    """A random packed call: request r owns seq_lens[r] workspace rows, packed one after another
    from row `workspace_gap` (workspace_starts[r] = workspace_gap + sum(seq_lens[:r]); rows before
    it belong to no request and stay poisoned), reading positions from seq_starts[r] (0 without).
    `rows` (default: every request's rows) is dst's row count T; the last request owns every row
    from its start to T, and gets pages for all of them. Pages in a random physical order, unused
    block-table entries poisoned, `row_pad` extra elements between dst rows."""
    g = torch.Generator().manual_seed(seed)
    fmt = as_format(format)
    num_reqs = len(seq_lens)
    starts = [workspace_gap + sum(seq_lens[:r]) for r in range(num_reqs)]
    total = rows if rows is not None else workspace_gap + sum(seq_lens)
    first = seq_starts if seq_starts is not None else [0] * num_reqs
    spans = [seq_lens[r] if r + 1 < num_reqs else max(total - starts[r], 0) for r in range(num_reqs)]
    pages_per_req = [_pages_for(spans[r], first[r], block_size) for r in range(num_reqs)]
    num_blocks = sum(pages_per_req) + extra_pages
    k_cache = make_cache(num_blocks, block_size, fmt, g, raw_bytes, page_pad, value_scale)
    block_table = random_block_table(pages_per_req, num_blocks, g)
    out = poisoned_out(1, total, head_dim=fmt.head_dim + row_pad)[0, :, : fmt.head_dim]
    int32 = lambda v: torch.tensor(v, dtype=torch.int32).reshape(len(v))  # noqa: E731
    return PackedCase(out=out, k_cache=k_cache, block_table=block_table, workspace_starts=int32(starts),
                      batch_size=num_reqs, seq_starts=None if seq_starts is None else int32(seq_starts),
                      block_size=block_size)


def make_raw_packed_case(*, seq_lens: list[int], block_size: int = 64, format: "str | Format" = "indexer_132",
                         first_row: int = 0, extra_rows: int = 2, seed: int = 0, raw_bytes: bool = False,
                         page_pad: int = 0, extra_pages: int = 2, value_scale: float = 1.0) -> RawPackedCase:
    """A random raw packed call: request r owns rows cu_seq_lens[r] .. cu_seq_lens[r+1] - 1, its
    positions 0 .. seq_lens[r] - 1; cu_seq_lens[0] = first_row. dst has `extra_rows` rows past
    cu_seq_lens[-1] (they, and the rows before first_row, stay poisoned: POISON_BYTE)."""
    g = torch.Generator().manual_seed(seed)
    fmt = as_format(format)
    cu = [first_row]
    for length in seq_lens:
        cu.append(cu[-1] + length)
    pages_per_req = [_pages_for(length, 0, block_size) for length in seq_lens]
    num_blocks = sum(pages_per_req) + extra_pages
    k_cache = make_cache(num_blocks, block_size, fmt, g, raw_bytes, page_pad, value_scale)
    block_table = random_block_table(pages_per_req, num_blocks, g)
    total = cu[-1] + extra_rows
    dst_k = torch.full((total, fmt.value_bytes), POISON_BYTE, dtype=torch.uint8)
    dst_scale = torch.full((total, fmt.num_scales * fmt.scale_size), POISON_BYTE, dtype=torch.uint8)
    return RawPackedCase(k_cache=k_cache, dst_k=dst_k, dst_scale=dst_scale, block_table=block_table,
                         cu_seq_lens=torch.tensor(cu, dtype=torch.int32), block_size=block_size)


def poisoned_out(num_reqs: int, max_tokens: int, device="cpu", head_dim: int = 512) -> torch.Tensor:
    out = torch.empty((num_reqs, max_tokens, head_dim), dtype=torch.bfloat16, device=device)
    out.view(torch.int16).fill_(POISON_BF16)
    return out


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements that differ under kvgen's comparison rule: NaN matches any NaN
    (but not the poison); everything else bit for bit."""
    a, b = a.detach(), b.detach().to(a.device)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"cannot compare {a.dtype}{list(a.shape)} with {b.dtype}{list(b.shape)}")
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    same_bits = a.view(torch.int16) == b.view(torch.int16)
    # The poison is a NaN too: it must match bit for bit (it marks unwritten rows).
    poison = (a.view(torch.int16) == POISON_BF16) | (b.view(torch.int16) == POISON_BF16)
    return int((~(same_bits | (both_nan & ~poison))).sum())


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None if `a` and `b` agree under `mismatches`' rule, else where they first
    differ: its index (request, row, column for a [requests, rows, 512] output)
    and both bit patterns."""
    bad = mismatches(a, b)
    if bad == 0:
        return None
    a, b = a.detach().cpu(), b.detach().cpu()
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    poison = (a.view(torch.int16) == POISON_BF16) | (b.view(torch.int16) == POISON_BF16)
    differ = ~((a.view(torch.int16) == b.view(torch.int16)) | (both_nan & ~poison))
    index = [int(i) for i in differ.nonzero()[0]]
    names = {3: ("request", "row", "column"), 2: ("row", "column")}.get(a.dim())
    where = ", ".join(f"{n} {i}" for n, i in zip(names, index)) if names else f"index {tuple(index)}"
    bits = lambda t: f"0x{int(t[tuple(index)].view(torch.int16)) & 0xFFFF:04x}"  # noqa: E731
    return f"{bad} element(s) differ; first at {where}: {bits(a)} vs {bits(b)}"
