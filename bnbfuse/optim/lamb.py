"""LAMB (You et al. 2020, *Large Batch Optimization for Deep Learning*), 8- or 32-bit state.

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g²
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p
    ratio = ||p|| / ||u||  (1 when either is 0), clamped to at most max_unorm when max_unorm > 0
    p -= lr * ratio * u

With the default ``max_unorm=1.0`` the ratio is min(1, ||p||/||u||), which is what
bitsandbytes' 32-bit LAMB computes; ``max_unorm=0`` gives the paper's unclamped ratio.
"""
from __future__ import annotations

from .optimizer import Optimizer2State

__all__ = ["LAMB", "LAMB8bit", "LAMB32bit"]


class LAMB(Optimizer2State):
    """LAMB with 8- or 32-bit state and a real trust ratio (bitsandbytes 0.50 signature).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        bias_correction: must be True (False raises NotImplementedError).
        betas: (beta1, beta2).
        eps: added to the denominator.
        weight_decay: decoupled decay, part of the update whose norm sets the trust ratio.
        amsgrad: not supported (True raises).
        adam_w_mode: must be True (False raises NotImplementedError).
        optim_bits: 8 or 32.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        max_unorm: upper bound of the trust ratio (0 = unbounded).
        percentile_clipping: keyword-only, see :class:`bnbfuse.optim.Adam`.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.LAMB8bit([w], lr=1e-3, weight_decay=0.01)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> opt.state[w]["state2"].dtype
        torch.uint8
    """

    optimizer_name = "lamb"

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0, amsgrad=False, adam_w_mode=True, optim_bits=32, args=None,
                 min_8bit_size=4096, max_unorm=1.0, *, percentile_clipping=100):
        name = type(self).__name__
        if not bias_correction:
            raise NotImplementedError(f"{name}: bias_correction=False is not supported")
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True")
        if not adam_w_mode:
            raise NotImplementedError(f"{name}: adam_w_mode=False (L2 in the gradient) is not "
                                      "supported")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay),
                         optim_bits, args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        self._check_betas(group)

    def _kernel_hparams(self, cfg, step):
        beta1, beta2 = cfg["betas"]
        return dict(lr=cfg["lr"], beta1=beta1, beta2=beta2, eps=cfg["eps"],
                    weight_decay=cfg["weight_decay"])

    def _needs_norms(self, cfg):
        return True

    def _update_scale(self, cfg, unorm, pnorm):
        ratio = pnorm / unorm if unorm > 0 and pnorm > 0 else 1.0
        if cfg["max_unorm"] > 0:
            ratio = min(ratio, cfg["max_unorm"])
        return ratio


class LAMB8bit(LAMB):
    """:class:`LAMB` with 8-bit state."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0, amsgrad=False, adam_w_mode=True, args=None, min_8bit_size=4096,
                 max_unorm=1.0, *, percentile_clipping=100):
        super().__init__(params, lr, bias_correction, betas, eps, weight_decay, amsgrad,
                         adam_w_mode, 8, args, min_8bit_size, max_unorm,
                         percentile_clipping=percentile_clipping)


class LAMB32bit(LAMB):
    """:class:`LAMB` with 32-bit state."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0, amsgrad=False, adam_w_mode=True, args=None, min_8bit_size=4096,
                 max_unorm=1.0, *, percentile_clipping=100):
        super().__init__(params, lr, bias_correction, betas, eps, weight_decay, amsgrad,
                         adam_w_mode, 32, args, min_8bit_size, max_unorm,
                         percentile_clipping=percentile_clipping)
