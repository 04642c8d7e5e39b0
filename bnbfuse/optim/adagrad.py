"""Adagrad (``torch.optim.Adagrad`` semantics) with an 8- or 32-bit sum of squares.

    clr = lr / (1 + (t - 1) * lr_decay)
    g += wd * p
    s += g²                      (s starts at initial_accumulator_value)
    p -= clr * g / (sqrt(s) + eps)
"""
from __future__ import annotations

import torch

from .compat import require_bits
from .optimizer import Optimizer1State

__all__ = ["Adagrad", "Adagrad8bit", "Adagrad32bit"]


class Adagrad(Optimizer1State):
    """Adagrad with an 8- or 32-bit accumulator (bitsandbytes 0.50 signature; ``lr_decay`` and
    ``initial_accumulator_value`` work, as in ``torch.optim.Adagrad``).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        lr_decay: learning-rate decay per step.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: starting value of the sum of squares.
        eps: added to the denominator.
        optim_bits: 8 or 32.
        args: bitsandbytes' argument object (optional).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        max_unorm, percentile_clipping: keyword-only extras, see :class:`bnbfuse.optim.Adam`.

    State: ``state1`` (the sum of squared gradients) of the parameter's shape.

    Example:
        >>> import torch, bnbfuse as bnb
        >>> w = torch.nn.Parameter(torch.randn(64, 128))
        >>> opt = bnb.optim.Adagrad8bit([w], lr=1e-2)
        >>> w.grad = torch.randn_like(w); opt.step()
        >>> opt.state[w]["state1"].shape
        torch.Size([64, 128])
    """

    optimizer_name = "adagrad"
    _torch_counterpart = (torch.optim.Adagrad, ("sum",))
    _bnb_fixed = {"lr_decay": 0.0, "initial_accumulator_value": 0.0}

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, optim_bits=32, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps),
                         optim_bits, args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)

    def _validate_hparams(self, group):
        name = type(self).__name__
        if float(group["lr_decay"]) < 0:
            raise ValueError(f"{name}: invalid lr_decay value {group['lr_decay']!r}")
        if float(group["initial_accumulator_value"]) < 0:
            raise ValueError(f"{name}: invalid initial_accumulator_value "
                             f"{group['initial_accumulator_value']!r}")

    def _init_state1(self, p, cfg):
        value = float(cfg["initial_accumulator_value"])
        return value if value != 0 else None

    def _kernel_hparams(self, cfg, step):
        return dict(lr=cfg["lr"] / (1 + (step - 1) * cfg["lr_decay"]), eps=cfg["eps"],
                    weight_decay=cfg["weight_decay"])

    def _torch_group(self, group):
        return dict(lr=group["lr"], lr_decay=group["lr_decay"],
                    weight_decay=group["weight_decay"],
                    initial_accumulator_value=group["initial_accumulator_value"],
                    eps=group["eps"])

    def _from_torch_group(self, tg):
        return dict(lr=tg["lr"], lr_decay=tg["lr_decay"], weight_decay=tg["weight_decay"],
                    initial_accumulator_value=tg["initial_accumulator_value"], eps=tg["eps"])


class Adagrad8bit(Adagrad):
    """:class:`Adagrad` with 8-bit state (``optim_bits`` must stay 8, as in bitsandbytes)."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, optim_bits=8, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        require_bits(type(self).__name__, optim_bits, (8,), 8)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, 8,
                         args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)


class Adagrad32bit(Adagrad):
    """:class:`Adagrad` with 32-bit state (``optim_bits`` must stay 32)."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, optim_bits=32, args=None, min_8bit_size=4096, *, max_unorm=0.0,
                 percentile_clipping=100):
        require_bits(type(self).__name__, optim_bits, (32,), 32)
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, 32,
                         args, min_8bit_size, max_unorm=max_unorm,
                         percentile_clipping=percentile_clipping)
