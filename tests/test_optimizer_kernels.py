"""The optimizer update ops: native kernels against the pure-PyTorch reference (bit for bit),
the reference against torch.optim, the non-finite and zero-gradient policies, the
second-moment ("no blow-ups") policy, the norms ops and argument validation."""
import ctypes

import pytest
import torch

import bnbfuse  # noqa: F401  (registers the ops)
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
    two = opt in R.TWO_STATE
    shape1 = (2, *shape) if opt == "ademamix" else shape
    s1 = torch.randn(shape1, generator=gen) * 0.1
    if opt in ("rmsprop", "adagrad"):
        s1 = s1.abs()
    s2 = (torch.rand(shape, generator=gen) * 0.01) if two else None
    if not eight_bit:
        return [t if t is None else t.to(device) for t in (s1, s2)]
    q1, q2 = maps()
    kp1 = R.keeps_positive(opt, 1)
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
    two = opt in R.TWO_STATE
    if eight_bit:
        c1, c2, a1, a2 = state
        fn(opt, p, g, c1, c2, a1, a2, q1, q2 if two else None, *hparams(step, nesterov),
           update_scale)
    else:
        s1, s2 = state
        fn(opt, p, g, s1, s2, *hparams(step, nesterov), update_scale)


# ---- native == reference, bit for bit ------------------------------------------------------
@native
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", R.OPTIMIZERS)
def test_native_equals_reference(opt, dtype, eight_bit):
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    ref = R.optimizer_update_8bit_blockwise if eight_bit else R.optimizer_update_32bit
    for size in SIZES:
        shape = (size,) if isinstance(size, int) else tuple(size)
        p0 = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        pn, pr = p0.clone(), p0.clone()
        sn = make_state(opt, size, eight_bit)
        sr = clone_all(sn)
        for step in (1, 2, 3):  # step 1 exercises SGD's buffer initialisation
            g = grads(size, dtype, seed=step)
            run_update(upd, opt, pn, g, sn, eight_bit, step, nesterov=step != 2)
            run_update(ref, opt, pr, g, sr, eight_bit, step, nesterov=step != 2)
            assert bits_equal(pn, pr), f"{opt} {dtype} size={size} step={step}: parameters differ"
            for i, (a, b) in enumerate(zip(sn, sr)):
                assert bits_equal(a, b), f"{opt} {dtype} size={size} step={step}: state {i} differs"



@native
@pytest.mark.parametrize("opt", ["adamw", "ademamix", "rmsprop", "lion"])
def test_native_equals_reference_non_finite_state_blocks(opt):
    # Finite gradients so large that g*g overflows give an infinite second moment, and a
    # NaN absmax (a corrupt loaded state) a NaN block: such blocks take the quantizer's
    # careful path (NaN keys, inf/inf = NaN), which must still match the reference.
    n = 1024
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    sn = make_state(opt, n, True)
    sn[2][..., 3] = float("nan")  # absmax1 of the last block
    sr = clone_all(sn)
    pn, pr = p0.clone(), p0.clone()
    g = torch.randn(n, generator=torch.Generator().manual_seed(4)) * 1e-3
    g[5], g[300] = 3e25, -2e30  # blocks 0 and 1
    for step in (1, 2):
        run_update(ops.optimizer_update_8bit_blockwise, opt, pn, g, sn, True, step)
        run_update(R.optimizer_update_8bit_blockwise, opt, pr, g, sr, True, step)
        assert bits_equal(pn, pr), f"{opt} step={step}: parameters differ"
        for i, (a, b) in enumerate(zip(sn, sr)):
            if a is not None:
                assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
                assert bits_equal(torch.nan_to_num(a), torch.nan_to_num(b)) if a.is_floating_point() \
                    else bits_equal(a, b), f"{opt} step={step}: state {i} differs"
    absmax = sn[3] if opt in R.TWO_STATE else sn[2]
    assert not torch.isfinite(absmax).all()  # the test reached a non-finite block

