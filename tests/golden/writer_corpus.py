"""The writer's golden corpus: seeded quantize_and_insert_k_cache calls and the digests of the caches they leave.

    python -m tests.golden.writer_corpus            # check the torch reference against the digests
    python -m tests.golden.writer_corpus --update   # rewrite them, printing what changed

Each case's cache lies in a storage of random bytes (from a seeded generator:
the poison), so the bytes a call must not touch count too. A digest is the
sha256 of that whole storage after the call. Each case is run twice, by the
torch reference (kvgen/families/quantize_insert/reference.py) and by the
independent numpy encoder (.../oracle.py), and accepted only where the two
leave the same storage byte for byte: a disagreement names the case and the
first differing byte (page, data or scale row, byte offset), and nothing is
written.

Cases of the formats of docs/semantics.md's "Three more record formats" may pass the tail apart
(`split_tail`: k[:, :values] and the tail in its own strided buffer, as concat_and_cache_ds_mla does) or
round float32 scales up to powers of two (`pow2_scale`, indexer_k_quant_and_cache's scale_fmt="ue8m0").
"""

from __future__ import annotations

import hashlib
import json
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kvgen.families.quantize_insert.oracle import quantize_and_insert_oracle
from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
from kvgen.formats import Format
from kvgen.testing import _to, as_format, clone_strided, whole_storage
from tests.golden.digests import Disagreement
from tests.golden.digests import main as digests_main

HERE = Path(__file__).resolve().parent
DIGESTS = HERE / "writer_digests.json"
LAYOUTS = ("dsv4_584", "v41_528")
BLOCK_SIZES = (16, 32, 64, 128, 256)
TRAILER = 48  # poisoned bytes after the last page: a write past the cache shows


