"""Stage 3: PTX -> cubin through cuda.core's Linker (nvJitLink). No GPU needed."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LinkedCubin:
    cubin: bytes
    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    info_log: str


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def link_ptx(ptx: str, arch: str) -> LinkedCubin:
    from cuda.core import Linker, LinkerOptions, ObjectCode

    linker = Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=arch, verbose=True))
    try:
        cubin = bytes(linker.link("cubin").code)
        log = linker.get_info_log()
    finally:
        linker.close()
    regs = _REGS.search(log)
    spill = _SPILL.search(log)
    if not regs or not spill:
        raise RuntimeError(f"could not read resource usage from the nvJitLink log:\n{log}")
    stack, stores, loads = (int(g) for g in spill.groups())
    return LinkedCubin(cubin=cubin, registers=int(regs.group(1)), spill_bytes=stores + loads,
                       stack_bytes=stack, info_log=log)


def toolchain_versions() -> dict[str, str]:
    from importlib.metadata import version

    versions = {}
    for dist in ("nvidia-cutlass-dsl", "cuda-core", "nvidia-nvjitlink", "jinja2"):
        versions[dist] = version(dist)
    from cuda.bindings import nvjitlink

    major, minor = nvjitlink.version()
    versions["nvjitlink-library"] = f"{major}.{minor}"
    # kvgen's own compile and link steps are part of the toolchain: a change to
    # either changes every build key, so `build` rebuilds every kernel and the
    # committed rows' keys stop matching until it has.
    steps = b"".join((Path(__file__).with_name(step)).read_bytes() for step in ("compile.py", "link.py"))
    versions["kvgen-compile-link"] = hashlib.sha256(steps).hexdigest()[:16]
    return versions
