"""Pure-PyTorch reference kernels: the specification the native kernels are tested against.

They run on any device and are registered as ``CompositeExplicitAutograd``, so they serve
every device that has no native kernel. They favour clarity over speed.
"""
from __future__ import annotations

import torch

# ---- blockwise quantization ----------------------------------------------------------------


def nearest_thresholds(code: torch.Tensor):
    """(thresholds, order) such that nearest-in-map = order[searchsorted(thr, x, right=True)].

    thr[k] is the smallest float32 >= the exact midpoint of the k-th and (k+1)-th sorted map
    values, so ``x >= thr[k]`` is exact for float32 x and ties go to the larger value.
    """
    values, order = torch.sort(code.to(torch.float32), stable=True)
    mid = (values[:-1].double() + values[1:].double()) / 2
    thr = mid.float()
    thr = torch.where(thr.double() < mid, torch.nextafter(thr, torch.tensor(float("inf"), device=thr.device)), thr)
    return thr, order


def quantize_to_map(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the value of ``code`` nearest each element of fp32 ``x``.

    NaN counts no threshold (compares are false) and gets the smallest value's index, as in
    the native kernels; ``searchsorted`` alone would sort it above every threshold.
    """
    thr, order = nearest_thresholds(code.to(x.device))
    flat = x.reshape(-1).contiguous()
    rank = torch.searchsorted(thr, flat, right=True).clamp_(max=255).masked_fill_(flat.isnan(), 0)
    return order[rank].to(torch.uint8).view(x.shape)


def _one_block_at_most(n: int, blocksize: int) -> int:
    """A block longer than the tensor is the tensor: the same blocks, without padding a
    5-element tensor to a blocksize of 2**63 - 1."""
    return min(blocksize, max(n, 1))


def _blocks(A: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A flattened to fp32 and zero-padded to whole blocks, shape (blocks, blocksize)."""
    blocksize = _one_block_at_most(A.numel(), blocksize)
    flat = A.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def block_divisor(absmax: torch.Tensor) -> torch.Tensor:
    """absmax, with 1 for all-zero blocks so that 0/0 never happens."""
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = A.numel()
    x = _blocks(A, blocksize)
    absmax = x.abs().amax(dim=1) if n else x.new_zeros(0)
    codes = quantize_to_map(x / block_divisor(absmax)[:, None], code)
    return codes.reshape(-1)[:n].view(A.shape), absmax


def dequantize_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, dtype: torch.dtype):
    n = A.numel()
    blocksize = _one_block_at_most(n, blocksize)
    codes = A.reshape(-1).long()
    pad = (-n) % blocksize
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    values = code.to(device=A.device, dtype=torch.float32)[codes].view(-1, blocksize)
    out = values * absmax.reshape(-1)[: values.shape[0], None]
    return out.reshape(-1)[:n].to(dtype).view(A.shape)


torch.library.impl("bnbfuse::quantize_blockwise", "CompositeExplicitAutograd")(quantize_blockwise)
torch.library.impl("bnbfuse::dequantize_blockwise", "CompositeExplicitAutograd")(dequantize_blockwise)


# ---- optimizer updates ---------------------------------------------------------------------
import math  # noqa: E402  (kept inside this section of the shared file)
import struct  # noqa: E402

# The specification of the optimizer update ops (schemas in bnbfuse/_ops.py). Every formula
# below is a sequence of float32 elementwise tensor operations (mul, add, sub, tensor/tensor
# div, sqrt32, sign) whose rounding is unambiguous, applied with host scalars that were rounded
# once to float32 by `optimizer_scalars`; the native kernels (csrc/common/optim_rule.h) do the
# same operations in the same order, so both give identical bits for every parameter dtype.
#
# Policies (docs/optimizers.md, "Numerics choices"):
#  - Non-finite gradient element: its parameter and state values are left unchanged (8-bit:
#    the element's dequantized state values are requantized with the block's new absmax, so
#    its code can change only when the block's absmax changed). Norms ops skip it.
#  - "No blow-ups" (8-bit): second-moment-like states (state2 of adam/adamw/lamb/ademamix and
#    state1 of rmsprop/adagrad) are requantized with keep_positive: a positive value whose
#    nearest code is the zero code is stored as the smallest positive code instead. Storing a
#    slightly larger v only shrinks that element's step, whereas rounding v to 0 while m is not
#    0 would make the next zero-gradient step m/eps (a blow-up). All other states use exact
#    nearest rounding (ties to the larger value).

