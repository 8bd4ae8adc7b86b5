"""How bench and tune name and rank the variants they time."""

from __future__ import annotations

import math


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values))


# A schedule's letter in a variant's name, and the field that sizes it there.
SCHEDULE_LETTERS = {"strided": ("s", None), "contiguous": ("c", None), "ballot": ("b", "ballot_chunk"),
                    "compact": ("k", "ballot_chunk"), "page_run": ("p", "run_tokens"), "direct": ("d", None)}


def variant_of(config: dict) -> str:
    """A row's tuned fields as a short name: s4w8c (a reader), s4w4b16 (a reader
    under the ballot schedule, with its chunk; k16 under compact), s1w8p32 (under
    page_run, with its run), s4w8d (under direct), s4w4se (evict-first stores), t2w4 (a
    writer)."""
    if "tokens_per_warp" in config:
        return f"t{config['tokens_per_warp']}w{config['num_warps']}"
    letter, sized_by = SCHEDULE_LETTERS[config["schedule"]]
    evict_first = "e" if config.get("evict_first") else ""
    return f"s{config['num_stages']}w{config['num_warps']}{letter}{config[sized_by] if sized_by else ''}{evict_first}"
