"""Kernel families: each is one template, one config class (its parameters
and ABI), a torch reference, a Triton fallback and the op users call.

FAMILIES maps a family's name prefix (the start of every kernel name and the
`family` of its manifest rows) to its config class, so that build workers,
the manifest and the spec find a family's config from plain data.
"""

from __future__ import annotations

from .dequant_gather.config import DequantGatherConfig
from .quantize_insert.config import QuantizeInsertConfig

FAMILIES = {cls.family: cls for cls in (DequantGatherConfig, QuantizeInsertConfig)}
SPEC_TABLES = {cls.spec_table: cls for cls in FAMILIES.values()}  # the spec's [[table]] of each family
