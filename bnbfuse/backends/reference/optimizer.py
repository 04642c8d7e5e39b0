"""Reference optimizer updates: the specification of the optimizer ops (schemas, argument
checks and host scalars in bnbfuse/ops/optimizer.py; optimizer kinds in bnbfuse/ops/rules.py).

Every formula below is a sequence of float32 elementwise tensor operations (mul, add, sub,
tensor/tensor div, sqrt32, sign) whose rounding is unambiguous, applied with host scalars
that were rounded once to float32 by ``optimizer_scalars``; the native kernels
(csrc/common/optim_rule.h) do the same operations in the same order, so both give identical
bits for every parameter dtype.

Policies (docs/optimizers.md, "Numerics choices"):

- Skipped element: a non-finite gradient, or an update that would make one of the
  element's states non-finite (g*g overflowing in a second moment), leaves its parameter
  and state values unchanged (8-bit: the element's dequantized state values are requantized
  with the block's new scale, ``state_absmax``, which is idempotent, so its code changes
  only when the other elements moved the block's scale). Norms ops skip it.
- "No blow-ups" (8-bit): the states a rule marks ``keep_positive`` (second-moment-like:
  state2 of adam/adamw/lamb/ademamix, state1 of rmsprop/adagrad) never store a positive
  value as the zero code; they get the smallest positive code instead. Storing a slightly
  larger v only shrinks that element's step, whereas rounding v to 0 while m is not 0 would
  make the next zero-gradient step m/eps (a blow-up). All other states use exact nearest
  rounding (ties to the larger value).
"""
from __future__ import annotations

import torch

from ...ops.optimizer import (KernelHyperparams, check_optimizer_args, check_state_blocks,
                              optimizer_scalars)
from ...ops.rules import OPTIMIZER_BLOCKSIZE, RULES
from .quantize import blocks_of, block_divisor, dequantize_blockwise, quantize_to_map


