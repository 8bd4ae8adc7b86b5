"""KVGEN_CHECK=1: check every device-side index a call will use, before any launch.

The default path cannot see values that live on the device (block-table
entries, seq_lens, gather_lens, slots) without a synchronisation, so it
trusts them, and an out-of-range value makes a kernel read outside the cache
(docs/semantics.md says what the unchecked path does). With KVGEN_CHECK=1,
read at each call, every op first checks them on the tensors' own device with
a few vectorised torch ops and one device-to-host copy of the verdicts, and
raises a ValueError naming the argument, the request (or row) and the value;
nothing is written. Cost: one synchronisation per call plus elementwise work
over the block table's used columns (or the slots) -- a debugging switch, not
a serving mode, and it cannot run inside CUDA-graph capture.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from .switches import CHECK_ENV


def _not_capturing(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise UsageError(f"{CHECK_ENV}=1 synchronises to read device values, which CUDA-graph capture forbids; "
                         f"unset it while capturing")


def _first(mask: torch.Tensor) -> list[int] | None:
    """The index of mask's first True element (row-major), or None."""
    hits = mask.nonzero()
    return None if hits.shape[0] == 0 else hits[0].tolist()


def check_dense(k_cache: torch.Tensor, seq_lens: torch.Tensor, gather_lens: torch.Tensor | None,
                block_table: torch.Tensor, block_size: int, max_rows: int) -> None:
    """For each request r: 0 <= gather_len <= seq_len <= block_table.shape[1] * block_size,
    and every block-table entry the call reads (the pages of the first
    min(gather_len, max_rows) of its gathered positions) lies in [0, num_blocks)."""
    _not_capturing(seq_lens.device)
    num_blocks, width = k_cache.shape[0], block_table.shape[1]
    seq = seq_lens.to(torch.int64)
    gathered = seq if gather_lens is None else gather_lens.to(torch.int64)
    capacity = width * block_size
    rows = gathered.clamp(min=0, max=max(max_rows, 0))
    start = seq - gathered
    bad_page = _pages_outside(block_table, start, start + rows - 1, rows > 0, block_size, num_blocks)
    checks = (  # (mask, message for its first hit): in the order a reader would ask
        ((gathered < 0) | (gathered > seq) if gather_lens is not None else seq < 0,
         lambda r: (f"gather_lens: request {r} gathers {int(gathered[r])} tokens of a seq_len of {int(seq[r])}; "
                    f"expected 0 <= gather_len <= seq_len") if gather_lens is not None
         else f"seq_lens: request {r} has seq_len {int(seq[r])}; expected >= 0"),
        (seq > capacity,
         lambda r: (f"seq_lens: request {r} has seq_len {int(seq[r])}, past its block-table row's capacity "
                    f"({width} pages x block_size {block_size} = {capacity} tokens)")),
        bad_page,
    )
    _raise_first(checks)