OPTIMIZERS = ("adam", "adamw", "ademamix", "lamb", "momentum", "rmsprop", "adagrad", "lion",
              "lars")
TWO_STATE = ("adam", "adamw", "ademamix", "lamb")
OPTIMIZER_BLOCKSIZE = 256


def sqrt32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (what IEEE sqrtf, and the native kernels, give).

    torch's vectorised float32 (and float64) CPU sqrt is not always correctly rounded; the
    float64 result rounded to float32 is, because float64 carries more than 2*24+2 bits and
    the error of the float64 sqrt stays far below the distance of sqrt(x) from any float32
    rounding boundary.
    """
    return torch.sqrt(x.double()).float()


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float); out-of-range values give inf."""
    try:
        return _F32.unpack(_F32.pack(float(x)))[0]  # C's (float) cast: round to nearest
    except OverflowError:
        return math.copysign(math.inf, x)


_F32 = struct.Struct("<f")


def optimizer_scalars(optimizer: str, lr: float, beta1: float, beta2: float, beta3: float,
                      alpha: float, eps: float, weight_decay: float, dampening: float,
                      nesterov: bool, step: int, gnorm_scale: float,
                      update_scale: float = 1.0) -> dict:
    """The per-step scalars of one update, computed in double and rounded once to float32.

    Both the reference and the native kernels use exactly these values (the native ones
    through ``bnbfuse._native.OptimizerArgs``), which is what makes them agree bit for bit.
    Keys match the fields of ``bnbf_optim_args`` in csrc/include/bnbfuse.h.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based count after this update), got {step}")
    lr, wd, us = float(lr), float(weight_decay), float(update_scale)
    bc1 = 1.0 - float(beta1) ** step
    bc2 = 1.0 - float(beta2) ** step
    if optimizer in ("adam", "adamw"):
        step_size = lr * us / bc1 if bc1 != 0 else 0.0
    elif optimizer == "lars":
        step_size = lr
    else:
        step_size = lr * us
    s = dict(
        gnorm_scale=gnorm_scale,
        beta1=beta1, one_minus_beta1=1.0 - float(beta1),
        beta2=beta2, one_minus_beta2=1.0 - float(beta2),
        beta3=beta3, one_minus_beta3=1.0 - float(beta3),
        alpha=alpha, eps=eps, weight_decay=wd, dampening_factor=1.0 - float(dampening),
        decay=1.0 - lr * wd,
        inv_bc1=1.0 / bc1 if bc1 != 0 else 0.0,
        inv_sqrt_bc2=1.0 / math.sqrt(bc2) if bc2 > 0 else 0.0,
        step_size=step_size, lr=lr, update_scale=us,
    )
    s = {k: _f32(v) for k, v in s.items()}
    s["step"] = int(step)
    s["nesterov"] = bool(nesterov)
    return s


def optimizer_rule(optimizer: str, p, g, s1, s1b, s2, sc: dict):
    """One update of fp32 tensors: returns (p, s1, s1b, s2, direction).

    ``g`` is already multiplied by gnorm_scale. ``s1b`` is AdEMAMix's m2 (None otherwise),
    ``s2`` the second state (None for 1-state optimizers). ``direction`` is the update before
    the learning rate that the norms op reports (see ``optimizer_norms_32bit``).
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
            return p - u * sc["step_size"], s1, s1b, s2, u
        u = s1 / denom
        return p - u * sc["step_size"], s1, s1b, s2, u * sc["inv_bc1"]
    if optimizer == "ademamix":
        s1 = s1 * sc["beta1"] + g * sc["one_minus_beta1"]
        s1b = s1b * sc["beta3"] + g * sc["one_minus_beta3"]
        s2 = s2 * sc["beta2"] + (g * g) * sc["one_minus_beta2"]
        denom = sqrt32(s2) * sc["inv_sqrt_bc2"] + sc["eps"]
        u = (s1 * sc["inv_bc1"] + s1b * sc["alpha"]) / denom
        return p * sc["decay"] - u * sc["step_size"], s1, s1b, s2, u
    if optimizer == "momentum":
        d = g + p * wd
        if sc["step"] == 1:
            s1 = d
        else:
            s1 = s1 * sc["beta1"] + d * sc["dampening_factor"]
        d = d + s1 * sc["beta1"] if sc["nesterov"] else s1
        return p - d * sc["step_size"], s1, s1b, s2, d
    if optimizer in ("rmsprop", "adagrad"):
        g = g + p * wd
        if optimizer == "rmsprop":
            s1 = s1 * sc["beta1"] + (g * g) * sc["one_minus_beta1"]
        else:
            s1 = s1 + g * g
        u = g / (sqrt32(s1) + sc["eps"])
        return p - u * sc["step_size"], s1, s1b, s2, u
    if optimizer == "lion":
        u = torch.sign(s1 * sc["beta1"] + g * sc["one_minus_beta1"])
        p = p * sc["decay"] - u * sc["step_size"]
        s1 = s1 * sc["beta2"] + g * sc["one_minus_beta2"]
        return p, s1, s1b, s2, u
    if optimizer == "lars":
        d = g + p * wd
        s1 = s1 * sc["beta1"] + d * sc["update_scale"]
        return p - s1 * sc["step_size"], s1, s1b, s2, d
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")


