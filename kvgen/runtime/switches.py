"""The environment switches a call consults, read once a call.

Every op reads all of them in one snapshot (`read`: ~0.2 us, where
os.environ.get costs ~1 us a name; kvgen.env.reader says how), so each call
still sees the environment as it is at that call. A snapshot is a tuple of raw
values, indexed by the constants below; each switch is parsed only where it
is consulted, by a cached parser, so a bad value is refused with the same
message, at the same point of the call, as when each was read on its own.
"""

from __future__ import annotations

from ..env import flag, reader
from .dispatch import BACKEND_ENV, EVICT_FIRST_ENV, PDL_ENV, PTX_ENV

CHECK_ENV = "KVGEN_CHECK"  # kvgen.runtime.index_check
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"  # Triton on CPU tensors

# The snapshot's order. The dispatch cache is keyed by the whole snapshot, so
# a decision is made afresh (and a bad value refused) whenever one changes.
NAMES = (BACKEND_ENV, PDL_ENV, PTX_ENV, TRITON_INTERPRET_ENV, CHECK_ENV, EVICT_FIRST_ENV)
BACKEND, PDL, PTX, TRITON_INTERPRET, CHECK, EVICT_FIRST = range(len(NAMES))

read = reader(NAMES)


def check_requested(snapshot: tuple) -> bool:
    """KVGEN_CHECK, as the snapshot has it."""
    return flag(CHECK_ENV, snapshot[CHECK], False)
