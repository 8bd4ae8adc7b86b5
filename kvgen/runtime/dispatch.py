"""Which backend, and which cubin, serves a call: a filter over manifest rows.

Everything here is decided from host-known quantities (dtypes, shapes,
strides, the device's compute capability): no device synchronisation.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import ARCHS
from ..env import env_flag
from ..errors import UsageError
from .manifest import KernelEntry

BACKENDS = ("cubin", "ptx", "triton", "torch")  # in dispatch order
# The PTX route (on unless KVGEN_PTX=0): on a GPU with no cubin of its arch, a
# compute_* row's PTX, JIT-compiled by the driver once per process and device.
PTX_ENV = "KVGEN_PTX"
BACKEND_ENV = "KVGEN_BACKEND"
# Programmatic dependent launch (on unless KVGEN_PDL=0): a cubin built to wait
# on griddepcontrol is launched so that its grid is scheduled while the
# previous kernel in the stream drains, and lets the next kernel do the same.
PDL_ENV = "KVGEN_PDL"
# Evict-first output stores (on unless KVGEN_EVICT_FIRST=0): rows built with
# evict_first store their output rows with the streaming cache policy, the
# lines L2 evicts first (BENCHMARKS.md, log 52). With it off, the plain twin of
# the row a rule prefers is taken: for a stack whose next kernel reads the
# gathered rows from L2, which the benchmark does not measure.
EVICT_FIRST_ENV = "KVGEN_EVICT_FIRST"

# Without a tuned dispatch table, prefer the rows closest to the seed design.
# The PDL field follows KVGEN_PDL (preference_with_pdl).
# Fields a family does not have match no row of it, so one table serves every family.
DEFAULT_PREFERENCE = {"num_stages": 4, "num_warps": 4, "schedule": "strided", "tokens_per_warp": 2, "pdl": True}
# Each family's parameters added after its kernels shipped, at the default that
# leaves them out of names (kvgen.config.unnamed_defaults), by family name; a
# family's op module enters its own (the runtime imports no family). A rule that
# does not name one (written before it existed) and a manifest row that lacks
# one (built before it existed) mean its default, so such a rule keeps choosing
# the row it chose, whatever the names sort to.
UNNAMED_DEFAULTS: dict[str, dict[str, Any]] = {}

# Launch shape: the whole grid is held near this many CTAs (a request's CTAs
# grid-stride over its tokens). Measured on the H100 (BENCHMARKS.md, sweep of
# 2048..65536): 8192 starved one long request among short ones
# ([131072,100,2000,7]: 0.80 of roofline); 32768 gave 0.86 there and no loss elsewhere.
TARGET_CTAS = 32768
MAX_GRID_Y = 65535

DISPATCH_TABLE = "dispatch.json"  # in generated/: the tuned rules, written by `kvgen tune`


@dataclass(frozen=True)
class ShapeClass:
    """Calls told apart by host-known sizes, for tuned dispatch rules. A call's
    bound is num_reqs * max_rows (max_rows = out.shape[1] - offset bounds every
    gather length; a sparse call is one request of num_slots rows)."""

    name: str
    max_bound: int | None = None  # at most this many tokens may be gathered
    min_reqs: int | None = None  # at least this many requests

    def matches(self, num_reqs: int, max_rows: int) -> bool:
        return ((self.max_bound is None or num_reqs * max_rows <= self.max_bound)
                and (self.min_reqs is None or num_reqs >= self.min_reqs))


# Rows of data; a call's class is the first row it matches.
SHAPE_CLASSES = (
    ShapeClass("short", max_bound=16384),  # a few microseconds: launch and ramp dominate
    ShapeClass("many_requests", min_reqs=64),  # many short gathers side by side
    ShapeClass("long"),  # long gathers of a few requests: bandwidth-bound
)


@functools.lru_cache(maxsize=4096)  # called per eager call: a dict hit, not a scan
def shape_class(num_reqs: int, max_rows: int) -> str:
    return next(c.name for c in SHAPE_CLASSES if c.matches(num_reqs, max_rows))


@dataclass(frozen=True)
class CallKey:
    """What a kernel must match: the call's host-known properties."""

    family: str  # the kernel family's prefix (dqgk, qik, ...)
    format: str  # the record format's name
    block_size: int
    fields: tuple[tuple[str, Any], ...]  # the family's own config fields a row must have, e.g. indexing
    capability: tuple[int, int] | None  # None: not a CUDA device
    shape_class: str = SHAPE_CLASSES[-1].name  # chooses among matching rows; never filters them

    def get(self, name: str) -> Any:
        """A field by name, the family's own included (None where the call has no such field)."""
        if name in {"family", "format", "block_size", "capability", "shape_class"}:
            return getattr(self, name)
        return dict(self.fields).get(name)


