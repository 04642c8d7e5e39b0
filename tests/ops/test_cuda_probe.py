"""The CUDA library's driver/runtime probe and the registration decision built on it.

A CUDA library whose probe fails (no driver, a driver older than its runtime, a GPU its
architectures do not cover) must not serve CUDA tensors: the reference kernels do, and one
warning says why when torch can use CUDA. These tests run on a CPU machine: the decision is
fed fake probe results, and the real probe is called where no NVIDIA driver exists.
"""
import ctypes
import ctypes.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bnbfuse import _native

ROOT = Path(__file__).resolve().parents[2]
needs_cuda_lib = pytest.mark.skipif(not _native.cuda.loaded,
                                    reason=f"native CUDA library not built: {_native.cuda.error}")
# The real probe's failure is only predictable where there is no driver at all.
no_driver = pytest.mark.skipif(ctypes.util.find_library("cuda") is not None,
                               reason="an NVIDIA driver (libcuda) is installed here")


class FakeLibrary:
    """Stands for a loaded CUDA library built for `archs` (the decision reads only that)."""

    loaded = True
    error = None

    def __init__(self, archs):
        self._archs = archs

    def bnbf_cuda_archs(self):
        return self._archs.encode()


def probe(driver=13000, runtime=13000, devices=((9, 0),), images=None, ok=True,
          count_error=None, message="ok"):
    """A fake probe result; `images` (one per device) are image errors ("" = loads)."""
    devs = tuple(_native.CudaDevice(i, cc, None if images is None else images[i])
                 for i, cc in enumerate(devices))
    return _native.CudaProbe(ok=ok, driver_version=driver, runtime_version=runtime,
                             devices=devs, device_count_error=count_error,
                             images_checked=images is not None, message=message)


@pytest.fixture
def torch_has_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def decide(result, archs="sm_75 sm_80 sm_90 sm_100 sm_120 compute_120"):
    return _native.decide_cuda(FakeLibrary(archs), probe=lambda lib: result)


# ---- the decision -------------------------------------------------------------------------------
def test_passing_probe_registers(torch_has_cuda):
    status = decide(probe(devices=((8, 0), (9, 0), (12, 0))))
    assert status.registered and status.reason is None
    # PTX of compute_120 serves a newer GPU (sm_121) the list has no machine code for
    assert decide(probe(devices=((12, 1),))).registered
    # images the driver loaded are its own answer
    assert decide(probe(devices=((9, 0),), images=("",)), archs="sm_90").registered


def test_driver_too_old_is_not_registered(torch_has_cuda):
    status = decide(probe(driver=12080, runtime=13000, ok=False))
    assert not status.registered
    assert "driver too old" in status.reason
    assert "CUDA 12.8" in status.reason and "CUDA 13.0" in status.reason
    assert "r580" in status.reason
    # minor version compatibility: a 13.0 driver runs a 13.2 runtime
    assert decide(probe(driver=13000, runtime=13020)).registered


def test_no_driver_and_no_device(torch_has_cuda):
    status = decide(probe(driver=0, devices=(), ok=False,
                          count_error="cudaErrorInsufficientDriver: ..."))
    assert not status.registered and "no NVIDIA driver" in status.reason
    assert "cudaErrorInsufficientDriver" in status.reason
    status = decide(probe(devices=(), ok=False, count_error="cudaErrorNoDevice: no device"))
    assert not status.registered and "no usable CUDA device" in status.reason


def test_no_kernel_image_for_a_device(torch_has_cuda):
    # a T4 (sm_75) beside an A100 with a library built for sm_80 sm_90 only
    status = decide(probe(devices=((8, 0), (7, 5))), archs="sm_80 sm_90 compute_90")
    assert not status.registered
    assert "no kernel image for device 1 (sm_75)" in status.reason
    assert "sm_80 sm_90 compute_90" in status.reason
    # the driver's own refusal, seen when the probe loads the images
    status = decide(probe(devices=((9, 0),), images=("cudaErrorNoKernelImageForDevice: x",)),
                    archs="sm_90")
    assert not status.registered and "cudaErrorNoKernelImageForDevice" in status.reason