@native
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("opt", ["adamw", "ademamix", "lion", "rmsprop"])
def test_every_isa_and_thread_count_gives_the_same_bits(opt, isa):
    lib = _native.cpu.lib
    lib.bnbf_cpu_force_isa.argtypes = [ctypes.c_char_p]
    if lib.bnbf_cpu_force_isa(isa.encode()) != 0:
        lib.bnbf_cpu_force_isa(None)
        pytest.skip(f"{isa} not available on this CPU")
    threads = torch.get_num_threads()
    try:
        size = 70_001
        results = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            p = torch.randn(size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
            st = make_state(opt, size, True)
            run_update(ops.optimizer_update_8bit_blockwise, opt, p, grads(size, p.dtype, 5), st,
                       True, 4)
            results.append([p, *st])
        pr = torch.randn(size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        sr = make_state(opt, size, True)
        run_update(R.optimizer_update_8bit_blockwise, opt, pr, grads(size, pr.dtype, 5), sr, True, 4)
        for a, b, c in zip(results[0], results[1], [pr, *sr]):
            assert bits_equal(a, b) and bits_equal(a, c)
    finally:
        torch.set_num_threads(threads)
        lib.bnbf_cpu_force_isa(None)


@native
def test_non_contiguous_parameter_is_updated_in_place():
    p0 = torch.randn(64, 48)
    before = p0.clone()
    pn, pr = p0.t(), p0.clone().t()  # non-contiguous views
    g = torch.randn(48, 64)
    sn = [torch.zeros(48, 64), torch.zeros(48, 64)]
    sr = clone_all(sn)
    run_update(ops.optimizer_update_32bit, "adamw", pn, g, sn, False, 1)
    run_update(R.optimizer_update_32bit, "adamw", pr, g, sr, False, 1)
    assert bits_equal(pn.contiguous(), pr.contiguous())
    assert not torch.equal(p0, before)  # the base tensor itself was written


# ---- the reference against torch.optim -----------------------------------------------------
def _torch_vs_ops(torch_opt_fn, opt, steps=20, two=False, lr=1e-2, wd=0.0, beta1=0.9,
                  beta2=0.999, eps=1e-8, dampening=0.0, nesterov=False, lr_fn=None):
    torch.manual_seed(0)
    p = torch.randn(1000)
    tp = p.clone().requires_grad_()
    topt = torch_opt_fn([tp])
    s1, s2 = torch.zeros(1000), (torch.zeros(1000) if two else None)
    for step in range(1, steps + 1):
        g = torch.randn(1000)
        tp.grad = g.clone()
        topt.step()
        lr_t = lr_fn(step) if lr_fn else lr
        ops.optimizer_update_32bit(opt, p, g, s1, s2, lr_t, beta1, beta2, 0.0, 0.0, eps, wd,
                                   dampening, nesterov, step, 1.0, 1.0)
    torch.testing.assert_close(p, tp.detach(), rtol=1e-5, atol=1e-6)


def test_adamw_matches_torch():
    _torch_vs_ops(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), "adamw",
                  two=True, wd=0.1)


def test_adam_weight_decay_is_coupled_l2_like_torch():
    _torch_vs_ops(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1), "adam",
                  two=True, wd=0.1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_torch(nesterov):
    damp = 0.0 if nesterov else 0.2
    _torch_vs_ops(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=damp,
                                             weight_decay=0.01, nesterov=nesterov),
                  "momentum", wd=0.01, dampening=damp, nesterov=nesterov)


def test_rmsprop_matches_torch():
    _torch_vs_ops(lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.99, eps=1e-8,
                                                 weight_decay=0.01),
                  "rmsprop", lr=1e-3, beta1=0.99, wd=0.01)


def test_adagrad_matches_torch():
    decay = 0.01  # the class passes lr already decayed: lr / (1 + (step - 1) * lr_decay)
    _torch_vs_ops(lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=decay, eps=1e-10,
                                                 weight_decay=0.01),
                  "adagrad", wd=0.01, eps=1e-10, lr_fn=lambda t: 1e-2 / (1 + (t - 1) * decay))


