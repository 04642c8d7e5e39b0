"""Runs a test body on N gloo processes (CPU), with a hard time limit.

``run_workers(fn, world_size=2, timeout=...)`` spawns ``world_size`` fresh interpreters with
``torch.multiprocessing`` (from a fork server: no forked OpenMP/thread state of the test process), joins them into one
process group over a free TCP port, calls ``fn(rank, world_size, *args)`` in each and returns
the list of their return values (index = rank). A worker that raises fails the calling test
with the worker's traceback; a worker that hangs (a collective waiting for a peer, a
deadlock) is killed when ``timeout`` seconds have passed and the test fails instead of
blocking CI. ``fn`` must be a module-level function (it is pickled by name).
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, collective_timeout):
    # Two processes share few cores with the rest of the machine: one thread each keeps
    # the run predictable and avoids oversubscription.
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
        # Nobody leaves while a peer may still need it for a collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _preload_forkserver() -> None:
    # The fork server imports torch (and this helper) once; every worker is then forked
    # from that clean process, which has never run an OpenMP region, instead of paying a
    # fresh interpreter start per test.
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", __name__])


def run_workers(fn, *args, world_size: int = 2, timeout: float = 90.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results.

    Raises ``TimeoutError`` (after killing the workers) when they do not all finish within
    ``timeout`` seconds, and re-raises a worker's exception with its traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        _preload_forkserver()
        ctx = mp.start_processes(
            _worker,
            args=(world_size, port, fn, args, out_dir, max(10.0, timeout - 5.0)),
            nprocs=world_size, join=False, start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"distributed workers of {fn.__name__} did not finish in {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(os.path.join(out_dir, f"result{r}.pt"), weights_only=False)
                for r in range(world_size)]
