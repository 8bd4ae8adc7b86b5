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
    """Pack per-token rows (num_blocks*block_size of them) into a paged uint8 cache
    [num_blocks, block_size, record_bytes] whose page stride is padded by `page_pad`
    bytes of junk. The junk comes from a generator seeded from `g`'s seed, so a
    case is the same whatever ran before it, and `g`'s own draws (block tables,
    slots) are those the golden digests were made with."""
    record = fmt.record_bytes
    page_bytes = block_size * record + page_pad
    assert page_bytes % 16 == 0, "pages must start 16 bytes apart (the kernels copy 16-byte pieces)"
    junk = torch.Generator(device=g.device).manual_seed(g.initial_seed() ^ 0x9AD)
    storage = torch.randint(0, 256, (num_blocks * page_bytes,), dtype=torch.uint8, generator=junk, device=data.device)
    pages = storage.view(num_blocks, page_bytes)
    data_bytes = fmt.data_bytes
    pages[:, : block_size * data_bytes] = data.reshape(num_blocks, block_size * data_bytes)
    pages[:, block_size * data_bytes: block_size * record] = codes.reshape(num_blocks, block_size * fmt.scale_bytes)
    return storage.as_strided((num_blocks, block_size, record), (page_bytes, record, 1))


def make_cache(num_blocks: int, block_size: int, fmt: Format, g: torch.Generator, raw_bytes: bool = False,
               page_pad: int = 0, value_scale: float = 1.0) -> torch.Tensor:
    """A paged cache of random records, on `g`'s device: quantized from random
    bf16, or raw random bytes."""
    n, device = num_blocks * block_size, g.device
    if raw_bytes:
        data = torch.randint(0, 256, (n, fmt.data_bytes), dtype=torch.uint8, generator=g,
                             device=device)
        codes = torch.randint(0, 256, (n, fmt.scale_bytes), dtype=torch.uint8, generator=g, device=device)
    else:
        k = (torch.randn((n, fmt.head_dim), generator=g, device=device) * value_scale).to(torch.bfloat16)
        data, codes = quantize_ue8m0(k, fmt)
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
