"""`python -m kvgen tune` (GPU): which shipped variant should serve each shape class.

Every shipped row that could serve a benchmark shape (bench.FAMILIES, and
bench_formats.TUNE_FAMILIES for the formats' gathers) is
checked bit-exact and timed beside the others (bench's interleaved CUDA-graph
replays). Shapes are grouped by what a dispatch rule can match -- format,
indexing, output and shape class (dispatch.SHAPE_CLASSES) -- and a variant becomes a
rule only where it beats the untuned default on the geometric mean of its
group's shapes by more than `margin` (run-to-run noise is about 2%), or is
faster on every one of them and by more than `margin` on one (BENCHMARKS.md,
log 48: a row 3.3% faster on one shape, 0.6% on the other, in every run; a
shape's lead inside the noise may be noise, so such a rule can trade a
fraction of a percent there for the clear gain). A rule
this device's entry already holds stays while its variant is still the
group's best and beats the default at all: a rule is added past the margin
and dropped only when it stops winning, so a retune does not drop a rule
that still gains (BENCHMARKS.md, log 45). The table
(generated/dispatch.json) keeps every group's measurements, ruled or not;
the runtime reads its rules with no device synchronisation. The table holds an
entry per device name, each with its own rules: tuning on one GPU keeps the
other devices' entries, and tuning some families keeps this device's
measurements of the others, so their rules survive.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from datetime import date
from pathlib import Path

from ..errors import UsageError
from ..paths import generated_dir
from ..runtime.dispatch import (DEFAULT_PREFERENCE, DISPATCH_TABLE, candidate_rows, choose_row, split_by_image,
                                table_entries)
from .variants import geomean, variant_of

FORMAT = 2  # the table's layout: format 2 holds an entry per device (format 1, one device's, is still read)
MARGIN = 0.02
# The fields a rule may prefer. PDL is not among them: KVGEN_PDL decides it.
# Each family's rows have some of them.
TUNED_FIELDS = ("num_stages", "num_warps", "schedule", "ballot_chunk", "run_tokens", "evict_first", "tokens_per_warp")
# CallKey fields a rule matches (output: the raw packed gather's rules must not steer the bf16 one's calls).
MATCH_FIELDS = ("family", "format", "indexing", "output", "slot_dtype", "shape_class")


def family_shapes(family: str) -> tuple:
    from . import bench, bench_formats

    return bench.FAMILIES.get(family) or bench_formats.TUNE_FAMILIES[family]


def measure_shape(shape, copy_bw: float, l2_bytes: int) -> dict | None:
    """Time every row that could serve `shape` (built with the default's PDL
    choice); returns {"shape", "match", "default", "us": {variant: us}, "prefer": {variant: fields}},
    or None where no cubin row serves it on this device (nothing to choose among)."""
    from . import bench

    if isinstance(shape, bench.WriterShape):
        return _measure_writer_shape(shape, copy_bw, l2_bytes)
    if not isinstance(shape, (bench.Shape, bench.SparseShape)):
        return _measure_packed_shape(shape, l2_bytes)
    w = bench.workload(shape, l2_bytes)
    found = _candidates(w.key)
    if found is None:
        return None
    default, variants = found
    timed = bench._time_variants(shape.label, w.cases, w.expected,
                                 bench.entry_variants(variants.values(), lambda e: variant_of(e.config)),
                                 w.working_set, w.working_set / copy_bw, w.reference)
    return _measurement(shape.label, w.key, default, variants, {name: timed[name]["us"] for name in variants})


def _measure_writer_shape(shape, copy_bw: float, l2_bytes: int) -> dict | None:
    from . import bench
    from ..runtime.loader import registry

    key = bench.writer_key(shape)
    rows = {variant_of(e.config): e for e in split_by_image(candidate_rows(registry().entries, key))[0]}
    if not rows:
        return None
    result = bench.bench_writer_shape(shape, copy_bw, l2_bytes, sweep=True)
    return _measurement(shape.label, key, choose_row(list(rows.values()), DEFAULT_PREFERENCE), rows,
                        {name: result["backends"][name]["us"] for name in rows})


def _measure_packed_shape(shape, l2_bytes: int) -> dict | None:
    """A packed gather's shape, raw or bf16 (a bench_formats.Bench): its rows, timed directly."""
    import torch

    from . import bench_formats
    from ..families.dequant_gather.op import FAMILY, PACKED_FIELDS
    from ..runtime.dispatch import CallKey, shape_class

    key = CallKey(FAMILY, shape.format, bench_formats.BLOCK_SIZE, PACKED_FIELDS["raw" if shape.op == "raw" else "bf16"],
                  torch.cuda.get_device_capability(), shape_class(1, shape.tokens))
    found = _candidates(key)
    if found is None:
        return None
    default, variants = found
    return _measurement(shape.label, key, default, variants,
                        bench_formats.time_packed_rows(shape, variants, l2_bytes))


