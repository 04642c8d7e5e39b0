"""The backends of the quantization ops agree bit for bit: native CPU (every instruction set
this CPU runs) and native CUDA against the pure-PyTorch reference and the NumPy oracle.
Also the C ABI's own argument checks, running without the native library, and
``python -m bnbfuse``.
"""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bnbfuse.functional as F
from bnbfuse import _native
from bnbfuse.backends import reference
from _nearest import quantize_numpy, same_bits

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cpu_lib = pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")


def force_isa(name):
    fn = _native.cpu.bnbf_cpu_force_isa
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn(None if name is None else name.encode())


def clustered_map() -> torch.Tensor:
    """256 values packed so tightly that several nearest-thresholds share a 16-bit bin:
    the CPU kernels must take their binary-search path (QuantMap.one_step is false)."""
    base = np.float32(0.5)
    values = [base]
    for _ in range(127):
        values.append(np.nextafter(values[-1], np.float32(1)))
    values = np.array(values, np.float32)
    values = np.concatenate([values, -values[:127], [np.float32(0.0)]])
    return torch.from_numpy(np.random.default_rng(1).permutation(values).astype(np.float32))


def inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[: n // 4] *= 1e-30
    x[n // 4: n // 3] = 0
    x[n // 2: n // 2 + 50] = torch.randn(50, generator=g) * 1e-42
    return x


MAPS = {
    "signed": lambda: F.dynamic_map(True),
    "unsigned": lambda: F.dynamic_map(False),
    "clustered": clustered_map,
}


@needs_cpu_lib
@pytest.mark.parametrize("mapname", list(MAPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [1, 7, 64, 256, 1000, 4096, 6000])
def test_native_cpu_equals_reference(isa, mapname, dtype, blocksize):
    code = MAPS[mapname]()
    x = inputs(2 * blocksize + 4099, seed=blocksize).to(dtype)
    if mapname == "clustered":  # values around +-0.5 so the tight cluster matters
        x = x.float().clamp(-1, 1).mul(0.5).add(torch.rand(x.shape) * 1e-6).to(dtype)
        x[::blocksize] = 1.0
    codes, absmax = torch.ops.bnbfuse.quantize_blockwise(x, code, blocksize)
    ref_codes, ref_absmax = reference.quantize_blockwise(x, code, blocksize)
    assert same_bits(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes), f"{(codes != ref_codes).sum()} codes differ ({isa})"
    for out_dtype in DTYPES:
        y = torch.ops.bnbfuse.dequantize_blockwise(codes, absmax, code, blocksize, out_dtype)
        ref_y = reference.dequantize_blockwise(codes, absmax, code, blocksize, out_dtype)
        assert y.dtype == out_dtype and same_bits(y, ref_y)


@needs_cpu_lib
def test_native_cpu_equals_oracle_clustered(isa):
    code = clustered_map()
    x = (0.5 + torch.rand(20000) * 2e-5) * torch.where(torch.rand(20000) < 0.5, -1.0, 1.0)
    x[0] = 0.51
    codes, state = F.quantize_blockwise(x, code=code, blocksize=512)
    want, want_absmax = quantize_numpy(x, code, 512)
    assert same_bits(state.absmax, want_absmax) and np.array_equal(codes.numpy(), want)


@needs_cpu_lib
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_cpu_thread_counts_agree(threads):
    old = torch.get_num_threads()
    x = torch.randn(300_000, dtype=torch.bfloat16)
    try:
        torch.set_num_threads(threads)
        codes, state = F.quantize_blockwise(x, blocksize=256)
        y = F.dequantize_blockwise(codes, state)
    finally:
        torch.set_num_threads(old)
    ref_codes, ref_absmax = reference.quantize_blockwise(x, F.dynamic_map(True), 256)
    assert torch.equal(codes, ref_codes) and torch.equal(state.absmax, ref_absmax)
    assert same_bits(y, reference.dequantize_blockwise(codes, state.absmax, F.dynamic_map(True), 256,
                                                       torch.bfloat16))


# ---- the C ABI rejects bad arguments itself -------------------------------------------------
@needs_cpu_lib
def test_c_api_rejects_bad_arguments():
    lib = _native.cpu
    P, I32, I64 = _native.P, _native.I32, _native.I64
    q = lib.function("bnbf_cpu_quantize_blockwise", P, P, I32, P, P, I64, I64, I32)
    dq = lib.function("bnbf_cpu_dequantize_blockwise", P, P, P, P, I32, I64, I64, I32)
    code = F.dynamic_map(True).contiguous()
    x = torch.randn(100)
    codes = torch.empty(100, dtype=torch.uint8)
    absmax = torch.empty(2)
    p = [code.data_ptr(), x.data_ptr(), absmax.data_ptr(), codes.data_ptr()]

    def err():
        return lib.bnbf_last_error().decode()

    assert q(p[0], p[1], 0, p[2], p[3], 64, 100, 1) == 0
    assert q(p[0], p[1], 0, p[2], p[3], 64, -1, 1) == -1 and "n must be >= 0" in err()
    assert q(p[0], p[1], 0, p[2], p[3], 0, 100, 1) == -1 and "blocksize" in err()
    assert q(p[0], p[1], 5, p[2], p[3], 64, 100, 1) == -1 and "dtype" in err()
    for i in range(4):
        args = list(p)
        args[i] = None
        assert q(args[0], args[1], 0, args[2], args[3], 64, 100, 1) == -1
        assert "null pointer" in err()
    assert q(None, None, 0, None, None, 64, 0, 1) == 0  # nothing to do, nothing touched
    out = torch.empty(100)
    assert dq(p[0], p[3], p[2], out.data_ptr(), 0, 64, 100, 2) == 0
    assert dq(p[0], p[3], p[2], out.data_ptr(), 0, 64, -5, 2) == -1 and "n must be" in err()
    assert dq(p[0], None, p[2], out.data_ptr(), 0, 64, 100, 2) == -1
    assert dq(p[0], p[3], p[2], out.data_ptr(), 3, 64, 100, 2) == -1 and "dtype" in err()
    assert dq(p[0], p[3], p[2], out.data_ptr(), 0, -1, 100, 2) == -1
    assert force_isa("no-such-isa") == -4 and "no-such-isa" in err()
    force_isa(None)
    with pytest.raises(ValueError, match="blocksize"):
        lib.check(q(p[0], p[1], 0, p[2], p[3], 0, 100, 1), "quantize_blockwise")


# ---- without the native library ---------------------------------------------------------------
NO_NATIVE_SCRIPT = r"""
import sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    import bnbfuse
    import bnbfuse.functional as F
    bnbfuse._native.warn_if_missing()  # a second call must not warn again
    torch.manual_seed(0)
    x = torch.randn(5000)
    codes, state = F.quantize_blockwise(x, blocksize=256)
    y = F.dequantize_blockwise(codes, state)
    errors = []
    for bad in (lambda: F.quantize_blockwise(x, code=torch.zeros(255)),
                lambda: F.dequantize_blockwise(codes, absmax=state.absmax[:3], blocksize=256),
                lambda: F.dequantize_blockwise(codes, absmax=state.absmax, blocksize=0)):
        try:
            bad()
        except ValueError as e:
            errors.append(str(e))
assert len(errors) == 3, errors
native = [w for w in caught if "native CPU library not loaded" in str(w.message)]
print("WARNINGS", len(native), native[0].category.__name__ if native else None)
print("CPU", bnbfuse.backend_info()["cpu"])
torch.save({"codes": codes, "absmax": state.absmax, "y": y}, sys.argv[1])
"""


def test_works_without_native_library(tmp_path):
    out = tmp_path / "result.pt"
    env = dict(os.environ, BNBFUSE_DISABLE_NATIVE="1")
    proc = subprocess.run([sys.executable, "-c", NO_NATIVE_SCRIPT, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNINGS 1 RuntimeWarning" in proc.stdout
    assert "CPU not loaded: disabled by BNBFUSE_DISABLE_NATIVE" in proc.stdout
    got = torch.load(out)
    torch.manual_seed(0)
    x = torch.randn(5000)
    codes, state = F.quantize_blockwise(x, blocksize=256)  # native here when built
    assert torch.equal(got["codes"], codes) and torch.equal(got["absmax"], state.absmax)
    assert same_bits(got["y"], F.dequantize_blockwise(codes, state))


def built_cuda_archs():
    """What the CUDA library must report: the list its build folder compiled (setup.py's
    build/cmake-cuda), else (a library built elsewhere) None."""
    cache = ROOT / "build" / "cmake-cuda" / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text().splitlines():
        if line.startswith("BNBF_CUDA_ARCH_NAMES:"):
            return line.split("=", 1)[1]
    return None


def check_cuda_archs(archs):
    """bnbf_cuda_archs: nvcc names of the compiled list, machine code before PTX."""
    expected = built_cuda_archs()
    if expected is not None:
        assert archs == expected
    names = archs.split()
    assert names and all(_native._parse_arch(n) for n in names), archs
    kinds = [n.split("_")[0] for n in names]
    assert kinds == sorted(kinds, key=lambda k: k != "sm"), archs


def test_python_m_bnbfuse():
    proc = subprocess.run([sys.executable, "-m", "bnbfuse"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["torch"] == torch.__version__
    assert "cpu" in lines and "cpu_isa" in lines and "cuda" in lines
    if _native.cpu.loaded:
        assert lines["cpu"].startswith("loaded")
        assert lines["cpu_isa"] in ("generic", "avx2", "avx512", "avx512vbmi")
        assert lines["cpu_isa"] in lines["cpu_isas_compiled"].split()
    if _native.cuda.loaded:
        check_cuda_archs(lines["cuda_archs"])
        if _native.cuda_status().registered:
            assert lines["cuda"].startswith("registered")
        else:
            assert lines["cuda"].startswith("not registered: " + _native.cuda_status().reason)


@needs_cpu_lib
def test_cpu_isa_environment_variable_forces_a_lower_path():
    """BNBFUSE_CPU_ISA caps the instruction set; a higher one than the CPU has is ignored."""
    import os
    best = _native.cpu.lib.bnbf_cpu_isa().decode()
    for asked, expected in (("generic", "generic"), ("avx512vbmi", best)):
        env = dict(os.environ, BNBFUSE_CPU_ISA=asked)
        proc = subprocess.run([sys.executable, "-m", "bnbfuse"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env=env)
        lines = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in
                                                    proc.stdout.splitlines() if ":" in line)}
        assert lines["cpu_isa"] == expected, (asked, proc.stdout)


# ---- CUDA --------------------------------------------------------------------------------------
def _cuda_ready():
    if not _native.cuda.loaded:
        pytest.skip(f"native CUDA library not loaded: {_native.cuda.error}")
    if torch.cuda.is_available() and not _native.cuda_status().registered:
        # the reference kernels serve CUDA tensors here: comparing them would prove nothing
        pytest.skip(f"native CUDA kernels not registered: {_native.cuda_status().reason}")


@pytest.mark.cuda
@pytest.mark.parametrize("mapname", list(MAPS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [1, 7, 32, 64, 128, 256, 512, 1000, 1024, 2048, 4096, 4097,
                                       8192, 100_000])
def test_cuda_equals_cpu(mapname, dtype, blocksize):
    _cuda_ready()
    code = MAPS[mapname]()
    x = inputs(3 * blocksize + 12345, seed=blocksize).to(dtype)
    if mapname == "clustered":
        x = x.float().clamp(-1, 1).mul(0.5).add(torch.rand(x.shape) * 1e-6).to(dtype)
        x[::blocksize] = 1.0
    ref_codes, ref_absmax = reference.quantize_blockwise(x, code, blocksize)
    codes, absmax = torch.ops.bnbfuse.quantize_blockwise(x.cuda(), code.cuda(), blocksize)
    torch.cuda.synchronize()
    assert same_bits(absmax, ref_absmax)
    mism = (codes.cpu() != ref_codes).sum().item()
    assert mism == 0, f"{mism} codes differ"
    for out_dtype in DTYPES:
        y = torch.ops.bnbfuse.dequantize_blockwise(codes, absmax, code.cuda(), blocksize, out_dtype)
        ref_y = reference.dequantize_blockwise(ref_codes, ref_absmax, code, blocksize, out_dtype)
        assert y.dtype == out_dtype and same_bits(y, ref_y)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_functional_matches_oracle_and_cpu(dtype):
    _cuda_ready()
    torch.manual_seed(0)
    x = torch.randn(1024, 1024, dtype=dtype)
    x[:3] = 0  # all-zero blocks
    for blocksize in (64, 256, 4096):
        for signed in (True, False):
            xs = x if signed else x.abs()
            code = F.dynamic_map(signed)
            c_cpu, s_cpu = F.quantize_blockwise(xs, code=code, blocksize=blocksize)
            c_gpu, s_gpu = F.quantize_blockwise(xs.cuda(), code=code.cuda(), blocksize=blocksize)
            assert c_gpu.device.type == "cuda" and torch.equal(c_gpu.cpu(), c_cpu)
            assert same_bits(s_gpu.absmax, s_cpu.absmax)
            y = F.dequantize_blockwise(c_gpu, s_gpu)
            assert y.dtype == dtype and same_bits(y, F.dequantize_blockwise(c_cpu, s_cpu))
            assert not torch.isnan(y).any()
    want, want_absmax = quantize_numpy(x[:64], F.dynamic_map(True), 256)
    codes, state = F.quantize_blockwise(x[:64].cuda(), blocksize=256)
    assert np.array_equal(codes.cpu().numpy(), want) and same_bits(state.absmax, want_absmax)


@pytest.mark.cuda
def test_cuda_layouts_nan_empty_nested_streams():
    _cuda_ready()
    base = torch.randn(300, 500, device="cuda")
    for x in (base.t(), base[:, ::7], base[3]):
        c, s = F.quantize_blockwise(x, blocksize=128)
        c2, s2 = F.quantize_blockwise(x.cpu(), blocksize=128)
        assert torch.equal(c.cpu(), c2) and torch.equal(s.absmax.cpu(), s2.absmax)
    x = torch.randn(1024, device="cuda")
    x[600] = float("nan")
    c, s = F.quantize_blockwise(x, blocksize=256)
    assert torch.isnan(s.absmax[2]) and torch.isfinite(s.absmax[[0, 1, 3]]).all()
    c_cpu, _ = F.quantize_blockwise(x.cpu(), blocksize=256)
    assert torch.equal(c.cpu(), c_cpu)  # NaN blocks too: the CPU and CUDA kernels agree
    e, se = F.quantize_blockwise(torch.empty(0, 3, device="cuda"))
    assert e.shape == (0, 3) and F.dequantize_blockwise(e, se).shape == (0, 3)
    c, s = F.quantize_blockwise(base, blocksize=256, nested=True)
    assert (F.dequantize_blockwise(c, s) - base).abs().mean() < 0.011
    stream = torch.cuda.Stream()
    big = torch.randn(1 << 22, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        c, s = F.quantize_blockwise(big, blocksize=4096)
        y = F.dequantize_blockwise(c, s)
    stream.synchronize()
    c_ref, s_ref = F.quantize_blockwise(big, blocksize=4096)
    assert torch.equal(c, c_ref) and torch.equal(y, F.dequantize_blockwise(c_ref, s_ref))


@pytest.mark.cuda
def test_cuda_c_api_rejects_bad_arguments():
    _cuda_ready()
    lib = _native.cuda
    P, I32, I64 = _native.P, _native.I32, _native.I64
    q = lib.function("bnbf_cuda_quantize_blockwise", P, P, I32, P, P, I64, I64, I32, P)
    code = F.dynamic_map(True, "cuda").contiguous()
    x = torch.randn(100, device="cuda")
    codes = torch.empty(100, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(2, device="cuda")
    p = [code.data_ptr(), x.data_ptr(), absmax.data_ptr(), codes.data_ptr()]
    err = lambda: lib.bnbf_last_error().decode()  # noqa: E731
    check_cuda_archs(lib.bnbf_cuda_archs().decode())
    dev = x.device.index
    assert q(p[0], p[1], 0, p[2], p[3], 64, 100, dev, None) == 0
    torch.cuda.synchronize()
    assert q(p[0], p[1], 0, p[2], p[3], 64, -1, dev, None) == -1 and "n must be" in err()
    assert q(p[0], p[1], 0, p[2], p[3], 0, 100, dev, None) == -1 and "blocksize" in err()
    assert q(p[0], p[1], 9, p[2], p[3], 64, 100, dev, None) == -1 and "dtype" in err()
    assert q(p[0], None, 0, p[2], p[3], 64, 100, dev, None) == -1 and "null" in err()
    # The library trusts the device index for the buffers, but never launches on a GPU
    # that does not exist.
    for bad in (-1, torch.cuda.device_count()):
        assert q(p[0], p[1], 0, p[2], p[3], 64, 100, bad, None) == -1
        assert f"no CUDA device {bad}" in err()
    assert q(None, None, 0, None, None, 64, 0, dev, None) == 0
    # Host memory never reaches the library: the Python side refuses it by name.
    from bnbfuse.backends.native import cuda_tail
    with pytest.raises(ValueError, match="out is on cpu, but the call runs on cuda"):
        cuda_tail("quantize_blockwise", x, code=code, out=torch.empty(100, dtype=torch.uint8))
    assert cuda_tail("quantize_blockwise", x, code=code, out=codes)[0] == dev


def test_cuda_library_host_side_checks():
    """The CUDA library's own argument checks and error buffer; runs without a GPU (the
    checks return before any CUDA call)."""
    _cuda_ready()
    lib = _native.cuda
    P, I32, I64 = _native.P, _native.I32, _native.I64
    q = lib.function("bnbf_cuda_quantize_blockwise", P, P, I32, P, P, I64, I64, I32, P)
    dq = lib.function("bnbf_cuda_dequantize_blockwise", P, P, P, P, I32, I64, I64, I32, P)
    err = lambda: lib.bnbf_last_error().decode()  # noqa: E731
    check_cuda_archs(lib.bnbf_cuda_archs().decode())
    if _native.cpu.loaded:
        assert lib.bnbf_version().decode() == _native.cpu.bnbf_version().decode()
    fake = 4096  # never dereferenced: every call below fails its checks first
    assert q(fake, fake, 0, fake, fake, 64, -1, 0, None) == -1 and "n must be >= 0" in err()
    assert q(fake, fake, 0, fake, fake, 0, 10, 0, None) == -1 and "blocksize" in err()
    assert q(fake, fake, 3, fake, fake, 64, 10, 0, None) == -1 and "dtype" in err()
    assert q(None, fake, 0, fake, fake, 64, 10, 0, None) == -1 and "null pointer" in err()
    assert dq(fake, fake, fake, fake, 0, 64, -2, 0, None) == -1 and "n must be" in err()
    assert dq(fake, fake, None, fake, 0, 64, 10, 0, None) == -1 and "null pointer" in err()
    assert q(None, None, 0, None, None, 64, 0, 0, None) == 0
    assert dq(None, None, None, None, 2, 64, 0, 0, None) == 0
    # A device index that names no GPU is refused before anything is launched (without a
    # GPU or driver every index is: BNBF_E_ARG, or BNBF_E_CUDA from counting the devices).
    assert q(fake, fake, 0, fake, fake, 64, 10, -1, None) == -1 and "no CUDA device -1" in err()
    assert q(fake, fake, 0, fake, fake, 64, 10, 1 << 20, None) in (-1, -3) and err()
    if not torch.cuda.is_available():
        assert dq(fake, fake, fake, fake, 0, 64, 10, 0, None) in (-1, -3) and err()
