"""Optimizer step throughput and state memory: bnbfuse 8-bit and 32-bit AdamW beside
torch.optim.AdamW (fused=True and foreach=True), bitsandbytes AdamW8bit, torchao AdamW8bit
and DeepSpeed's DeepSpeedCPUAdam (when importable), all in one run on the same tensors.

Per configuration (size x dtype) every optimizer takes `--warmup` untimed steps on its own
parameter of that many elements (rounded up to a multiple of 4096, so that every 8-bit
implementation keeps 8-bit state: torchao falls back to full-width state for sizes that
are not a multiple of its block), then `--repeats` timed rounds in which each optimizer
steps once in turn (so a slow spell of a shared machine hits all of them alike); the
table shows the median step time as Mparam/s, the optimizer state in bytes per parameter
(counted from the state tensors), and the throughput relative to torch's fused AdamW
measured in the same rounds.

``--tensors K`` splits each size into K parameters of equal size (each a multiple of 4096), as
a model of many small tensors (LoRA adapters, norms, biases) steps them: the per-parameter
cost of each optimizer then shows beside its per-element cost.

The table also gives the fastest round (``min ms``): on a shared machine the memory-bound
torch steps vary more between runs than the compute-bound 8-bit ones, and the minimum tells
how fast each can be when the machine is quiet.

bnbfuse is driven through its optimizer classes (``bnbfuse.optim.AdamW8bit`` /
``AdamW32bit``), exactly as a user calls it.

DeepSpeedCPUAdam (``pip install deepspeed``, not a dependency of bnbfuse) is the CPU AdamW of
ZeRO-Offload: fp32 state (also for bf16 parameters), ``adamw_mode=True``. DeepSpeed compiles
its ``cpu_adam`` op with ninja and a C++ compiler on first use (about a minute, cached in
``~/.cache/torch_extensions``); that happens before the first configuration, and when it
fails the contender is left out with a one-line note saying why. Only on ``--device cpu``.

    python benchmarks/optimizer_step.py                     # 1M..64M, fp32 and bf16
    python benchmarks/optimizer_step.py --sizes 16 --dtypes fp32 --threads 2
    python benchmarks/optimizer_step.py --sizes 1 --dtypes fp32 --tensors 256   # 256 x 4096
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bnbfuse  # noqa: E402
from _common import have_matplotlib, machine_info, progress, pyplot  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 1e-2


def bnbfuse_factories():
    """(label, factory) for bnbfuse's 8-bit and 32-bit AdamW."""
    return [
        ("bnbfuse AdamW8bit", lambda ps: bnbfuse.optim.AdamW8bit(ps, lr=LR, betas=BETAS, eps=EPS,
                                                                 weight_decay=WD)),
        ("bnbfuse AdamW32bit", lambda ps: bnbfuse.optim.AdamW32bit(ps, lr=LR, betas=BETAS,
                                                                   eps=EPS, weight_decay=WD)),
    ]


def contenders(device, wanted=lambda name: True):
    """(label, factory) of every available contender that ``wanted(label)``, and notes on the
    ones that are not available. DeepSpeed is probed only when wanted (its first probe
    compiles an op for a minute)."""
    out = [
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS,
                                                           weight_decay=WD, fused=True)),
        ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS,
                                                             weight_decay=WD, foreach=True)),
    ]
    out += bnbfuse_factories()
    notes = []
    try:
        import bitsandbytes as bnb
        out.append(("bitsandbytes AdamW8bit",
                    lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, betas=BETAS, eps=EPS,
                                                   weight_decay=WD)))
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        notes.append(f"bitsandbytes not available: {err}")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit
        out.append(("torchao AdamW8bit",
                    lambda ps: AoAdamW8bit(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)))
    except Exception as err:  # noqa: BLE001
        notes.append(f"torchao not available: {err}")
    if device.type == "cpu" and wanted("DeepSpeedCPUAdam"):
        factory, why = deepspeed_cpu_adam()
        if factory is not None:
            out.append(("DeepSpeedCPUAdam", factory))
        else:
            notes.append(f"DeepSpeedCPUAdam not available: {why}")
    return [c for c in out if wanted(c[0])], notes


