"""SGD with momentum (``torch.optim.SGD`` semantics) and an 8- or 32-bit momentum buffer.

    d = g + wd * p
    buf = d                                   (first step)
    buf = momentum * buf + (1 - dampening) d  (later steps)
    p -= lr * (d + momentum * buf if nesterov else buf)

Plain SGD (momentum=0) has no state to quantize: use ``torch.optim.SGD``.
"""
from __future__ import annotations

import torch

from .optimizer import Optimizer1State

__all__ = ["SGD", "SGD8bit", "SGD32bit"]


class SGD(Optimizer1State):
    """SGD with momentum and an 8- or 32-bit momentum buffer (bitsandbytes 0.50 signature).

    Args:
        params: parameters or param groups.
        lr: learning rate (required).
        momentum: momentum factor (must be > 0).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        optim_bits: 8 or 32.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        max_unorm, percentile_clipping: keyword-only extras, see :class:`bnbfuse.optim.Adam`.

    State: ``state1`` (the momentum buffer) of the parameter's shape.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.SGD8bit([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> opt.state[w]["state1"].dtype
        torch.uint8
    """

    optimizer_name = "sgd"
    _torch_counterpart = (torch.optim.SGD, ("momentum_buffer",))
    _bnb_betas = ("momentum", "dampening")
    _bnb_fixed = {"nesterov": False}

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 optim_bits=32, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        if momentum == 0:
            raise NotImplementedError(f"{type(self).__name__} without momentum is not "
                                      "supported (no state to keep); use torch.optim.SGD")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov),
                         optim_bits, args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        name = type(self).__name__
        if not 0 < float(group["momentum"]) < 1 + 1e-12:
            raise ValueError(f"{name}: invalid momentum value {group['momentum']!r} "
                             "(must be in (0, 1])")
        if not 0 <= float(group["dampening"]) <= 1:
            raise ValueError(f"{name}: invalid dampening value {group['dampening']!r}")
        if group["nesterov"] and group["dampening"] != 0:
            raise ValueError(f"{name}: Nesterov momentum requires zero dampening")

    def _kernel_hparams(self, cfg, step):
        return dict(lr=cfg["lr"], beta1=cfg["momentum"], dampening=cfg["dampening"],
                    nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])

    def _torch_group(self, group):
        return dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], nesterov=group["nesterov"])

    def _from_torch_group(self, tg):
        return dict(lr=tg["lr"], momentum=tg["momentum"], dampening=tg["dampening"],
                    weight_decay=tg["weight_decay"], nesterov=tg["nesterov"])


class SGD8bit(SGD):
    """:class:`SGD` with an 8-bit momentum buffer."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 args=None, min_8bit_size=4096, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 8, args,
                         min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class SGD32bit(SGD):
    """:class:`SGD` with a 32-bit momentum buffer."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 args=None, min_8bit_size=4096, *, max_unorm=0.0, percentile_clipping=100):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 32, args,
                         min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)