def _check_optimizer_args(optimizer, p, g, state1, state2, eight_bit):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"parameters must be float32/float16/bfloat16, got {p.dtype}")
    if g.dtype != p.dtype:
        raise TypeError(f"gradient dtype {g.dtype} differs from parameter dtype {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"gradient shape {tuple(g.shape)} differs from parameter shape "
                         f"{tuple(p.shape)}")
    n = p.numel()
    n1 = 2 * n if optimizer == "ademamix" else n
    sdtype = torch.uint8 if eight_bit else torch.float32
    if state1.dtype != sdtype:
        raise TypeError(f"state1 must be {sdtype}, got {state1.dtype}")
    if state1.numel() != n1:
        raise ValueError(f"state1 has {state1.numel()} elements, {optimizer} needs {n1}")
    if optimizer in TWO_STATE:
        if state2 is None:
            raise ValueError(f"{optimizer} needs state2")
        if state2.dtype != sdtype:
            raise TypeError(f"state2 must be {sdtype}, got {state2.dtype}")
        if state2.numel() != n:
            raise ValueError(f"state2 has {state2.numel()} elements, {optimizer} needs {n}")
    for name, t in (("g", g), ("state1", state1), ("state2", state2)):
        if t is not None and t.device != p.device:
            raise ValueError(f"{name} is on {t.device}, the parameter on {p.device}")