def test_ademamix_matches_its_definition():
    """AdEMAMix as in bitsandbytes' reference: m2 not bias-corrected, decay decoupled."""
    torch.manual_seed(0)
    n, lr, b1, b2, b3, alpha, eps, wd = 500, 1e-2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.1
    p, state = torch.randn(n), torch.zeros(2, n)
    nu = torch.zeros(n)
    pe, m1, m2, v = p.double(), torch.zeros(n, dtype=torch.float64), \
        torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in range(1, 11):
        g = torch.randn(n)
        ops.optimizer_update_32bit("ademamix", p, g, state, nu, lr, b1, b2, b3, alpha, eps, wd,
                                   0.0, False, t, 1.0, 1.0)
        gd = g.double()
        m1 = b1 * m1 + (1 - b1) * gd
        m2 = b3 * m2 + (1 - b3) * gd
        v = b2 * v + (1 - b2) * gd * gd
        denom = v.sqrt() / (1 - b2 ** t) ** 0.5 + eps
        pe = pe - lr * ((m1 / (1 - b1 ** t) + alpha * m2) / denom + wd * pe)
    torch.testing.assert_close(p.double(), pe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[1].double(), m2, rtol=1e-5, atol=1e-7)


def test_lion_matches_its_definition():
    torch.manual_seed(0)
    n, lr, b1, b2, wd = 500, 1e-3, 0.9, 0.99, 0.1
    p, m = torch.randn(n), torch.zeros(n)
    pe, me = p.double(), torch.zeros(n, dtype=torch.float64)
    for t in range(1, 11):
        g = torch.randn(n)
        ops.optimizer_update_32bit("lion", p, g, m, None, lr, b1, b2, 0.0, 0.0, 0.0, wd, 0.0,
                                   False, t, 1.0, 1.0)
        gd = g.double()
        c = b1 * me + (1 - b1) * gd
        pe = pe * (1 - lr * wd) - lr * torch.sign(c)
        me = b2 * me + (1 - b2) * gd
    torch.testing.assert_close(p.double(), pe, rtol=1e-5, atol=1e-6)


def test_update_scale_scales_the_step():
    p, g = torch.randn(300), torch.randn(300)
    outs = []
    for us in (1.0, 0.5):
        q, s1, s2 = p.clone(), torch.zeros(300), torch.zeros(300)
        ops.optimizer_update_32bit("lamb", q, g, s1, s2, 1e-2, 0.9, 0.999, 0, 0, 1e-8, 0.0, 0,
                                   False, 1, 1.0, us)
        outs.append(q - p)
    torch.testing.assert_close(outs[1], outs[0] * 0.5, rtol=1e-4, atol=1e-6)


# ---- norms ---------------------------------------------------------------------------------
def _direction_f64(opt, p, g, s1, s2, step, lr=1e-2, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0,
                   eps=1e-8, wd=0.1, damp=0.1, nesterov=True, gs=0.7):
    """Independent float64 computation of each optimizer's update direction."""
    p, g, s1 = p.double(), g.double() * gs, s1.double()
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    if opt in ("adam", "adamw", "lamb", "ademamix"):
        s2 = s2.double()
        if opt == "adam":
            g = g + wd * p
        m = b1 * s1[: p.numel()] + (1 - b1) * g
        v = b2 * s2 + (1 - b2) * g * g
        denom = v.sqrt() / bc2 ** 0.5 + eps
        if opt == "ademamix":
            m2 = b3 * s1[p.numel():] + (1 - b3) * g
            return (m / bc1 + alpha * m2) / denom
        u = (m / bc1) / denom
        return u + wd * p if opt == "lamb" else u
    if opt == "momentum":
        d = g + wd * p
        buf = d if step == 1 else b1 * s1 + (1 - damp) * d
        return d + b1 * buf if nesterov else buf
    if opt in ("rmsprop", "adagrad"):
        g = g + wd * p
        s = b1 * s1 + (1 - b1) * g * g if opt == "rmsprop" else s1 + g * g
        return g / (s.sqrt() + eps)
    if opt == "lion":
        return torch.sign(b1 * s1 + (1 - b1) * g)
    return g + wd * p  # lars