def candidate_rows(entries: Sequence[KernelEntry], key: CallKey) -> list[KernelEntry]:
    """Rows that can serve the call: same family, format, block size and
    family fields, and an arch that runs on this compute capability (a cubin
    arch: exactly it; a PTX arch: it or any newer)."""
    return [
        e for e in entries
        if e.family == key.family
        and e.config["format"] == key.format
        and e.config["block_size"] == key.block_size
        and all(e.config.get(name) == value for name, value in key.fields)
        and e.arch in ARCHS and ARCHS[e.arch].serves(key.capability)
    ]


@dataclass(frozen=True)
class TunedTable:
    """The rules of a tree's dispatch.json (written by `kvgen tune`), for each
    device they were measured on: {device name: ({"match": {CallKey field:
    value}, "prefer": {config field: value}}, ...)}. A rule steers calls on a
    device of that exact name only (torch.cuda.get_device_name): two GPUs of
    one compute capability (an H100 and an H200, say) can rank variants
    differently, so a rule measured on one must not silently steer the other."""

    devices: dict[str, tuple[dict, ...]] = field(default_factory=dict)

    def rules_for(self, device_name: str | None) -> tuple[dict, ...]:
        return self.devices.get(device_name, ())  # None (not a CUDA device) names no entry


def tuned_entries(table: dict) -> list[dict]:
    """A dispatch table's per-device entries ({"tuned_on": {"device": ...}, "rules", ...}):
    format 2 lists them under "devices"; format 1, the first, was one device's entry itself."""
    if table["format"] == 1:
        entries = [{k: v for k, v in table.items() if k != "format"}]
    elif table["format"] == 2:
        entries = list(table["devices"])
    else:
        later = isinstance(table["format"], int) and table["format"] > 2
        raise ValueError(f"format {table['format']!r}: " + ("written by a later kvgen" if later else "not a format")
                         + " (this kvgen reads 1 and 2)")
    names = [e["tuned_on"]["device"] for e in entries]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"each entry must name its device, once: {names}")
    return entries


def table_entries(path: Path) -> list[dict]:
    """The per-device entries of the dispatch table at `path` (none where there is no
    file); ValueError, KeyError or TypeError where it is not one this kvgen reads."""
    return tuned_entries(json.loads(path.read_text())) if path.exists() else []


def read_tuned_table(root: Path) -> TunedTable:
    """The table of the tree at `root`; an empty one where it has none."""
    path = root / DISPATCH_TABLE
    try:
        entries = table_entries(path)
        return TunedTable({e["tuned_on"]["device"]: tuple(e.get("rules", [])) for e in entries})
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: not a dispatch table this kvgen reads ({type(err).__name__}: {err}); "
                         "delete it and rerun `python -m kvgen tune`, or use the kvgen that wrote it") from None


def preference_for(key: CallKey, rules: Sequence[dict] = ()) -> dict | None:
    """The first of `rules` matching the call, else None (DEFAULT_PREFERENCE)."""
    for rule in rules:
        if all(key.get(k) == v for k, v in rule.get("match", {}).items()):
            return rule.get("prefer")
    return None


def preference_with_pdl(key: CallKey, rules: Sequence[dict] = ()) -> dict:
    """The call's preference, with pdl as KVGEN_PDL asks: with it off, a row
    built without the griddepcontrol instructions is taken where one is shipped;
    and with KVGEN_EVICT_FIRST=0, a row that stores with the default policy."""
    preference = {**(preference_for(key, rules) or DEFAULT_PREFERENCE), "pdl": pdl_requested()}
    if not evict_first_allowed():
        preference["evict_first"] = False
    return preference


