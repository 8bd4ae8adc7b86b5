"""Stage 4: the manifest -- what was built, as rows of data.

`generated/manifest.json` = {"format": 1, "kernels": [entry, ...]}; each entry
names one cubin: its config, arch, symbol, ABI, launch shape, resources,
hashes and toolchain. The runtime reads it with nothing but the standard
library, so this module imports no build tooling.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

FORMAT = 1


@dataclass(frozen=True)
class KernelEntry:
    name: str
    config: dict[str, Any]
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

    @property
    def pdl(self) -> bool:
        """Built to wait on griddepcontrol: may be launched with programmatic dependent launch."""
        return bool(self.config.get("pdl", False))

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "KernelEntry":
        try:
            return cls(
                name=row["name"], config=dict(row["config"]), arch=row["arch"], symbol=row["symbol"],
                params=tuple((p["name"], p["ctype"]) for p in row["params"]),
                block=tuple(row["block"]), smem_bytes=int(row["smem_bytes"]),
                registers=int(row["registers"]), spill_bytes=int(row["spill_bytes"]),
                cubin=row["cubin"], cubin_sha256=row["cubin_sha256"],
                source=row["source"], source_sha256=row["source_sha256"],
            )
        except (KeyError, TypeError, ValueError) as err:
            name = row.get("name", "?") if isinstance(row, dict) else "?"
            raise ManifestError(f"malformed manifest entry {name!r}: {err!r}") from err


class ManifestError(UsageError):
    """No kvgen manifest where one was looked for (KVGEN_GENERATED_DIR, or an
    unbuilt tree), or a malformed one: the user's to fix, so a ValueError."""


def _remedy(path: Path) -> str:
    override = os.environ.get("KVGEN_GENERATED_DIR")
    if override and Path(override) == path.parent:
        return (f"KVGEN_GENERATED_DIR={override} must name a tree built by `python -m kvgen build`; "
                "unset it to use the shipped one")
    return "run `python -m kvgen build`"


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"kvgen manifest not found: {path} ({_remedy(path)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not a readable kvgen manifest ({err}; {_remedy(path)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("kernels"), list):
        raise ManifestError(f"{path}: not a kvgen manifest of format {FORMAT} ({_remedy(path)})")
    return data


def load_entries(path: Path) -> list[KernelEntry]:
    return [KernelEntry.from_json(row) for row in read_manifest(path)["kernels"]]


def write_manifest(path: Path, entries: list[dict[str, Any]]) -> None:
    data = {"format": FORMAT, "kernels": sorted(entries, key=lambda e: e["name"])}
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
