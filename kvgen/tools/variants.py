"""How bench and tune name and rank the variants they time."""

from __future__ import annotations

import math


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values))


def variant_of(config: dict) -> str:
    """A row's tuned fields as a short name: s4w8c (a reader), s4w4b16 (a reader
    under the ballot schedule, with its chunk), s1w8p32 (under page_run, with its
    run), t2w4 (a writer)."""
    if "tokens_per_warp" in config:
        return f"t{config['tokens_per_warp']}w{config['num_warps']}"
    size = {"ballot": config.get("ballot_chunk"), "page_run": config.get("run_tokens")}.get(config["schedule"], "")
    return f"s{config['num_stages']}w{config['num_warps']}{config['schedule'][0]}{size}"