def _candidates(key) -> tuple | None:
    """(the untuned default row, {variant: row} of the cubin rows built with its
    PDL choice) for a call key: what a rule chooses among; None where no cubin
    row serves the key on this device."""
    from ..runtime.loader import registry

    rows = split_by_image(candidate_rows(registry().entries, key))[0]
    if not rows:
        return None
    default = choose_row(rows, DEFAULT_PREFERENCE)
    return default, {variant_of(e.config): e for e in rows if e.pdl == default.pdl}


def _measurement(label: str, key, default, variants: dict, us: dict) -> dict:
    """One shape's record in the table: what a rule would match, the default, each variant's time and fields."""
    return {
        "shape": label,
        "match": {f: key.get(f) for f in MATCH_FIELDS},
        "default": variant_of(default.config),
        "us": {name: round(us[name], 3) for name in variants},
        "prefer": {name: {f: e.config[f] for f in TUNED_FIELDS if f in e.config} for name, e in variants.items()},
    }


def choose_rules(measured: list[dict], margin: float = MARGIN,
                 held: dict[tuple, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Group shapes by their match fields; in each group, the variant timed on
    every shape with the lowest geometric-mean time relative to the default
    becomes a rule if it is faster by more than `margin`, or faster on every
    shape and by more than `margin` on one, or faster at all where `held`
    ({group's match values: variant}, the device's rules so far) names it for
    the group. Returns (rules, groups)."""
    groups: dict[tuple, list[dict]] = {}
    for m in measured:
        groups.setdefault(match_values(m["match"]), []).append(m)
    rules, summary = [], []
    for values, shapes in groups.items():
        match = {f: v for f, v in zip(MATCH_FIELDS, values) if v is not None}  # a field the call has
        common = set.intersection(*(set(m["us"]) for m in shapes))
        if not all(m["default"] in common for m in shapes):
            raise ValueError(f"{match}: the default variant was not timed on every shape")
        relative = {v: geomean(m["us"][v] / m["us"][m["default"]] for m in shapes) for v in sorted(common)}
        best = min(relative, key=lambda v: (relative[v], v))
        still_held = (held or {}).get(values) == best and relative[best] < 1
        each = [m["us"][best] / m["us"][m["default"]] for m in shapes]
        faster_on_all = max(each) < 1 and min(each) < 1 - margin
        chosen = best if relative[best] < 1 - margin or faster_on_all or still_held else None
        summary.append({"match": match, "shapes": [m["shape"] for m in shapes],
                        "default": sorted({m["default"] for m in shapes}),
                        "relative_time": {v: round(r, 4) for v, r in relative.items()}, "rule": chosen})
        if chosen is not None:
            rules.append({"match": match, "prefer": shapes[0]["prefer"][chosen]})
    return rules, summary


def old_entries(path: Path) -> list[dict]:
    """The per-device entries of the table at `path` (either table format); none
    where there is no table. A table that cannot be read, or is of a later
    format than this kvgen writes, is an error, not replaced: its devices'
    entries would be lost."""
    try:
        return table_entries(path)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: not a dispatch table this kvgen can add to ({type(err).__name__}: {err}); "
                         "tune with --out elsewhere, or delete it") from None


def kept_measurements(entries: list[dict], device: str, remeasured: list[dict]) -> list[dict]:
    """The measurements of `device`'s entry among a table's `entries` for groups
    this run did not measure (a group: family, format, indexing, output, slot
    dtype -- every shape class of it): tuning one family keeps the others' rules."""
    done = {_group(m) for m in remeasured}
    mine = [e for e in entries if e["tuned_on"]["device"] == device]
    return [m for e in mine for m in e.get("measured", []) if _group(m) not in done]


def merged_table(entries: list[dict], entry: dict) -> dict:
    """The table to write: `entry` (one device's) in place of that device's old
    one, every other device's entry kept as it was, in the order of their names."""
    device = entry["tuned_on"]["device"]
    kept = [e for e in entries if e["tuned_on"]["device"] != device]
    return {"format": FORMAT, "devices": sorted(kept + [entry], key=lambda e: e["tuned_on"]["device"])}


def held_rules(entries: list[dict], device: str) -> dict[tuple, str]:
    """The variant each group of `device`'s entry among `entries` ruled for: {group's match values: variant}."""
    return {match_values(g["match"]): g["rule"]
            for e in entries if e["tuned_on"]["device"] == device for g in e.get("groups", []) if g.get("rule")}


def match_values(match: dict) -> tuple:
    """A group's key: its match's value of each of MATCH_FIELDS (None where the call has no such field), the
    same for a measurement's match and a group's, so a held rule finds its group."""
    return tuple(match.get(f) for f in MATCH_FIELDS)


def _group(measurement: dict) -> tuple:
    """What a measurement's shapes are re-measured together by: its match fields but the shape class."""
    return tuple(measurement["match"].get(f) for f in MATCH_FIELDS if f != "shape_class")


def tune(families: Iterable[str], out: Path | None = None, margin: float = MARGIN) -> dict:
    import torch
    import triton

    from . import bench

    out = out or generated_dir() / DISPATCH_TABLE
    entries = old_entries(out)  # read first: a table this kvgen must not replace fails before any timing
    props = torch.cuda.get_device_properties(0)
    bench.copy_bandwidth()  # ramps the clocks up before anything is measured
    copy_bw = bench.copy_bandwidth()
    measured = []
    for family in families:
        for shape in family_shapes(family):
            m = measure_shape(shape, copy_bw, props.L2_cache_size)
            if m is None:
                print(f"{shape.label:<28} no cubin row serves it on this device: skipped", flush=True)
                continue
            measured.append(m)
            times = "  ".join(f"{v} {us / m['us'][m['default']]:.3f}" for v, us in sorted(m["us"].items()))
            print(f"{shape.label:<28} {m['match']['shape_class']:<14} default {m['default']}  {times}", flush=True)
    measured = kept_measurements(entries, props.name, measured) + measured
    rules, groups = choose_rules(measured, margin, held_rules(entries, props.name))
    entry = {
        "tuned_on": {"device": props.name, "date": date.today().isoformat(), "torch": torch.__version__,
                     "triton": triton.__version__, "python": platform.python_version()},
        "margin": margin,
        "rules": rules,
        "groups": groups,
        "measured": measured,
    }
    table = merged_table(entries, entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    for g in groups:
        print(f"{g['match']}: {g['rule'] or 'default kept'} "
              f"(best relative time {min(g['relative_time'].values()):.3f})")
    others = [e["tuned_on"]["device"] for e in table["devices"] if e is not entry]
    print(f"wrote {out}: {len(rules)} rule(s) for {props.name}"
          + (f"; the entries of {', '.join(others)} kept as they were" if others else ""))
    return table
