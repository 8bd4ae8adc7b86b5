"""Which backend, and which cubin, serves a call: a filter over manifest rows.

Everything here is decided from host-known quantities (dtypes, shapes,
strides, the device's compute capability): no device synchronisation.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Sequence

from .config import ARCHS
from .manifest import KernelEntry
from .paths import generated_dir

BACKENDS = ("cubin", "triton", "torch")
BACKEND_ENV = "KVGEN_BACKEND"
# Programmatic dependent launch (on unless KVGEN_PDL=0): a cubin built to wait
# on griddepcontrol is launched so that its grid is scheduled while the
# previous kernel in the stream drains, and lets the next kernel do the same.
PDL_ENV = "KVGEN_PDL"
_FLAGS = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}

# Without a tuned dispatch table, prefer the rows closest to the seed design.
# The PDL field follows KVGEN_PDL (preference_with_pdl).
DEFAULT_PREFERENCE = {"num_stages": 4, "num_warps": 4, "schedule": "strided", "pdl": True}

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

    layout: str
    block_size: int
    indexing: str
    gather_lens: bool
    capability: tuple[int, int] | None  # None: not a CUDA device
    shape_class: str = SHAPE_CLASSES[-1].name  # chooses among matching rows; never filters them


def candidate_rows(entries: Sequence[KernelEntry], key: CallKey) -> list[KernelEntry]:
    """Rows that can serve the call: same layout, block size, indexing and gather
    mode, and an arch whose cubins run on this exact compute capability."""
    return [
        e for e in entries
        if e.config["layout"] == key.layout
        and e.config["block_size"] == key.block_size
        and e.config["indexing"] == key.indexing
        and e.config["gather_lens"] == key.gather_lens
        and e.arch in ARCHS and key.capability == ARCHS[e.arch].compute_capability
    ]


@functools.lru_cache(maxsize=1)
def _tuned_rules() -> tuple[dict, ...]:
    """Rules of generated/dispatch.json (written by `kvgen tune`), if present:
    [{"match": {CallKey field: value}, "prefer": {config field: value}}, ...]."""
    path = generated_dir() / DISPATCH_TABLE
    if not path.exists():
        return ()
    return tuple(json.loads(path.read_text()).get("rules", []))


def preference_for(key: CallKey) -> dict | None:
    """The first tuned rule matching the call, else None (DEFAULT_PREFERENCE)."""
    for rule in _tuned_rules():
        if all(getattr(key, k) == v for k, v in rule.get("match", {}).items()):
            return rule.get("prefer")
    return None


def preference_with_pdl(key: CallKey) -> dict:
    """The call's preference, with pdl as KVGEN_PDL asks: with it off, a row
    built without the griddepcontrol instructions is taken where one is shipped."""
    return {**(preference_for(key) or DEFAULT_PREFERENCE), "pdl": pdl_requested()}


def choose_row(rows: list[KernelEntry], preference: dict | None = None) -> KernelEntry | None:
    """The row matching the most preferred fields; ties broken by name (stable).
    The pdl field outranks the others: with KVGEN_PDL=0 a row built without
    griddepcontrol is taken wherever one is shipped, whatever a tuned rule prefers."""
    if not rows:
        return None
    preference = preference if preference is not None else DEFAULT_PREFERENCE

    def score(e: KernelEntry):
        pdl_match = "pdl" in preference and e.config.get("pdl") == preference["pdl"]
        return (-pdl_match, -sum(e.config.get(k) == v for k, v in preference.items()), e.name)

    return min(rows, key=score)


def launch_grid(entry: KernelEntry, num_reqs: int, max_rows: int,
                target_ctas: int = TARGET_CTAS) -> tuple[int, int, int]:
    """grid = (requests, workers): enough warps for the longest possible gather
    (max_rows bounds every gather length), the whole grid held near target_ctas.
    A sparse call is one request of max_rows = number of slots."""
    warps = entry.config["num_warps"]
    workers = min(-(-max_rows // warps), -(-target_ctas // num_reqs), MAX_GRID_Y)
    return (num_reqs, max(1, workers), 1)


def forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def pdl_requested() -> bool:
    value = os.environ.get(PDL_ENV, "1").strip().lower() or "1"
    if value not in _FLAGS:
        raise ValueError(f"{PDL_ENV}={value!r}: expected 1 or 0")
    return _FLAGS[value]
