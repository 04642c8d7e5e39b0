"""The optimizer ops' native kernels (every ISA, thread count and CUDA) against the pure-PyTorch
reference, bit for bit, and the requantization at every threshold."""
import ctypes

import pytest
import torch

import bnbfuse  # noqa: F401  (registers the ops)
from bnbfuse import _native
from bnbfuse.backends import reference as R
from bnbfuse.ops.quantize import nearest_thresholds
from bnbfuse.ops.rules import RULES
from optimizer_cases import (hparams, maps, bits_equal, make_state, clone_all, grads, run_update, ops, native, SIZES, DTYPES)


# ---- native == reference, bit for bit ------------------------------------------------------
@native
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", tuple(RULES))
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
    # Finite gradients so large that g*g overflows (those elements are skipped), and a NaN
    # absmax (a corrupt loaded state) a NaN block: that block takes the quantizer's careful
    # path (NaN keys), which must still match the reference.
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
    assert not torch.isfinite(sn[2]).all()  # the test reached a non-finite block

@native
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512vbmi"])
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

# ---- CUDA ----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", tuple(RULES))
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
        two = RULES[opt].states == 2
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
    # A host tensor among CUDA ones is refused by name before any pointer reaches the
    # library (which takes the device index on trust), and nothing is written.
    c1, c2, a1, a2 = [t.cuda() for t in state]
    q1, q2 = maps("cuda")
    pc = p0.cuda()
    before = [t.clone() for t in (pc, c1, c2, a1, a2)]
    for bad in ("g", "state2", "absmax1"):
        args = dict(g=g.cuda(), state2=c2, absmax1=a1)
        args[bad] = args[bad].cpu()
        with pytest.raises(ValueError, match=f"{bad} is on cpu"):
            ops.optimizer_update_8bit_blockwise("adamw", pc, args["g"], c1, args["state2"],
                                                args["absmax1"], a2, q1, q2, *hparams(1), 1.0)
    assert all(torch.equal(x, y) for x, y in zip(before, (pc, c1, c2, a1, a2)))
    # The C API refuses a device index that names no GPU.
    lib = _native.cuda
    fn = lib.function("bnbf_cuda_optimizer_update_8bit_blockwise", _native.I32, _native.P,
                      _native.P, _native.I32, _native.P, _native.P, _native.P, _native.P,
                      _native.P, _native.P, _native.P, _native.I64, _native.I32, _native.P)
    oargs = _native.OptimizerArgs(step=1)
    ptrs = [t.data_ptr() for t in (pc, g.cuda(), c1, c2, a1, a2, q1, q2)]
    rc = fn(1, ptrs[0], ptrs[1], 0, *ptrs[2:], ctypes.byref(oargs), n,
            torch.cuda.device_count(), None)
    assert rc == -1 and "no CUDA device" in lib.bnbf_last_error().decode()

@native
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_requantization_is_exact_at_every_threshold(signed):
    """Values at, just below and just above every rounding threshold of the map go through
    the native kernel's requantization (SGD's buffer at step 1 is g; Adagrad's sum is g*g)
    with absmax 1, and must get the reference's nearest code."""
    q = maps()[0 if signed else 1]
    thr, _ = nearest_thresholds(q)
    inf = torch.tensor(float("inf"))
    vals = [thr, torch.nextafter(thr, inf), torch.nextafter(thr, -inf)]
    for _ in range(3):
        vals.append(torch.nextafter(vals[-2], inf))
        vals.append(torch.nextafter(vals[-2], -inf))
    x = torch.cat(vals + [q])  # also the map values themselves
    x = x[(x.abs() <= 1) & (x >= (-1 if signed else 0))]
    if signed:
        g = x
        opt, hp = "sgd", (1e-3, 0.9, 0.0, 0.0, 0.0, 1e-8, 0.0, 0.0, False, 1, 1.0)
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
