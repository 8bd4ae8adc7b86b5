"""Stage 4: the manifest -- what was built, as rows of data.

<tree>/manifest.json = {"format": 2, "formats": {name: Format fields},
"kernels": [entry, ...]}: the record formats the tree defines, and one entry
per cubin -- its family, config (naming its format), arch, symbol, ABI,
launch shape, resources, hashes and toolchain. The runtime reads it with nothing but the standard
library, so this module imports no build tooling.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..formats import Format, FormatError
from ..paths import MANIFEST_NAME

FORMAT = 2  # 2: the formats a tree defines, in a table of their own; rows name theirs


@dataclass(frozen=True)
class KernelEntry:
    name: str
    family: str  # the config class's prefix (kvgen.families.FAMILIES)
    config: dict[str, Any]  # its "format" is the format's name
    format: Format
    arch: str
    symbol: str
    params: tuple[tuple[str, str], ...]  # (name, C type), in ABI order
    block: tuple[int, int, int]
    smem_bytes: int
    registers: int
    spill_bytes: int
    cubin: str  # path relative to the manifest
    cubin_sha256: str
    source: str
    source_sha256: str
    root: Path  # the tree (folder of the manifest) this row came from

    @property
    def pdl(self) -> bool:
        """Built to wait on griddepcontrol: may be launched with programmatic dependent launch."""
        return bool(self.config.get("pdl", False))

    @property
    def cubin_path(self) -> Path:
        return self.root / self.cubin

    @classmethod
    def from_json(cls, row: dict[str, Any], formats: dict[str, Format], root: Path) -> "KernelEntry":
        try:
            return cls(
                name=row["name"], family=row["family"], config=dict(row["config"]),
                format=formats[row["config"]["format"]], arch=row["arch"], symbol=row["symbol"],
                params=tuple((p["name"], p["ctype"]) for p in row["params"]),
                block=tuple(row["block"]), smem_bytes=int(row["smem_bytes"]),
                registers=int(row["registers"]), spill_bytes=int(row["spill_bytes"]),
                cubin=row["cubin"], cubin_sha256=row["cubin_sha256"],
                source=row["source"], source_sha256=row["source_sha256"], root=root,
            )
        except (KeyError, TypeError, ValueError) as err:
            name = row.get("name", "?") if isinstance(row, dict) else "?"
            raise ManifestError(f"{root / MANIFEST_NAME}: malformed entry {name!r}: {err!r}") from err


class ManifestError(UsageError):
    """No kvgen manifest where one was looked for (KVGEN_GENERATED_DIR, or an
    unbuilt tree), or a malformed one: the user's to fix, so a ValueError."""


def _remedy(path: Path) -> str:
    override = os.environ.get("KVGEN_GENERATED_DIR")
    if override and Path(override) == path.parent:
        return (f"KVGEN_GENERATED_DIR={override} must name a tree built by `python -m kvgen build`; "
                "unset it to use the shipped one")
    return "run `python -m kvgen build`"


def _unreadable(path: Path) -> str:
    """What to do about a manifest that exists but cannot be used: kvgen will not
    build or prune over it (that would drop the rows it holds)."""
    override = os.environ.get("KVGEN_GENERATED_DIR")
    if override and Path(override) == path.parent:
        return f"KVGEN_GENERATED_DIR={override} must name a tree built by this kvgen; unset it to use the shipped one"
    return "rebuild that tree with the kvgen that reads it, or move it aside and build into an empty folder"


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"kvgen manifest not found: {path} ({_remedy(path)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not a readable kvgen manifest ({err}; {_unreadable(path)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("kernels"), list):
        raise ManifestError(f"{path}: not a kvgen manifest of format {FORMAT} ({_unreadable(path)})")
    if not isinstance(data.get("formats"), dict):
        raise ManifestError(f"{path}: no formats table ({_unreadable(path)})")
    return data


@dataclass(frozen=True)
class Tree:
    """One kernel tree as its manifest describes it: its formats and its rows."""

    root: Path
    formats: dict[str, Format]
    entries: tuple[KernelEntry, ...]


def read_tree(root: Path) -> Tree:
    path = root / MANIFEST_NAME
    data = read_manifest(path)
    try:
        formats = {name: Format.from_dict({**fields, "name": name}) for name, fields in data["formats"].items()}
    except (AttributeError, TypeError, FormatError) as err:
        raise ManifestError(f"{path}: malformed formats table ({err})") from None
    return Tree(root, formats, tuple(KernelEntry.from_json(row, formats, root) for row in data["kernels"]))


def write_manifest(path: Path, rows: list[dict[str, Any]], formats: dict[str, Format]) -> None:
    """Rows sorted by name; the formats table holds the formats the rows name."""
    used = sorted({row["config"]["format"] for row in rows})
    table = {name: {k: v for k, v in formats[name].to_dict().items() if k != "name"} for name in used}
    data = {"format": FORMAT, "formats": table, "kernels": sorted(rows, key=lambda e: e["name"])}
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
