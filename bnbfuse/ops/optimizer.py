"""Optimizer update ops: schemas, fake impls, argument checks and the per-step scalars.

One fused pass per parameter: read p, g and the state; write p and the state. ``optimizer``
names a :data:`~bnbfuse.ops.rules.RULES` entry; hyper-parameters an optimizer does not use
are ignored. ``step`` is the 1-based step count after this update. The 8-bit variant keeps
state in blocks of 256 (signed map for state1, unsigned for state2). The ``*_norms`` ops
compute ``[sum(update**2), sum(p**2)]`` (float32 tensor of 2) without writing anything, for
trust ratios and ``max_unorm``.

The hyper-parameters travel as :class:`KernelHyperparams`, whose fields are the schemas'
scalar arguments in order; every backend turns them into the float32 scalars of
:func:`optimizer_scalars`, which is what makes the reference and the native kernels agree
bit for bit.
"""
from __future__ import annotations

import math
import operator
import struct
from typing import NamedTuple

import torch

from .library import lib
from .quantize import check_map_has_no_nan
from .rules import OPTIMIZER_BLOCKSIZE, RULES, optimizer_blocks, rule

__all__ = ["KernelHyperparams", "optimizer_scalars", "check_optimizer_args",
           "check_state_blocks", "norms_scratch_size"]


class KernelHyperparams(NamedTuple):
    """The scalar arguments of the optimizer ops, in schema order (unused ones stay 0)."""

    lr: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    beta3: float = 0.0
    alpha: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    step: int = 0
    gnorm_scale: float = 1.0


_HPARAMS = ", ".join(
    f"{'bool' if f == 'nesterov' else 'int' if f == 'step' else 'float'} {f}"
    for f in KernelHyperparams._fields)
lib.define(
    "optimizer_update_8bit_blockwise(str optimizer, Tensor(a!) p, Tensor g, Tensor(b!) state1, "
    "Tensor(c!)? state2, Tensor(d!) absmax1, Tensor(e!)? absmax2, Tensor qmap1, Tensor? qmap2, "
    f"{_HPARAMS}, float update_scale) -> ()"
)
lib.define(
    "optimizer_update_32bit(str optimizer, Tensor(a!) p, Tensor g, Tensor(b!) state1, "
    f"Tensor(c!)? state2, {_HPARAMS}, float update_scale) -> ()"
)
lib.define(
    "optimizer_norms_8bit_blockwise(str optimizer, Tensor p, Tensor g, Tensor state1, "
    "Tensor? state2, Tensor absmax1, Tensor? absmax2, Tensor qmap1, Tensor? qmap2, "
    f"{_HPARAMS}) -> Tensor"
)
lib.define(
    f"optimizer_norms_32bit(str optimizer, Tensor p, Tensor g, Tensor state1, Tensor? state2, "
    f"{_HPARAMS}) -> Tensor"
)


@torch.library.register_fake("bnbfuse::optimizer_update_8bit_blockwise")
def _(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, *hp_and_scale):
    torch._check(state1.dtype == torch.uint8, lambda: f"state1 must be uint8, got {state1.dtype}")
    return None


@torch.library.register_fake("bnbfuse::optimizer_update_32bit")
def _(optimizer, p, g, state1, state2, *hp_and_scale):
    torch._check(state1.dtype == torch.float32,
                 lambda: f"state1 must be float32, got {state1.dtype}")
    return None


@torch.library.register_fake("bnbfuse::optimizer_norms_8bit_blockwise")
def _(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, *hp):
    return torch.empty(2, dtype=torch.float32, device=p.device)


@torch.library.register_fake("bnbfuse::optimizer_norms_32bit")
def _(optimizer, p, g, state1, state2, *hp):
    return torch.empty(2, dtype=torch.float32, device=p.device)


