"""The native CPU library's cache of prepared quantization maps stays bounded.

Every distinct 256-value map is prepared once (thresholds, lookup tables) and cached; a
program that quantizes with ever new maps (a per-layer learned map, a fuzzer) used to grow
that cache without limit. It now keeps the most recently used maps, and a map evicted while
another thread still uses it stays alive until that call ends.
"""
import threading

import pytest
import torch

import bnbfuse.functional as F
from bnbfuse import _native
from bnbfuse.backends import reference as R

pytestmark = pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")

CACHE_LIMIT = 64  # kQuantMapCacheSize in csrc/cpu/qmap.h


def cache_size() -> int:
    return _native.cpu.lib.bnbf_cpu_qmap_cache_size()


def perturbed_map(i: int) -> torch.Tensor:
    """The signed dynamic map with its inner values moved by a tiny, i-dependent amount."""
    code = F.dynamic_map(True).clone()
    code[1:-1] += (i + 1) * 1e-7 * torch.linspace(0, 1, 254)
    return code


def test_many_distinct_maps_stay_bounded():
    x = torch.randn(1024)
    for i in range(3 * CACHE_LIMIT):
        F.quantize_blockwise(x, code=perturbed_map(i), blocksize=256)
        assert cache_size() <= CACHE_LIMIT
    assert cache_size() == CACHE_LIMIT


def test_an_evicted_map_is_rebuilt_exactly():
    x = torch.randn(4096)
    first = perturbed_map(10_000)
    codes, state = F.quantize_blockwise(x, code=first, blocksize=256)
    for i in range(CACHE_LIMIT + 8):  # pushes `first` out of the cache
        F.quantize_blockwise(x[:256], code=perturbed_map(20_000 + i), blocksize=256)
    again, state_again = F.quantize_blockwise(x, code=first, blocksize=256)
    want, want_absmax = R.quantize_blockwise(x, first, 256)
    assert torch.equal(codes, want) and torch.equal(again, want)
    assert torch.equal(state_again.absmax, want_absmax)
    out = F.dequantize_blockwise(again, state_again)
    assert torch.equal(out, R.dequantize_blockwise(want, want_absmax, first, 256, torch.float32))


def test_eviction_under_concurrent_use_gives_exact_results():
    # Threads quantize large tensors (the ctypes call releases the GIL) while others churn
    # the cache; a map freed in use would give wrong codes or crash.
    x = torch.randn(1 << 18)
    maps = [perturbed_map(30_000 + i) for i in range(4)]
    want = [R.quantize_blockwise(x, m, 256)[0] for m in maps]
    errors = []

    def user(k):
        for _ in range(6):
            got, _ = F.quantize_blockwise(x, code=maps[k], blocksize=256)
            if not torch.equal(got, want[k]):
                errors.append(k)

    def churn(offset):
        for i in range(2 * CACHE_LIMIT):
            F.quantize_blockwise(x[:64], code=perturbed_map(offset + i), blocksize=64)

    threads = [threading.Thread(target=user, args=(k,)) for k in range(len(maps))]
    threads += [threading.Thread(target=churn, args=(40_000 + 1000 * j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache_size() <= CACHE_LIMIT