def test_ptx_only_device_needs_a_driver_as_new_as_the_toolkit(torch_has_cuda):
    # sm_120 runs on the compute_120 PTX only; a 13.0 driver cannot compile 13.1's PTX
    status = decide(probe(driver=13000, runtime=13010, devices=((12, 1),)),
                    archs="sm_90 compute_120")
    assert not status.registered and "only PTX" in status.reason
    assert decide(probe(driver=13010, runtime=13010, devices=((12, 1),)),
                  archs="sm_90 compute_120").registered


def test_torch_without_cuda_is_not_registered_and_does_not_warn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_native, "_cuda_warned", False)

    def never(lib):
        raise AssertionError("the probe must not run when torch has no CUDA")

    status = _native.decide_cuda(FakeLibrary("sm_90"), probe=never)
    assert not status.registered
    assert status.reason.startswith(("torch has no CUDA", "torch sees no CUDA device"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _native.warn_cuda_unusable(status)
    assert not caught


def test_library_without_probe_is_not_registered(torch_has_cuda):
    def old_library(lib):
        raise RuntimeError("libbnbfuse_cuda.so predates the driver probe: rebuild it")

    status = _native.decide_cuda(FakeLibrary("sm_90"), probe=old_library)
    assert not status.registered and "predates the driver probe" in status.reason


def test_failed_probe_warns_exactly_once(torch_has_cuda, monkeypatch):
    monkeypatch.setattr(_native, "_cuda_warned", False)
    status = decide(probe(driver=12080, ok=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _native.warn_cuda_unusable(status)
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "not registered: driver too old" in str(caught[0].message)
    assert "reference kernels" in str(caught[0].message)


@pytest.mark.parametrize("arch, capability, runs", [
    ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_80", (9, 0), False),
    ("sm_86", (8, 0), False), ("sm_100", (12, 0), False), ("sm_120", (12, 1), True),
    ("compute_80", (9, 0), True), ("compute_90", (8, 6), False),
    ("compute_120", (12, 0), True), ("sm_90a", (9, 0), True), ("sm_90a", (9, 1), False),
    ("compute_90a", (10, 0), False), ("sm_100f", (10, 3), True), ("bogus", (9, 0), False),
])
def test_arch_compatibility(arch, capability, runs):
    assert _native.arch_runs_on(arch, capability) is runs


# ---- the real probe, on a machine without a driver ---------------------------------------------
PROBE_SCRIPT = r"""
from bnbfuse import _native
for load in (False, True):
    p = _native.probe_cuda(load_images=load)
    print("PROBE", p.ok, p.driver_version, p.runtime_version, len(p.devices), p.images_checked)
    print("ERROR", p.device_count_error)
    print("MESSAGE", p.message)
print("LAST", _native.cuda.bnbf_last_error().decode())
"""


@needs_cuda_lib
@no_driver
def test_real_probe_fails_cleanly_without_a_driver():
    # in a child process: a crash there fails this test instead of killing pytest
    proc = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    probes = [line.split()[1:] for line in lines if line.startswith("PROBE")]
    assert len(probes) == 2
    for ok, driver, runtime, ndev, checked in probes:
        assert (ok, driver, ndev, checked) == ("False", "0", "0", "False")
        assert int(runtime) >= 11000  # the static runtime answers without a driver
    assert all("cudaErrorInsufficientDriver" in line or "cudaErrorNoDevice" in line
               for line in lines if line.startswith("ERROR"))
    messages = [line.removeprefix("MESSAGE ") for line in lines if line.startswith("MESSAGE")]
    assert all(m.startswith("no NVIDIA driver found") for m in messages), messages
    assert [line for line in lines if line.startswith("LAST")] == ["LAST " + messages[-1]]


@needs_cuda_lib
def test_probe_refuses_a_mismatched_struct():
    fn = _native.cuda.function("bnbf_cuda_probe", ctypes.c_void_p, _native.I64, _native.I32)
    info = _native.CudaProbeInfo()
    assert fn(ctypes.addressof(info), ctypes.sizeof(info) - 4, 0) == -1
    assert "info_size" in _native.cuda.bnbf_last_error().decode()
    assert fn(None, ctypes.sizeof(info), 0) == -1
    assert "null pointer" in _native.cuda.bnbf_last_error().decode()
    text = _native.cuda.bnbf_cuda_error_string(209).decode()
    assert text.startswith("cudaErrorNoKernelImageForDevice: ")


# ---- import bnbfuse with a probe that fails -----------------------------------------------------
IMPORT_SCRIPT = r"""
import warnings
import torch
torch.cuda.is_available = lambda: True  # torch "has" a GPU; the library's probe says no
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import bnbfuse
    from bnbfuse import _native
    import bnbfuse.backends  # already imported: no second decision, no second warning
    _native.warn_cuda_unusable(_native.cuda_status())
    info = bnbfuse.backend_info()
mine = [w for w in caught if "CUDA kernels not registered" in str(w.message)]
print("WARNINGS", len(mine), mine[0].category.__name__ if mine else None)
print("WHY", mine[0].message if mine else None)
print("REGISTERED", _native.cuda_status().registered)
has = torch._C._dispatch_has_kernel_for_dispatch_key
print("CUDA_KERNEL", has("bnbfuse::quantize_blockwise", "CUDA"),
      has("bnbfuse::optimizer_update_8bit_blockwise", "CUDA"))
print("SERVES", has("bnbfuse::quantize_blockwise", "CompositeExplicitAutograd"))
print("CUDA", info["cuda"])
"""


@needs_cuda_lib
@no_driver
def test_failed_probe_is_not_registered_and_warns_once():
    proc = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert out["WARNINGS"] == "1 RuntimeWarning"
    assert "no NVIDIA driver found" in out["WHY"] and "reference kernels" in out["WHY"]
    assert out["REGISTERED"] == "False"
    assert out["CUDA_KERNEL"] == "False False"  # the native CUDA kernels are not there
    assert out["SERVES"] == "True"               # the reference kernels are
    assert out["CUDA"].startswith("not registered: no NVIDIA driver found")


def run_main(*pre):
    code = "; ".join([*pre, "import runpy", "runpy.run_module('bnbfuse', run_name='__main__')"])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in
                                                proc.stdout.splitlines() if ":" in line)}
    return lines, proc.stderr


@needs_cuda_lib
@pytest.mark.skipif(torch.cuda.is_available(), reason="torch has CUDA here")
def test_python_m_bnbfuse_says_why_not_registered():
    lines, stderr = run_main()
    assert lines["cuda"].startswith("not registered: torch ")  # no CUDA torch / no device
    assert f"library built for {lines['cuda_archs']}" in lines["cuda"]
    assert lines["cuda_runtime"].startswith("CUDA ") and "needs a CUDA" in lines["cuda_runtime"]
    assert "CUDA kernels not registered" not in stderr  # no CUDA torch: no warning


@needs_cuda_lib
@no_driver
def test_python_m_bnbfuse_reports_the_missing_driver():
    lines, stderr = run_main("import torch", "torch.cuda.is_available = lambda: True")
    assert lines["cuda"].startswith("not registered: no NVIDIA driver found")
    assert lines["cuda_driver"] == "none"
    assert lines["cuda_devices"].startswith("none (cudaError")
    assert stderr.count("CUDA kernels not registered") == 1


def test_backend_info_without_the_cuda_library():
    env = dict(os.environ, BNBFUSE_DISABLE_NATIVE="1")
    proc = subprocess.run([sys.executable, "-m", "bnbfuse"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "cuda: not loaded: disabled by BNBFUSE_DISABLE_NATIVE" in proc.stdout