@pytest.mark.parametrize("opt", R.OPTIMIZERS)
def test_norms_32bit_match_torch_computation(opt):
    size = 1000
    p = torch.randn(size, generator=torch.Generator().manual_seed(1))
    g = grads(size, torch.float32, seed=2)
    s1, s2 = make_state(opt, size, False)
    for step in (1, 3):
        out = ops.optimizer_norms_32bit(opt, p, g, s1, s2, *hparams(step))
        assert out.dtype == torch.float32 and out.shape == (2,)
        ok = torch.isfinite(g)
        d = _direction_f64(opt, p[ok], g[ok], s1.view(-1, size)[:, ok].reshape(-1),
                           None if s2 is None else s2[ok], step)
        expect = torch.stack([(d * d).sum(), (p[ok].double() ** 2).sum()]).float()
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
        ref = R.optimizer_norms_32bit(opt, p, g, s1, s2, *hparams(step))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("opt", R.OPTIMIZERS)
def test_norms_8bit_use_the_dequantized_state(opt):
    size = 3000
    q1, q2 = maps()
    p = torch.randn(size, generator=torch.Generator().manual_seed(1)).bfloat16()
    g = grads(size, torch.bfloat16, seed=2)
    c1, c2, a1, a2 = make_state(opt, size, True)
    two = opt in R.TWO_STATE
    out = ops.optimizer_norms_8bit_blockwise(opt, p, g, c1, c2, a1, a2, q1, q2 if two else None,
                                             *hparams(2))
    # the same with the dequantized state through the 32-bit op
    s1 = R._dequantize_state(c1.view(-1)[:size], a1.view(-1)[: a1.numel() // (2 if opt == "ademamix" else 1)], q1)
    if opt == "ademamix":
        s1 = torch.cat([s1, R._dequantize_state(c1.view(-1)[size:], a1.view(-1)[a1.numel() // 2:], q1)])
    s2 = R._dequantize_state(c2, a2, q2) if two else None
    expect = ops.optimizer_norms_32bit(opt, p, g, s1.view(c1.shape), s2, *hparams(2))
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=0)
    assert torch.isfinite(out).all()


# ---- gradient policies ---------------------------------------------------------------------
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("opt", R.OPTIMIZERS)
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
        old = R._dequantize_state(b1_.view(-1)[sl], ab1.view(-1)[part * nb:(part + 1) * nb], q1)
        new = R._dequantize_state(c1.view(-1)[sl], a1.view(-1)[part * nb:(part + 1) * nb], q1)
        blk_absmax = a1.view(-1)[part * nb:(part + 1) * nb][bad // 256]
        assert ((new[bad] - old[bad]).abs() <= 0.1 * blk_absmax + 1e-12).all()


@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("opt", R.OPTIMIZERS)
def test_zero_gradients_on_fresh_state_are_harmless(opt, eight_bit):
    size = 600
    p = torch.randn(size)
    q = p.clone()
    g = torch.zeros(size)
    two = opt in R.TWO_STATE
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
        m, v = R._dequantize_state(c1, a1, q1), R._dequantize_state(c2, a2, q2)
        p32 = p8.clone()
        ops.optimizer_update_8bit_blockwise("adamw", p8, g, c1, c2, a1, a2, q1, q2, 1e-3, 0.9,
                                            0.999, 0, 0, 1e-8, 0.01, 0, False, step, 1.0, 1.0)
        ops.optimizer_update_32bit("adamw", p32, g, m, v, 1e-3, 0.9, 0.999, 0, 0, 1e-8, 0.01, 0,
                                   False, step, 1.0, 1.0)
        for new, ref_state in ((R._dequantize_state(c1, a1, q1), m),
                               (R._dequantize_state(c2, a2, q2), v)):
            assert (~torch.isclose(new, ref_state, atol=3e-3, rtol=1e-3)).sum() < 20
        errs.append((p8 - p32).abs().mean().item())
    assert max(errs) < 6e-5


# ---- argument validation -------------------------------------------------------------------
@pytest.mark.parametrize("fn", [ops.optimizer_update_32bit, R.optimizer_update_32bit])
def test_python_argument_errors(fn):
    p, g = torch.randn(10), torch.randn(10)
    s = torch.zeros(10)
    with pytest.raises(ValueError, match="unknown optimizer"):
        fn("adamx", p, g, s, s.clone(), *hparams(1), 1.0)
    with pytest.raises(ValueError, match="needs state2"):
        fn("adam", p, g, s, None, *hparams(1), 1.0)
    with pytest.raises(ValueError, match="state1 has 10 elements"):
        fn("ademamix", p, g, s, s.clone(), *hparams(1), 1.0)
    with pytest.raises(TypeError, match="state1 must be"):
        fn("lion", p, g, s.double(), None, *hparams(1), 1.0)
    with pytest.raises(TypeError, match="gradient dtype"):
        fn("lion", p, g.half(), s, None, *hparams(1), 1.0)
    with pytest.raises(ValueError, match="gradient shape"):
        fn("lion", p, g[:5], s, None, *hparams(1), 1.0)
    with pytest.raises(ValueError, match="step must be >= 1"):
        fn("lion", p, g, s, None, *hparams(0), 1.0)
    with pytest.raises(TypeError, match="parameters must be"):
        fn("lion", p.double(), g.double(), s, None, *hparams(1), 1.0)


def test_python_argument_errors_8bit():
    q1, q2 = maps()
    p, g = torch.randn(300), torch.randn(300)
    c = torch.zeros(300, dtype=torch.uint8)
    with pytest.raises(ValueError, match="absmax1 must be float32 with 2 values"):
        ops.optimizer_update_8bit_blockwise("lion", p, g, c, None, torch.zeros(1), None, q1, None,
                                            *hparams(1), 1.0)
    with pytest.raises(ValueError, match="needs absmax2 and qmap2"):
        ops.optimizer_update_8bit_blockwise("adamw", p, g, c, c.clone(), torch.zeros(2), None,
                                            q1, q2, *hparams(1), 1.0)
    with pytest.raises(ValueError, match="qmap1 must have 256"):
        ops.optimizer_update_8bit_blockwise("lion", p, g, c, None, torch.zeros(2), None,
                                            q1[:100], None, *hparams(1), 1.0)
    with pytest.raises(TypeError, match="state1 must be torch.uint8"):
        ops.optimizer_update_8bit_blockwise("lion", p, g, c.float(), None, torch.zeros(2), None,
                                            q1, None, *hparams(1), 1.0)


@native
def test_c_api_rejects_bad_arguments():
    lib = _native.cpu
    P, I32, I64 = _native.P, _native.I32, _native.I64
    args_p = ctypes.POINTER(_native.OptimizerArgs)
    upd32 = lib.function("bnbf_cpu_optimizer_update_32bit", I32, P, P, I32, P, P, args_p, I64, I32)
    upd8 = lib.function("bnbf_cpu_optimizer_update_8bit_blockwise", I32, P, P, I32, P, P, P, P,
                        P, P, args_p, I64, I32)
    nrm = lib.function("bnbf_cpu_optimizer_norms_32bit", I32, P, P, I32, P, P, args_p, I64, P, I32)
    a = _native.OptimizerArgs.from_scalars(R.optimizer_scalars("adam", *hparams(1)))
    p, g, s1, s2 = (torch.zeros(16) for _ in range(4))
    ok = (p.data_ptr(), g.data_ptr(), 0, s1.data_ptr(), s2.data_ptr(), ctypes.byref(a), 16, 1)
    assert upd32(1, *ok) == 0

    def err(rc, text):
        assert rc == -1, rc
        assert text in lib.lib.bnbf_last_error().decode()

    err(upd32(42, *ok), "unknown optimizer id 42")
    err(upd32(1, *ok[:6], -1, 1), "n must be >= 0")
    err(upd32(1, None, *ok[1:]), "null pointer")
    err(upd32(1, *ok[:4], None, *ok[5:]), "needs state2")
    err(upd32(1, *ok[:2], 7, *ok[3:]), "unsupported dtype code 7")
    err(upd32(1, *ok[:5], None, 16, 1), "args is a null pointer")
    c = torch.zeros(16, dtype=torch.uint8)
    err(upd8(7, p.data_ptr(), g.data_ptr(), 0, c.data_ptr(), None, None, None, None, None,
             ctypes.byref(a), 16, 1), "null pointer among absmax1, qmap1")
    err(nrm(1, *ok[:7], None, 1), "out is a null pointer")
    bad_step = _native.OptimizerArgs.from_scalars(R.optimizer_scalars("adam", *hparams(1)))
    bad_step.step = 0
    err(upd32(1, *ok[:5], ctypes.byref(bad_step), 16, 1), "step must be >= 1")
    assert upd32(1, None, None, 0, None, None, ctypes.byref(a), 0, 1) == 0  # n = 0: no-op


def test_fake_impls_trace_under_torch_compile():
    q1, q2 = maps()

    def step(p, g, c1, c2, a1, a2):
        ops.optimizer_update_8bit_blockwise("adamw", p, g, c1, c2, a1, a2, q1, q2, *hparams(1),
                                            1.0)
        return ops.optimizer_norms_32bit("lion", p, g, p.clone(), None, *hparams(1))

    n = 512
    args = [torch.randn(n), torch.randn(n), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(n, dtype=torch.uint8), torch.zeros(2), torch.zeros(2)]
    eager = clone_all(args)
    out_e = step(*eager)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        q1, q2 = mode.from_tensor(q1), mode.from_tensor(q2)
        out_f = step(*fake)
    assert out_f.shape == out_e.shape and out_f.dtype == out_e.dtype


# ---- CUDA ----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", R.OPTIMIZERS)
def test_cuda_equals_reference(opt, dtype, eight_bit):
    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    ref = R.optimizer_update_8bit_blockwise if eight_bit else R.optimizer_update_32bit
    for size in SIZES + [1_000_003]:
        shape = (size,) if isinstance(size, int) else tuple(size)
        p0 = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        pc, pr = p0.cuda(), p0.clone()
        sr = make_state(opt, size, eight_bit)
        sc = [t if t is None else t.cuda() for t in sr]
        for step in (1, 2, 3):
            g = grads(size, dtype, seed=step)
            run_update(upd, opt, pc, g.cuda(), sc, eight_bit, step)
            run_update(ref, opt, pr, g, sr, eight_bit, step)
            assert bits_equal(pc.cpu(), pr), f"{opt} {dtype} size={size} step={step}"
            for a, b in zip(sc, sr):
                assert bits_equal(None if a is None else a.cpu(), b)
        nc = (ops.optimizer_norms_8bit_blockwise if eight_bit else ops.optimizer_norms_32bit)
        nr = (R.optimizer_norms_8bit_blockwise if eight_bit else R.optimizer_norms_32bit)
        q1, q2 = maps("cuda")
        g = grads(size, dtype, seed=9)
        two = opt in R.TWO_STATE
        if eight_bit:
            c1, c2, a1, a2 = sc
            args = (opt, pc, g.cuda(), c1, c2, a1, a2, q1, q2 if two else None, *hparams(4))
            q1c, q2c = maps()
            expect = nr(opt, pr, g, *sr[:2], *sr[2:], q1c, q2c if two else None, *hparams(4))
        else:
            args = (opt, pc, g.cuda(), *sc, *hparams(4))
            expect = nr(opt, pr, g, *sr, *hparams(4))
        out = nc(*args)
        torch.testing.assert_close(out.cpu(), expect, rtol=1e-5, atol=1e-6)
        # The thread blocks' sums are added in a fixed order: run to run, the same bits.
        assert all(bits_equal(nc(*args), out) for _ in range(5)), f"{opt} norms vary"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", ["adamw", "ademamix", "rmsprop", "lion"])
def test_cuda_non_finite_state_blocks_equal_reference(opt, dtype):
    # As test_native_equals_reference_non_finite_state_blocks, on the GPU: an overflowing
    # second moment, a NaN absmax and a NaN parameter (its bits must stay as they were).
    n = 1024
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    p0[700] = float("nan")
    p0 = p0.to(dtype)
    sr = make_state(opt, n, True)
    sr[2][..., 3] = float("nan")
    sc = [t if t is None else t.cuda() for t in sr]
    pc, pr = p0.cuda(), p0.clone()
    g = torch.randn(n, generator=torch.Generator().manual_seed(4)) * 1e-3
    g[5], g[300], g[700] = 3e25, -2e30, float("nan")
    g = g.to(dtype)
    for step in (1, 2):
        run_update(ops.optimizer_update_8bit_blockwise, opt, pc, g.cuda(), sc, True, step)
        run_update(R.optimizer_update_8bit_blockwise, opt, pr, g, sr, True, step)
        assert torch.equal(pc.cpu().isnan(), pr.isnan())
        assert bits_equal(pc.cpu()[700:701], p0[700:701])  # untouched NaN keeps its bits
        assert bits_equal(torch.nan_to_num(pc.cpu()), torch.nan_to_num(pr)), f"{opt} step={step}"
        for a, b in zip(sc, sr):
            if a is not None:
                a = a.cpu()
                assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True
                assert bits_equal(torch.nan_to_num(a) if a.is_floating_point() else a,
                                  torch.nan_to_num(b) if b.is_floating_point() else b)


@pytest.mark.cuda
def test_cuda_optimizer_runs_on_the_tensors_device_and_refuses_host_memory():
    n = 5000
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    g = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 1e-2
    state = make_state("adamw", n, True)
    pr = p0.clone()
    sr = clone_all(state)
    run_update(R.optimizer_update_8bit_blockwise, "adamw", pr, g, sr, True, 1)
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(0):  # the current device need not be the tensors' one
        pc = p0.to(last)
        sc = [t if t is None else t.to(last) for t in state]
        run_update(ops.optimizer_update_8bit_blockwise, "adamw", pc, g.to(last), sc, True, 1)
        torch.cuda.synchronize(last)
    assert bits_equal(pc.cpu(), pr)
    for a, b in zip(sc, sr):
        assert bits_equal(a.cpu(), b)
    # The C API refuses host buffers by name instead of faulting in the kernel.
    lib = _native.cuda
    fn = lib.function("bnbf_cuda_optimizer_update_8bit_blockwise", _native.I32, _native.P,
                      _native.P, _native.I32, _native.P, _native.P, _native.P, _native.P,
                      _native.P, _native.P, _native.P, _native.I64, _native.P)
    c1, c2, a1, a2 = [t.cuda() for t in state]
    q1, q2 = maps("cuda")
    args = _native.OptimizerArgs()
    host_p = p0.clone()
    rc = fn(1, host_p.data_ptr(), g.cuda().data_ptr(), 0, c1.data_ptr(), c2.data_ptr(),
            a1.data_ptr(), a2.data_ptr(), q1.data_ptr(), q2.data_ptr(), ctypes.byref(args), n,
            None)
    assert rc == -1 and "p is not CUDA device memory" in lib.bnbf_last_error().decode()

@native
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_requantization_is_exact_at_every_threshold(signed):
    """Values at, just below and just above every rounding threshold of the map go through
    the native kernel's requantization (SGD's buffer at step 1 is g; Adagrad's sum is g*g)
    with absmax 1, and must get the reference's nearest code."""
    q = maps()[0 if signed else 1]
    thr, _ = R.nearest_thresholds(q)
    inf = torch.tensor(float("inf"))
    vals = [thr, torch.nextafter(thr, inf), torch.nextafter(thr, -inf)]
    for _ in range(3):
        vals.append(torch.nextafter(vals[-2], inf))
        vals.append(torch.nextafter(vals[-2], -inf))
    x = torch.cat(vals + [q])  # also the map values themselves
    x = x[(x.abs() <= 1) & (x >= (-1 if signed else 0))]
    if signed:
        g = x
        opt, hp = "momentum", (1e-3, 0.9, 0.0, 0.0, 0.0, 1e-8, 0.0, 0.0, False, 1, 1.0)
    else:
        g = torch.sqrt(x.double()).float()
        opt, hp = "adagrad", (1e-3, 0.0, 0.0, 0.0, 0.0, 1e-8, 0.0, 0.0, False, 1, 1.0)
    # blocks of 255 values plus a 1.0 that fixes the block's absmax at 1
    blocks = -(g.numel() // -255)
    pad = blocks * 255 - g.numel()
    g = torch.cat([g, g.new_zeros(pad)]).view(blocks, 255)
    g = torch.cat([torch.ones(blocks, 1), g], dim=1).reshape(-1)
    n = g.numel()
    outs = []
    for fn in (ops.optimizer_update_8bit_blockwise, R.optimizer_update_8bit_blockwise):
        c = torch.zeros(n, dtype=torch.uint8)
        a = torch.zeros(n // 256)
        fn(opt, torch.zeros(n), g, c, None, a, None, q, None, *hp, 1.0)
        outs.append((c, a))
    assert torch.equal(outs[0][1], torch.ones(n // 256))
    assert torch.equal(outs[0][0], outs[1][0])
