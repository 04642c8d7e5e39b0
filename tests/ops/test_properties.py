"""Property-based tests (hypothesis) of the quantization and optimizer kernels.

Random sizes (0, 1 and tiny ones included), blocksizes, dtypes and values (NaN, +-Inf,
subnormals, huge and tiny magnitudes): the native CPU kernels equal the pure-PyTorch
reference bit for bit wherever the example-based tests expect that (test_backends.py,
test_optimizer_native.py), and dequantize(quantize(x)) stays within the map's bound.

Sized for CI (under a minute on 2 cores): the ``bnbfuse-ci`` profile runs a fixed set of
examples. ``BNBFUSE_HYPOTHESIS_PROFILE=thorough`` runs many more, randomly.
"""
from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bnbfuse.functional as F  # noqa: E402
from bnbfuse.backends import reference as R  # noqa: E402
from bnbfuse.ops.rules import RULES  # noqa: E402
from _nearest import same_bits  # noqa: E402
from optimizer_cases import bits_equal, make_state, native  # noqa: E402

# no example database and no explain phase: nothing is written into the checkout
_COMMON = dict(deadline=None, database=None, print_blob=True,
               phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
               suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("bnbfuse-ci", max_examples=50, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("BNBFUSE_HYPOTHESIS_PROFILE", "bnbfuse-ci"))

ops = torch.ops.bnbfuse
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-40, 1.2e-38,
            3e38, -3e38, 65504.0, 1e-8]


@st.composite
def tensors(draw, max_size=3000, specials=SPECIALS, dtypes=DTYPES):
    """A float tensor: random normal values at a random scale, some set to special values."""
    n = draw(st.one_of(st.integers(0, 3), st.integers(0, max_size)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e-30, 1e-42, 1e20, 1e37]))
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    x = x.float()
    if n and specials:
        for i, v in draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(specials)),
                                  max_size=8)):
            x[i] = v
    return x.to(dtype)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, but any NaN equals any NaN: NaN payloads are not part of the contract
    (a NaN block's bfloat16 output is 0x7FC0 natively, 0xFFFF from the reference)."""
    nan_a, nan_b = a.isnan(), b.isnan()
    return bool(torch.equal(nan_a, nan_b)) and same_bits(torch.where(nan_a, 0, a),
                                                        torch.where(nan_b, 0, b))


BLOCKSIZES = st.one_of(st.sampled_from([1, 2, 7, 64, 256, 1000, 4096]), st.integers(1, 5000))
SIGNED = st.booleans()


# ---- quantize / dequantize --------------------------------------------------------------
@native
@PROFILE
@given(x=tensors(), blocksize=BLOCKSIZES, signed=SIGNED,
       out_dtype=st.sampled_from(DTYPES))
def test_quantize_native_equals_reference(x, blocksize, signed, out_dtype):
    code = F.dynamic_map(signed)
    codes, absmax = ops.quantize_blockwise(x, code, blocksize)
    ref_codes, ref_absmax = R.quantize_blockwise(x, code, blocksize)
    assert same_bits(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ"
    y = ops.dequantize_blockwise(codes, absmax, code, blocksize, out_dtype)
    ref_y = R.dequantize_blockwise(codes, absmax, code, blocksize, out_dtype)
    assert y.dtype == out_dtype and same_values(y, ref_y)


def _map_bound(code: torch.Tensor) -> float:
    """The largest |x/absmax - map value| of a nearest rounding of x/absmax in [-1, 1]."""
    q = code.double().sort().values
    return max(float((q[1:] - q[:-1]).max()) / 2, float(q[0] + 1), float(1 - q[-1]))


@PROFILE
@given(x=tensors(specials=[0.0, -0.0, 1e-45, -1e-40, 1.2e-38, 3e38, -3e38]),
       blocksize=BLOCKSIZES, signed=SIGNED)
def test_dequantize_quantize_is_within_the_map_bound(x, blocksize, signed):
    # absmax is each block's largest |x|; every element comes back within absmax * (half
    # the widest gap of the map, or the distance from an end of the map to +-1), plus the
    # float32 rounding of the product. The unsigned map takes non-negative values.
    x = torch.where(torch.isfinite(x), x, 0)  # float16 turns the huge values into inf
    x = x if signed else x.abs()
    code = F.dynamic_map(signed)
    codes, qs = F.quantize_blockwise(x, code=code, blocksize=blocksize)
    y = ops.dequantize_blockwise(codes, qs.absmax, code, qs.blocksize, torch.float32)
    xf = x.double().reshape(-1)
    n, bs = xf.numel(), min(qs.blocksize, max(xf.numel(), 1))
    blocks = torch.nn.functional.pad(xf.abs(), (0, -n % bs)).view(-1, bs)
    assert same_bits(qs.absmax, blocks.amax(1).float())
    amax = qs.absmax.double().repeat_interleave(bs)[:n]
    bound = amax * _map_bound(code) * (1 + 2**-20) + y.double().abs() * 2**-24 + 2**-148
    err = (xf - y.double().reshape(-1)).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


# ---- optimizer kernels -------------------------------------------------------------------
GRAD_SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, 1e-40, 1e10,
                 -1e12]


@native
@PROFILE
@given(opt=st.sampled_from(sorted(RULES)), eight_bit=st.booleans(),
       p=tensors(max_size=1200, specials=[0.0, -0.0, 1e-45, 1e-40]),
       gseed=st.integers(0, 2**31 - 1),
       gspecials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(GRAD_SPECIALS)),
                          max_size=8),
       gscale=st.sampled_from([1.0, 1e-4, 1e-38, 1e4]),
       steps=st.lists(st.one_of(st.integers(1, 5), st.integers(6, 2**40)), min_size=1,
                      max_size=3),
       nesterov=st.booleans(), gnorm_scale=st.sampled_from([1.0, 0.5]),
       update_scale=st.sampled_from([1.0, 0.25]))
