"""Launch plans: a launched call's validation and dispatch, remembered per
call signature, so that a call like an earlier one goes straight to its launch.

What validation and dispatch conclude is a function of a call's signature
alone: its tensors' shape, strides, dtype, device and data pointer modulo 16
(the alignments they check), its scalar arguments (type and value), the
switches snapshot, and the registry's trees and dispatch state. A signature
is a flat tuple of exactly those, so a call whose signature equals an earlier
one's would pass the same checks and get the same decision, grid and
strides: it takes that call's launch, with its own pointers. Hence:

* only calls served by the decided cubin (or PTX) row are remembered, after
  they launched; no failed call is (its error is raised again by the full
  path), nor one served by a fallback, nor one under KVGEN_CHECK (its device
  values are checked at every call), nor one with a tensor of a subclass
  (FakeTensor and the like) or a non-tensor where a tensor goes;
* the plans live in the registry beside its dispatch decisions and are
  forgotten with them (a tree added, clear_dispatch_cache, a new registry);
* a changed tensor (pointer, shape, stride, dtype, device) or switch is a
  changed signature, except the pointer's high bits, which are read at every
  call and are never part of a plan; nor is the stream or the context, read
  at every launch (launch_loaded), so CUDA-graph capture works as before.

A signature costs about what reading the tensors for validation does; what
a plan saves is the checks, the decision's key, the grid and argument
assembly. Shapes change from step to step in serving, but not from layer to
layer within one, so most calls find a plan.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch

from . import backend, switches
from .launch import LoadedKernel, launch_loaded, take_launched
from .loader import KvgenLoadError, registry

MAX_PLANS = 4096  # signatures remembered; past it, the registry starts afresh

_Tensor = torch.Tensor


class Plan(NamedTuple):
    """An earlier call's launch, less its pointers: launch_loaded's arguments,
    the values after the pointers (strides, sizes) fixed."""

    kernel: LoadedKernel
    names: tuple[str, ...]
    offsets: Optional[tuple[int, ...]]  # added to the pointers (a pointer inside a tensor: the writer's tail); None: 0
    fixed: tuple  # the values after the pointers
    grid: tuple[int, int, int]
    device: int
    pdl: bool
    backend: str  # "cubin" or "ptx": what served it


def signature(op: str, scalars: tuple, tensors: tuple) -> tuple[tuple, Optional[tuple], list[int]]:
    """(The call's switches, read now (kvgen.runtime.switches: the op's one
    read of them), its signature, its tensors' data pointers in order, 0 for
    None); the signature is None, and the pointers [], where a tensor argument
    is neither None nor a torch.Tensor proper: such a call is never planned.
    `op` names the op (its own checks), `scalars` its other arguments."""
    snapshot = switches.read()
    key = [op, snapshot, *scalars, *map(type, scalars)]
    pointers = []
    for t in tensors:
        if t is None:
            key.append(None)
            pointers.append(0)
        elif type(t) is _Tensor:
            pointer = t.data_ptr()
            key += (t.shape, t.stride(), t.dtype, t.device, pointer & 15)
            pointers.append(pointer)
        else:
            return snapshot, None, []
    return snapshot, tuple(key), pointers


def launch_planned(key: Optional[tuple], pointers: list[int]) -> bool:
    """Launch the plan of `key` with the call's `pointers`: True if it did
    (the call is served), False if there is none -- the call takes the full
    path, and `remember` may then make one."""
    plan = registry().plans.get(key) if key is not None else None
    if plan is not None:
        values = (*(pointers if plan.offsets is None else map(operator.add, pointers, plan.offsets)), *plan.fixed)
        try:
            launch_loaded(plan.kernel, plan.names, values, plan.grid, plan.device, plan.pdl)
        except KvgenLoadError:  # the driver refused the row only now: the full path falls back as it does
            registry().plans.pop(key, None)
        else:
            backend.record_backend(plan.backend)
            return True
    take_launched()  # so that `remember` sees only this call's launch
    return False


def remember(key: Optional[tuple], pointers: list[int], decision: backend.Decision) -> None:
    """After the full path served the call of signature `key` (None: not to
    be planned) as `decision` says: remember its launch, if it made one with
    the decided row, and the switches (key[1]) did not ask for index checks."""
    launched = take_launched()
    if (key is None or launched is None or backend.last_backend() != decision.backend
            or switches.check_requested(key[1])):
        return
    pointer_values = launched.values[:len(pointers)]
    offsets = tuple(map(operator.sub, pointer_values, pointers))
    plans = registry().plans
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plans[key] = Plan(launched.kernel, launched.names, offsets if any(offsets) else None,
                      launched.values[len(pointers):], launched.grid, launched.device, launched.pdl,
                      decision.backend)
