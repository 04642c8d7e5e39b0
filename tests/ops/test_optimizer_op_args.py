"""Argument validation of the optimizer ops (Python and C API) and their fake impls."""
import ctypes

import pytest
import torch

import bnbfuse  # noqa: F401  (registers the ops)
from bnbfuse import _native
from bnbfuse.backends import reference as R
from bnbfuse.ops.optimizer import KernelHyperparams, optimizer_scalars
from optimizer_cases import (hparams, maps, clone_all, ops, native)


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
    a = _native.OptimizerArgs.from_scalars(optimizer_scalars("adam", KernelHyperparams(*hparams(1))))
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
    bad_step = _native.OptimizerArgs.from_scalars(optimizer_scalars("adam", KernelHyperparams(*hparams(1))))
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


# ---- step counts past int32 ---------------------------------------------------------------
@native
@pytest.mark.parametrize("step", [2**31, 2**32 + 1, 2**40 + 7], ids=str)
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
@pytest.mark.parametrize("opt", ["sgd", "adamw", "lars"])
def test_step_counts_past_int32_reach_the_kernel(opt, eight_bit, step):
    # The C API's step is int64: 2**31 was refused as negative and 2**32 + 1 wrapped to 1,
    # which restarts SGD/LARS momentum (the buffer is set to d on step 1).
    from optimizer_cases import bits_equal, grads, make_state, run_update

    upd = ops.optimizer_update_8bit_blockwise if eight_bit else ops.optimizer_update_32bit
    ref = R.optimizer_update_8bit_blockwise if eight_bit else R.optimizer_update_32bit
    p0 = torch.randn(300, generator=torch.Generator().manual_seed(1))
    pn, pr = p0.clone(), p0.clone()
    sn = make_state(opt, 300, eight_bit)
    sr = clone_all(sn)
    g = grads(300, torch.float32, seed=2)
    run_update(upd, opt, pn, g, sn, eight_bit, step)
    run_update(ref, opt, pr, g, sr, eight_bit, step)
    assert bits_equal(pn, pr)
    for a, b in zip(sn, sr):
        assert bits_equal(a, b)
    restarted = clone_all(sr)
    run_update(ref, opt, p0.clone(), g, restarted, eight_bit, 1)
    if opt != "adamw":
        assert not bits_equal(sr[0], restarted[0])


def test_step_count_too_large_for_int64_is_refused():
    with pytest.raises(ValueError, match="step"):
        optimizer_scalars("adamw", KernelHyperparams(lr=1e-3, beta1=0.9, step=2**63))