def _check_absmax(optimizer, n, absmax1, absmax2, qmap1, qmap2):
    blocks = -(n // -OPTIMIZER_BLOCKSIZE)
    need1 = 2 * blocks if optimizer == "ademamix" else blocks
    if absmax1.dtype != torch.float32 or absmax1.numel() != need1:
        raise ValueError(f"absmax1 must be float32 with {need1} values "
                         f"({n} elements in blocks of {OPTIMIZER_BLOCKSIZE}), got "
                         f"{absmax1.dtype} with {absmax1.numel()}")
    if qmap1.numel() != 256:
        raise ValueError(f"qmap1 must have 256 values, got {qmap1.numel()}")
    if optimizer in TWO_STATE:
        if absmax2 is None or qmap2 is None:
            raise ValueError(f"{optimizer} needs absmax2 and qmap2")
        if absmax2.dtype != torch.float32 or absmax2.numel() != blocks:
            raise ValueError(f"absmax2 must be float32 with {blocks} values, got "
                             f"{absmax2.dtype} with {absmax2.numel()}")
        if qmap2.numel() != 256:
            raise ValueError(f"qmap2 must have 256 values, got {qmap2.numel()}")


def keeps_positive(optimizer: str, state: int) -> bool:
    """Whether 8-bit state `state` (1 or 2) of `optimizer` is requantized with keep_positive."""
    return (state == 2) or optimizer in ("rmsprop", "adagrad")


def _finite(g):
    return g.abs() <= torch.finfo(torch.float32).max  # False for NaN and +-inf


def _dequantize_state(codes, absmax, qmap):
    n = codes.numel()
    return dequantize_blockwise(codes.reshape(-1), absmax.reshape(-1), qmap.to(torch.float32),
                                OPTIMIZER_BLOCKSIZE, torch.float32) if n else \
        torch.zeros(0, dtype=torch.float32, device=codes.device)


def quantize_state(x: torch.Tensor, qmap: torch.Tensor, keep_positive: bool):
    """fp32 state (n,) -> (codes uint8 (n,), absmax (blocks,)), blocks of 256, exact nearest.

    With ``keep_positive`` a positive value never gets the zero code (the second-moment policy).
    """
    n = x.numel()
    qmap = qmap.to(device=x.device, dtype=torch.float32)
    if n == 0:
        return x.new_zeros(0, dtype=torch.uint8), x.new_zeros(0)
    xb = _blocks(x, OPTIMIZER_BLOCKSIZE)
    absmax = xb.abs().amax(dim=1)
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


def _run_rule(optimizer, p32, g, s1, s1b, s2, sc):
    """The rule with the non-finite-gradient policy: (p, s1, s1b, s2, direction, ok)."""
    ok = _finite(g)
    g = g * sc["gnorm_scale"]
    np_, ns1, ns1b, ns2, d = optimizer_rule(optimizer, p32, g, s1, s1b, s2, sc)
    keep = lambda new, old: None if new is None else torch.where(ok, new, old)  # noqa: E731
    return keep(np_, p32), keep(ns1, s1), keep(ns1b, s1b), keep(ns2, s2), d, ok


def _states_32(optimizer, p, state1, state2):
    n = p.numel()
    s1 = state1.reshape(-1)
    s1b = s1[n:] if optimizer == "ademamix" else None
    s1 = s1[:n] if optimizer == "ademamix" else s1
    s2 = state2.reshape(-1) if optimizer in TWO_STATE else None
    return s1, s1b, s2


def optimizer_update_32bit(optimizer, p, g, state1, state2, lr, beta1, beta2, beta3, alpha,
                           eps, weight_decay, dampening, nesterov, step, gnorm_scale,
                           update_scale):
    _check_optimizer_args(optimizer, p, g, state1, state2, False)
    sc = optimizer_scalars(optimizer, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                           dampening, nesterov, step, gnorm_scale, update_scale)
    s1, s1b, s2 = _states_32(optimizer, p, state1, state2)
    np_, ns1, ns1b, ns2, _, _ = _run_rule(optimizer, _flat32(p), _flat32(g), s1, s1b, s2, sc)
    p.copy_(np_.view(p.shape))
    if optimizer == "ademamix":
        state1.copy_(torch.cat([ns1, ns1b]).view(state1.shape))
    else:
        state1.copy_(ns1.view(state1.shape))
    if ns2 is not None:
        state2.copy_(ns2.view(state2.shape))


def _norms(d, p32, ok):
    zero = torch.zeros((), dtype=torch.float64, device=p32.device)
    d2 = torch.where(ok, d.double() * d.double(), zero).sum()
    p2 = torch.where(ok, p32.double() * p32.double(), zero).sum()
    return torch.stack([d2, p2]).to(torch.float32)


def optimizer_norms_32bit(optimizer, p, g, state1, state2, lr, beta1, beta2, beta3, alpha, eps,
                          weight_decay, dampening, nesterov, step, gnorm_scale):
    """[sum(direction**2), sum(p**2)] over finite-gradient elements, accumulated in float64.

    direction: adam/adamw m̂/(sqrt(v̂)+eps); lamb m̂/(sqrt(v̂)+eps) + wd*p; ademamix
    (m1/bc1 + alpha*m2)/(sqrt(nu)/sqrt(bc2)+eps); momentum the SGD step d; rmsprop/adagrad
    g/(sqrt(s)+eps); lion sign(c); lars g + wd*p. All from the fresh moments of this step.
    """
    _check_optimizer_args(optimizer, p, g, state1, state2, False)
    sc = optimizer_scalars(optimizer, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                           dampening, nesterov, step, gnorm_scale)
    s1, s1b, s2 = _states_32(optimizer, p, state1, state2)
    p32 = _flat32(p)
    *_, d, ok = _run_rule(optimizer, p32, _flat32(g), s1, s1b, s2, sc)
    return _norms(d, p32, ok)


def _states_8(optimizer, n, state1, state2, absmax1, absmax2, qmap1, qmap2):
    c1, a1 = state1.reshape(-1), absmax1.reshape(-1)
    if optimizer == "ademamix":
        nb = a1.numel() // 2
        s1 = _dequantize_state(c1[:n], a1[:nb], qmap1)
        s1b = _dequantize_state(c1[n:], a1[nb:], qmap1)
    else:
        s1, s1b = _dequantize_state(c1, a1, qmap1), None
    s2 = _dequantize_state(state2, absmax2, qmap2) if optimizer in TWO_STATE else None
    return s1, s1b, s2


def optimizer_update_8bit_blockwise(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1,
                                    qmap2, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                                    dampening, nesterov, step, gnorm_scale, update_scale,
                                    *, keep_positive: bool = True):
    """8-bit blockwise update of ``p`` and its quantized state, in place.

    Shapes: ``p``/``g`` any shape, n elements (fp32/fp16/bf16, same dtype); ``state1`` uint8
    codes with n elements (AdEMAMix: 2n, shape ``(2, *p.shape)``, m1 then m2); ``absmax1``
    float32 with ceil(n/256) values (AdEMAMix: ``(2, blocks)``); ``state2``/``absmax2`` the
    same for 2-state optimizers (else None); ``qmap1`` the signed dynamic map, ``qmap2`` the
    unsigned one (256 float32 values each).

    Per block of 256 elements of the flattened tensor: dequantize (code value * absmax),
    apply ``optimizer_rule`` in float32, take the block's new absmax, requantize with exact
    nearest rounding (ties to the larger value).

    Second-moment policy ("No blow-ups", docs/optimizers.md): state2 of adam/adamw/lamb/ademamix and
    state1 of rmsprop/adagrad are requantized with keep_positive: a positive value whose
    nearest code is the map's zero is stored as the smallest positive code instead. The
    stored v is then at most one code step too large, so the element's next steps are at
    most slightly smaller than fp32 Adam's, whereas a v rounded to 0 under a non-zero m
    makes the next zero-gradient step m/eps (a jump of up to lr*1e4 with eps=1e-8).
    ``keep_positive=False`` (reference only, for tests) turns the policy off to show that
    blow-up.

    Example::

        >>> import torch, bnbfuse
        >>> from bnbfuse.functional import dynamic_map
        >>> p, g = torch.randn(1000), torch.randn(1000)
        >>> s1 = torch.zeros(1000, dtype=torch.uint8); s2 = torch.zeros_like(s1)
        >>> a1, a2 = torch.zeros(4), torch.zeros(4)
        >>> torch.ops.bnbfuse.optimizer_update_8bit_blockwise(
        ...     "adamw", p, g, s1, s2, a1, a2, dynamic_map(True, p.device),
        ...     dynamic_map(False, p.device), 1e-3, 0.9, 0.999, 0.0, 0.0, 1e-8, 1e-2, 0.0,
        ...     False, 1, 1.0, 1.0)
    """
    _check_optimizer_args(optimizer, p, g, state1, state2, True)
    n = p.numel()
    _check_absmax(optimizer, n, absmax1, absmax2, qmap1, qmap2)
    sc = optimizer_scalars(optimizer, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                           dampening, nesterov, step, gnorm_scale, update_scale)
    s1, s1b, s2 = _states_8(optimizer, n, state1, state2, absmax1, absmax2, qmap1, qmap2)
    np_, ns1, ns1b, ns2, _, _ = _run_rule(optimizer, _flat32(p), _flat32(g), s1, s1b, s2, sc)
    p.copy_(np_.view(p.shape))
    kp1 = keep_positive and keeps_positive(optimizer, 1)
    c1, a1 = quantize_state(ns1, qmap1, kp1)
    if ns1b is not None:
        c1b, a1b = quantize_state(ns1b, qmap1, kp1)
        c1, a1 = torch.cat([c1, c1b]), torch.cat([a1, a1b])
    state1.copy_(c1.view(state1.shape))
    absmax1.copy_(a1.view(absmax1.shape))
    if ns2 is not None:
        c2, a2 = quantize_state(ns2, qmap2, keep_positive)
        state2.copy_(c2.view(state2.shape))
        absmax2.copy_(a2.view(absmax2.shape))


def optimizer_norms_8bit_blockwise(optimizer, p, g, state1, state2, absmax1, absmax2, qmap1,
                                   qmap2, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                                   dampening, nesterov, step, gnorm_scale):
    """As ``optimizer_norms_32bit``, with the state dequantized from its 8-bit blocks."""
    _check_optimizer_args(optimizer, p, g, state1, state2, True)
    n = p.numel()
    _check_absmax(optimizer, n, absmax1, absmax2, qmap1, qmap2)
    sc = optimizer_scalars(optimizer, lr, beta1, beta2, beta3, alpha, eps, weight_decay,
                           dampening, nesterov, step, gnorm_scale)
    s1, s1b, s2 = _states_8(optimizer, n, state1, state2, absmax1, absmax2, qmap1, qmap2)
    p32 = _flat32(p)
    *_, d, ok = _run_rule(optimizer, p32, _flat32(g), s1, s1b, s2, sc)
    return _norms(d, p32, ok)


for _name in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit",
              "optimizer_norms_8bit_blockwise", "optimizer_norms_32bit"):
    torch.library.impl(f"bnbfuse::{_name}", "CompositeExplicitAutograd")(globals()[_name])


