"""AdEMAMix (Pagliardini et al. 2024, *The AdEMAMix Optimizer*), 8- or 32-bit state.

Two first moments, a fast one (beta1) and a slow one (beta3), mixed by alpha:

    m1 = b1 m1 + (1 - b1) g;   m2 = b3 m2 + (1 - b3) g;   v = b2 v + (1 - b2) g²
    p *= 1 - lr * wd
    p -= lr * (m1 / (1 - b1^t) + alpha * m2) / (sqrt(v / (1 - b2^t)) + eps)

With ``t_alpha`` / ``t_beta3`` set, alpha and beta3 warm up over that many steps (the paper's
schedulers, as bitsandbytes computes them). ``state1`` stacks m1 and m2: shape (2, *p.shape)
(8-bit: ``absmax1`` of shape (2, blocks)).
"""
from __future__ import annotations

import math

from .optimizer import Optimizer2State

__all__ = ["AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit"]


def scheduled_alpha(alpha: float, t_alpha, step: int) -> float:
    """Linear warm-up of alpha over t_alpha steps."""
    return min(step * alpha / t_alpha, alpha) if t_alpha else alpha


def scheduled_beta3(beta1: float, beta3: float, t_beta3, step: int) -> float:
    """beta3 warm-up: the half-life grows linearly from beta1's to beta3's over t_beta3 steps."""
    if not t_beta3:
        return beta3
    ln1, ln3 = math.log(beta1), math.log(beta3)
    frac = step / t_beta3
    return min(math.exp(ln1 * ln3 / ((1 - frac) * ln3 + frac * ln1)), beta3)


class AdEMAMix(Optimizer2State):
    """AdEMAMix with 8- or 32-bit state (bitsandbytes 0.50 signature).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: (beta1, beta2, beta3): fast moment, second moment, slow moment.
        alpha: weight of the slow moment.
        t_alpha: warm-up steps of alpha (None: none).
        t_beta3: warm-up steps of beta3 (None: none).
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
        optim_bits: 8 or 32.
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        is_paged: paged state on CUDA (see :mod:`bnbfuse.optim.paged`); a no-op on the CPU.
        max_unorm, percentile_clipping: keyword-only extras, see :class:`bnbfuse.optim.Adam`.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.AdEMAMix8bit([w], lr=1e-3, t_alpha=1000, t_beta3=1000)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> opt.state[w]["state1"].shape, opt.state[w]["absmax1"].shape
        (torch.Size([2, 64, 128]), torch.Size([2, 32]))
    """

    optimizer_name = "ademamix"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2, optim_bits=32, min_8bit_size=4096,
                 is_paged=False, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), alpha=alpha, t_alpha=t_alpha,
                                      t_beta3=t_beta3, eps=eps, weight_decay=weight_decay),
                         optim_bits, None, min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        name = type(self).__name__
        self._check_betas(group, "beta1, beta2, beta3")
        if float(group["alpha"]) < 0:
            raise ValueError(f"{name}: invalid alpha value {group['alpha']!r}")
        for key in ("t_alpha", "t_beta3"):
            t = group[key]
            if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
                raise ValueError(f"{name}: {key} must be None or an int >= 1, got {t!r}")
        if group["t_beta3"] and not (group["betas"][0] > 0 and group["betas"][2] > 0):
            raise ValueError(f"{name}: t_beta3 needs beta1 > 0 and beta3 > 0")

    def _kernel_hparams(self, cfg, step):
        beta1, beta2, beta3 = cfg["betas"]
        return dict(lr=cfg["lr"], beta1=beta1, beta2=beta2,
                    beta3=scheduled_beta3(beta1, beta3, cfg["t_beta3"], step),
                    alpha=scheduled_alpha(cfg["alpha"], cfg["t_alpha"], step), eps=cfg["eps"],
                    weight_decay=cfg["weight_decay"])


class AdEMAMix8bit(AdEMAMix):
    """:class:`AdEMAMix` with 8-bit state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay, 8,
                         min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class AdEMAMix32bit(AdEMAMix):
    """:class:`AdEMAMix` with 32-bit state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2, min_8bit_size=4096, is_paged=False,
                 *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay, 32,
                         min_8bit_size, is_paged, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)
