"""DTensor (FSDP2-style) parameters: state on the local shard, min_8bit_size on the global
size, norms summed over the shards. Two gloo processes on CPU."""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_workers

pytest.importorskip("torch.distributed.tensor")


def _weights():
    torch.manual_seed(0)
    w = torch.randn(64, 100)
    w[32:] *= 10  # rank 1's shard is 10x larger: per-shard norms would give other ratios
    return w


def _cases(bo):
    return (("adamw8", lambda ps: bo.AdamW8bit(ps, lr=1e-2)),
            ("lamb8", lambda ps: bo.LAMB8bit(ps, lr=1e-2, max_unorm=0)),
            ("lamb32", lambda ps: bo.LAMB32bit(ps, lr=1e-2, max_unorm=0, min_8bit_size=0)),
            ("clip32", lambda ps: bo.AdamW32bit(ps, lr=1e-2, max_unorm=1e-3)))


def _worker(rank, world):
    import warnings

    warnings.simplefilter("ignore")
    import bnbfuse.optim as bo
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full = _weights()  # 6400 elements: 3200 per rank, below min_8bit_size
    grads = [torch.randn(64, 100) * 0.01 for _ in range(4)]
    results = {}
    for name, make in _cases(bo):
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        opt = make([p])
        for g in grads:
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
        st = opt.state[p]
        results[name] = dict(full=p.full_tensor().detach().clone(),
                             dtype=st["state1"].dtype, shape=tuple(st["state1"].shape))
    return results


def test_dtensor_parameters_shard_state_and_match_single_process():
    import bnbfuse.optim as bo

    results = run_workers(_worker, world_size=2, timeout=120)[0]
    full = _weights()
    grads = [torch.randn(64, 100) * 0.01 for _ in range(4)]
    for name, make in _cases(bo):
        p = torch.nn.Parameter(full.clone())
        opt = make([p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        r = results[name]
        err = (r["full"] - p.detach()).abs().max().item()
        if name.endswith("8"):
            # 8-bit although each shard (3200) is below min_8bit_size: decided on the global
            # size. Blocks of 256 fall differently on shards, so close rather than equal.
            assert r["dtype"] == torch.uint8 and r["shape"] == (32, 100)
            assert err < 2e-3 if name == "adamw8" else err < 2.5e-2, (name, err)
        else:
            # the trust ratio and max_unorm use the global norms: per-shard norms (rank 1's
            # shard is 10x larger) would move the parameters by a different amount
            assert r["dtype"] == torch.float32 and r["shape"] == (32, 100)
            assert err < 1e-5, (name, err)