def deepspeed_cpu_adam():
    """(factory, None) when DeepSpeed imports and its cpu_adam op loads, else (None, reason).

    The op is loaded (JIT-compiled the first time) here, not in the first timed
    configuration, so that a build failure is one note instead of one error row per
    configuration, and the minute of compilation is outside every measurement.
    """
    import logging
    import os

    # Without an accelerator named, DeepSpeed probes for one and warns that it picked the
    # CPU; name it, the op builder follows the accelerator.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # noqa: BLE001 - import or build failure: not available
        lines = [ln.strip() for ln in f"{type(err).__name__}: {err}".splitlines() if ln.strip()]
        return None, (lines[0] if lines else type(err).__name__)[:200]

    def factory(ps):
        return DeepSpeedCPUAdam(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                adamw_mode=True, fp32_optimizer_states=True)
    return factory, None


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                # torchao keeps quantized subclasses: count their inner tensors
                inner = getattr(v, "__tensor_flatten__", None)
                if inner is not None and type(v) is not torch.Tensor:
                    names, _ = v.__tensor_flatten__()
                    total += sum(getattr(v, n).numel() * getattr(v, n).element_size()
                                 for n in names)
                else:
                    total += v.numel() * v.element_size()
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_run(factory, numel, dtype, device, tensors=1):
    """`tensors` parameters of numel // tensors elements each, with gradients, and their
    optimizer: the same values for every contender."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ps = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(numel // tensors, generator=gen).to(device=device,
                                                                               dtype=dtype))
        p.grad = (torch.randn(numel // tensors, generator=gen) * 1e-2).to(device=device,
                                                                          dtype=dtype)
        ps.append(p)
    return ps, factory(ps)


def timed_step(opt, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def bench_config(factories, numel, dtype, device, warmup, repeats, slow_budget_s, tensors=1):
    """Median step time of every contender for one (size, dtype), measured round-robin.

    The timed steps are interleaved (round r steps every contender once) so that a change
    in the machine's speed during the run (shared CPUs and memory bandwidth on a VM) hits
    all contenders alike and the ratios stay fair. The first step (state allocation, and
    torchao's compilation) is never timed; a contender whose second step takes longer than
    `slow_budget_s` gets a single timed step.
    """
    runs, rows = {}, {}
    for name, factory in factories:
        try:
            ps, opt = make_run(factory, numel, dtype, device, tensors)
            timed_step(opt, device)  # one-off work, whatever it costs
            slow = timed_step(opt, device) > slow_budget_s
            for _ in range(0 if slow else warmup - 2):
                timed_step(opt, device)
            runs[name] = (ps, opt, 1 if slow else repeats, [])
        except Exception as err:  # noqa: BLE001 - report and continue with the others
            rows[name] = dict(error=f"{type(err).__name__}: {err}"[:300])
    for r in range(repeats):
        for name, (ps, opt, want, times) in runs.items():
            if r < want and name not in rows:  # a contender that failed is not stepped again
                try:
                    times.append(timed_step(opt, device))
                except Exception as err:  # noqa: BLE001
                    rows[name] = dict(error=f"{type(err).__name__}: {err}"[:300])
    for name, (ps, opt, want, times) in runs.items():
        if name in rows:
            continue
        if not all(torch.isfinite(p.detach()).all() for p in ps):
            rows[name] = dict(error="RuntimeError: non-finite parameters after the steps")
            continue
        med = statistics.median(times)
        rows[name] = dict(seconds=med, min_seconds=min(times), mparam_s=numel / med / 1e6,
                          state_bytes_per_param=state_bytes(opt) / numel, repeats=len(times))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16,64",
                    help="comma-separated parameter counts in millions (default 1,4,16,64)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--tensors", type=int, default=1,
                    help="split each size into this many equal parameters (default 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of contender names")
    ap.add_argument("--slow-budget", type=float, default=5.0,
                    help="seconds: a step slower than this is timed once")
    ap.add_argument("--max-slow-size", type=float, default=16,
                    help="millions: skip bitsandbytes/torchao (CPU) above this size")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--out", default="benchmarks/results/optimizer_step",
                    help="path prefix for the .json and .png outputs")
    args = ap.parse_args(argv)
    if args.tensors < 1:
        ap.error("--tensors must be >= 1")

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    native = bnbfuse._native.cuda if device.type == "cuda" else bnbfuse._native.cpu
    serves = (bnbfuse._native.cuda_status().registered if device.type == "cuda"
              else native.loaded)
    if not serves:
        # the bnbfuse rows would time the pure-PyTorch reference kernels under its name
        sys.exit(f"bnbfuse's native {device.type} kernels are not in use "
                 f"({bnbfuse.backend_info().get(device.type)}); `python -m bnbfuse` says why")
    sizes = [float(s) for s in args.sizes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
    cands, notes = contenders(device, lambda name: not keys or any(k in name.lower()
                                                                   for k in keys))
    results = []
    configs = [(s, d) for s in sizes for d in dtypes]
    for size, dname in progress(configs, desc="optimizer steps", disable=args.no_progress):
        per_tensor = -(-int(size * 1_000_000) // (4096 * args.tensors)) * 4096
        numel = per_tensor * args.tensors
        factories = []
        for name, factory in cands:
            third_party = name.startswith(("bitsandbytes", "torchao"))
            if third_party and device.type == "cpu" and size > args.max_slow_size:
                results.append(dict(optimizer=name, size_m=size, numel=numel, dtype=dname,
                                    tensors=args.tensors,
                                    skipped=f"size above --max-slow-size {args.max_slow_size}M"))
            else:
                factories.append((name, factory))
        rows = bench_config(factories, numel, DTYPES[dname], device, args.warmup, args.repeats,
                            args.slow_budget, args.tensors)
        for name, _ in factories:
            results.append(dict(optimizer=name, size_m=size, numel=numel, dtype=dname,
                                tensors=args.tensors, **rows[name]))

    # ratios vs torch fused in the same run
    fused = {(r["size_m"], r["dtype"]): r.get("mparam_s") for r in results
             if r["optimizer"] == "torch AdamW fused"}
    for r in results:
        base = fused.get((r["size_m"], r["dtype"]))
        if base and r.get("mparam_s"):
            r["vs_torch_fused"] = r["mparam_s"] / base

    machine = dict(machine_info(), device=str(device))
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)

    print(f"\nmachine: {machine}")
    if args.tensors > 1:
        print(f"each size split into {args.tensors} parameters")
    for n in notes:
        print(f"note: {n}")
    hdr = f"{'size':>6} {'dtype':>5}  {'optimizer':<34} {'Mparam/s':>9} {'ms/step':>9} " \
          f"{'min ms':>8} {'state B/param':>13} {'vs fused':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "mparam_s" in r:
            print(f"{r['size_m']:>5g}M {r['dtype']:>5}  {r['optimizer']:<34} "
                  f"{r['mparam_s']:>9.1f} {r['seconds'] * 1e3:>9.2f} {r['min_seconds'] * 1e3:>8.2f} "
                  f"{r['state_bytes_per_param']:>13.3f} {r.get('vs_torch_fused', float('nan')):>7.2f}x")
        else:
            print(f"{r['size_m']:>5g}M {r['dtype']:>5}  {r['optimizer']:<34} "
                  f"{r.get('skipped') or r.get('error')}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/optimizer_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".json").write_text(json.dumps(dict(machine=machine, command=cmd,
                                                        notes=notes, results=results), indent=2))
    if have_matplotlib():
        plot(results, dtypes, out.with_suffix(".png"), machine)
        print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    else:
        print(f"\nwrote {out.with_suffix('.json')} (no plot: install matplotlib)")
    return results


def plot(results, dtypes, path, machine):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    for ax, dname in zip(axes[0], dtypes):
        for name in names:
            pts = sorted((r["size_m"], r["mparam_s"]) for r in results
                         if r["optimizer"] == name and r["dtype"] == dname and "mparam_s" in r)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("Mparam/s (higher is better)")
        ax.set_title(f"AdamW step, {dname} params, {machine['device']} "
                     f"({machine['torch_threads']} threads)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
