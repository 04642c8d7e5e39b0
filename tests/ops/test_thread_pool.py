"""The native CPU thread pool (csrc/cpu/runtime.cpp): workers and caller spin briefly before
they sleep, so back-to-back parallel calls, calls with more threads than cores, and calls
from several Python threads at once must all give the single-threaded bits."""
import threading

import pytest
import torch

import bnbfuse.functional as F
from bnbfuse import _native

pytestmark = pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")

# around the kernels' grain (16k elements): one chunk, a few, many
SIZES = [16_384, 16_385, 40_000, 65_536, 200_001]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=gen) for n in SIZES]


def _quantize_all(xs, rounds):
    return [F.quantize_blockwise(x, blocksize=256) for _ in range(rounds) for x in xs]


def _assert_matches(got, want):
    """got: rounds of results over the inputs; want: one round, single-threaded."""
    for i, (codes, state) in enumerate(got):
        ref_codes, ref_state = want[i % len(want)]
        assert torch.equal(codes, ref_codes)
        assert torch.equal(state.absmax, ref_state.absmax)


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("num_threads", [2, 3, 8])
def test_back_to_back_parallel_calls_match_one_thread(threads, num_threads):
    xs = _inputs()
    torch.set_num_threads(1)
    want = _quantize_all(xs, 1)
    torch.set_num_threads(num_threads)  # 3 and 8: more workers than this machine's cores
    _assert_matches(_quantize_all(xs, 40), want)


def test_concurrent_python_threads_match_one_thread(threads):
    xs = _inputs()
    torch.set_num_threads(1)
    want = _quantize_all(xs, 1)
    torch.set_num_threads(2)
    results, errors = {}, []

    def user(k):
        try:
            results[k] = _quantize_all(xs, 15)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    workers = [threading.Thread(target=user, args=(k,)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not errors and all(not w.is_alive() for w in workers)
    assert len(results) == len(workers)
    for got in results.values():
        _assert_matches(got, want)