@dataclass
class WriterCase:
    """One call's arguments on the CPU: k (maybe a strided view), the cache (a record or byte view into a
    poisoned storage, maybe padded, maybe at a storage offset), the slots."""

    k: torch.Tensor
    k_cache: torch.Tensor
    slot_mapping: torch.Tensor
    block_size: int
    fmt: Format
    byte_view: bool
    meta: dict = field(default_factory=dict)
    split_tail: bool = False  # pass the tail apart: fn(k[:, :values], ..., tail=k_pe)
    pow2_scale: bool = False  # float32 scales rounded up to powers of two

    def extra(self, k: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The writer's k and keyword arguments for this case (k: the full [T, head_dim] input)."""
        kw = {"pow2_scale": True} if self.pow2_scale else {}
        if not self.split_tail:
            return k, kw
        # Rows fmt.tail + 16 apart, 8 elements in, NaN around them: strided, and still
        # 16-byte aligned, so the cubins serve it (a misaligned k_pe goes to Triton).
        buffer = torch.full((k.shape[0], self.fmt.tail + 16), float("nan"), dtype=torch.bfloat16, device=k.device)
        tail = buffer[:, 8: 8 + self.fmt.tail]
        tail.copy_(k[:, self.fmt.values:])
        return k[:, : self.fmt.values], {**kw, "tail": tail}

    def call_public(self, k, k_cache, slots, block_size) -> None:
        """The case through the entry point a user would call: the indexer's for
        pow2 scales, concat_and_cache_ds_mla for a tail apart, else
        quantize_and_insert_k_cache (record or byte view)."""
        import kvgen

        if not (self.pow2_scale or self.split_tail):
            kvgen.quantize_and_insert_k_cache(k, k_cache, slots, block_size, record_bytes=self.record_bytes)
            return
        fmt = self.fmt
        records = k_cache if k_cache.dim() == 3 else k_cache.as_strided(
            (k_cache.shape[0], block_size, fmt.record_bytes), (k_cache.stride(0), fmt.record_bytes, 1),
            k_cache.storage_offset())
        if self.pow2_scale:  # (with a tail apart too: no public op takes both; the bytes are the same)
            kvgen.indexer_k_quant_and_cache(k, records, slots, fmt.scale_group, "ue8m0")
        else:
            values, kw = self.extra(k)
            kvgen.concat_and_cache_ds_mla(values, kw["tail"], records, slots)

    @property
    def record_bytes(self) -> int | None:
        """The public op's record_bytes argument: needed with the byte view only."""
        return self.fmt.record_bytes if self.byte_view else None

    def args(self, device: str | torch.device = "cpu"):
        """(k, a fresh copy of the poisoned cache, slot_mapping, block_size) on `device`, strides kept."""
        return (_to(self.k, device), clone_strided(self.k_cache, device), _to(self.slot_mapping, device),
                self.block_size)


def storage_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU copy of the whole byte storage under t (on any device: not t.cpu(), which keeps only t's elements)."""
    return whole_storage(_to(t.detach(), "cpu")).numpy().copy()


def digest(k_cache: torch.Tensor) -> str:
    return hashlib.sha256(storage_bytes(k_cache).tobytes()).hexdigest()


# ---- building cases ------------------------------------------------------------------------------------------


def bf16(bits: np.ndarray | list) -> torch.Tensor:
    """bf16 tensor of the given uint16 bit patterns."""
    return torch.from_numpy(np.asarray(bits, dtype=np.uint16).astype(np.int16)).view(torch.bfloat16)


def bits_of(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def writer_case(*, format: "str | Format", block_size: int, seed: int, tokens: int = 40, num_blocks: int = 3,
                fill: Callable | None = None, valid: float = 0.8, mapped: int | None = None,
                slots: list[int] | None = None, slot_dtype: torch.dtype = torch.int64, byte_view: bool = False,
                block_pad: int = 0, page_pad: int = 0, lead: int = 0, k_row_pad: int = 0,
                split_tail: bool = False, pow2_scale: bool = False) -> WriterCase:
    """A random call. `fill(tokens, fmt, rng)` gives k (bf16 [tokens, head_dim]; default random normal);
    `mapped` (default: tokens) is slot_mapping's length; `slots` overrides the random distinct slots (a
    fraction `valid` of them real, the rest -1). The cache is the byte view [num_blocks, block_size *
    record_bytes + block_pad] (byte_view) or the record view; pages lie block_pad + page_pad bytes apart
    beyond a page, `lead` bytes into a storage of seeded random bytes with TRAILER bytes after the last."""
    fmt = as_format(format)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    k = fill(tokens, fmt, rng) if fill is not None else torch.randn((tokens, fmt.head_dim), generator=g).to(
        torch.bfloat16)
    assert k.shape == (tokens, fmt.head_dim) and k.dtype == torch.bfloat16
    if k_row_pad:  # rows k_row_pad values apart beyond head_dim, junk in between
        junk = torch.randint(-(1 << 15), 1 << 15, (tokens, fmt.head_dim + k_row_pad), generator=g).to(torch.int16)
        buffer = junk.view(torch.bfloat16)
        buffer[:, : fmt.head_dim] = k
        k = buffer[:, : fmt.head_dim]

    mapped = tokens if mapped is None else mapped
    if slots is None:
        chosen = torch.randperm(num_blocks * block_size, generator=g)[:mapped]
        chosen[torch.rand(mapped, generator=g) >= valid] = -1
    else:
        chosen = torch.tensor(slots, dtype=torch.int64)
    slot_mapping = chosen.to(slot_dtype)
    assert slot_mapping.shape[0] <= tokens

    page = block_size * fmt.record_bytes + block_pad
    stride = page + page_pad
    assert stride % 16 == 0 and lead % 16 == 0, "pages 16-byte aligned, as the kernels need"
    poison = torch.Generator().manual_seed(seed ^ 0x5EED)
    storage = torch.randint(0, 256, (lead + num_blocks * stride + TRAILER,), dtype=torch.uint8, generator=poison)
    if byte_view:
        k_cache = storage.as_strided((num_blocks, page), (stride, 1), lead)
    else:
        k_cache = storage.as_strided((num_blocks, block_size, fmt.record_bytes), (stride, fmt.record_bytes, 1), lead)
    return WriterCase(k=k, k_cache=k_cache, slot_mapping=slot_mapping, block_size=block_size, fmt=fmt,
                      byte_view=byte_view, meta=dict(seed=seed), split_tail=split_tail, pow2_scale=pow2_scale)


# ---- inputs that reach the edge cases --------------------------------------------------------------------------

E4M3_VALUES = [m * 2.0 ** -9 if f == 0 else (8 + m) * 2.0 ** (f - 10) for f in range(16) for m in range(8)][:127]
E4M3_MIDPOINTS = [(a + b) / 2 for a, b in itertools.pairwise(E4M3_VALUES)]  # every tie (5 bits: bf16-exact)


def _bf16_bits_of_floats(values: np.ndarray) -> np.ndarray:
    """bf16 bits of float64 values that are exactly representable in bf16 (asserted)."""
    f32 = np.asarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    assert ((bits & 0xFFFF) == 0).all() and (f32.astype(np.float64) == np.asarray(values)).all(), "not bf16-exact"
    return (bits >> 16).astype(np.uint16)


def _groups(tokens: int, fmt: Format) -> int:
    return tokens * fmt.num_scales


def _with_tail(values_bits: np.ndarray, tokens: int, fmt: Format, rng) -> torch.Tensor:
    """k from the value bits [tokens, values] and a tail of random bit patterns (NaNs, Infs included)."""
    tail = rng.integers(0, 1 << 16, (tokens, fmt.tail)).astype(np.uint16)
    return bf16(np.concatenate([values_bits.reshape(tokens, fmt.values), tail], axis=1))


def fill_zeros(tokens, fmt, rng):
    """+0 and -0 (a group of zeros: amax clamps to 1e-4, code 105)."""
    bits = np.where(rng.random((tokens, fmt.values)) < 0.5, 0x0000, 0x8000)
    return _with_tail(bits, tokens, fmt, rng)


def fill_tiny(tokens, fmt, rng):
    """|x| around 1e-7 .. 1e-4: amax below the 1e-4 clamp, or just at it."""
    x = rng.standard_normal((tokens, fmt.values)) * 10.0 ** rng.integers(-8, -3, (tokens, 1))
    bits = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncated: exact bf16
    return _with_tail(bits, tokens, fmt, rng)


def fill_subnormal(tokens, fmt, rng):
    """bf16 subnormals (0x0001..0x007F, either sign); every other group also holds one normal value."""
    bits = rng.integers(1, 0x80, (_groups(tokens, fmt), fmt.scale_group)) | (
        rng.integers(0, 2, (_groups(tokens, fmt), fmt.scale_group)) << 15)
    normal = _bf16_bits_of_floats(2.0 ** rng.integers(-60, 60, _groups(tokens, fmt)))
    bits[1::2, 0] = normal[1::2]
    return _with_tail(bits, tokens, fmt, rng)


def fill_ties(tokens, fmt, rng):
    """Groups of scale 2^s (amax = 448 * 2^s) holding every E4M3 rounding tie (and exact value) times 2^s."""
    n = _groups(tokens, fmt)
    s = rng.integers(-22, 110, n)  # codes 105 .. 236: every group's amax clears the 1e-4 floor
    s[: min(n, 8)] = 0
    pool = np.array(E4M3_MIDPOINTS + E4M3_VALUES)
    v = pool[(np.arange(n)[:, None] * 7 + np.arange(fmt.scale_group)[None, :]) % len(pool)]
    v = v * np.where(rng.random(v.shape) < 0.5, -1.0, 1.0)
    v[:, 0] = 448.0
    return _with_tail(_bf16_bits_of_floats(np.ldexp(v, s[:, None])), tokens, fmt, rng)


def fill_amax_edges(tokens, fmt, rng):
    """amax exactly 448 * 2^s, one bf16 step above it (450 * 2^s), and one below (446 * 2^s), over every
    code a finite group can have (105 .. 247); the rest of the group random below it."""
    n = _groups(tokens, fmt)
    s = np.resize(np.arange(-22, 120), n)
    rng.shuffle(s)
    top = np.resize(np.array([448.0, 450.0, 446.0, 448.0]), n)
    # 7-bit integers times powers of two below 256 * 2^s: bf16-exact, normal, under the group's amax.
    shift = s[:, None] + 1 - rng.integers(0, 20, (n, fmt.scale_group))
    rest = np.floor(rng.random((n, fmt.scale_group)) * 128) * np.ldexp(1.0, shift)
    v = rest * np.where(rng.random(rest.shape) < 0.5, -1.0, 1.0)
    v[:, 0] = np.ldexp(top, s) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return _with_tail(_bf16_bits_of_floats(v), tokens, fmt, rng)


EXTREMES = (0x7F7F, 0xFF7F, 0x0001, 0x8001, 0x0080, 0x8080, 0x007F, 0x807F, 0x0000, 0x8000)
SMALL_EXTREMES = EXTREMES[2:]


def fill_extremes(tokens, fmt, rng):
    """The largest and smallest bf16 magnitudes (max finite, min normal, min and max subnormal, zeros) in
    groups: any of them (code 247); only the small ones (code 105); max finite throughout; one max finite
    among ordinary values (which flush to zero); small ones among ordinary values."""
    n = _groups(tokens, fmt)
    shape = (n, fmt.scale_group)
    kind = np.arange(n) % 5
    every = np.array(EXTREMES, dtype=np.int64)[rng.integers(0, len(EXTREMES), shape)]
    small = np.array(SMALL_EXTREMES, dtype=np.int64)[rng.integers(0, len(SMALL_EXTREMES), shape)]
    ordinary = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    bits = np.where((kind == 0)[:, None], every, small)
    bits[kind == 2] = 0x7F7F
    bits[kind == 3] = ordinary[kind == 3]
    bits[kind == 3, 0] = 0xFF7F
    mixed = np.where(rng.random(shape) < 0.5, ordinary, small)
    bits[kind == 4] = mixed[kind == 4]
    return _with_tail(bits, tokens, fmt, rng)


NAN_PATTERNS = (0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7FBF, 0xFF81)


def fill_specials(tokens, fmt, rng):
    """NaN (several payloads, either sign), +Inf and -Inf in groups: one NaN among normal values (ignored by
    the amax), all NaN, +Inf, -Inf, NaN with Inf, Inf with the largest finite values; specials in the tail."""
    n = _groups(tokens, fmt)
    bits = (rng.standard_normal((n, fmt.scale_group)).astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    kind = np.arange(n) % 7
    nan = np.array(NAN_PATTERNS)[rng.integers(0, len(NAN_PATTERNS), (n, fmt.scale_group))]
    col = rng.integers(0, fmt.scale_group, n)
    bits[kind == 0, col[kind == 0]] = nan[kind == 0, 0]
    bits[kind == 1] = nan[kind == 1]
    bits[kind == 2, col[kind == 2]] = 0x7F80
    bits[kind == 3, col[kind == 3]] = 0xFF80
    bits[kind == 4, col[kind == 4]] = 0x7F80
    bits[kind == 4, (col[kind == 4] + 1) % fmt.scale_group] = nan[kind == 4, 1]
    big = rng.integers(0, 2, (n, fmt.scale_group)) << 15 | rng.integers(0x7F00, 0x7F80, (n, fmt.scale_group))
    bits[kind == 5] = big[kind == 5]
    bits[kind == 5, col[kind == 5]] = 0xFF80
    # kind 6: ordinary values
    k = _with_tail(bits, tokens, fmt, rng)
    if fmt.tail:
        tail = k[:, fmt.values:].view(torch.int16)
        specials = torch.tensor([0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x8001, 0x8000], dtype=torch.int32)
        tail[:] = specials.to(torch.int16).repeat(tail.shape[1] // len(specials) + 1)[: tail.shape[1]]
    return k


# e2m1 steps and the ties between them (docs/semantics.md: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
# 2.5 -> 2, 3.5 -> 4, 5 -> 4), times the group's scale.
E2M1_STEPS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def fill_e2m1_ties(tokens, fmt, rng):
    """Groups of amax 6 * 2^s (s = a / 6 = 2^s exactly: an exact e4m3 scale) holding every e2m1 tie and step
    times 2^s, either sign (-0 too), and the bf16 neighbours of each tie; some groups with a NaN, +-Inf."""
    n = _groups(tokens, fmt)
    s = rng.integers(-9, 7, n)  # 2^-9 (e4m3's least subnormal) .. 2^6 (6 * 64 = 384 < 448)
    pool = np.array(E2M1_TIES + E2M1_STEPS)
    v = pool[(np.arange(n)[:, None] * 5 + np.arange(fmt.scale_group)[None, :]) % len(pool)]
    v = v * np.where(rng.random(v.shape) < 0.5, -1.0, 1.0)
    v[:, 0] = 6.0
    bits = _bf16_bits_of_floats(np.ldexp(v, s[:, None])).astype(np.int64)
    near = rng.random(bits.shape) < 0.15  # a bf16 step either side of a tie
    bits[near] += np.where(rng.random(int(near.sum())) < 0.5, 1, -1)
    bits[:, 0] = _bf16_bits_of_floats(np.ldexp(6.0, s))
    kind = np.arange(n) % 6
    bits[kind == 1, 1] = 0x7FC1  # NaN: ignored by the amax, nibble 0x0
    bits[kind == 2, 2] = 0x7F80  # +Inf: the scale saturates
    bits[kind == 3, 3] = 0xFF80
    bits[kind == 4] = 0x8000  # a group of -0
    return _with_tail(bits.astype(np.uint16), tokens, fmt, rng)


def fill_random_bits(tokens, fmt, rng):
    """Random bf16 bit patterns: every class (NaN, Inf, subnormal, huge, tiny) in every group."""
    return bf16(rng.integers(0, 1 << 16, (tokens, fmt.head_dim)))


def fill_duplicate_rows(tokens, fmt, rng):
    """Random normal rows, each pair (2i, 2i+1) identical: duplicate slots give one record either way."""
    x = rng.standard_normal((tokens, fmt.head_dim)).astype(np.float32)
    x[1::2] = x[0::2][: x[1::2].shape[0]]
    return bf16((x.view(np.uint32) >> 16).astype(np.uint16))


def _duplicate_slots(tokens: int, cache_slots: int, rng) -> list[int]:
    base = rng.permutation(cache_slots)[: (tokens + 1) // 2]
    slots = np.repeat(base, 2)[:tokens]
    slots[4::5] = -1
    return slots.tolist()


def _cases() -> dict[str, Callable[[], WriterCase]]:
    c: dict[str, Callable[[], WriterCase]] = {}
    for layout in LAYOUTS:
        p = "v4" if layout == "dsv4_584" else "v41"
        for i, bs in enumerate(BLOCK_SIZES):
            c[f"{p}_random_b{bs}"] = lambda bs=bs, layout=layout, i=i: writer_case(
                format=layout, block_size=bs, seed=10 * bs + len(layout), tokens=min(bs + 9, 48), num_blocks=2 + i % 2,
                slot_dtype=(torch.int64, torch.int32)[i % 2])
        x = 0 if layout == "dsv4_584" else 1000  # seeds differ between the formats

        def add(name, p=p, layout=layout, **kw):
            c[f"{p}_{name}"] = lambda kw=kw, layout=layout: writer_case(format=layout, **kw)

        add("zeros_b16", block_size=16, seed=x + 1, fill=fill_zeros, tokens=20)
        add("tiny_b32", block_size=32, seed=x + 2, fill=fill_tiny, tokens=30, slot_dtype=torch.int32)
        add("subnormal_b64", block_size=64, seed=x + 3, fill=fill_subnormal, tokens=24, num_blocks=1)
        add("ties_b128", block_size=128, seed=x + 4, fill=fill_ties, tokens=40, num_blocks=1, valid=1.0)
        add("amax_edges_b256", block_size=256, seed=x + 5, fill=fill_amax_edges, tokens=48, num_blocks=1, valid=1.0,
            slot_dtype=torch.int32)
        add("extremes_b16", block_size=16, seed=x + 6, fill=fill_extremes, tokens=30)
        add("specials_b32", block_size=32, seed=x + 7, fill=fill_specials, tokens=35, valid=0.9)
        add("random_bits_b64", block_size=64, seed=x + 8, fill=fill_random_bits, tokens=40, num_blocks=2,
            slot_dtype=torch.int32)
        add("all_skipped_b16", block_size=16, seed=x + 9, tokens=12, valid=0.0)
        add("empty_mapping_b32", block_size=32, seed=x + 10, tokens=5, mapped=0)
        add("short_mapping_b16", block_size=16, seed=x + 11, tokens=40, mapped=23, slot_dtype=torch.int32)
        add("short_mapping_int64_b128", block_size=128, seed=x + 12, tokens=33, mapped=17, num_blocks=1)
        add("byte_view_b64", block_size=64, seed=x + 13, tokens=40, byte_view=True)
        add("byte_view_padded_b16", block_size=16, seed=x + 14, tokens=40, byte_view=True, block_pad=48,
            slot_dtype=torch.int32)
        add("byte_view_strided_b32", block_size=32, seed=x + 15, tokens=40, byte_view=True, block_pad=16,
            page_pad=32, lead=64)
        add("record_view_padded_b16", block_size=16, seed=x + 16, tokens=40, page_pad=64, slot_dtype=torch.int32)
        add("storage_offset_b256", block_size=256, seed=x + 17, tokens=30, num_blocks=2, lead=4096, page_pad=16)
        add("strided_k_b32", block_size=32, seed=x + 18, tokens=40, k_row_pad=24, fill=fill_random_bits)
        add("strided_k_padded_b128", block_size=128, seed=x + 19, tokens=30, num_blocks=2, k_row_pad=8, page_pad=48,
            slot_dtype=torch.int32)
        c[f"{p}_duplicates_b16"] = lambda layout=layout, x=x: writer_case(
            format=layout, block_size=16, seed=x + 20, tokens=30, fill=fill_duplicate_rows,
            slots=_duplicate_slots(30, 3 * 16, np.random.default_rng(x + 20)))

    # The formats of docs/semantics.md's "Three more record formats": every block size, special inputs.
    for fmt, p, x in (("v41_288", "nvfp4", 2000), ("v32_656", "v32", 3000), ("indexer_132", "idx", 4000)):
        pows = (False, True) if as_format(fmt).scale_kind == "f32" else (False,)
        splits = (False, True) if as_format(fmt).tail else (False,)
        for i, bs in enumerate(BLOCK_SIZES):
            pow2, split = pows[i % len(pows)], splits[(i // 2) % len(splits)]
            c[f"{p}_random_b{bs}" + "_pow2" * pow2 + "_split" * split] = \
                lambda bs=bs, fmt=fmt, x=x, i=i, pow2=pow2, split=split: writer_case(
                    format=fmt, block_size=bs, seed=x + bs, tokens=min(bs + 5, 24), num_blocks=2 - (i >= 2),
                    slot_dtype=(torch.int64, torch.int32)[i % 2], pow2_scale=pow2, split_tail=split)
        fills = {"zeros": fill_zeros, "tiny": fill_tiny, "subnormal": fill_subnormal, "extremes": fill_extremes,
                 "specials": fill_specials, "random_bits": fill_random_bits}
        fills.update({"e2m1_ties": fill_e2m1_ties} if fmt == "v41_288" else {"e4m3_ties": fill_ties})
        for j, (what, fill) in enumerate(fills.items()):
            for pow2 in pows:  # float32 scales: each fill with and without pow2, the tail apart in one of them
                split = splits[(j + pow2) % len(splits)]
                c[f"{p}_{what}" + "_pow2" * pow2 + "_split" * split] = \
                    lambda fmt=fmt, x=x, j=j, fill=fill, pow2=pow2, split=split: writer_case(
                        format=fmt, block_size=16, seed=x + 100 + j, fill=fill, tokens=12, num_blocks=1,
                        valid=0.9, pow2_scale=pow2, split_tail=split, slot_dtype=(torch.int64, torch.int32)[j % 2])
        c[f"{p}_byte_view_padded_b32"] = lambda fmt=fmt, x=x: writer_case(
            format=fmt, block_size=32, seed=x + 200, tokens=10, num_blocks=2, byte_view=True, block_pad=48,
            page_pad=16, lead=32, k_row_pad=8)
        c[f"{p}_duplicates_b16"] = lambda fmt=fmt, x=x: writer_case(
            format=fmt, block_size=16, seed=x + 201, tokens=12, fill=fill_duplicate_rows, num_blocks=1,
            slots=_duplicate_slots(12, 16, np.random.default_rng(x + 201)))
    return c


CASES = _cases()


def build_case(name: str) -> WriterCase:
    return CASES[name]()


def public_mismatches(device: str, backend: str) -> list[str]:
    """Every case through the public op a user would call (WriterCase.call_public)
    on `device`: a line for each case served by another backend than `backend`
    (the one the caller's setting must lead to) or whose cache's digest differs."""
    import kvgen

    digests = json.loads(DIGESTS.read_text())["cases"]
    wrong = []
    for name in sorted(CASES):
        case = build_case(name)
        k, k_cache, slots, block_size = case.args(device)
        case.call_public(k, k_cache, slots, block_size)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        if slots.shape[0] and kvgen.last_backend() != backend:
            wrong.append(f"{name}: served by {kvgen.last_backend()}")
        elif digest(_to(k_cache, "cpu")) != digests[name]["sha256"]:
            wrong.append(f"{name}: digest differs on {device}")
    return wrong


# ---- running and comparing -------------------------------------------------------------------------------------


def run_case(case: WriterCase, fn) -> torch.Tensor:
    """fn(k, k_cache, slot_mapping, block_size, fmt[, tail=, pow2_scale=]) on a fresh copy of the case's
    poisoned cache; the cache."""
    k, k_cache, slots, block_size = case.args()
    k, kw = case.extra(k)
    fn(k, k_cache, slots, block_size, case.fmt, **kw)
    return k_cache


def reference_cache(case: WriterCase) -> torch.Tensor:
    return run_case(case, quantize_and_insert_torch)


def oracle_cache(case: WriterCase) -> torch.Tensor:
    return run_case(case, quantize_and_insert_oracle)


def locate(case: WriterCase, address: int) -> str:
    """Where a byte address of the cache's storage lies: page, data or scale row, byte offset."""
    fmt, bs = case.fmt, case.block_size
    rel = address - case.k_cache.storage_offset()
    stride = case.k_cache.stride(0)
    page, at = divmod(rel, stride)
    if rel < 0 or page >= case.k_cache.shape[0]:
        return f"storage byte {address}, outside the cache's pages"
    if at < bs * fmt.data_bytes:
        return f"page {page}, data row {at // fmt.data_bytes}, byte {at % fmt.data_bytes}"
    at -= bs * fmt.data_bytes
    if at < bs * fmt.scale_bytes:
        return f"page {page}, scale row {at // fmt.scale_bytes}, byte {at % fmt.scale_bytes}"
    return f"page {page}, padding byte {at - bs * fmt.scale_bytes} past the scale rows"


def first_difference(case: WriterCase, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None if the two caches' storages are equal, else how many bytes differ and where the first lies."""
    x, y = storage_bytes(a), storage_bytes(b)
    differ = np.nonzero(x != y)[0]
    if differ.size == 0:
        return None
    at = int(differ[0])
    return f"{differ.size} byte(s) differ; first at {locate(case, at)}: 0x{x[at]:02x} vs 0x{y[at]:02x}"


def agreed_cache(name: str) -> torch.Tensor:
    """The case's cache after the reference's call, once the oracle has left the same (else Disagreement)."""
    case = build_case(name)
    cache = reference_cache(case)
    problem = first_difference(case, cache, oracle_cache(case))
    if problem is not None:
        raise Disagreement(f"golden case {name!r}: the torch reference and the oracle disagree: {problem}")
    return cache


def compute() -> dict[str, dict]:
    """Every case's digest; raises Disagreement naming every case where reference and oracle differ."""
    table, disagreements = {}, []
    for name in CASES:
        try:
            cache = agreed_cache(name)
        except Disagreement as err:
            disagreements.append(str(err))
            continue
        case = build_case(name)
        written = int((case.slot_mapping >= 0).sum())
        table[name] = {"sha256": digest(cache), "storage_bytes": int(cache.untyped_storage().nbytes()),
                       "tokens_written": written}
    if disagreements:
        raise Disagreement("\n".join(disagreements))
    return table


def main(argv=None) -> int:
    return digests_main(argv, __doc__, compute, len(CASES), DIGESTS)


if __name__ == "__main__":
    sys.exit(main())