def choose_row(rows: list[KernelEntry], preference: dict | None = None) -> KernelEntry | None:
    """The row matching the most preferred fields; ties broken by name (stable).
    The pdl field outranks the others: with KVGEN_PDL=0 a row built without
    griddepcontrol is taken wherever one is shipped, whatever a tuned rule prefers."""
    if not rows:
        return None
    defaults = UNNAMED_DEFAULTS.get(rows[0].family, {})  # the rows of one call are one family's
    preference = {**defaults, **(preference if preference is not None else DEFAULT_PREFERENCE)}

    def score(e: KernelEntry):
        def has(field, value):
            return e.config.get(field, defaults.get(field)) == value

        pdl_match = "pdl" in preference and has("pdl", preference["pdl"])
        return (-pdl_match, -sum(has(k, v) for k, v in preference.items()), e.name)

    return min(rows, key=score)


# A warp's share of a gather is at least this many record bytes (a V4.1
# record's): small records give each warp several tokens, so the ring's fill and
# drain are paid once per several records, not per record. Measured on the H100
# (BENCHMARKS.md, log 16): 132-byte records (4 tokens a warp) 27.8 -> 18.0 us at
# 65536 tokens; 288-byte records are best at one token a warp (two: +1%), as are
# the 528-, 584- and 656-byte ones, which keep their grid.
MIN_WARP_BYTES = 528


def held_grid(num_reqs: int, workers_needed: int, target_ctas: int = TARGET_CTAS) -> tuple[int, int, int]:
    """grid = (requests, workers): `workers_needed` CTAs a request, the whole
    grid held near target_ctas (a request's CTAs grid-stride over the rest)."""
    workers = min(workers_needed, -(-target_ctas // num_reqs), MAX_GRID_Y)
    return (num_reqs, max(1, workers), 1)


def launch_grid(entry: KernelEntry, num_reqs: int, max_rows: int, target_ctas: int = TARGET_CTAS,
                tokens_per_step: int = 1, rows_per_warp: int | None = None,
                min_steps: int = 1) -> tuple[int, int, int]:
    """grid = (requests, workers) for the ring schedules: enough warps for the
    longest possible gather (max_rows bounds every gather length), each lane
    group of a warp (a warp moves `tokens_per_step` records a step) with at
    least MIN_WARP_BYTES of records and `min_steps` steps -- or, where the
    row's schedule fixes it, `rows_per_warp` rows a warp --, held near
    target_ctas. A sparse or packed call is one request of max_rows = number
    of slots (rows)."""
    if rows_per_warp is None:
        rows_per_warp = tokens_per_step * max(min_steps, MIN_WARP_BYTES // entry.format.record_bytes)
    return held_grid(num_reqs, -(-max_rows // (entry.config["num_warps"] * rows_per_warp)), target_ctas)


def run_grid(num_reqs: int, max_rows: int, run_tokens: int, windowed: bool,
             target_ctas: int = TARGET_CTAS) -> tuple[int, int, int]:
    """grid = (requests, workers) for the page_run schedule: a CTA per run of
    `run_tokens` positions (runs aligned to run_tokens, so a window that starts
    inside one touches one run more), held near target_ctas."""
    return held_grid(num_reqs, -(-max_rows // run_tokens) + (1 if windowed else 0), target_ctas)


def forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def ptx_allowed() -> bool:
    return env_flag(PTX_ENV, default=True)


def split_by_image(rows: list[KernelEntry]) -> tuple[list[KernelEntry], list[KernelEntry]]:
    """(cubin rows, PTX rows ordered newest target first: the PTX closest to the GPU)."""
    cubins = [e for e in rows if not ARCHS[e.arch].ptx]
    ptx = sorted((e for e in rows if ARCHS[e.arch].ptx), key=lambda e: ARCHS[e.arch].compute_capability,
                 reverse=True)
    return cubins, ptx


def pdl_requested() -> bool:
    return env_flag(PDL_ENV, default=True)


def evict_first_allowed() -> bool:
    return env_flag(EVICT_FIRST_ENV, default=True)
