"""torch.ops.kvgen.*: each op registered with the dispatcher, cheaply.

`torch.library.custom_op` costs 12-30 us a call through torch.ops (its
autograd and ADInplaceOrView kernels run in Python, and fill in every
default); a kernel registered with `torch.library.Library` for
CompositeExplicitAutograd costs ~1.5 us. What custom_op gave is kept: the
schema is inferred from the annotated function by the same
`torch.library.infer_schema` (so it is written once, and comes out
identical), tagged pt2_compliant; the fake implementation (these ops return
nothing) serves FakeTensor, torch.compile and opcheck; and each mutated
tensor's version counter is bumped, as custom_op's ADInplaceOrView kernel did,
so autograd still sees the mutation.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch.autograd.graph import increment_version

NAMESPACE = "kvgen"
_library = torch.library.Library(NAMESPACE, "FRAGMENT")  # alive as long as the module: its ops with it


def register_op(name: str, mutates_args: tuple[str, ...]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: register the annotated function (returning None) as
    torch.ops.kvgen.<name>, mutating the arguments named in `mutates_args`
    (each a Tensor); the function is returned unchanged."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        _library.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
        parameters = list(inspect.signature(fn).parameters)
        mutated = [parameters.index(arg) for arg in mutates_args]

        # The dispatcher passes every argument positionally (these schemas have
        # no kwarg-only arguments), defaults filled in. The versions are bumped
        # first, as custom_op's ADInplaceOrView kernel did.
        if len(mutated) == 1:
            (index,) = mutated

            def kernel(*args):
                increment_version(args[index])
                fn(*args)
        else:
            def kernel(*args):
                increment_version([args[i] for i in mutated])
                fn(*args)

        _library.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", _returns_nothing, lib=_library)
        return fn

    return register


def _returns_nothing(*args, **kwargs) -> None:
    """The fake implementation of every kvgen op: each writes into its arguments, and returns nothing."""
    return None