def _pages_outside(block_table: torch.Tensor, first: torch.Tensor, last: torch.Tensor, reads: torch.Tensor,
                   block_size: int, num_blocks: int):
    """(mask, message) for the block-table entries a call reads -- request r's
    columns first[r] // block_size .. last[r] // block_size, where reads[r] --
    that hold a page outside [0, num_blocks); other entries may hold anything."""
    column = torch.arange(block_table.shape[1], device=block_table.device)
    read = ((column[None, :] >= first[:, None] // block_size) & (column[None, :] <= last[:, None] // block_size)
            & reads[:, None])
    page = block_table[: first.shape[0]].to(torch.int64)
    return (read & ((page < 0) | (page >= num_blocks)),
            lambda r, c: (f"block_table: request {r}, column {c} holds page {int(page[r, c])}, outside the cache's "
                          f"{num_blocks} pages [0, {num_blocks})"))


def check_slots(k_cache: torch.Tensor, slot_indices: torch.Tensor, block_size: int) -> None:
    """Every slot lies in [-1, num_blocks * block_size)."""
    _not_capturing(slot_indices.device)
    slots = slot_indices.to(torch.int64)
    limit = k_cache.shape[0] * block_size
    _raise_first((((slots < -1) | (slots >= limit),
                   lambda i: (f"slot_indices: row {i} holds slot {int(slots[i])}, outside [-1, {limit}) "
                              f"(k_cache holds {k_cache.shape[0]} pages x block_size {block_size})")),))


def _raise_first(checks) -> None:
    # One device-to-host copy for every verdict; the offending index only on failure.
    failed = torch.stack([mask.any() for mask, _ in checks]).tolist()
    for (mask, message), bad in zip(checks, failed):
        if bad:
            raise ValueError(message(*_first(mask)))


def check_write_slots(k_cache_blocks: int, slot_mapping: torch.Tensor, block_size: int) -> None:
    """Every slot a writer uses lies in [-1, num_blocks * block_size), and no
    slot >= 0 appears twice (two tokens of one call writing one row)."""
    _not_capturing(slot_mapping.device)
    slots = slot_mapping.to(torch.int64)
    limit = k_cache_blocks * block_size
    order = torch.argsort(slots, stable=True)
    ordered = slots[order]
    twice = torch.zeros_like(slots, dtype=torch.bool)
    twice[order[1:]] = (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)

    def duplicate(i):
        first = int((slots[:i] == slots[i]).nonzero()[0, 0])
        return (f"slot_mapping: tokens {first} and {i} both write slot {int(slots[i])}; each slot may be written "
                "once a call")

    _raise_first((((slots < -1) | (slots >= limit),
                   lambda i: (f"slot_mapping: token {i} has slot {int(slots[i])}, outside [-1, {limit}) "
                              f"(k_cache holds {k_cache_blocks} pages x block_size {block_size})")),
                  (twice, duplicate)))


def check_packed(k_cache: torch.Tensor, block_table: torch.Tensor, starts: torch.Tensor, num_reqs: int,
                 num_rows: int, bounded: bool, seq_starts: torch.Tensor | None, block_size: int,
                 starts_name: str) -> None:
    """A packed gather's requests: `starts` does not decrease, and each request's
    rows read positions >= 0 within its block-table row (and int32), whose
    entries there lie in [0, num_blocks). Request r owns rows starts[r] ..
    starts[r+1] - 1 (the last one up to num_rows, or starts[num_reqs] when
    `bounded`, which must then not lie past the output's rows)."""
    _not_capturing(starts.device)
    num_blocks, width = k_cache.shape[0], block_table.shape[1]
    st = starts[: num_reqs + int(bounded)].to(torch.int64)
    ends = st[1:] if bounded else torch.cat([st[1:], st.new_tensor([num_rows])])
    first = st[:num_reqs].clamp(min=0, max=num_rows)
    rows = (ends.clamp(max=num_rows) - first).clamp(min=0)
    shift = seq_starts[:num_reqs].to(torch.int64) if seq_starts is not None else torch.zeros_like(first)
    p_first = first - st[:num_reqs] + shift
    p_last = p_first + rows - 1
    capacity = width * block_size
    checks = (
        (st[1:] < st[:-1],
         lambda i: (f"{starts_name}: entry {i + 1} ({int(st[i + 1])}) is below entry {i} ({int(st[i])}); requests "
                    "must be packed in order")),
        ((rows > 0) & (p_first < 0),
         lambda r: f"seq_starts: request {r} starts at position {int(p_first[r])}; expected >= 0"),
        ((rows > 0) & (p_last >= min(capacity, 2**31)),
         lambda r: (f"block_table: request {r} reads position {int(p_last[r])}, past its row's capacity ({width} "
                    f"pages x block_size {block_size} = {capacity} tokens)" if int(p_last[r]) >= capacity else
                    f"seq_starts: request {r} reads position {int(p_last[r])}, past int32")),
        (((st[num_reqs:num_reqs + 1] > num_rows) if bounded else st[:0] > 0),
         lambda _: (f"{starts_name}: the last request ends at row {int(st[num_reqs])}, past the output's "
                    f"{num_rows} rows (its tokens from row {num_rows} on would be dropped)")),
        _pages_outside(block_table, p_first, p_last, rows > 0, block_size, num_blocks),
    )
    _raise_first(checks)