# ---- quantized embedding lookup ------------------------------------------------------------


def check_lookup_args(ids, base, absmax, qmap, fusion, bits, blocksize):
    """Shape/dtype checks shared by every backend of fusion_embedding_lookup; returns (V, F, D)."""
    if ids.dtype != torch.int64:
        raise TypeError(f"fusion_embedding_lookup: ids must be int64, got {ids.dtype}")
    if bits not in (0, 4, 8):
        raise ValueError(f"fusion_embedding_lookup: bits must be 0, 4 or 8, got {bits}")
    if fusion.dim() != 2 or base.dim() != 2:
        raise ValueError("fusion_embedding_lookup: base and fusion tables must be 2-D")
    V, (F, D) = base.shape[0], fusion.shape
    if fusion.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fusion_embedding_lookup: tables must be float32/float16/bfloat16, "
                        f"got {fusion.dtype}")
    if bits == 0:
        if base.dtype != fusion.dtype or base.shape[1] != D:
            raise ValueError(f"fusion_embedding_lookup: base {tuple(base.shape)} {base.dtype} does "
                             f"not match fusion {tuple(fusion.shape)} {fusion.dtype}")
    else:
        if base.dtype != torch.uint8:
            raise TypeError(f"fusion_embedding_lookup: quantized base must be uint8, got {base.dtype}")
        cols = D if bits == 8 else (D + 1) // 2
        nblk = -(D // -blocksize) if blocksize > 0 else -1
        if blocksize < 1 or base.shape[1] != cols:
            raise ValueError(f"fusion_embedding_lookup: {bits}-bit base of {D} columns must have "
                             f"{cols} code columns and blocksize >= 1, got {tuple(base.shape)}, "
                             f"blocksize {blocksize}")
        if tuple(absmax.shape) != (V, nblk) or absmax.dtype != torch.float32:
            raise ValueError(f"fusion_embedding_lookup: absmax must be float32 {(V, nblk)}, got "
                             f"{absmax.dtype} {tuple(absmax.shape)}")
        if qmap.numel() != (256 if bits == 8 else 16) or qmap.dtype != torch.float32:
            raise ValueError(f"fusion_embedding_lookup: qmap must hold {256 if bits == 8 else 16} "
                             f"float32 values, got {qmap.numel()} {qmap.dtype}")
    return V, F, D


def check_ids_in_range(flat: torch.Tensor, total: int) -> None:
    """IndexError naming the first id outside [0, total) (synchronizes: reference/CPU only)."""
    if flat.numel() == 0:
        return
    bad = (flat < 0) | (flat >= total)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(f"token id {int(flat[pos])} at flat position {pos} is out of range "
                         f"[0, {total}) (vocab_size + fusion_vocab_size)")


def fusion_embedding_lookup(ids, base, absmax, qmap, fusion, bits, blocksize):
    V, F, D = check_lookup_args(ids, base, absmax, qmap, fusion, bits, blocksize)
    flat = ids.reshape(-1)
    check_ids_in_range(flat, V + F)
    is_new = flat >= V
    # Both gathers read a valid row for every token; torch.where then picks one (no
    # data-dependent shapes, so this also runs without a host sync on any device).
    base_rows = base[torch.where(is_new, 0, flat)] if V else None
    if bits == 0:
        rows = base_rows
    elif V:
        if bits == 8:
            idx = base_rows.long()
        else:
            idx = torch.stack([(base_rows >> 4).long(), (base_rows & 15).long()], -1).flatten(-2)[:, :D]
        scale = absmax[torch.where(is_new, 0, flat)].repeat_interleave(
            _one_block_at_most(D, blocksize), dim=1)[:, :D]
        rows = (qmap.to(torch.float32)[idx] * scale).to(fusion.dtype)
    if F == 0:
        out = rows
    else:
        new_rows = fusion[torch.where(is_new, flat - V, 0)]
        out = new_rows if V == 0 else torch.where(is_new[:, None], new_rows, rows)
    return out.reshape(*ids.shape, D).clone()


torch.library.impl("bnbfuse::fusion_embedding_lookup", "CompositeExplicitAutograd")(
    fusion_embedding_lookup)
