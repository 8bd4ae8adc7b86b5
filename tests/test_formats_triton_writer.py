"""The Triton writer on every record format: byte for byte the torch reference, over the whole cache storage.

docs/semantics.md ("Three more record formats", "Writing") is the contract:
v41_288 (e2m1 values under e4m3 scales, page_split), v32_656 (e4m3 values
under float32 scales, inline, bf16 tail), indexer_132 (one float32 scale,
page_split; `pow2_scale` rounds it up to a power of two), beside the UE8M0
formats (dsv4_584, v41_528) whose bytes must not move, and user formats that
reach what the shipped ones do not (pad bytes after float32 or e4m3 scales,
groups that are not powers of two, an inline e2m1 record, an e2m1 tail).

Triton runs in the interpreter on CPU tensors where TRITON_INTERPRET=1 (the
conftest sets it without a GPU), else on CUDA copies -- so on a GPU machine
this file checks the compiled kernel (div.rn.f32, the denormal mode) against
the CPU reference. Every call's cache lies in a storage of seeded random bytes
(the poison: page padding, a lead and a trailer included); the whole storage
after the Triton call must equal the whole storage after the reference's.

The inputs hit every edge the contract names: values at every bf16 magnitude,
random bit patterns, +0/-0 groups, all-NaN groups, NaN among values, +-Inf in
a group, exact e2m1 and e4m3 rounding ties at the group's scale (and one bf16
step either side), scale ties (a / 6 or a / 448 on an e4m3 midpoint), tiny
groups below the scale floors (a < 6 * 2^-9; a / 448 < 2^-126), bf16 max, bf16
subnormals (alone: the case where a flushed x would differ). Hand-computed
bytes pin a few records independently of the reference.
"""

from __future__ import annotations

import itertools
import os
import struct

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
from kvgen.families.quantize_insert.triton import quantize_and_insert_triton
from kvgen.formats import Format
from kvgen.testing import as_format, clone_strided, whole_storage

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it without a GPU
SHIPPED = ("dsv4_584", "v41_528", "v41_288", "v32_656", "indexer_132")
USER_FORMATS = (
    Format("f32_pad", values=384, scale_group=128, scale_kind="f32", tail=32),  # 12 scale bytes + 4 pad
    Format("f32_g48", values=480, scale_group=48, scale_kind="f32"),  # 10 scales, 40 bytes + 8 pad
    Format("f32_inline_pad", values=256, scale_group=128, scale_kind="f32", tail=32, placement="inline"),  # pad 8
    Format("fp4_pad", values=384, value_kind="e2m1", scale_group=32, scale_kind="e4m3", tail=16),  # 12 + 4 pad
    Format("fp4_g24", values=384, value_kind="e2m1", scale_group=24, scale_kind="e4m3", tail=8),  # groups of 24
    Format("fp4_inline", values=256, value_kind="e2m1", scale_group=16, scale_kind="e4m3", tail=32,
           placement="inline"),
)
FORMATS = {**{name: as_format(name) for name in SHIPPED}, **{f.name: f for f in USER_FORMATS}}
LEAD, TRAILER = 32, 48  # poisoned bytes before the first page and after the last

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Inf / Inf in numpy


# ---- bf16 bits ----------------------------------------------------------------------------------------------


def bf16(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint16).astype(np.int16)).view(torch.bfloat16)


