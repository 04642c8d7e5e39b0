"""Plain fp32 torch references for the optimizers torch.optim does not have (tests only).

Written from the papers, independently of bnbfuse's kernels: Lion, LAMB (trust ratio
||p||/||u||, bounded by max_unorm when > 0), LARS (bitsandbytes' form: momentum buffer, the
step clipped to max_unorm ||p||) and
AdEMAMix (with the alpha / beta3 schedulers).
"""
from __future__ import annotations

import math

import torch


class RefLion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                m = st["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class RefLAMB(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 max_unorm=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_unorm=max_unorm))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])
                u = u + group["weight_decay"] * p
                pn, un = p.norm().item(), u.norm().item()
                ratio = pn / un if pn > 0 and un > 0 else 1.0
                if group["max_unorm"] > 0:
                    ratio = min(ratio, group["max_unorm"])
                p.add_(u, alpha=-group["lr"] * ratio)


class RefLARS(torch.optim.Optimizer):
    """bitsandbytes' LARS: buf = momentum buf + (g + wd p); step clipped to max_unorm ||p||."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, max_unorm=0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      max_unorm=max_unorm))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                buf = st["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad + group["weight_decay"] * p)
                limit = group["max_unorm"] * p.norm().item()
                bn = buf.norm().item()
                scale = limit / bn if group["max_unorm"] > 0 and bn > limit else 1.0
                p.add_(buf, alpha=-group["lr"] * scale)


class RefAdEMAMix(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha,
                                      t_beta3=t_beta3, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2, b3_final = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, m1_m2=p.new_zeros((2, *p.shape)), nu=torch.zeros_like(p))
                st["step"] += 1
                t = st["step"]
                alpha = group["alpha"]
                if group["t_alpha"]:
                    alpha = min(t * alpha / group["t_alpha"], alpha)
                b3 = b3_final
                if group["t_beta3"]:
                    # half-life interpolates linearly between beta1's and beta3's
                    frac = t / group["t_beta3"]
                    l1, l3 = math.log(b1), math.log(b3_final)
                    b3 = min(math.exp(l1 * l3 / ((1 - frac) * l3 + frac * l1)), b3_final)
                m1, m2, nu = st["m1_m2"][0], st["m1_m2"][1], st["nu"]
                m1.mul_(b1).add_(p.grad, alpha=1 - b1)
                m2.mul_(b3).add_(p.grad, alpha=1 - b3)
                nu.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (nu / (1 - b2 ** t)).sqrt() + group["eps"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(group["lr"] * (m1 / (1 - b1 ** t) + alpha * m2) / denom)
