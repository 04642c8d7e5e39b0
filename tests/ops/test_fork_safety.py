"""The native thread pool after fork: a child of a process that ran multi-threaded kernels
(os.fork, a multiprocessing fork pool, DataLoader workers) runs them too instead of
waiting forever on worker threads that do not exist in it."""
import subprocess
import sys
from pathlib import Path

import pytest

from bnbfuse import _native

ROOT = Path(__file__).resolve().parents[2]
native = pytest.mark.skipif(not _native.cpu.loaded, reason="native CPU library not built")

FORK_POOL = r"""
import hashlib
import multiprocessing as mp
import torch, bnbfuse as bnb

torch.set_num_threads(2)
torch.manual_seed(0)
model = torch.nn.Sequential(bnb.nn.FusionEmbedding(5000, 16, 64, base_quant="int8"),
                            torch.nn.Linear(64, 8))
opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=256)
ids = torch.randint(0, 5016, (64, 128))
model(ids).sum().backward()
opt.step()                                    # multi-threaded kernels in the parent
x = torch.randn(1 << 20)
bnb.functional.quantize_blockwise(x)


def evaluate(seed):
    # torch's own OpenMP team is not fork-safe (torch's DataLoader workers set one thread
    # for that reason), so the child runs no torch op that may go parallel (MKL's sgemm of
    # even the small Linear does on some CPUs and hangs) and hashes with numpy; the lookup
    # is bnbfuse's kernel and the quantize of 2**20 elements runs on bnbfuse's pool with two
    # threads.
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model[0](torch.randint(0, 5016, (2, 8)))
    codes, state = bnb.functional.quantize_blockwise(x)
    return (hashlib.sha1(out.numpy().tobytes()).hexdigest(),
            hashlib.sha1(codes.numpy().tobytes()).hexdigest())


with mp.get_context("fork").Pool(2) as pool:
    results = pool.map(evaluate, range(4))
assert results == [evaluate(s) for s in range(4)], results
print("ok")
"""

OS_FORK = r"""
import os, torch, bnbfuse as bnb

torch.set_num_threads(2)
p = torch.nn.Parameter(torch.randn(1 << 18))
opt = bnb.optim.AdamW8bit([p], lr=1e-3)
p.grad = torch.randn_like(p)
opt.step()
pid = os.fork()
if pid == 0:
    p.grad = torch.randn_like(p)
    opt.step()                                 # the optimizer kernel in the child
    bnb.functional.quantize_blockwise(torch.randn(1 << 20))
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.WEXITSTATUS(status) == 0, status
opt.step()                                     # and the parent's pool still works
print("ok")
"""


@native
@pytest.mark.parametrize("script", [FORK_POOL, OS_FORK], ids=["fork_pool", "os_fork"])
def test_forked_child_runs_native_kernels(script):
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a forked child hung in a native kernel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