def bits_of_floats(v) -> np.ndarray:
    """bf16 bits of float64 values; values that are not bf16-exact become +0 (callers pass exact ones)."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = v.astype(np.float32)
        exact = (f32.astype(np.float64) == v) & ((f32.view(np.uint32) & 0xFFFF) == 0)
    return np.where(exact, f32.view(np.uint32) >> 16, 0).astype(np.uint16)


E4M3_VALUES = np.array([m * 2.0 ** -9 if e == 0 else (8 + m) * 2.0 ** (e - 10) for e in range(16) for m in range(8)][
    1:127])  # 2^-9 .. 448
E4M3_MIDPOINTS = (E4M3_VALUES[1:] + E4M3_VALUES[:-1]) / 2
E2M1_STEPS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_TIES = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def _signs(rng, shape):
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0)


def _one_ulp(bits: np.ndarray, rng) -> np.ndarray:
    """Each non-zero finite bf16 one step up or down in magnitude (or left), at random."""
    step = rng.integers(-1, 2, bits.shape)
    mag = bits.astype(np.int64) & 0x7FFF
    moved = np.clip(mag + step, 1, 0x7F7F)
    return np.where(mag == 0, bits, (bits.astype(np.int64) & 0x8000) | moved).astype(np.uint16)


def group_class(kind: int, fmt: Format, rng) -> np.ndarray:
    """One group (scale_group bf16 bit patterns) of edge class `kind`."""
    g = fmt.scale_group
    if kind == 0:  # normal values at a random magnitude, anywhere in bf16's range
        v = rng.standard_normal(g) * 2.0 ** rng.integers(-133, 120)
        return (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncated: bf16
    if kind == 1:  # random bit patterns: NaNs, Infs, subnormals, anything
        return rng.integers(0, 1 << 16, g).astype(np.uint16)
    if kind == 2:  # +0 and -0
        return (rng.integers(0, 2, g) << 15).astype(np.uint16)
    if kind == 3:  # all -0
        return np.full(g, 0x8000, dtype=np.uint16)
    if kind == 4:  # all NaN, either sign, various payloads
        return (rng.choice([0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7FBF], g)).astype(np.uint16)
    if kind == 5:  # normal values, one or two NaNs among them
        bits = group_class(0, fmt, rng)
        bits[rng.integers(0, g, 2)] = rng.choice([0x7FC0, 0xFFC1, 0x7F81], 2)
        return bits
    if kind == 6:  # normal values with +-Inf (and maybe a NaN, a zero, bf16 max)
        bits = group_class(0, fmt, rng)
        at = rng.permutation(g)[:4]
        bits[at] = [rng.choice([0x7F80, 0xFF80]), rng.choice([0x7F80, 0xFF80, 0x7FC0]), 0x8000, 0x7F7F]
        return bits
    if kind == 7:  # bf16 subnormals only, either sign (the largest 0x007F / 0x807F: quotients up to 0.99)
        bits = (rng.integers(1, 0x80, g) | (rng.integers(0, 2, g) << 15)).astype(np.uint16)
        bits[rng.integers(0, g)] |= 0x7F
        return bits
    if kind == 8:  # tiny: amax below both floors (a < 6 * 2^-9 = 0.0117; a / 448 < 2^-126: a < 2^-117.2)
        v = rng.standard_normal(g) * 2.0 ** rng.choice([-8, -10, -20, -60, -118, -122, -126, -130])
        return (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if kind == 9:  # bf16 max and -max among random values
        bits = group_class(0, fmt, rng)
        bits[rng.permutation(g)[:2]] = [0x7F7F, 0xFF7F]
        return bits
    if kind == 10:  # rounding ties of the values at the group's scale, exactly, and one bf16 step off them
        return _value_ties(fmt, rng)
    if kind == 11:  # scale ties: a / 6 (e2m1) or a / 448 (float32 scale's significand) on an e4m3 midpoint
        return _scale_ties(fmt, rng)
    raise ValueError(kind)


EDGE_CLASSES = 12


def _value_ties(fmt: Format, rng) -> np.ndarray:
    g = fmt.scale_group
    if fmt.value_kind == "e2m1":
        # S an e4m3 value with a = 6 * S, so s = a / 6 = S exactly; x = tie * S or step * S (exact in bf16).
        big_s = E4M3_VALUES[rng.integers(0, len(E4M3_VALUES))]
        v = np.concatenate([E2M1_TIES, E2M1_TIES, E2M1_STEPS])[rng.integers(0, 22, g)] * big_s
        v[0] = 6.0 * big_s
    else:
        # s = c * 2^k exactly (a = 448 * s; ue8m0 and pow2 need c = 1): x = midpoint * s or value * s.
        c = 1.0 if fmt.scale_kind == "ue8m0" else rng.choice([1.0, 1.0, 1.25, 1.5, 1.75])
        s = c * 2.0 ** int(rng.integers(-120, 100))
        pool = np.concatenate([E4M3_MIDPOINTS, E4M3_VALUES])
        v = pool[rng.integers(0, len(pool), g)] * s
        v[0] = 448.0 * s
    bits = bits_of_floats(v * _signs(rng, g))
    off = rng.random(g) < 0.25  # a quarter one bf16 step off (never the amax)
    off[0] = False
    return np.where(off, _one_ulp(bits, rng), bits).astype(np.uint16)


def _scale_ties(fmt: Format, rng) -> np.ndarray:
    """A group whose scale division lands on (or one bf16 step beside) an e4m3 midpoint: a / 6 for e2m1
    (the scale byte's rounding tie), a / 448 for the others; smaller values of either sign beside it."""
    g = fmt.scale_group
    mid = E4M3_MIDPOINTS[rng.integers(0, len(E4M3_MIDPOINTS))]
    top = 6.0 * mid if fmt.value_kind == "e2m1" else 448.0 * mid * 2.0 ** int(rng.integers(-110, 100))
    a = bits_of_floats(np.array([top]))  # exact: <= 5 significant bits times 3 (or 7 * 2^6)
    if rng.random() < 0.3:
        a = _one_ulp(a, rng)
    a_value = float((a.astype(np.uint32) << 16).view(np.float32)[0])
    v = rng.random(g) * a_value * _signs(rng, g)
    bits = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bits[rng.integers(0, g)] = a[0] | (rng.integers(0, 2) << 15)
    return bits


def edge_values(tokens: int, fmt: Format, rng, classes=range(EDGE_CLASSES)) -> np.ndarray:
    """bf16 bits [tokens, values], each group of a class drawn from `classes` (every class appears when
    there are enough groups)."""
    n = tokens * fmt.num_scales
    kinds = np.resize(np.array(list(classes)), n)
    rng.shuffle(kinds)
    return np.stack([group_class(int(kind), fmt, rng) for kind in kinds]).reshape(tokens, fmt.values)


# ---- calls ----------------------------------------------------------------------------------------------------


class Call:
    """One writer call on the CPU: k (values, with the tail or without), the tail (split calls), a cache
    view into a poisoned storage (record or byte view, padded pages, a lead), the slots."""

    def __init__(self, fmt: Format, values_bits: np.ndarray, *, seed: int, block_size: int = 16, num_blocks: int = 3,
                 slots=None, valid: float = 0.8, mapped: int | None = None, slot_dtype=torch.int64,
                 split: bool = False, byte_view: bool = False, page_pad: int = 0, k_row_pad: int = 0,
                 pow2: bool = False):
        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        tokens = values_bits.shape[0]
        tail_bits = rng.integers(0, 1 << 16, (tokens, fmt.tail)).astype(np.uint16)  # any bits: copied
        whole = bf16(np.concatenate([values_bits, tail_bits], axis=1))
        width = (fmt.values if split else fmt.head_dim) + k_row_pad
        buffer = torch.randint(-(1 << 15), 1 << 15, (tokens, width), generator=g, dtype=torch.int16).view(
            torch.bfloat16)  # rows k_row_pad values apart, junk between
        if split:
            buffer[:, : fmt.values] = whole[:, : fmt.values]
            self.k = buffer[:, : fmt.values]
            tail_buffer = torch.randint(-(1 << 15), 1 << 15, (tokens, fmt.tail + 3), generator=g,
                                        dtype=torch.int16).view(torch.bfloat16)
            tail_buffer[:, 1: 1 + fmt.tail] = whole[:, fmt.values:]
            self.tail = tail_buffer[:, 1: 1 + fmt.tail]  # own row stride, offset into its storage
        else:
            buffer[:, : fmt.head_dim] = whole
            self.k, self.tail = buffer[:, : fmt.head_dim], None
        self.whole = whole  # [tokens, head_dim], for the single-k form of the same call
        if slots is None:
            mapped = tokens if mapped is None else mapped
            chosen = torch.randperm(num_blocks * block_size, generator=g)[:mapped]
            chosen[torch.rand(mapped, generator=g) >= valid] = -1
        else:
            chosen = torch.tensor(slots, dtype=torch.int64)
        self.slot_mapping = chosen.to(slot_dtype)
        page = block_size * fmt.record_bytes + (16 if byte_view else 0)
        stride = page + page_pad
        storage = torch.randint(0, 256, (LEAD + num_blocks * stride + TRAILER,), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(seed ^ 0x5EED))
        if byte_view:
            self.k_cache = storage.as_strided((num_blocks, page), (stride, 1), LEAD)
        else:
            self.k_cache = storage.as_strided((num_blocks, block_size, fmt.record_bytes),
                                              (stride, fmt.record_bytes, 1), LEAD)
        self.fmt, self.block_size, self.pow2 = fmt, block_size, pow2

    def run(self, fn, device: str = "cpu", single: bool = False) -> np.ndarray:
        """The whole storage (bytes) after fn's call on a fresh copy of the poisoned cache."""
        move = (lambda t: t) if device == "cpu" else (lambda t: clone_strided(t, device))
        cache = clone_strided(self.k_cache, device)
        k, tail = (self.whole, None) if single else (self.k, self.tail)
        fn(move(k), cache, move(self.slot_mapping), self.block_size, self.fmt,
           tail=None if tail is None else move(tail), pow2_scale=self.pow2)
        if device != "cpu":
            torch.cuda.synchronize()
        return whole_storage(cache).cpu().numpy().copy()

    def reference(self, single: bool = False) -> np.ndarray:
        return self.run(quantize_and_insert_torch, single=single)

    def triton(self, single: bool = False) -> np.ndarray:
        if INTERPRETED:
            return self.run(quantize_and_insert_triton, single=single)
        if not torch.cuda.is_available():
            pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device")
        return self.run(quantize_and_insert_triton, "cuda", single=single)

    def poison(self) -> np.ndarray:
        return whole_storage(self.k_cache).numpy().copy()

    def addressed(self) -> np.ndarray:
        """bool over the storage: every byte of every written token's record (values, scales + pad, tail)."""
        mask = np.zeros(self.poison().shape, dtype=bool)
        for slot in self.slot_mapping.tolist():
            if slot >= 0:
                for start, size in self.parts(slot).values():
                    mask[start: start + size] = True
        return mask

    def parts(self, slot: int) -> dict[str, tuple[int, int]]:
        """{part: (storage address, bytes)} of slot's record, from Format.regions."""
        page, row = divmod(slot, self.block_size)
        at = self.k_cache.storage_offset() + page * self.k_cache.stride(0)
        return {part: (at + base + row * row_stride, size)
                for part, (base, row_stride, size) in self.fmt.regions(self.block_size).items()}

    def record(self, storage: np.ndarray, slot: int) -> dict[str, np.ndarray]:
        return {part: storage[start: start + size] for part, (start, size) in self.parts(slot).items()}

    def locate(self, address: int) -> str:
        for slot in range(self.k_cache.shape[0] * self.block_size):
            for part, (start, size) in self.parts(slot).items():
                if start <= address < start + size:
                    return f"slot {slot} {part} byte {address - start}"
        return f"storage byte {address} (outside every record)"


def assert_same(call: Call, got: np.ndarray, want: np.ndarray, what: str) -> None:
    differ = np.nonzero(got != want)[0]
    if differ.size:
        at = int(differ[0])
        raise AssertionError(f"{what}: {differ.size} byte(s) differ; first at {call.locate(at)}: "
                             f"triton 0x{got[at]:02x}, reference 0x{want[at]:02x}")


def pow2_options(fmt: Format):
    return (False, True) if fmt.scale_kind == "f32" else (False,)


FORMAT_POW2 = [(name, pow2) for name, fmt in FORMATS.items() for pow2 in pow2_options(fmt)]


# ---- Triton == the reference, whole storage -------------------------------------------------------------------


@pytest.mark.parametrize("name,pow2", FORMAT_POW2, ids=[f"{n}{'-pow2' if p else ''}" for n, p in FORMAT_POW2])
def test_edge_inputs_match_the_reference(name, pow2):
    """Every edge class, split tail and single k, record and byte views, both slot dtypes, padded rows and
    pages, a short slot mapping (tokens past it not written), negative slots."""
    fmt = FORMATS[name]
    configs = [{"split": False, "block_size": 16, "slot_dtype": torch.int64},
               {"split": True, "block_size": 32, "slot_dtype": torch.int32, "byte_view": True, "page_pad": 16,
                "k_row_pad": 5, "mapped": 22, "num_blocks": 2},
               {"split": True, "block_size": 64, "slot_dtype": torch.int64, "valid": 0.5, "k_row_pad": 1,
                "page_pad": 32, "num_blocks": 1}]
    for i, config in enumerate(configs):
        if config["split"] and fmt.tail == 0:
            config = {**config, "split": False}
        seed = 1000 * i + sum(map(ord, name)) + pow2
        tokens = max(24, -(-EDGE_CLASSES * 2 // fmt.num_scales))
        call = Call(fmt, edge_values(tokens, fmt, np.random.default_rng(seed)), seed=seed, pow2=pow2, **config)
        want, got = call.reference(), call.triton()
        assert (want != call.poison()).any()
        assert_same(call, got, want, f"{name} pow2={pow2} config {i}")


@pytest.mark.parametrize("name,pow2", FORMAT_POW2, ids=[f"{n}{'-pow2' if p else ''}" for n, p in FORMAT_POW2])
def test_random_magnitudes_match_the_reference(name, pow2):
    """Gaussian values at magnitudes 1e-38 .. 1e36, one magnitude per token (and one token of each edge
    class, mixed)."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(7 + pow2)
    scales = 10.0 ** np.linspace(-38, 36, 20)
    v = rng.standard_normal((20, fmt.values)) * scales[:, None]
    bits = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    call = Call(fmt, bits, seed=11, pow2=pow2, valid=1.0, block_size=8)
    assert_same(call, call.triton(), call.reference(), f"{name} pow2={pow2}")


@pytest.mark.parametrize("name", [n for n in FORMATS if FORMATS[n].tail])
def test_split_tail_writes_what_single_k_writes(name):
    fmt = FORMATS[name]
    for pow2 in pow2_options(fmt):
        call = Call(fmt, edge_values(20, fmt, np.random.default_rng(5)), seed=5, split=True, pow2=pow2,
                    k_row_pad=3)
        split, single = call.triton(), call.triton(single=True)
        assert_same(call, split, single, f"{name}: split vs single k (Triton)")
        assert_same(call, split, call.reference(single=True), f"{name}: split Triton vs single-k reference")


@pytest.mark.parametrize("name", list(FORMATS))
def test_only_the_addressed_records_change(name):
    """Independently of the reference: outside the written tokens' records (values, scales, pad, tail), the
    storage keeps its poison -- other rows, page padding, the lead and trailer, skipped and unmapped tokens."""
    fmt = FORMATS[name]
    call = Call(fmt, edge_values(30, fmt, np.random.default_rng(3)), seed=3, block_size=16, num_blocks=3,
                slots=[5, -1, 40, 0, -7, 47, 16, 31, -1000, 17, 2], byte_view=True, page_pad=16,
                split=bool(fmt.tail))
    got, before = call.triton(), call.poison()
    outside = np.nonzero((got != before) & ~call.addressed())[0]
    assert outside.size == 0, f"{name}: wrote outside the records, first at {call.locate(int(outside[0]))}"
    for slot in (5, 40, 0, 47, 16, 31, 17, 2):
        scales = call.record(got, slot)["scales"]
        assert (scales[fmt.num_scales * fmt.scale_size:] == 0).all(), (name, slot, "pad bytes")


def test_every_bf16_amax_through_every_scale_rule():
    """Each finite non-negative bf16 amax (and +Inf) as a group's largest magnitude, either sign, a smaller
    value beside it: the scale rules (a / 6 and its e4m3 byte; a / 448, the 2^-126 floor, pow2) and the
    values under them, against the reference."""
    amax = np.arange(0, 0x7F81, dtype=np.int64)
    f32_g16 = Format("f32_g16", values=512, scale_group=16, scale_kind="f32")  # v32_656's rule, 32 groups a token
    for fmt, pow2 in ((FORMATS["v41_288"], False), (f32_g16, False), (f32_g16, True)):
        groups = -(-amax.size // fmt.num_scales) * fmt.num_scales
        bits = np.zeros((groups, fmt.scale_group), dtype=np.int64)
        bits[: amax.size, 3] = amax | (np.arange(amax.size) % 2 << 15)
        bits[: amax.size, 6] = amax - (amax >> 2)  # a quarter below: a value that rounds somewhere
        bits[: amax.size, 9] = amax >> 1
        tokens = groups // fmt.num_scales
        call = Call(fmt, bits.reshape(tokens, fmt.values).astype(np.uint16), seed=9, block_size=256,
                    num_blocks=-(-tokens // 256), valid=1.0, pow2=pow2)
        assert_same(call, call.triton(), call.reference(), f"{fmt.name} pow2={pow2}")


# ---- hand-computed bytes ----------------------------------------------------------------------------------------


def one_record(fmt: Format, values: np.ndarray, pow2: bool = False, tail=None) -> dict[str, np.ndarray]:
    """The Triton record of one token (float64 values, bf16-exact, or uint16 bits) written to slot 5."""
    bits = values if values.dtype == np.uint16 else bits_of_floats(values)
    call = Call(fmt, bits.reshape(1, fmt.values), seed=1, slots=[5], pow2=pow2)
    if tail is not None:
        call.whole[:, fmt.values:] = bf16(tail)
        call.k[:, fmt.values:] = bf16(tail)
    got = call.triton()
    assert_same(call, got, call.reference(), f"{fmt.name}: the hand-computed record")
    return call.record(got, 5)


def f32_bytes(x: float) -> list[int]:
    return list(struct.pack("<f", x))


def test_nvfp4_record_by_hand():
    fmt = FORMATS["v41_288"]
    v = np.zeros(fmt.values)
    # Group 0: amax 6.0 -> s = 1.0, scale byte 0x38; the ties go to the even code.
    v[:16] = [6, -6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.0, 0.5, 3, 4, -1, 1.5, 2]
    # Group 1: all +0 -> s = 2^-9 (the floor), byte 0x01; values 0. Group 2: all -0 -> nibbles 0x8.
    v[32:48] = -0.0
    # Group 3: amax 2688 = 6 * 448 -> s = 448, byte 0x7E; 1344 / 448 = 3 -> code 5; 224 / 448 = 0.5 -> 1.
    v[48:52] = [2688, -1344, 224, 112]  # 112 / 448 = 0.25: a tie, to 0
    # Group 4: amax 1e6 -> s clamps to 448 (0x7E); 1e6 / 448 > 5 -> 6.
    v[64:66] = [999424.0, -2688.0]
    # Group 5: amax 0.005 (below 6 * 2^-9): s = 2^-9 (0x01); 0.005 / 2^-9 = 2.56 -> code 5 (3.0).
    v[80:82] = [0.0050048828125, -0.0009765625]  # 2^-10 / 2^-9 = 0.5 -> code 1, negative
    # Group 6: a / 6 on an e4m3 tie: a = 6 * 1.0625 = 6.375 -> s = 1.0625, between 1.0 and 1.125 -> even, 1.0.
    v[96:98] = [6.375, 1.0]
    # Group 7: s = 0.75 (a = 4.5, e4m3 0x30 | 4 = 0x34); x = 0.75 * 1.25 = 0.9375 -> a tie, to code 2.
    v[112:114] = [4.5, 0.9375]
    bits = bits_of_floats(v)
    bits[16:32] = 0x0000
    # Group 8: NaN, Inf, -Inf, bf16 max: a = Inf -> s = 448 (0x7E); NaN -> 0x0, +-Inf -> 7 / 0xF, max -> 7.
    bits[128:132] = [0x7FC0, 0x7F80, 0xFF80, 0x7F7F]
    # Group 9: all NaN -> a = 0 -> 0x01, nibbles 0x0 whatever the sign.
    bits[144:160] = [0xFFC0, 0x7FC1] * 8
    # Group 10: subnormals only -> a tiny, s = 2^-9; x / S < 2^-117 -> 0, signs kept.
    bits[160:164] = [0x007F, 0x807F, 0x0001, 0x8001]
    rec = one_record(fmt, bits)
    values, scales = rec["values"], rec["scales"]
    assert values[:8].tolist() == [0xF7, 0x20, 0x42, 0x64, 0x86, 0x51, 0xA6, 0x43]
    assert scales[:11].tolist() == [0x38, 0x01, 0x01, 0x7E, 0x7E, 0x01, 0x38, 0x34, 0x7E, 0x01, 0x01]
    assert (values[8:16] == 0x00).all() and (values[16:24] == 0x88).all()
    assert values[24:26].tolist() == [0xD7, 0x01]  # 6 | 0xD << 4 (-3); 1 | 0 << 4 (0.25 -> 0)
    assert values[32] == 0xF7  # 999424 / 448 > 5 -> 7; -2688 / 448 = -6 -> 0xF
    assert values[40] == 0x95  # 0.0050048828125 * 512 = 2.5625 -> 5 (3.0); -0.5 -> 0x9
    assert values[48] == 0x27  # 6.375 / 1.0 = 6.375 -> 7; 1.0 -> 2
    assert values[56] == 0x27  # 4.5 / 0.75 = 6 -> 7; 0.9375 / 0.75 = 1.25 -> 2
    assert values[64:66].tolist() == [0x70, 0x7F]  # NaN 0 | +Inf 7 << 4; -Inf 0xF | bf16 max 7 << 4
    assert (values[72:80] == 0x00).all()
    assert values[80:82].tolist() == [0x80, 0x80]
    assert rec["tail"].size == 0


def test_float32_scale_records_by_hand():
    fmt = FORMATS["indexer_132"]
    v = np.zeros(fmt.values)
    v[:4] = [448.0, 1.0, -1.0, -0.0]  # s = 1.0
    rec = one_record(fmt, v)
    assert rec["scales"].tolist() == f32_bytes(1.0) == [0x00, 0x00, 0x80, 0x3F]
    assert rec["values"][:5].tolist() == [0x7E, 0x38, 0xB8, 0x80, 0x00]
    # 450 / 448 = 1.0044642..: pow2 rounds the scale up to 2.0 (450 / 2 = 225 -> 224, 0x76); without,
    # 450 / s is 448 (0x7E).
    v[:4] = [450.0, 1.0, 0.0, 0.0]
    assert one_record(fmt, v, pow2=True)["scales"].tolist() == f32_bytes(2.0)
    assert one_record(fmt, v, pow2=True)["values"][:2].tolist() == [0x76, 0x30]  # 1 / 2 = 0.5: 0x30
    plain = one_record(fmt, v)
    assert plain["scales"].tolist() == f32_bytes(float(np.float32(450.0) / np.float32(448.0)))
    assert plain["values"][0] == 0x7E
    # A power-of-two scale stays: a = 896 -> s = 2.0 either way.
    v[:4] = [896.0, 0.0, 0.0, 0.0]
    assert one_record(fmt, v, pow2=True)["scales"].tolist() == one_record(fmt, v)["scales"].tolist() == f32_bytes(2.0)
    # All zeros: s = 2^-126 (FLT_MIN), bytes 00 00 80 00; values +-0.
    z = np.zeros(fmt.values, dtype=np.uint16)
    z[1::2] = 0x8000
    rec = one_record(fmt, z)
    assert rec["scales"].tolist() == [0x00, 0x00, 0x80, 0x00] and rec["values"][:2].tolist() == [0x00, 0x80]
    # bf16 subnormals alone: s = 2^-126, x / s = x * 2^126 -- 0x007F -> 127 / 128 -> 1.0 (0x38); 0x0040
    # (2^-127) -> 0.5 (0x30); 0x0001 (2^-133) -> 2^-7 = 4 * 2^-9 (0x04); a GPU that flushed x would write 0.
    z[:5] = [0x007F, 0x0040, 0x0001, 0x8003, 0x0000]
    rec = one_record(fmt, z)
    assert rec["scales"].tolist() == f32_bytes(2.0 ** -126)
    assert rec["values"][:5].tolist() == [0x38, 0x30, 0x04, 0x8C, 0x00]
    # A group with +-Inf: s = +Inf; Inf / Inf is NaN -> 0x7F; finite / Inf -> +-0.
    z[:5] = [0x7F80, 0xFF80, 0x3F80, 0xBF80, 0x7FC0]
    rec = one_record(fmt, z)
    assert rec["scales"].tolist() == f32_bytes(float("inf"))
    assert rec["values"][:5].tolist() == [0x7F, 0x7F, 0x00, 0x80, 0x7F]
    # All NaN: a = 0 -> FLT_MIN; every value 0x7F.
    rec = one_record(fmt, np.full(fmt.values, 0xFFC0, dtype=np.uint16))
    assert rec["scales"].tolist() == f32_bytes(2.0 ** -126) and (rec["values"] == 0x7F).all()


def test_inline_record_by_hand():
    """v32_656: one record per row -- values 0..511, four float32 scales 512..527, the tail 528..655."""
    fmt = FORMATS["v32_656"]
    assert fmt.regions(16) == {"values": (0, 656, 512), "scales": (512, 656, 16), "tail": (528, 656, 128)}
    v = np.zeros(fmt.values)
    v[0], v[128], v[256], v[384] = 448.0, -896.0, 0.5, 3.0 * 2 ** -110
    v[1], v[129], v[257] = 1.0, 2.0, 2.0 ** -10
    tail = np.arange(fmt.tail, dtype=np.uint16) * 0x0101 + 0x8001
    rec = one_record(fmt, v, tail=tail[None, :])
    assert rec["scales"].tolist() == (f32_bytes(1.0) + f32_bytes(2.0) + f32_bytes(float(np.float32(0.5) / 448))
                                      + f32_bytes(float(np.float32(3.0 * 2 ** -110) / np.float32(448))))
    assert rec["values"][[0, 1, 128, 129, 256, 384]].tolist() == [0x7E, 0x38, 0xFE, 0x38, 0x7E, 0x7E]
    assert rec["tail"].tolist() == list(tail.astype("<u2").tobytes())


# ---- refusals and the division ----------------------------------------------------------------------------------


def test_refusals():
    k = torch.zeros((1, 512), dtype=torch.bfloat16)
    cache = torch.zeros((1, 16, 528), dtype=torch.uint8)
    with pytest.raises(ValueError, match="pow2_scale"):
        quantize_and_insert_triton(k, cache, torch.tensor([0]), 16, FORMATS["v41_528"], pow2_scale=True)
    odd = Format("e2m1_ue8m0", values=64, scale_group=32, value_kind="e2m1", scale_kind="ue8m0")
    with pytest.raises(ValueError, match="e2m1 values with ue8m0 scales"):
        quantize_and_insert_triton(k[:, :64], cache, torch.tensor([0]), 16, odd)


@triton.jit
def _div_kernel(x_ptr, y_ptr, out_ptr, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    x = tl.load(x_ptr + i, mask=i < n, other=1.0)
    y = tl.load(y_ptr + i, mask=i < n, other=1.0)
    tl.store(out_ptr + i, tl.math.div_rn(x, y), mask=i < n)


def test_div_rn_is_the_ieee_division():
    """tl.math.div_rn exists in this Triton and rounds as IEEE float32 division (numpy's), on normal operands
    and normal quotients -- where the writer uses it (subnormal quotients only ever round to a zero byte)."""
    assert hasattr(tl.math, "div_rn")
    rng = np.random.default_rng(0)
    n = 1 << 14
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
    y = (rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
    y[:8] = [448.0, 6.0, 3.0, 7.0, 0.75, 1.0625, 448.0, 6.0]
    want = x / y
    device = "cpu" if INTERPRETED else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device")
    out = torch.empty(n, dtype=torch.float32, device=device)
    _div_kernel[(triton.cdiv(n, 1024),)](torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), out, n,
                                         B=1024)
    got = out.cpu().numpy()
    assert (got.view(np.uint32) == want.view(np.uint32)).all()


def test_the_formats_cover_what_the_kernel_branches_on():
    kinds = {(f.value_kind, f.scale_kind, f.placement) for f in FORMATS.values()}
    assert kinds >= {("e4m3", "ue8m0", "page_split"), ("e2m1", "e4m3", "page_split"), ("e2m1", "e4m3", "inline"),
                     ("e4m3", "f32", "page_split"), ("e4m3", "f32", "inline")}
    assert any(f.scale_pad and f.scale_kind == "f32" for f in FORMATS.values())
    assert any(f.scale_pad and f.scale_kind == "e4m3" for f in FORMATS.values())
    assert any(f.scale_group & (f.scale_group - 1) for f in FORMATS.values() if f.value_kind == "e2m1")
    assert list(itertools.chain(*[pow2_options(f) for f in FORMATS.values()])).count(True) >= 4