# ---- host-side scalars ----------------------------------------------------------------------
_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float); out-of-range values give inf."""
    try:
        return _F32.unpack(_F32.pack(float(x)))[0]  # C's (float) cast: round to nearest
    except OverflowError:
        return math.copysign(math.inf, x)


def optimizer_scalars(optimizer: str, hp: KernelHyperparams, update_scale: float = 1.0) -> dict:
    """The per-step scalars of one update, computed in double and rounded once to float32.

    Both the reference and the native kernels use exactly these values (the native ones
    through ``bnbfuse._native.OptimizerArgs``). Keys match the fields of
    ``bnbf_optim_args`` in csrc/include/bnbfuse.h.
    """
    rule(optimizer)
    try:
        step = operator.index(hp.step)  # an int, NumPy integer or integer 0-d tensor
    except TypeError:
        step = None
    if step is None or isinstance(hp.step, bool):
        raise TypeError(f"step must be an int, got {type(hp.step).__name__}")
    if not 1 <= step < 2**63:
        raise ValueError(f"step must be >= 1 and < 2**63 (1-based count after this update), "
                         f"got {step}")
    lr, wd, us = float(hp.lr), float(hp.weight_decay), float(update_scale)
    bc1 = 1.0 - float(hp.beta1) ** step
    bc2 = 1.0 - float(hp.beta2) ** step
    if optimizer in ("adam", "adamw"):
        step_size = lr * us / bc1 if bc1 != 0 else 0.0
    else:
        step_size = lr * us
    s = dict(
        gnorm_scale=hp.gnorm_scale,
        beta1=hp.beta1, one_minus_beta1=1.0 - float(hp.beta1),
        beta2=hp.beta2, one_minus_beta2=1.0 - float(hp.beta2),
        beta3=hp.beta3, one_minus_beta3=1.0 - float(hp.beta3),
        alpha=hp.alpha, eps=hp.eps, weight_decay=wd,
        dampening_factor=1.0 - float(hp.dampening),
        decay=1.0 - lr * wd,
        inv_bc1=1.0 / bc1 if bc1 != 0 else 0.0,
        inv_sqrt_bc2=1.0 / math.sqrt(bc2) if bc2 > 0 else 0.0,
        step_size=step_size, lr=lr, update_scale=us,
    )
    s = {k: _f32(v) for k, v in s.items()}
    s["step"] = int(step)
    s["nesterov"] = bool(hp.nesterov)
    return s


# ---- argument checks (the same messages on every backend) -----------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_optimizer_args(optimizer, p, g, state1, state2, eight_bit: bool) -> None:
    """Dtypes, element counts and devices of p, g and the states of one update."""
    r = rule(optimizer)
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"parameters must be float32/float16/bfloat16, got {p.dtype}")
    if g.dtype != p.dtype:
        raise TypeError(f"gradient dtype {g.dtype} differs from parameter dtype {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"gradient shape {tuple(g.shape)} differs from parameter shape "
                         f"{tuple(p.shape)}")
    n = p.numel()
    n1 = 2 * n if r.stacked_moments else n
    sdtype = torch.uint8 if eight_bit else torch.float32
    if state1.dtype != sdtype:
        raise TypeError(f"state1 must be {sdtype}, got {state1.dtype}")
    if state1.numel() != n1:
        raise ValueError(f"state1 has {state1.numel()} elements, {optimizer} needs {n1}")
    if r.states == 2:
        if state2 is None:
            raise ValueError(f"{optimizer} needs state2")
        if state2.dtype != sdtype:
            raise TypeError(f"state2 must be {sdtype}, got {state2.dtype}")
        if state2.numel() != n:
            raise ValueError(f"state2 has {state2.numel()} elements, {optimizer} needs {n}")
    for name, t in (("g", g), ("state1", state1), ("state2", state2)):
        if t is not None and t.device != p.device:
            raise ValueError(f"{name} is on {t.device}, the parameter on {p.device}")


def check_state_blocks(optimizer, n: int, absmax1, absmax2, qmap1, qmap2, device=None) -> None:
    """The block maxima and maps of 8-bit state for a parameter of ``n`` elements."""
    r = rule(optimizer)
    blocks = optimizer_blocks(n)
    need1 = 2 * blocks if r.stacked_moments else blocks
    if absmax1.dtype != torch.float32 or absmax1.numel() != need1:
        raise ValueError(f"absmax1 must be float32 with {need1} values "
                         f"({n} elements in blocks of {OPTIMIZER_BLOCKSIZE}), got "
                         f"{absmax1.dtype} with {absmax1.numel()}")
    if qmap1.numel() != 256:
        raise ValueError(f"qmap1 must have 256 values, got {qmap1.numel()}")
    if r.states == 2:
        if absmax2 is None or qmap2 is None:
            raise ValueError(f"{optimizer} needs absmax2 and qmap2")
        if absmax2.dtype != torch.float32 or absmax2.numel() != blocks:
            raise ValueError(f"absmax2 must be float32 with {blocks} values, got "
                             f"{absmax2.dtype} with {absmax2.numel()}")
        if qmap2.numel() != 256:
            raise ValueError(f"qmap2 must have 256 values, got {qmap2.numel()}")
    check_map_has_no_nan(qmap1, "qmap1")
    if r.states == 2:
        check_map_has_no_nan(qmap2, "qmap2")
    if device is not None:
        for name, t in (("absmax1", absmax1), ("absmax2", absmax2 if r.states == 2 else None)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device}, the parameter on {device}; all "
                                 "tensors must be on one device")


# Mirrors BNBF_NORM_GROUP_BLOCKS (csrc/include/bnbfuse.h): the norms are summed per
# 256-element block, per group of this many blocks, then over the groups in order.
NORM_GROUP_BLOCKS = 256


def norms_scratch_size(n: int) -> int:
    """Doubles of scratch the CUDA norms kernels need for ``n`` elements: two partial sums
    per optimizer block and two per group of blocks (csrc/common/norm_order.h)."""
    blocks = optimizer_blocks(n)
    return 2 * (blocks + -(blocks // -NORM_GROUP_BLOCKS))


def two_state_only(optimizer: str, t):
    """``t`` for 2-state optimizers, None for 1-state ones (whose state2 slots are unused)."""
    return t if RULES[optimizer].states == 2 else None
