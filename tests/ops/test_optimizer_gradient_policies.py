"""The gradient policies of the optimizer ops: non-finite and zero gradients, empty tensors,
and the second-moment ("no blow-ups") policy against fp32 AdamW."""

import pytest
import torch

import bnbfuse  # noqa: F401  (registers the ops)
from bnbfuse.backends import reference as R
from bnbfuse.ops.rules import RULES
from optimizer_cases import (hparams, maps, make_state, clone_all, run_update, ops)


# ---- gradient policies ---------------------------------------------------------------------
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("opt", tuple(RULES))
def test_non_finite_gradient_leaves_element_unchanged(opt, eight_bit):
    size = 1024
    p = torch.randn(size)
    g = torch.randn(size)
    bad = torch.tensor([5, 300, 301, 1000])
    g[bad] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])
    st = make_state(opt, size, eight_bit)
    before = clone_all(st)
    q = p.clone()
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    run_update(upd, opt, q, g, st, eight_bit, 2)
    assert torch.isfinite(q).all()
    assert torch.equal(q[bad], p[bad])
    good = torch.ones(size, dtype=torch.bool)
    good[bad] = False
    assert not torch.equal(q[good], p[good])
    if not eight_bit:
        for a, b in zip(st, before):
            if a is not None:
                assert torch.equal(a.view(-1, size)[:, bad], b.view(-1, size)[:, bad])
        return
    q1, q2 = maps()
    # 8-bit: the element's value is requantized with its block's new absmax: within one
    # quantization step of what it was.
    c1, c2, a1, a2 = st
    b1_, b2_, ab1, ab2 = before
    k = 2 if opt == "ademamix" else 1
    for part in range(k):
        sl = slice(part * size, (part + 1) * size)
        nb = a1.numel() // k
        old = R.dequantize_state(b1_.view(-1)[sl], ab1.view(-1)[part * nb:(part + 1) * nb], q1)
        new = R.dequantize_state(c1.view(-1)[sl], a1.view(-1)[part * nb:(part + 1) * nb], q1)
        blk_absmax = a1.view(-1)[part * nb:(part + 1) * nb][bad // 256]
        assert ((new[bad] - old[bad]).abs() <= 0.1 * blk_absmax + 1e-12).all()


@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("opt", tuple(RULES))
def test_zero_gradients_on_fresh_state_are_harmless(opt, eight_bit):
    size = 600
    p = torch.randn(size)
    q = p.clone()
    g = torch.zeros(size)
    two = RULES[opt].states == 2
    k = 2 if opt == "ademamix" else 1
    if eight_bit:
        q1, q2 = maps()
        nb = -(size // -256)
        st = [torch.full((k * size,), int(R.quantize_to_map(torch.zeros(1), q1)), dtype=torch.uint8),
              torch.full((size,), int(R.quantize_to_map(torch.zeros(1), q2)), dtype=torch.uint8) if two else None,
              torch.zeros(k * nb), torch.zeros(nb) if two else None]
        ops.optimizer_update_8bit_blockwise(opt, q, g, st[0], st[1], st[2], st[3], q1,
                                            q2 if two else None, 1e-2, 0.9, 0.999, 0.9999, 5.0,
                                            1e-8, 0.0, 0.0, False, 1, 1.0, 1.0)
        assert (st[2] == 0).all()
    else:
        st = [torch.zeros(k * size), torch.zeros(size) if two else None]
        ops.optimizer_update_32bit(opt, q, g, st[0], st[1], 1e-2, 0.9, 0.999, 0.9999, 5.0, 1e-8,
                                   0.0, 0.0, False, 1, 1.0, 1.0)
        assert all((s == 0).all() for s in st if s is not None)
    assert torch.equal(q, p)


@pytest.mark.parametrize("fn", [ops.optimizer_update_32bit, R.optimizer_update_32bit])
def test_empty_tensor_is_a_no_op(fn):
    p = torch.zeros(0)
    fn("adamw", p, torch.zeros(0), torch.zeros(0), torch.zeros(0), *hparams(1), 1.0)
    q1, q2 = maps()
    ops.optimizer_update_8bit_blockwise("adamw", p, torch.zeros(0),
                                        torch.zeros(0, dtype=torch.uint8),
                                        torch.zeros(0, dtype=torch.uint8), torch.zeros(0),
                                        torch.zeros(0), q1, q2, *hparams(1), 1.0)
    out = ops.optimizer_norms_32bit("lamb", p, torch.zeros(0), torch.zeros(0), torch.zeros(0),
                                    *hparams(1))
    assert torch.equal(out, torch.zeros(2))

# ---- the "no blow-ups" policy --------------------------------------------------------------
def _track_fp32_adamw(grad_fn, steps, keep_positive, use_op=True, rows=64, cols=64):
    """Max over elements of (|movement under 8-bit AdamW| - |movement under fp32 AdamW|)."""
    lr = 1e-3
    p0 = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.1
    ref = p0.clone().requires_grad_()
    topt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    p = p0.clone()
    q1, q2 = maps()
    n = p.numel()
    nb = -(n // -256)
    c1 = torch.full((rows, cols), int(R.quantize_to_map(torch.zeros(1), q1)), dtype=torch.uint8)
    c2 = torch.full((rows, cols), int(R.quantize_to_map(torch.zeros(1), q2)), dtype=torch.uint8)
    a1, a2 = torch.zeros(nb), torch.zeros(nb)
    for step in range(1, steps + 1):
        g = grad_fn(step)
        ref.grad = g.clone()
        topt.step()
        hp = ("adamw", p, g, c1, c2, a1, a2, q1, q2, lr, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.0, 0.0,
              False, step, 1.0, 1.0)
        if use_op:
            ops.optimizer_update_8bit_blockwise(*hp)
        else:
            R.optimizer_update_8bit_blockwise(*hp, keep_positive=keep_positive)
    excess = (p - p0).abs() - (ref.detach() - p0).abs()
    return excess.max().item()


def _sparse_rows(step):
    """Embedding-like: row 0 of every 4-row (256-element) block is a frequent token with a
    large gradient every step; the other rows get a small gradient once, then none."""
    gen = torch.Generator().manual_seed(step)
    g = torch.zeros(64, 64)
    g[::4] = torch.randn(16, 64, generator=gen)
    if step == 1:
        rare = torch.ones(64, dtype=torch.bool)
        rare[::4] = False
        g[rare] = torch.randn(48, 64, generator=gen) * 1e-3
    return g


def _dead_relus(step):
    """Linear layer whose units 1..63 die (zero gradient) after step 3; unit 0 stays alive."""
    gen = torch.Generator().manual_seed(step)
    g = torch.zeros(64, 64)
    g[0] = torch.randn(64, generator=gen)
    if step <= 3:
        g[1:] = torch.randn(63, 64, generator=gen) * 2e-3
    return g


@pytest.mark.parametrize("grad_fn", [_sparse_rows, _dead_relus], ids=["sparse_rows", "dead_relus"])
def test_8bit_adamw_tracks_fp32_on_zero_gradient_elements(grad_fn):
    for use_op in (True, False):  # the native kernel (when loaded) and the reference
        assert _track_fp32_adamw(grad_fn, 40, True, use_op=use_op) <= 1e-2


@pytest.mark.parametrize("grad_fn", [_sparse_rows, _dead_relus], ids=["sparse_rows", "dead_relus"])
def test_without_keep_positive_the_same_setup_blows_up(grad_fn):
    assert _track_fp32_adamw(grad_fn, 40, False, use_op=False) > 1.0


def test_8bit_adamw_follows_32bit_adamw():
    """bitsandbytes' protocol: each step from the same (resynchronised) state, the 8-bit
    update stays within the quantization error of the 32-bit one."""
    torch.manual_seed(0)
    n = 8192
    p8 = torch.randn(n)
    q1, q2 = maps()
    nb = n // 256
    c1, c2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(nb), torch.zeros(nb)
    errs = []
    for step in range(1, 31):
        g = torch.randn(n) * 0.01  # bitsandbytes' test scale (the atol is absolute)
        m, v = R.dequantize_state(c1, a1, q1), R.dequantize_state(c2, a2, q2)
        p32 = p8.clone()
        ops.optimizer_update_8bit_blockwise("adamw", p8, g, c1, c2, a1, a2, q1, q2, 1e-3, 0.9,
                                            0.999, 0, 0, 1e-8, 0.01, 0, False, step, 1.0, 1.0)
        ops.optimizer_update_32bit("adamw", p32, g, m, v, 1e-3, 0.9, 0.999, 0, 0, 1e-8, 0.01, 0,
                                   False, step, 1.0, 1.0)
        for new, ref_state in ((R.dequantize_state(c1, a1, q1), m),
                               (R.dequantize_state(c2, a2, q2), v)):
            assert (~torch.isclose(new, ref_state, atol=3e-3, rtol=1e-3)).sum() < 20
        errs.append((p8 - p32).abs().mean().item())
    assert max(errs) < 6e-5


# ---- overflowing state ---------------------------------------------------------------------
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("opt", ["rmsprop", "adagrad", "adam", "adamw", "ademamix", "lamb"])
def test_overflowing_state_freezes_only_its_element(opt, eight_bit):
    """g = 1e20 makes g*g overflow: that element is skipped (its parameter and state keep
    their values); the other 255 elements of its 8-bit block keep training. Before, the
    infinite second moment made the whole block NaN within two steps."""
    size = 512
    p = torch.randn(size)
    st = make_state(opt, size, eight_bit)
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    gen = torch.Generator().manual_seed(1)
    start = p.clone()
    for step in range(2, 6):
        g = torch.randn(size, generator=gen)
        g[10] = 1e20
        before = p.clone()
        run_update(upd, opt, p, g, st, eight_bit, step)
        assert p[10] == start[10]
        neighbours = torch.arange(size) != 10
        assert torch.isfinite(p).all()
        assert (p[neighbours] != before[neighbours]).float().mean() > 0.9
    for t in st:
        if t is not None and t.is_floating_point():
            assert torch.isfinite(t).all()
