"""Record formats as data: what one token's record in a paged cache holds.

A `Format` is a row of data that says everything the templates, the runtime
and the references need; every other quantity (head dim, data and scale row
bytes, record bytes) is derived from its fields, never restated. A format
that does not add up, whose scale group does not divide its values, or whose
rows the kernels cannot move with their copies (16-byte pieces for a data
row; 4-, 8- or 16-byte pieces for a scale row) is refused when it is made,
with one line saying why.

Formats are defined in a spec (kvgen/specs/*.toml, or a user's own), recorded
in each tree's manifest, and learned by the runtime from the trees it loads.
This module is imported everywhere (build, runtime, tools): no torch, no jinja2.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError


class FormatError(UsageError):
    """A record format that does not add up or that kvgen cannot move."""


# Kinds of quantized values: bits per value (docs/semantics.md decodes each).
#   e4m3: OCP FP8 E4M3, one per byte
#   e2m1: OCP FP4 E2M1, two per byte, element 2i in the low nibble of byte i
VALUE_BITS = {"e4m3": 8, "e2m1": 4}
# Kinds of scale: bytes per scale.
#   ue8m0: 2^(code - 127), one byte; e4m3: an E4M3 value; f32: a little-endian float32
SCALE_SIZE = {"ue8m0": 1, "e4m3": 1, "f32": 4}
# Where a token's scales live.
#   page_split: a page holds block_size data rows (values, then the tail), then
#               block_size scale rows (scales, then pad bytes)
#   inline:     one contiguous record per token: values, scales (+ pad), tail
PLACEMENTS = ("page_split", "inline")
TAIL_BYTES = 2  # a bf16 tail value, copied verbatim
SCALE_COPY_SIZES = (4, 8, 16)  # a scale row moves in one copy of these sizes, or in 16-byte pieces
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Format:
    """One token's record: `values` quantized values, then `tail` bf16 values
    copied verbatim; one scale per `scale_group` values, padded by `scale_pad`
    bytes into a scale row."""

    name: str
    values: int  # quantized values per token (fp8_dim for e4m3 formats)
    scale_group: int  # quantized values per scale
    tail: int = 0  # bf16 values copied verbatim after the quantized ones
    value_kind: str = "e4m3"
    scale_kind: str = "ue8m0"
    scale_pad: int | None = None  # pad bytes after a row's scales (None: the fewest the copy needs)
    placement: str = "page_split"

    def __post_init__(self) -> None:
        _check(self)

    # ---- derived, never stored --------------------------------------------------
    @property
    def head_dim(self) -> int:
        """bf16 values written per token."""
        return self.values + self.tail

    @property
    def num_scales(self) -> int:
        return self.values // self.scale_group

    @property
    def value_bytes(self) -> int:
        """The quantized values of one token."""
        return self.values * VALUE_BITS[self.value_kind] // 8

    @property
    def tail_bytes(self) -> int:
        return TAIL_BYTES * self.tail

    @property
    def data_bytes(self) -> int:
        """The quantized values, then the bf16 tail (a page-split format's data row)."""
        return self.value_bytes + self.tail_bytes

    @property
    def scale_bytes(self) -> int:
        """A scale row: the scales, then `scale_pad` pad bytes."""
        return self.num_scales * SCALE_SIZE[self.scale_kind] + self.scale_pad

    @property
    def record_bytes(self) -> int:
        """Bytes per token: k_cache.shape[-1], by which calls tell formats apart."""
        return self.data_bytes + self.scale_bytes

    @property
    def offsets(self) -> dict[str, int]:
        """Byte offset of the values, scales and tail within one token's record
        as the kernels stage it: for page_split the data row then the scale row
        (values, tail, scales), for inline the record itself (values, scales, tail)."""
        if self.placement == "inline":
            return {"values": 0, "scales": self.value_bytes, "tail": self.value_bytes + self.scale_bytes}
        return {"values": 0, "tail": self.value_bytes, "scales": self.data_bytes}

    def regions(self, block_size: int) -> dict[str, tuple[int, int, int]]:
        """Where each part of row r lies in a page of `block_size` rows:
        {part: (base, row_stride, bytes)}, part r at page + base + r * row_stride.
        The one statement of the placements that every reader and writer uses."""
        if self.placement == "inline":
            at = self.offsets
            return {part: (at[part], self.record_bytes, size) for part, size in self._part_bytes().items()}
        return {"values": (0, self.data_bytes, self.value_bytes),
                "tail": (self.value_bytes, self.data_bytes, self.tail_bytes),
                "scales": (block_size * self.data_bytes, self.scale_bytes, self.scale_bytes)}

    def _part_bytes(self) -> dict[str, int]:
        return {"values": self.value_bytes, "scales": self.scale_bytes, "tail": self.tail_bytes}

    @property
    def scale_size(self) -> int:
        """Bytes per scale."""
        return SCALE_SIZE[self.scale_kind]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], record_bytes: int | None = None) -> "Format":
        """A format from plain values (a spec table, a manifest row). `record_bytes`,
        where given, is the size the format must add up to: a check, not a field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        name = values.get("name", "?")
        if unknown:
            raise FormatError(f"format {name}: unknown field(s) {unknown}; known: {sorted(known)}")
        try:
            fmt = cls(**values)
        except TypeError as err:  # a required field missing
            raise FormatError(f"format {name}: {err}") from None
        if record_bytes is not None and record_bytes != fmt.record_bytes:
            raise FormatError(
                f"format {name}: does not add up to record_bytes={record_bytes}: {fmt.data_bytes}-byte data rows "
                f"({fmt.values} {fmt.value_kind} + {fmt.tail} bf16) + {fmt.scale_bytes}-byte scale rows "
                f"({fmt.num_scales} {fmt.scale_kind} + {fmt.scale_pad} pad) = {fmt.record_bytes}")
        return fmt


def _fewest_pad(f: Format, scale_bytes: int) -> int:
    """Pad bytes after the scales: page_split, the fewest that make a scale row a
    size the copy moves; inline, the fewest that keep the tail (or the next
    record) 16-byte aligned."""
    if f.placement == "inline":
        return -(f.value_bytes + scale_bytes) % 16
    size = next((s for s in SCALE_COPY_SIZES if s >= scale_bytes), -(-scale_bytes // 16) * 16)
    return size - scale_bytes


def _check(f: Format) -> None:
    def refuse(why: str) -> None:
        raise FormatError(f"format {f.name}: {why}")

    if not isinstance(f.name, str) or not _NAME.match(f.name):
        raise FormatError(f"format name {f.name!r}: expected lower-case letters, digits and _, starting with a letter")
    for field in ("values", "scale_group", "tail"):
        value = getattr(f, field)
        if type(value) is not int:
            refuse(f"{field} must be an int, got {value!r}")
    if f.value_kind not in VALUE_BITS:
        refuse(f"value_kind {f.value_kind!r}: known kinds are {sorted(VALUE_BITS)}")
    if f.scale_kind not in SCALE_SIZE:
        refuse(f"scale_kind {f.scale_kind!r}: known kinds are {sorted(SCALE_SIZE)}")
    if f.placement not in PLACEMENTS:
        refuse(f"placement {f.placement!r}: known placements are {list(PLACEMENTS)}")
    if f.values <= 0 or f.scale_group <= 0 or f.tail < 0:
        refuse(f"values ({f.values}) and scale_group ({f.scale_group}) must be positive, tail ({f.tail}) >= 0")
    if f.values % f.scale_group:
        refuse(f"scale_group {f.scale_group} does not divide values {f.values}")
    if f.values * VALUE_BITS[f.value_kind] % 8:
        refuse(f"{f.values} {f.value_kind} values do not fill whole bytes")
    scales = f.num_scales * SCALE_SIZE[f.scale_kind]
    if f.scale_pad is None:
        object.__setattr__(f, "scale_pad", _fewest_pad(f, scales))
    elif type(f.scale_pad) is not int or f.scale_pad < 0:
        refuse(f"scale_pad must be an int >= 0, got {f.scale_pad!r}")
    if f.placement == "inline":
        # One contiguous record, copied in 16-byte pieces; the tail copied verbatim in 16-byte pieces too.
        if f.value_bytes % 16 or (f.value_bytes + f.scale_bytes) % 16 or f.record_bytes % 16:
            refuse(f"an inline record of {f.value_bytes} value bytes, {f.scale_bytes} scale bytes and "
                   f"{f.tail_bytes} tail bytes cannot be moved in 16-byte copies: the values, the values and "
                   f"scales, and the record must each be a multiple of 16 bytes")
        return
    if f.data_bytes % 16:
        refuse(f"a data row of {f.data_bytes} bytes cannot be moved in 16-byte copies (make it a multiple of 16)")
    if f.scale_bytes not in SCALE_COPY_SIZES and f.scale_bytes % 16:
        refuse(f"a scale row of {f.scale_bytes} bytes ({scales} bytes of scales + {f.scale_pad} pad) cannot be moved: "
               f"it must be {', '.join(map(str, SCALE_COPY_SIZES))} or a multiple of 16 bytes")
