"""Shared cases and helpers of the optimizer-op tests (tests/ops/test_optimizer_*.py)."""

import pytest
import torch

import bnbfuse  # noqa: F401  (registers the ops)
from bnbfuse.ops.rules import RULES
from bnbfuse import _native
from bnbfuse.backends import reference as R
from bnbfuse.functional import dynamic_map

ops = torch.ops.bnbfuse
native = pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")

SIZES = [0, 1, 255, 256, 257, 4097, (3, 5, 7), (17, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.uint8: torch.uint8, torch.float64: torch.int64}

# lr, beta1, beta2, beta3, alpha, eps, weight_decay, dampening, nesterov, (step), gnorm_scale
def hparams(step, nesterov=True, gnorm_scale=0.7):
    return (1e-2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.1, 0.1, nesterov, step, gnorm_scale)


def maps(device="cpu"):
    return dynamic_map(True, torch.device(device)), dynamic_map(False, torch.device(device))


def bits_equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(INT_VIEW[a.dtype]), b.contiguous().view(INT_VIEW[b.dtype]))


def numel_of(size):
    return size if isinstance(size, int) else int(torch.Size(size).numel())


def make_state(opt, size, eight_bit, device="cpu", seed=0):
    """Random non-trivial state (second moments positive) as a class would hold it."""
    gen = torch.Generator().manual_seed(seed)
    shape = (size,) if isinstance(size, int) else tuple(size)
    n = numel_of(size)
    two = RULES[opt].states == 2
    shape1 = (2, *shape) if opt == "ademamix" else shape
    s1 = torch.randn(shape1, generator=gen) * 0.1
    if opt in ("rmsprop", "adagrad"):
        s1 = s1.abs()
    s2 = (torch.rand(shape, generator=gen) * 0.01) if two else None
    if not eight_bit:
        return [t if t is None else t.to(device) for t in (s1, s2)]
    q1, q2 = maps()
    kp1 = RULES[opt].keep_positive[0]
    flat = s1.reshape(-1)
    if opt == "ademamix":
        (c1a, a1a), (c1b, a1b) = R.quantize_state(flat[:n], q1, kp1), R.quantize_state(flat[n:], q1, kp1)
        c1, a1 = torch.cat([c1a, c1b]), torch.stack([a1a, a1b])
    else:
        c1, a1 = R.quantize_state(flat, q1, kp1)
    c1 = c1.view(shape1)
    c2 = a2 = None
    if two:
        c2, a2 = R.quantize_state(s2.reshape(-1), q2, True)
        c2 = c2.view(shape)
    return [t if t is None else t.to(device) for t in (c1, c2, a1, a2)]


def clone_all(ts):
    return [t if t is None else t.clone() for t in ts]


def grads(size, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (size,) if isinstance(size, int) else tuple(size)
    g = torch.randn(shape, generator=gen)
    flat = g.view(-1)
    if flat.numel() > 3:  # non-finite elements: NaN, +inf, -inf
        flat[1], flat[flat.numel() // 2], flat[-1] = float("nan"), float("inf"), float("-inf")
    return g.to(dtype).to(device)


def run_update(fn, opt, p, g, state, eight_bit, step, nesterov=True, update_scale=0.9):
    q1, q2 = maps(p.device)
    two = RULES[opt].states == 2
    if eight_bit:
        c1, c2, a1, a2 = state
        fn(opt, p, g, c1, c2, a1, a2, q1, q2 if two else None, *hparams(step, nesterov),
           update_scale)
    else:
        s1, s2 = state
        fn(opt, p, g, s1, s2, *hparams(step, nesterov), update_scale)

