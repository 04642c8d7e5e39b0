"""Idempotent requantization of 8-bit optimizer state: a step whose gradient is all NaN
(a skipped step) leaves every code and every absmax as it was, for every signed state.

The signed dynamic map's most negative value is -0.9929..., so with a plain absmax a block
whose largest-magnitude value is negative shrank by 0.7% at every requantization."""

import pytest
import torch

import bnbfuse
from bnbfuse import _native
from bnbfuse.backends import reference as R
from bnbfuse.backends.reference.optimizer import _scale_for, state_absmax
from bnbfuse.functional import dynamic_map
from bnbfuse.ops.rules import RULES
from optimizer_cases import bits_equal, clone_all, make_state, run_update

BACKENDS = {"reference": R.optimizer_update_8bit_blockwise,
            "native": torch.ops.bnbfuse.optimizer_update_8bit_blockwise}
native_only = pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")


def _negative_extremes(size, seed):
    """A state whose every block has its largest magnitude on a negative value."""
    x = torch.randn(size, generator=torch.Generator().manual_seed(seed)).abs() * 0.1
    x[7::256] = -0.5
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", tuple(RULES))
def test_skipped_steps_keep_codes_and_absmax(opt, backend):
    if backend == "native" and not _native.cpu.loaded:
        pytest.skip("native CPU library not built")
    size = 1024 + 77
    st = make_state(opt, size, True, seed=3)
    if not RULES[opt].keep_positive[0]:  # a signed state1: make the extremes negative
        signed = _negative_extremes(2 * size if opt == "ademamix" else size, 4)
        flat = signed.view(-1)
        parts = [flat[:size], flat[size:]] if opt == "ademamix" else [flat]
        quantized = [R.quantize_state(part, dynamic_map(True), False) for part in parts]
        st[0] = torch.cat([c for c, _ in quantized]).view(st[0].shape)
        st[2] = torch.stack([a for _, a in quantized]).view(st[2].shape) if opt == "ademamix" \
            else quantized[0][1]
    p = torch.randn(size)
    before_p, before = p.clone(), clone_all(st)
    nan = torch.full((size,), float("nan"))
    for step in range(2, 22):
        run_update(BACKENDS[backend], opt, p, nan, st, True, step)
    assert bits_equal(p, before_p)
    for now, then in zip(st, before):
        assert bits_equal(now, then)


@native_only
def test_adamw8bit_skipped_steps_do_not_drift():
    """The reported case: 100 all-NaN steps moved AdamW8bit's m by up to 47%."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096))
    opt = bnbfuse.optim.AdamW8bit([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    m_before = bnbfuse.optim.state8bit.get_state(opt.state[p], 1)
    p.grad = torch.full_like(p, float("nan"))
    for _ in range(100):
        opt.step()
    assert torch.equal(bnbfuse.optim.state8bit.get_state(opt.state[p], 1), m_before)


def test_scale_for_is_the_smallest_sufficient_scale():
    q = -float(dynamic_map(True).min())
    gen = torch.Generator().manual_seed(0)
    m = torch.cat([torch.rand(2000, generator=gen) * 10.0 ** torch.randint(-40, 38, (2000,),
                                                                            generator=gen),
                   torch.tensor([1e-45, 1.2e-38, 1.0, 3.0e38])]).float()
    s = _scale_for(m, q)
    qt = torch.full_like(s, q)
    assert (qt * s >= m).all()
    lower = torch.nextafter(s, torch.zeros_like(s))
    assert not (qt * lower >= m).any()
    big = torch.tensor([3.4e38])
    assert float(_scale_for(big, q)) == torch.finfo(torch.float32).max  # would overflow


def test_state_absmax_of_positive_extremes_is_max_abs():
    """bitsandbytes' absmax (max |x|) is what a block with a positive extreme gets, so its
    saved state loads and continues unchanged."""
    x = torch.randn(8, 256)
    x[:, 0] = 5.0
    assert torch.equal(state_absmax(x, dynamic_map(True)), x.abs().amax(dim=1))
    v = torch.rand(8, 256)
    assert torch.equal(state_absmax(v, dynamic_map(False)), v.amax(dim=1))
    x[3, 9] = float("nan")
    assert state_absmax(x, dynamic_map(True))[3].isnan()
