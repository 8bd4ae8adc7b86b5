"""Spec files: the formats a kernel tree defines and the configs it builds, in TOML.

    [formats.fp8_384]              # one table per format: kvgen.formats.Format's fields
    values = 384
    tail = 128
    scale_group = 64
    record_bytes = 648             # optional: checked, never stored

    [[dequant_gather]]             # one table per config product of a family
    format = "fp8_384"             # each field a value or a list of values
    indexing = ["dense", "sparse"]
    block_size = [64, 512]
    num_stages = 3                 # left out: the field's default (kvgen list-params)

A product is the cross product of its fields' values; the spec's configs are
the union of its products, in order, without repeats. The shipped tree is
built from kvgen/specs/shipped.toml in exactly this way. Read with tomllib;
no torch, no jinja2.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .errors import UsageError
from .formats import Format, FormatError

SHIPPED_SPEC = Path(__file__).resolve().parent / "specs" / "shipped.toml"


class SpecError(UsageError):
    """A spec file that cannot be read or that names something it does not define."""


@dataclass(frozen=True)
class Spec:
    path: Path
    formats: dict[str, Format]  # by name
    configs: tuple  # family config objects, in product order

    @property
    def names(self) -> dict[str, Any]:
        return {c.name: c for c in self.configs}


def load_spec(path: Path | str) -> Spec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise SpecError(f"spec {path}: cannot read it ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"spec {path}: not valid TOML ({err})") from None
    return parse_spec(data, path)


def parse_spec(data: dict[str, Any], path: Path) -> Spec:
    from .families import SPEC_TABLES

    known = {"formats", *SPEC_TABLES}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"spec {path}: unknown table(s) {unknown}; known: {sorted(known)}")
    formats = _formats(data.get("formats", {}), path)
    configs: list = []
    seen: set = set()
    for table, family in SPEC_TABLES.items():
        products = data.get(table, [])
        if not isinstance(products, list):
            raise SpecError(f"spec {path}: [{table}] must be an array of tables ([[{table}]])")
        for number, product in enumerate(products, 1):
            for config in _expand(family, product, formats, f"spec {path}: [[{table}]] #{number}"):
                if config not in seen:
                    seen.add(config)
                    configs.append(config)
    return Spec(path, formats, tuple(configs))


def _formats(tables: dict[str, Any], path: Path) -> dict[str, Format]:
    if not isinstance(tables, dict):
        raise SpecError(f"spec {path}: formats must be tables ([formats.NAME]), got {type(tables).__name__}")
    formats: dict[str, Format] = {}
    by_record: dict[int, str] = {}
    for name, fields in tables.items():
        if not isinstance(fields, dict):
            raise SpecError(f"spec {path}: [formats.{name}] must be a table")
        fields = dict(fields)
        record_bytes = fields.pop("record_bytes", None)
        if record_bytes is not None and type(record_bytes) is not int:
            raise SpecError(f"spec {path}: [formats.{name}] record_bytes must be an integer, got {record_bytes!r}")
        try:
            fmt = Format.from_dict({"name": name, **fields}, record_bytes)
        except FormatError as err:
            raise SpecError(f"spec {path}: {err}") from None
        # Calls tell formats apart by k_cache.shape[-1]: within a tree it must be unique.
        if fmt.record_bytes in by_record:
            raise SpecError(f"spec {path}: formats {by_record[fmt.record_bytes]} and {name} both have "
                            f"{fmt.record_bytes}-byte records; calls could not tell them apart")
        by_record[fmt.record_bytes] = name
        formats[name] = fmt
    return formats


def _expand(family, product: dict[str, Any], formats: dict[str, Format], where: str):
    fields = {f.name: f for f in dataclasses.fields(family)}
    unknown = sorted(set(product) - set(fields))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; {family.spec_table} takes {sorted(fields)}")
    axes: dict[str, list] = {}
    for name, f in fields.items():
        if name in product:
            value = product[name]
            axes[name] = list(value) if isinstance(value, list) else [value]
        elif f.metadata["default"] is not dataclasses.MISSING:
            axes[name] = [f.metadata["default"]]
        else:
            raise SpecError(f"{where}: no {name} given ({f.metadata['doc']})")
        if not axes[name]:
            raise SpecError(f"{where}: {name} is an empty list")
    for name in axes["format"]:
        if not isinstance(name, str):
            raise SpecError(f"{where}: format must name a [formats.NAME] table, got {name!r}")
        if name not in formats:
            raise SpecError(f"{where}: format {name!r} is not defined in this spec (its formats: {sorted(formats)})")
    axes["format"] = [formats[name] for name in axes["format"]]
    names = list(axes)
    for values in itertools.product(*(axes[n] for n in names)):
        point = dict(zip(names, values))
        try:
            yield from family.from_product(point)
        except ConfigError as err:
            raise SpecError(f"{where}: {err}") from None
