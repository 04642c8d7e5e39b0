"""LARS (You et al. 2017, *Large Batch Training of Convolutional Networks*), 8- or 32-bit
momentum. Per parameter tensor, with the layer-wise trust ratio

    d = g + wd * p
    ratio = max_unorm * ||p|| / ||d||   (1 when either norm is 0 or max_unorm is 0)
    buf = momentum * buf + ratio * d
    p -= lr * buf

``max_unorm`` (bitsandbytes' name, default 0.02) is the trust coefficient eta. The norms come
from a read-only pass of the kernel before the update.
"""
from __future__ import annotations

from .optimizer import Optimizer1State

__all__ = ["LARS", "LARS8bit", "LARS32bit"]


class LARS(Optimizer1State):
    """LARS with an 8- or 32-bit momentum buffer and a real layer-wise trust ratio
    (bitsandbytes 0.50 signature).

    Args:
        params: parameters or param groups.
        lr: learning rate (required).
        momentum: momentum factor (must be > 0).
        dampening: not supported (nonzero raises).
        weight_decay: added to the gradient before the trust ratio.
        nesterov: not supported (True raises).
        optim_bits: 8 or 32.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        max_unorm: the trust coefficient eta (0 turns the trust ratio off).
        percentile_clipping: keyword-only, see :class:`bnbfuse.optim.Adam`.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.LARS8bit([w], lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> opt.state[w]["state1"].dtype
        torch.uint8
    """

    optimizer_name = "lars"
    _bnb_betas = ("momentum", "dampening")
    _bnb_fixed = {"nesterov": False}

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 optim_bits=32, args=None, min_8bit_size=4096, max_unorm=0.02, *,
                 percentile_clipping=100):
        if momentum == 0:
            raise NotImplementedError(f"{type(self).__name__} without momentum is not supported")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov),
                         optim_bits, args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        name = type(self).__name__
        if not 0 < float(group["momentum"]) <= 1:
            raise ValueError(f"{name}: invalid momentum value {group['momentum']!r}")
        if group["dampening"] != 0:
            raise ValueError(f"{name}: dampening is not supported (got {group['dampening']!r})")
        if group["nesterov"]:
            raise ValueError(f"{name}: nesterov=True is not supported")

    def _kernel_hparams(self, cfg, step):
        return dict(lr=cfg["lr"], beta1=cfg["momentum"], weight_decay=cfg["weight_decay"])

    def _update_scale(self, cfg, unorm, pnorm):
        # the trust ratio (max_unorm is the trust coefficient); _needs_norms keeps it > 0
        if unorm > 0 and pnorm > 0:
            return cfg["max_unorm"] * pnorm / unorm
        return 1.0


class LARS8bit(LARS):
    """:class:`LARS` with an 8-bit momentum buffer."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 args=None, min_8bit_size=4096, max_unorm=0.02, *, percentile_clipping=100):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 8, args,
                         min_8bit_size, max_unorm, percentile_clipping=percentile_clipping)


class LARS32bit(LARS):
    """:class:`LARS` with a 32-bit momentum buffer."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 args=None, min_8bit_size=4096, max_unorm=0.02, *, percentile_clipping=100):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 32, args,
                         min_8bit_size, max_unorm, percentile_clipping=percentile_clipping)
