"""Does compiling the optimizer step pay off? Eager ``opt.step()`` against the same step traced
by ``torch.compile``, side by side in one run.

bnbfuse marks ``Optimizer8bit.step`` ``torch.compiler.disable`` (docs/optimizers.md,
"torch.compile"); this script compiles the undecorated step to measure what tracing would
give. Its step count is pinned before every call, so the compiled step keeps its guards and
never recompiles: the best case a traced step could reach.

    python benchmarks/compile_step.py                     # the docs' configurations
    python benchmarks/compile_step.py --layers 2 --dim 32 --repeats 3 --backend eager
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import bnbfuse as bnb
from bnbfuse.optim.optimizer import Optimizer8bit

CONFIGS = [("AdamW8bit", 100, 64), ("AdamW8bit", 8, 1024), ("AdamW", 100, 64),
           ("Lion8bit", 100, 64)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=None,
                    help="optimizer classes (default: the docs' four configurations)")
    ap.add_argument("--layers", type=int, default=None, help="weight matrices (plus a bias each)")
    ap.add_argument("--dim", type=int, default=None, help="each weight is dim x dim")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps (median reported)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--out", default=None, help="folder for compile_step.json")
    return ap.parse_args(argv)


def _median_ms(fn, opt, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for state in opt.state.values():
            state["step"] = 5  # the same guards every call
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, layers: int, dim: int, repeats: int, backend: str) -> dict:
    torch.manual_seed(0)
    params = ([torch.nn.Parameter(torch.randn(dim, dim) * 0.02) for _ in range(layers)]
              + [torch.nn.Parameter(torch.zeros(dim)) for _ in range(layers)])
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = getattr(bnb.optim, name)(params, lr=1e-3)
    opt.step()
    eager = _median_ms(opt.step, opt, repeats)
    undecorated = Optimizer8bit.__dict__["step"].__wrapped__
    torch._dynamo.reset()
    compiled = torch.compile(lambda: undecorated(opt), backend=backend)
    start = time.perf_counter()
    compiled()
    first = time.perf_counter() - start
    traced = _median_ms(compiled, opt, repeats)
    return dict(optimizer=name, params=len(params), shape=f"{layers} x {dim}x{dim} + biases",
                eager_ms=eager, compiled_ms=traced, speedup=eager / traced,
                first_compiled_call_s=first, threads=torch.get_num_threads(), backend=backend)


def main(args) -> list[dict]:
    configs = CONFIGS
    if args.optimizers or args.layers or args.dim:
        configs = [(n, args.layers or 100, args.dim or 64) for n in (args.optimizers or ["AdamW8bit"])]
    rows = [measure(n, layers, dim, args.repeats, args.backend) for n, layers, dim in configs]
    print(f"{'optimizer':<12} {'parameters':<28} {'eager ms':>9} {'compiled ms':>12} "
          f"{'speed-up':>9} {'first call s':>13}")
    for r in rows:
        print(f"{r['optimizer']:<12} {str(r['params']) + ' (' + r['shape'] + ')':<28} "
              f"{r['eager_ms']:>9.3f} {r['compiled_ms']:>12.3f} {r['speedup']:>8.2f}x "
              f"{r['first_compiled_call_s']:>13.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        info = {k: v for k, v in bnb.backend_info().items() if k in ("torch", "cpu_isa", "threads")}
        (Path(args.out) / "compile_step.json").write_text(json.dumps(dict(machine=info, rows=rows),
                                                                     indent=1))
    return rows


if __name__ == "__main__":
    main(parse_args())
