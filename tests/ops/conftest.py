"""The `isa` fixture: runs a test once per CPU instruction-set path of the native library,
skipping the paths this CPU or build cannot run, and restores the automatic choice after."""
import ctypes

import pytest

from bnbfuse import _native

ISAS = ["generic", "avx2", "avx512", "avx512vbmi"]


@pytest.fixture(params=ISAS)
def isa(request):
    if not _native.cpu.loaded:
        pytest.skip("native CPU library not built")
    fn = _native.cpu.lib.bnbf_cpu_force_isa
    fn.argtypes = [ctypes.c_char_p]
    if fn(request.param.encode()) != 0:
        fn(None)
        pytest.skip(f"this CPU or build does not run {request.param}")
    yield request.param
    fn(None)
