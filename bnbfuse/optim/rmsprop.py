"""RMSprop (``torch.optim.RMSprop`` without momentum or centering), 8- or 32-bit state.

    g += wd * p
    s = alpha * s + (1 - alpha) g²
    p -= lr * g / (sqrt(s) + eps)
"""
from __future__ import annotations

import torch

from .optimizer import Optimizer1State

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit"]


class RMSprop(Optimizer1State):
    """RMSprop with an 8- or 32-bit square average (bitsandbytes 0.50 signature).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        alpha: smoothing constant of the square average (0 < alpha < 1).
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient.
        momentum: not supported (nonzero raises NotImplementedError).
        centered: not supported (True raises NotImplementedError).
        optim_bits: 8 or 32.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        max_unorm, percentile_clipping: keyword-only extras, see :class:`bnbfuse.optim.Adam`.

    State: ``state1`` (the square average) of the parameter's shape.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.RMSprop8bit([w], lr=1e-3)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> opt.state[w]["step"]
        1
    """

    optimizer_name = "rmsprop"
    _torch_counterpart = (torch.optim.RMSprop, ("square_avg",))
    _bnb_betas = ("alpha",)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, optim_bits=32, args=None, min_8bit_size=4096, *,
                 max_unorm=0.0, percentile_clipping=100):
        if alpha == 0:
            raise NotImplementedError(f"{type(self).__name__} with alpha == 0 is not supported")
        if momentum != 0:
            raise NotImplementedError(f"{type(self).__name__} with momentum is not supported; "
                                      "use torch.optim.RMSprop")
        if centered:
            raise NotImplementedError(f"{type(self).__name__}: centered RMSprop is not "
                                      "supported; use torch.optim.RMSprop")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay),
                         optim_bits, args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        name = type(self).__name__
        if not 0 < float(group["alpha"]) < 1:
            raise ValueError(f"{name}: invalid alpha value {group['alpha']!r} (0 < alpha < 1)")
        if group.get("momentum", 0) != 0 or group.get("centered", False):
            raise NotImplementedError(f"{name}: momentum and centered are not supported")

    def _kernel_hparams(self, cfg, step):
        return dict(lr=cfg["lr"], beta1=cfg["alpha"], eps=cfg["eps"],
                    weight_decay=cfg["weight_decay"])

    def _torch_group(self, group):
        return dict(lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                    weight_decay=group["weight_decay"])

    def _from_torch_group(self, tg):
        name = type(self).__name__
        if tg.get("momentum", 0) != 0 or tg.get("centered", False):
            raise ValueError(f"{name}.load_torch_state_dict: momentum and centered are not "
                             "supported")
        return dict(lr=tg["lr"], alpha=tg["alpha"], eps=tg["eps"],
                    weight_decay=tg["weight_decay"])


class RMSprop8bit(RMSprop):
    """:class:`RMSprop` with 8-bit state."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, 8, args,
                         min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class RMSprop32bit(RMSprop):
    """:class:`RMSprop` with 32-bit state."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, 32, args,
                         min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)