def sqrt32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (what IEEE sqrtf, and the native kernels, give).

    torch's vectorised float32 (and float64) CPU sqrt is not always correctly rounded; the
    float64 result rounded to float32 is, because float64 carries more than 2*24+2 bits and
    the error of the float64 sqrt stays far below the distance of sqrt(x) from any float32
    rounding boundary.
    """
    return torch.sqrt(x.double()).float()


def optimizer_rule(optimizer: str, p, g, s1, m2, s2, sc: dict):
    """One update of fp32 tensors: returns (p, s1, m2, s2, direction).

    ``g`` is already multiplied by gnorm_scale. ``m2`` is AdEMAMix's slow moment (None
    otherwise), ``s2`` the second state (None for 1-state optimizers). ``direction`` is the
    update before the learning rate that the norms op reports (see ``optimizer_norms_32bit``).
    Mirrors ``bnbf::opt_rule`` in csrc/common/optim_rule.h operation by operation.
    """
    wd = sc["weight_decay"]
    if optimizer in ("adam", "adamw", "lamb"):
        if optimizer == "adam":
            g = g + p * wd
        if optimizer == "adamw":
            p = p * sc["decay"]
        s1 = s1 * sc["beta1"] + g * sc["one_minus_beta1"]
        s2 = s2 * sc["beta2"] + (g * g) * sc["one_minus_beta2"]
        denom = sqrt32(s2) * sc["inv_sqrt_bc2"] + sc["eps"]
        if optimizer == "lamb":
            u = (s1 * sc["inv_bc1"]) / denom + p * wd
            return p - u * sc["step_size"], s1, m2, s2, u
        u = s1 / denom
        return p - u * sc["step_size"], s1, m2, s2, u * sc["inv_bc1"]
    if optimizer == "ademamix":
        s1 = s1 * sc["beta1"] + g * sc["one_minus_beta1"]
        m2 = m2 * sc["beta3"] + g * sc["one_minus_beta3"]
        s2 = s2 * sc["beta2"] + (g * g) * sc["one_minus_beta2"]
        denom = sqrt32(s2) * sc["inv_sqrt_bc2"] + sc["eps"]
        u = (s1 * sc["inv_bc1"] + m2 * sc["alpha"]) / denom
        return p * sc["decay"] - u * sc["step_size"], s1, m2, s2, u
    if optimizer == "sgd":
        d = g + p * wd
        if sc["step"] == 1:
            s1 = d
        else:
            s1 = s1 * sc["beta1"] + d * sc["dampening_factor"]
        d = d + s1 * sc["beta1"] if sc["nesterov"] else s1
        return p - d * sc["step_size"], s1, m2, s2, d
    if optimizer in ("rmsprop", "adagrad"):
        g = g + p * wd
        if optimizer == "rmsprop":
            s1 = s1 * sc["beta1"] + (g * g) * sc["one_minus_beta1"]
        else:
            s1 = s1 + g * g
        u = g / (sqrt32(s1) + sc["eps"])
        return p - u * sc["step_size"], s1, m2, s2, u
    if optimizer == "lion":
        u = torch.sign(s1 * sc["beta1"] + g * sc["one_minus_beta1"])
        p = p * sc["decay"] - u * sc["step_size"]
        s1 = s1 * sc["beta2"] + g * sc["one_minus_beta2"]
        return p, s1, m2, s2, u
    if optimizer == "lars":
        d = g + p * wd
        s1 = s1 * sc["beta1"] + d
        return p - s1 * sc["step_size"], s1, m2, s2, s1
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {tuple(RULES)}")


def _finite(g):
    return g.abs() <= torch.finfo(torch.float32).max  # False for NaN and +-inf


def dequantize_state(codes, absmax, qmap):
    if codes.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    return dequantize_blockwise(codes.reshape(-1), absmax.reshape(-1), qmap.to(torch.float32),
                                OPTIMIZER_BLOCKSIZE, torch.float32)


def _scale_for(m: torch.Tensor, q: float) -> torch.Tensor:
    """Smallest float32 S with fl(q * S) >= m, elementwise (m >= 0; +inf and NaN kept).

    A finite m whose S would overflow gets FLT_MAX (csrc/common/state_scale.h).
    """
    if q == 1.0:
        return m
    big = torch.finfo(torch.float32).max
    qt = torch.full_like(m, q)
    free = (m == 0) | ~(m <= big)
    s = torch.where(free, m, (m / qt).clamp(max=big))
    inf = torch.full_like(s, float("inf"))
    while True:  # m / q is within an ulp or two of S
        up = ~free & (qt * s < m) & (s < big)
        if not bool(up.any()):
            break
        s = torch.where(up, torch.nextafter(s, inf), s)
    while True:
        lower = torch.nextafter(s, torch.zeros_like(s))
        down = ~free & (lower != s) & (qt * lower >= m)
        if not bool(down.any()):
            break
        s = torch.where(down, lower, s)
    return s


def state_absmax(xb: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """The scale of each block (row) of 8-bit optimizer state: idempotent requantization.

    max(scale_for(largest value, q+), scale_for(largest negative magnitude, q-)), q+/q- the
    map's largest value and smallest value's magnitude (1 for a side the map lacks), so
    that requantizing unchanged values gives the same codes and the same absmax (plain
    max |x| shrinks a block whose extreme is negative by 1 - |q-| per requantization with
    the signed dynamic map). NaN if any value is NaN. Mirrors csrc/common/state_scale.h.
    """
    q_pos = float(qmap.max()) if float(qmap.max()) > 0 else 1.0
    q_neg = -float(qmap.min()) if float(qmap.min()) < 0 else 1.0
    zero = xb.new_zeros(())
    pos = torch.where(xb.signbit(), zero, xb).amax(dim=1)
    neg = torch.where(xb.signbit(), -xb, zero).amax(dim=1)
    scale = torch.maximum(_scale_for(pos, q_pos), _scale_for(neg, q_neg))
    nan = xb.isnan().any(dim=1)
    return torch.where(nan, torch.full_like(scale, float("nan")), scale)


def quantize_state(x: torch.Tensor, qmap: torch.Tensor, keep_positive: bool):
    """fp32 state (n,) -> (codes uint8 (n,), absmax (blocks,)), blocks of 256, exact nearest.

    The absmax is ``state_absmax`` (idempotent requantization). With ``keep_positive`` a
    positive value never gets the zero code (the second-moment policy).
    """
    n = x.numel()
    qmap = qmap.to(device=x.device, dtype=torch.float32)
    if n == 0:
        return x.new_zeros(0, dtype=torch.uint8), x.new_zeros(0)
    xb = blocks_of(x, OPTIMIZER_BLOCKSIZE)
    absmax = state_absmax(xb, qmap)
    codes = quantize_to_map(xb / block_divisor(absmax)[:, None], qmap)
    if keep_positive:
        zero_code = quantize_to_map(qmap.new_zeros(1), qmap)
        pos = torch.where(qmap > 0, qmap, torch.full_like(qmap, float("inf")))
        if bool((pos < float("inf")).any()):
            min_pos = torch.argmin(pos).to(torch.uint8)
            codes = torch.where((codes == zero_code) & (xb > 0), min_pos, codes)
    return codes.reshape(-1)[:n], absmax


def _flat32(t):
    return t.reshape(-1).to(torch.float32)


def _run_rule(optimizer, p32, g, s1, m2, s2, sc):
    """The rule with the skip policy: (p, s1, m2, s2, direction, ok).

    An element is skipped (``ok`` False: parameter and states keep their values) when its
    gradient is not finite or when its update would make a state non-finite (g*g
    overflowing in a second moment).
    """
    finite_g = _finite(g)
    g = g * sc["gnorm_scale"]
    new_p, new_s1, new_m2, new_s2, d = optimizer_rule(optimizer, p32, g, s1, m2, s2, sc)
    ok = finite_g & _finite(new_s1)
    for new in (new_m2, new_s2):
        if new is not None:
            ok = ok & _finite(new)
    keep = lambda new, old: None if new is None else torch.where(ok, new, old)  # noqa: E731
    return keep(new_p, p32), keep(new_s1, s1), keep(new_m2, m2), keep(new_s2, s2), d, ok


def _states_32(optimizer, p, state1, state2):
    n = p.numel()
    r = RULES[optimizer]
    s1 = state1.reshape(-1)
    m2 = s1[n:] if r.stacked_moments else None
    s1 = s1[:n] if r.stacked_moments else s1
    s2 = state2.reshape(-1) if r.states == 2 else None
    return s1, m2, s2


def _scalars(optimizer, hparams, update_scale=1.0):
    return optimizer_scalars(optimizer, KernelHyperparams(*hparams), update_scale)


def optimizer_update_32bit(optimizer, p, g, state1, state2, *hparams_and_scale):
    *hparams, update_scale = hparams_and_scale
    check_optimizer_args(optimizer, p, g, state1, state2, False)
    sc = _scalars(optimizer, hparams, update_scale)
    s1, m2, s2 = _states_32(optimizer, p, state1, state2)
    new_p, new_s1, new_m2, new_s2, _, _ = _run_rule(optimizer, _flat32(p), _flat32(g), s1, m2,
                                                    s2, sc)
    p.copy_(new_p.view(p.shape))
    if new_m2 is not None:
        new_s1 = torch.cat([new_s1, new_m2])
    state1.copy_(new_s1.view(state1.shape))
    if new_s2 is not None:
        state2.copy_(new_s2.view(state2.shape))


def _norms(d, p32, ok):
    zero = torch.zeros((), dtype=torch.float64, device=p32.device)
    d2 = torch.where(ok, d.double() * d.double(), zero).sum()
    p2 = torch.where(ok, p32.double() * p32.double(), zero).sum()
    return torch.stack([d2, p2]).to(torch.float32)


def optimizer_norms_32bit(optimizer, p, g, state1, state2, *hparams):
    """[sum(direction**2), sum(p**2)] over finite-gradient elements, accumulated in float64.

    direction: adam/adamw m̂/(sqrt(v̂)+eps); lamb m̂/(sqrt(v̂)+eps) + wd*p; ademamix
    (m1/bc1 + alpha*m2)/(sqrt(nu)/sqrt(bc2)+eps); sgd the step d; rmsprop/adagrad
    g/(sqrt(s)+eps); lion sign(c); lars the new momentum buffer. All from the fresh moments of
    this step.
    """
    check_optimizer_args(optimizer, p, g, state1, state2, False)
    sc = _scalars(optimizer, hparams)
    s1, m2, s2 = _states_32(optimizer, p, state1, state2)
    p32 = _flat32(p)
    *_, d, ok = _run_rule(optimizer, p32, _flat32(g), s1, m2, s2, sc)
    return _norms(d, p32, ok)


def _states_8(optimizer, n, state1, state2, absmax1, absmax2, qmap1, qmap2):
    r = RULES[optimizer]
    c1, a1 = state1.reshape(-1), absmax1.reshape(-1)
    if r.stacked_moments:
        nb = a1.numel() // 2
        s1 = dequantize_state(c1[:n], a1[:nb], qmap1)
        m2 = dequantize_state(c1[n:], a1[nb:], qmap1)
    else:
        s1, m2 = dequantize_state(c1, a1, qmap1), None
    s2 = dequantize_state(state2, absmax2, qmap2) if r.states == 2 else None
    return s1, m2, s2


def optimizer_update_8bit_blockwise(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1,
                                    qmap2, *hparams_and_scale, keep_positive: bool = True):
    """8-bit blockwise update of ``p`` and its quantized state, in place.

    Shapes: ``p``/``g`` any shape, n elements (fp32/fp16/bf16, same dtype); ``state1`` uint8
    codes with n elements (AdEMAMix: 2n, shape ``(2, *p.shape)``, m1 then m2); ``absmax1``
    float32 with ceil(n/256) values (AdEMAMix: ``(2, blocks)``); ``state2``/``absmax2`` the
    same for 2-state optimizers (else None); ``qmap1`` the signed dynamic map, ``qmap2`` the
    unsigned one (256 float32 values each). ``hparams_and_scale``: the
    :class:`~bnbfuse.ops.optimizer.KernelHyperparams` fields, then ``update_scale``.

    Per block of 256 elements of the flattened tensor: dequantize (code value * absmax),
    apply ``optimizer_rule`` in float32, take the block's new absmax, requantize with exact
    nearest rounding (ties to the larger value).

    Second-moment policy ("No blow-ups", docs/optimizers.md): the states a rule marks
    ``keep_positive`` are requantized so that a positive value whose nearest code is the
    map's zero is stored as the smallest positive code instead. The stored v is then at
    most one code step too large, so the element's next steps are at most slightly smaller
    than fp32 Adam's, whereas a v rounded to 0 under a non-zero m makes the next
    zero-gradient step m/eps (a jump of up to lr*1e4 with eps=1e-8).
    ``keep_positive=False`` (reference only, for tests) turns the policy off to show that
    blow-up.

    Example::

        >>> import torch, bnbfuse
        >>> from bnbfuse.functional import dynamic_map
        >>> from bnbfuse.ops.optimizer import KernelHyperparams
        >>> p, g = torch.randn(1000), torch.randn(1000)
        >>> s1 = torch.zeros(1000, dtype=torch.uint8); s2 = torch.zeros_like(s1)
        >>> a1, a2 = torch.zeros(4), torch.zeros(4)
        >>> hparams = KernelHyperparams(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
        ...                        weight_decay=1e-2, step=1)
        >>> torch.ops.bnbfuse.optimizer_update_8bit_blockwise(
        ...     "adamw", p, g, s1, s2, a1, a2, dynamic_map(True, p.device),
        ...     dynamic_map(False, p.device), *hparams, 1.0)
    """
    *hparams, update_scale = hparams_and_scale
    check_optimizer_args(optimizer, p, g, state1, state2, True)
    n = p.numel()
    check_state_blocks(optimizer, n, absmax1, absmax2, qmap1, qmap2)
    sc = _scalars(optimizer, hparams, update_scale)
    s1, m2, s2 = _states_8(optimizer, n, state1, state2, absmax1, absmax2, qmap1, qmap2)
    new_p, new_s1, new_m2, new_s2, _, _ = _run_rule(optimizer, _flat32(p), _flat32(g), s1, m2,
                                                    s2, sc)
    p.copy_(new_p.view(p.shape))
    kp1, kp2 = (keep_positive and k for k in RULES[optimizer].keep_positive)
    c1, a1 = quantize_state(new_s1, qmap1, kp1)
    if new_m2 is not None:
        c1b, a1b = quantize_state(new_m2, qmap1, kp1)
        c1, a1 = torch.cat([c1, c1b]), torch.cat([a1, a1b])
    state1.copy_(c1.view(state1.shape))
    absmax1.copy_(a1.view(absmax1.shape))
    if new_s2 is not None:
        c2, a2 = quantize_state(new_s2, qmap2, kp2)
        state2.copy_(c2.view(state2.shape))
        absmax2.copy_(a2.view(absmax2.shape))


def optimizer_norms_8bit_blockwise(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1,
                                   qmap2, *hparams):
    """As ``optimizer_norms_32bit``, with the state dequantized from its 8-bit blocks."""
    check_optimizer_args(optimizer, p, g, state1, state2, True)
    n = p.numel()
    check_state_blocks(optimizer, n, absmax1, absmax2, qmap1, qmap2)
    sc = _scalars(optimizer, hparams)
    s1, m2, s2 = _states_8(optimizer, n, state1, state2, absmax1, absmax2, qmap1, qmap2)
    p32 = _flat32(p)
    *_, d, ok = _run_rule(optimizer, p32, _flat32(g), s1, m2, s2, sc)
    return _norms(d, p32, ok)


for _name in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit",
              "optimizer_norms_8bit_blockwise", "optimizer_norms_32bit"):
    torch.library.impl(f"bnbfuse::{_name}", "CompositeExplicitAutograd")(globals()[_name])
