"""Which backend serves a call -- a shipped or user cubin, Triton, or torch --
and serving it, with the fallback when a cubin cannot be loaded.

Decided from host-known quantities only (the call's key, the device's compute
capability and name, alignment, the KVGEN_* switches): no synchronisation.
Each decision is cached in the registry, so it is made once per call key (the
switches as the call read them included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from . import switches
from .dispatch import (BACKEND_ENV, PTX_ENV, CallKey, candidate_rows, choose_row, evict_first_allowed, forced_backend,
                       pdl_requested, preference_with_pdl, ptx_allowed, shape_class, split_by_image)
from .driver import driver
from .loader import KvgenLoadError, registry
from .manifest import KernelEntry


class BackendUnavailable(RuntimeError):
    """KVGEN_BACKEND forced a backend that cannot serve this call."""


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def device_info(device: torch.device) -> tuple[str, Optional[tuple[int, int]], Optional[str]]:
    """(device type, compute capability, device name; None for both off CUDA):
    all that dispatch asks of the device."""
    if device.type != "cuda":
        return device.type, None, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "cuda", _capability(index), _device_name(index)


@functools.lru_cache(maxsize=None)
def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def triton_usable(device_type: str) -> bool:
    if not _available("triton"):
        return False
    return device_type == "cuda" or os.environ.get(switches.TRITON_INTERPRET_ENV) == "1"


@dataclass(frozen=True)
class Decision:
    backend: str
    entry: Optional[KernelEntry] = None
    reason: str = ""  # why a faster backend was not taken
    pdl: bool = False  # launch the cubin with programmatic dependent launch
    fallback: Optional["Decision"] = None  # a cubin's: the PTX route, tried before Triton if the cubin fails to load
    device_name: Optional[str] = None


def _image_entry(key: CallKey, device_type: str, device_name: Optional[str],
                 ptx: bool) -> tuple[Optional[KernelEntry], str]:
    """The row that serves the call: a cubin of the device's arch or, with
    `ptx`, the PTX row of the newest target the device runs."""
    if device_type != "cuda":
        return None, f"tensors are on {device_type}, not a CUDA device"
    if driver() is None:
        return None, "the CUDA driver library (libcuda) could not be opened, or lacks cuLibraryLoadData"
    reg = registry()
    cubins, ptx_rows = split_by_image(candidate_rows(reg.entries, key))
    if ptx:
        rows = [e for e in ptx_rows if e.arch == ptx_rows[0].arch] if ptx_rows else []
    else:
        rows = cubins
    entry = choose_row(rows, preference_with_pdl(key, reg.tuned_rules(device_name)))
    if entry is None:
        fields = " ".join(f"{name}={value}" for name, value in key.fields)
        what = "PTX" if ptx else "cubin" + (" (only PTX: KVGEN_BACKEND=ptx, or unset it)" if ptx_rows else "")
        return None, (f"no {what} for {key.family} format={key.format} block_size={key.block_size} {fields} "
                      f"on compute capability {key.capability}")
    return entry, ""


def _decide(key: CallKey, device: torch.device, aligned: bool, forced: Optional[str]) -> Decision:
    device_type, capability, device_name = device_info(device)
    key = dataclasses.replace(key, capability=capability)
    pdl = pdl_requested()  # read (and checked) whichever backend serves
    ptx_on = ptx_allowed()  # likewise
    evict_first_allowed()  # likewise (a row's preference reads it)
    if forced == "ptx" and not ptx_on:
        raise BackendUnavailable(f"{BACKEND_ENV}=ptx contradicts {PTX_ENV}=0")
    images, why_not = {}, "not asked for"
    for backend, wanted in (("cubin", forced in (None, "cubin")),
                            ("ptx", forced == "ptx" or (forced is None and ptx_on))):
        if not wanted:
            continue
        entry, reason = _image_entry(key, device_type, device_name, ptx=backend == "ptx")
        if entry is not None and not aligned:
            entry, reason = None, "a pointer or row stride is not 16-byte aligned"
        if entry is not None:
            images[backend] = Decision(backend, entry, pdl=entry.pdl and pdl, device_name=device_name)
        elif backend == "cubin" or forced == "ptx":
            why_not = reason
    if forced in ("cubin", "ptx"):
        if forced not in images:
            raise BackendUnavailable(f"{BACKEND_ENV}={forced}, but {why_not}")
        return images[forced]
    if forced == "triton":
        if not triton_usable(device_type):
            raise BackendUnavailable(f"{BACKEND_ENV}=triton, but Triton cannot run on {device_type} here "
                                     "(not installed, or CPU tensors without TRITON_INTERPRET=1)")
        return Decision("triton")
    if forced == "torch":
        return Decision("torch")
    if "cubin" in images:
        return dataclasses.replace(images["cubin"], fallback=images.get("ptx"))
    if images:
        return images["ptx"]
    if device_type == "cuda" and triton_usable(device_type):
        return Decision("triton", reason=why_not)
    return Decision("torch", reason=why_not)


def decide(family: str, format_name: str, block_size: int, fields: tuple, num_reqs: int, max_rows: int,
           device: torch.device, aligned: bool, snapshot: Optional[tuple] = None) -> Decision:
    """The decision for a call of `family` (`fields`: the family's own config
    fields the row must have), made once per key (cached in the registry: a new
    registry, or a tree added, starts afresh). `snapshot`: the call's switches
    (kvgen.runtime.switches), read now if not given."""
    if snapshot is None:
        snapshot = switches.read()
    cache_key = (family, format_name, block_size, fields, shape_class(num_reqs, max_rows), device, aligned,
                 snapshot)
    decisions = registry().decisions
    decision = decisions.get(cache_key)
    if decision is None:
        key = CallKey(family, format_name, block_size, fields, None, cache_key[4])
        decision = decisions[cache_key] = _decide(key, device, aligned, forced_backend())
    return decision


_state = threading.local()


def last_backend() -> Optional[str]:
    """The backend that served this thread's last call (None before any call)."""
    return getattr(_state, "last_backend", None)


