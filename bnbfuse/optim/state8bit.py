"""The layout of one parameter's optimizer state, 8-bit or 32-bit.

Keys are bitsandbytes': ``step`` (int), ``state1``, ``state2`` and, for 8-bit state,
``absmax1``, ``absmax2``, ``qmap1``, ``qmap2`` (1-state optimizers: only the ``1`` keys);
``gnorm_vec`` holds the gradient-norm history when ``percentile_clipping < 100``.

8-bit ``state{i}`` holds uint8 codes of the parameter's (local) shape, in blocks of 256
elements of the flattened tensor; ``absmax{i}`` one float32 per block; ``qmap1`` the signed
dynamic map, ``qmap2`` the unsigned one. A rule with stacked moments (AdEMAMix) keeps two
moments in state1: shape ``(2, *p.shape)``, absmax ``(2, blocks)``. 32-bit state is float32.

Example:
    >>> import torch
    >>> from bnbfuse.optim import state8bit
    >>> st = {}
    >>> state8bit.init_state(st, "adamw", torch.zeros(300), eight_bit=True)
    >>> sorted(st), tuple(st["absmax1"].shape)
    (['absmax1', 'absmax2', 'qmap1', 'qmap2', 'state1', 'state2', 'step'], (2,))
    >>> state8bit.set_state(st, "adamw", 2, torch.full((300,), 1e-3))
    >>> float(state8bit.get_state(st, 2)[0])
    0.0010000000474974513
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import functional as F
from ..backends.reference.optimizer import quantize_state
from ..ops.rules import OPTIMIZER_BLOCKSIZE, optimizer_blocks, rule

__all__ = ["GRADIENT_NORM_HISTORY", "state1_shape", "expected_keys", "state_shapes",
           "step_count", "init_state", "get_state", "set_state"]

GRADIENT_NORM_HISTORY = 100  # gradient norms remembered by percentile clipping


def state1_shape(optimizer: str, p: torch.Tensor) -> tuple[int, ...]:
    """Shape of state1 for (local) parameter ``p``: AdEMAMix stacks two moments."""
    return ((2,) if rule(optimizer).stacked_moments else ()) + tuple(p.shape)


def expected_keys(optimizer: str, eight_bit: bool) -> set[str]:
    """The state keys a parameter of ``optimizer`` must have (``gnorm_vec`` aside)."""
    keys = {"step", "state1"} | ({"absmax1", "qmap1"} if eight_bit else set())
    if rule(optimizer).states == 2:
        keys |= {"state2"} | ({"absmax2", "qmap2"} if eight_bit else set())
    return keys


def state_shapes(optimizer: str, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of every state tensor for (local) parameter ``p``."""
    shape1 = state1_shape(optimizer, p)
    blocks = optimizer_blocks(p.numel())
    return {"state1": shape1, "state2": tuple(p.shape), "qmap1": (256,), "qmap2": (256,),
            "absmax1": shape1[:len(shape1) - p.dim()] + (blocks,), "absmax2": (blocks,),
            "gnorm_vec": (GRADIENT_NORM_HISTORY,)}


def step_count(value, where: str) -> int:
    """A state's ``step`` as a Python int (the kernels take any count in [0, 2**63)).

    Accepted: an int, or an integral float or one-element tensor (torch.optim saves a
    float32 tensor). Anything else raises: TypeError for a str, bool or other type,
    ValueError for a fraction, NaN, a negative count or one of 2**63 and above.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{where}: step must be a count, got a {value.dtype} tensor of "
                            f"shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: step must be an int, got {type(value).__name__} "
                        f"{value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{where}: step must be a whole count, got {value!r}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{where}: step must be in [0, 2**63), got {value!r}")
    return int(value)


def init_state(state: dict, optimizer: str, p: torch.Tensor, *, eight_bit: bool,
               init1: Optional[float] = None, percentile_clipping: int = 100) -> None:
    """Fills ``state`` with the zero state of (local) parameter ``p``.

    ``init1``: the initial value of state1 (Adagrad's ``initial_accumulator_value``).
    """
    dev = p.device
    shapes = state_shapes(optimizer, p)
    states = rule(optimizer).states
    state["step"] = 0
    if eight_bit:
        for i in range(1, states + 1):
            qmap = F.dynamic_map(i == 1, dev).clone()
            state[f"state{i}"] = torch.full(shapes[f"state{i}"], F.dynamic_map_zero_code(i == 1),
                                            dtype=torch.uint8, device=dev)
            state[f"absmax{i}"] = torch.zeros(shapes[f"absmax{i}"], dtype=torch.float32,
                                              device=dev)
            state[f"qmap{i}"] = qmap
        if init1 is not None:
            set_state(state, optimizer, 1, torch.full(shapes["state1"], float(init1), device=dev))
    else:
        for i in range(1, states + 1):
            state[f"state{i}"] = torch.zeros(shapes[f"state{i}"], dtype=torch.float32,
                                             device=dev)
        if init1 is not None:
            state["state1"].fill_(init1)
    if percentile_clipping < 100:
        state["gnorm_vec"] = torch.zeros(GRADIENT_NORM_HISTORY, dtype=torch.float32, device=dev)


def _rows(absmax: torch.Tensor) -> int:
    """How many stacked moments a state holds (one absmax row each)."""
    return absmax.reshape(-1, absmax.shape[-1]).shape[0]


def get_state(state: dict, i: int) -> torch.Tensor:
    """state{i} as float32 (dequantized when 8-bit; a copy either way)."""
    s = state[f"state{i}"]
    if s.dtype != torch.uint8:
        return s.clone()
    if s.numel() == 0:
        return torch.zeros(s.shape, dtype=torch.float32, device=s.device)
    absmax, qmap = state[f"absmax{i}"], state[f"qmap{i}"]
    rows = _rows(absmax)
    parts = [F.dequantize_blockwise(c, absmax=a, code=qmap, blocksize=OPTIMIZER_BLOCKSIZE)
             for c, a in zip(s.reshape(rows, -1), absmax.reshape(rows, -1))]
    return torch.stack(parts).reshape(s.shape)


def set_state(state: dict, optimizer: str, i: int, value: torch.Tensor) -> None:
    """Stores float ``value`` into state{i}, quantizing when the state is 8-bit.

    Quantized as the kernels requantize (``quantize_state``): the idempotent block scale,
    and for the states the rule marks keep_positive the no-blow-up rule (a positive value
    whose nearest code is zero gets the smallest positive code instead).
    """
    s = state[f"state{i}"]
    value = value.to(device=s.device, dtype=torch.float32).reshape(s.shape)
    if s.dtype != torch.uint8:
        s.copy_(value)
        return
    if s.numel() == 0:
        return
    absmax, qmap = state[f"absmax{i}"], state[f"qmap{i}"]
    rows = _rows(absmax)
    keep_positive = rule(optimizer).keep_positive[i - 1]
    for x, c, a in zip(value.reshape(rows, -1), s.view(rows, -1), absmax.view(rows, -1)):
        codes, scale = quantize_state(x, qmap, keep_positive)
        c.copy_(codes.view(c.shape))
        a.copy_(scale)
