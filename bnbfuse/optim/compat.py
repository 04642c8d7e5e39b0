"""bitsandbytes' optimizer conventions that are not part of the step itself: the argument
object (``optimizer.args``), paged state, and the constructor arguments a class refuses
because they contradict it (``Adagrad8bit(..., optim_bits=32)``)."""
from __future__ import annotations

import types
from typing import Any

import torch

from .. import paged

__all__ = ["OptimizerArgs", "optimizer_args", "page_state", "prefetch_state", "require_bits"]


class OptimizerArgs(types.SimpleNamespace):
    """bitsandbytes' argument object (its ``MockArgs``): ``optim_bits``, ``min_8bit_size``,
    ``max_unorm``, ``skip_zeros`` and, in bnbfuse, ``percentile_clipping`` and ``is_paged``,
    as the optimizer was built with them. Changing it after construction changes nothing
    (the group settings are what the step reads)."""


def optimizer_args(args, **effective: Any):
    """``optimizer.args``: the caller's own object when one was given (as bitsandbytes keeps
    it), a dict turned into an :class:`OptimizerArgs`, else the constructor's values."""
    if args is not None and not isinstance(args, dict):
        return args
    values = dict(skip_zeros=False, **effective)
    values.update(args or {})
    return OptimizerArgs(**values)


def require_bits(cls_name: str, optim_bits, allowed: tuple, default) -> None:
    """ValueError when ``optim_bits`` contradicts a class whose precision is in its name, as
    bitsandbytes raises (``default`` is the signature's value, kept for compatibility)."""
    if optim_bits not in allowed:
        also = "".join(f" or {b}" for b in allowed if b != default)
        raise ValueError(f"{cls_name} only supports optim_bits={default} (the default, kept for "
                         f"bitsandbytes compatibility){also}, got {optim_bits!r}")


def page_state(state: dict) -> None:
    """Moves the large state tensors of one parameter into paged memory where it applies
    (CUDA, >= ``paged.PAGED_MIN_NUMEL`` elements); everything else stays as it is."""
    for key in ("state1", "state2"):
        t = state.get(key)
        if isinstance(t, torch.Tensor) and not paged.is_paged(t) and paged.pages(t):
            state[key] = paged.paged_like(t)


def prefetch_state(state: dict) -> None:
    """Prefetches a parameter's paged state to its GPU on the current stream, so the update
    kernel that follows on that stream reads resident pages."""
    for key in ("state1", "state2"):
        t = state.get(key)
        if paged.is_paged(t):
            paged.prefetch_tensor(t)