def test_optimizer_native_equals_reference(opt, eight_bit, p, gseed, gspecials, gscale, steps,
                                           nesterov, gnorm_scale, update_scale):
    # Gradients up to 1e12 (g*g stays finite in float32 where the rules square it); the
    # overflow cases are test_optimizer_native.py's non-finite-state tests.
    if p.dtype == torch.float16 or p.dtype == torch.bfloat16:
        p = torch.where(p.float().abs() > 1e4, 0.0, p.float()).to(p.dtype)
    else:
        p = torch.where(p.abs() > 1e10, 0.0, p)
    p = torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)
    n = p.numel()
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    ref = R.optimizer_update_8bit_blockwise if eight_bit else R.optimizer_update_32bit
    sn = make_state(opt, n, eight_bit, seed=gseed % 1000)
    sr = [t if t is None else t.clone() for t in sn]
    pn, pr = p.clone(), p.clone()
    q1, q2 = F.dynamic_map(True), F.dynamic_map(False)
    two = RULES[opt].states == 2
    for k, step in enumerate(steps):
        g = torch.randn(n, generator=torch.Generator().manual_seed(gseed + k)) * gscale
        for i, v in gspecials:
            if n:
                g[i % n] = v
        g = g.to(p.dtype)
        hp = (1e-2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.1, 0.1, nesterov, step, gnorm_scale)
        for fn, pp, s in ((upd, pn, sn), (ref, pr, sr)):
            if eight_bit:
                fn(opt, pp, g, s[0], s[1], s[2], s[3], q1, q2 if two else None, *hp,
                   update_scale)
            else:
                fn(opt, pp, g, s[0], s[1], *hp, update_scale)
        assert bits_equal(pn, pr), f"{opt} step {step}: parameters differ"
        for i, (a, b) in enumerate(zip(sn, sr)):
            assert bits_equal(a, b), f"{opt} step {step}: state {i} differs"


@native
@PROFILE
@given(opt=st.sampled_from(sorted(RULES)), eight_bit=st.booleans(),
       n=st.one_of(st.integers(0, 3), st.integers(0, 1000)), seed=st.integers(0, 2**20),
       nonfinite=st.lists(st.tuples(st.integers(0, 10**6),
                                    st.sampled_from([float("nan"), float("inf"),
                                                     float("-inf")])), max_size=6),
       step=st.integers(1, 50))
def test_non_finite_gradient_elements_leave_their_parameter_untouched(opt, eight_bit, n, seed,
                                                                      nonfinite, step):
    # docs/optimizers.md: an element with a NaN/Inf gradient keeps its parameter (with the
    # norm-based rules, LAMB/LARS, the trust ratio is an input: update_scale here)
    p = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    bad = sorted({i % n for i, _ in nonfinite}) if n else []
    for i, v in nonfinite:
        if n:
            g[i % n] = v
    s = make_state(opt, n, eight_bit, seed=seed % 97)
    before = p.clone()
    q1, q2 = F.dynamic_map(True), F.dynamic_map(False)
    hp = (1e-2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.1, 0.1, False, step, 1.0)
    if eight_bit:
        ops.optimizer_update_8bit_blockwise(opt, p, g, s[0], s[1], s[2], s[3], q1,
                                            q2 if RULES[opt].states == 2 else None, *hp, 1.0)
    else:
        ops.optimizer_update_32bit(opt, p, g, s[0], s[1], *hp, 1.0)
    assert bits_equal(p[bad], before[bad])
    assert torch.isfinite(p).all()
    for t in s:
        if t is not None and t.is_floating_point():
            assert not torch.isnan(t).any()
