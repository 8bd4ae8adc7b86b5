"""What both golden corpora share: the disagreement error, and the command line
that checks (or, with --update, rewrites) a corpus's committed digests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


class Disagreement(AssertionError):
    """The reference and the oracle differ on a golden case: neither is accepted."""


def main(argv, doc: str, compute: Callable[[], dict], num_cases: int, digests: Path,
         write_more: Callable[[], None] | None = None) -> int:
    """Compare `compute()`'s digests with the committed ones at `digests`; with
    --update, rewrite them (and whatever `write_more` writes). Exit status 1
    where the reference and the oracle disagree, or (without --update) where
    any digest changed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="rewrite the digests")
    args = parser.parse_args(argv)
    try:
        new = compute()
    except Disagreement as err:
        print(f"{err}\n{len(str(err).splitlines())} of {num_cases} cases: the reference and the oracle disagree; "
              "nothing compared or written")
        return 1
    old = json.loads(digests.read_text())["cases"] if digests.exists() else {}
    changed = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))
    for name in changed:
        print(f"{'changed' if name in old and name in new else 'added' if name in new else 'removed'}: {name}"
              f"  {old.get(name, {}).get('sha256', '-')[:12]} -> {new.get(name, {}).get('sha256', '-')[:12]}")
    if args.update:
        digests.write_text(json.dumps({"cases": new}, indent=1, sort_keys=True) + "\n")
        if write_more is not None:
            write_more()
        print(f"{len(new)} cases, reference and oracle agree on all, {len(changed)} changed; wrote {digests.name}")
        return 0
    print(f"{len(new)} cases, reference and oracle agree on all; {len(changed)} differ from the committed digests")
    return 1 if changed else 0