def record_no_launch() -> None:
    _state.last_backend = None


def record_backend(backend: str) -> None:
    """`backend` served this thread's call (kvgen.runtime.plans: a call that skipped `serve`)."""
    _state.last_backend = backend


class Paths(NamedTuple):
    """How an op runs each backend: `cubin(entry, pdl, checked, *args)` launches a
    manifest row (the PTX route's too), `triton(*args)` and `torch(*args)` run
    the fallbacks. Module-level functions, so that serving a call makes no closure."""

    cubin: Callable[..., None]
    triton: Callable[..., None]
    torch: Callable[..., None]


def fallback(package: str, module: str, function: str) -> Callable[..., None]:
    """A fallback path: `package.module.function(*args)`, the module imported at
    its first call (Triton and the torch reference are not imported while the
    cubins serve)."""
    def run(*args) -> None:
        getattr(importlib.import_module(f"{package}.{module}"), function)(*args)

    run.__qualname__ = f"{module}.{function}"
    return run


def serve(decision: Decision, device: torch.device, paths: Paths, checked, args: tuple) -> None:
    """Run the decided backend on the call's `args` (`checked`: what validation
    read, for the launch; `device`: the tensors'). A cubin that fails to load
    falls back to the PTX route, then to Triton or torch, with a warning (an
    error when KVGEN_BACKEND forced it). The first call through each PTX row
    warns that the driver JIT-compiles it."""
    backend = decision.backend
    if backend == "cubin":  # the usual case, without a frame of its own
        try:
            paths.cubin(decision.entry, decision.pdl, checked, *args)
        except KvgenLoadError as err:
            backend = _fall_back(err, decision, device, paths, checked, args)
    elif backend == "ptx":
        backend = _serve_image(decision, device, paths, checked, args)
    if backend == "triton":
        # Triton launches on the current device: make it the tensors' (a call on a GPU that is not current;
        # CPU tensors run under TRITON_INTERPRET=1).
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            paths.triton(*args)
    elif backend == "torch":
        paths.torch(*args)
    _state.last_backend = backend


def _serve_image(decision: Decision, device: torch.device, paths: Paths, checked, args: tuple) -> str:
    """Launch the decided row (its PTX route, or a cubin's fallback to it);
    the backend that served, or the fallback that must ("triton" or "torch")
    if none loads."""
    if decision.backend == "ptx":
        _warn_jit_once(decision)
    try:
        paths.cubin(decision.entry, decision.pdl, checked, *args)
        return decision.backend
    except KvgenLoadError as err:
        return _fall_back(err, decision, device, paths, checked, args)


def _fall_back(err: KvgenLoadError, decision: Decision, device: torch.device, paths: Paths, checked,
               args: tuple) -> str:
    """`decision`'s row failed to load (`err`): an error if KVGEN_BACKEND forced
    it, else a warning (once per row) and the next route. The warnings point at
    the line that called the op directly (serve's caller's caller)."""
    if forced_backend() == decision.backend:
        raise err
    warned = registry().warned
    if f"{decision.entry.name}:load" not in warned:
        warned.add(f"{decision.entry.name}:load")
        warnings.warn(f"kvgen: falling back from {decision.backend}: {err}", RuntimeWarning, stacklevel=5)
    if decision.fallback is None:
        return "triton" if triton_usable(device.type) else "torch"
    return _serve_image(decision.fallback, device, paths, checked, args)


def _warn_jit_once(decision: Decision) -> None:
    warned = registry().warned
    if decision.entry.name not in warned:
        warned.add(decision.entry.name)
        warnings.warn(f"kvgen: the driver JIT-compiles {decision.entry.name}'s PTX for "
                      f"{decision.device_name or 'this GPU'} (no cubin of its arch served the call), once per "
                      f"process and device; {PTX_ENV}=0 turns this route off", RuntimeWarning, stacklevel=6)


def clear_dispatch_cache() -> None:
    """Forget every decision and launch plan, and which fallbacks were warned
    about (tests that change what a decision depends on behind the registry's back)."""
    reg = registry()
    reg.decisions.clear()
    reg.plans.clear()
    reg.warned.clear()
