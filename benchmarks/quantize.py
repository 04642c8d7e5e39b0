"""Throughput of blockwise 8-bit quantization on CPU, side by side in one run.

Compared, for each dtype, tensor size and blocksize:
  * bnbfuse (native CPU kernels, the instruction set chosen at run time),
  * bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise`` on CPU, when installed,
  * bnbfuse's pure-PyTorch reference kernels (only up to ``--reference-max`` elements: slow),
  * ``torch.clone`` of the input tensor: the memory-bandwidth yardstick.

Byte accounting (the bytes one call must move at the least; GB/s = bytes / median time):
  quantize    reads the input (n * itemsize) and writes the codes (n) and absmax (4 * blocks)
  dequantize  reads the codes (n) and absmax (4 * blocks) and writes the output (n * itemsize)
  clone       reads and writes the input (2 * n * itemsize)
"x clone" is an implementation's GB/s divided by clone's GB/s for the same dtype and size.
Implementations are interleaved round by round and the ratio is taken within each round,
then the median over rounds is reported, so a noisy neighbour on a shared machine slows
both sides of a ratio alike. Every call allocates its output, as clone does.

The JSON also records each call's process CPU time (all threads), a figure that a busy
shared machine distorts less than wall time.

Example:
    python benchmarks/quantize.py --threads 2 --sizes 4M 16M 64M --out results/
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * mult[text[-1]]) if text[-1] in mult else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every implementation (default: torch.get_num_threads())")
    p.add_argument("--sizes", nargs="+", default=["4M", "16M", "64M"],
                   help="elements per tensor (suffix K/M/G = 2**10/2**20/2**30)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "float16", "bfloat16"])
    p.add_argument("--blocksizes", nargs="+", type=int, default=[4096, 256])
    p.add_argument("--repeats", type=int, default=7, help="timed calls per case (median)")
    p.add_argument("--reference-max", default="4M",
                   help="largest size the (slow) pure-PyTorch reference runs at")
    p.add_argument("--no-bitsandbytes", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results"), help="results directory")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    # Before torch (and bitsandbytes) start their thread pools.
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bnbfuse  # noqa: E402
import bnbfuse.functional as F  # noqa: E402
from bnbfuse.backends import reference  # noqa: E402


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "bnbfuse": bnbfuse.__version__,
            "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Core(s) per socket", "Socket(s)", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        info["bitsandbytes"] = version("bitsandbytes")
    except Exception:  # noqa: BLE001  (not installed)
        info["bitsandbytes"] = None
    backend = bnbfuse.backend_info()
    info["bnbfuse_cpu_backend"] = backend["cpu"]
    info["cpu_isa"] = backend["cpu_isa"]
    return info


def implementations(use_bnb: bool, notes: list) -> dict:
    """name -> (quantize(x, code, blocksize) -> state, dequantize(state) -> tensor); why a
    contender is missing goes to ``notes`` (and into the JSON)."""
    impls = {}
    if not bnbfuse._native.cpu.loaded:
        notes.append(f"bnbfuse native CPU library not loaded: {bnbfuse.backend_info()['cpu']}")
    else:
        impls["bnbfuse"] = (
            lambda x, code, bs: F.quantize_blockwise(x, code=code, blocksize=bs),
            lambda st: F.dequantize_blockwise(*st),
        )
    impls["reference"] = (
        lambda x, code, bs: (reference.quantize_blockwise(x, code, bs), code, bs, x.dtype),
        lambda st: reference.dequantize_blockwise(st[0][0], st[0][1], st[1], st[2], st[3]),
    )
    if use_bnb:
        try:
            import bitsandbytes.functional as BF
        except Exception as err:  # noqa: BLE001  (any import failure means "not available")
            notes.append(f"bitsandbytes not available: {err}")
            print(notes[-1], file=sys.stderr)
        else:
            impls["bitsandbytes"] = (
                lambda x, code, bs: BF.quantize_blockwise(x, code=code, blocksize=bs),
                lambda st: BF.dequantize_blockwise(*st),
            )
    return impls


CPU_TIMES: list = []  # process CPU seconds (all threads) of each timed call, in call order


def timed(fn) -> float:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t1 = time.perf_counter()
    CPU_TIMES.append(time.process_time() - c0)
    return t1 - t0


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes]
    ref_max = parse_size(args.reference_max)
    notes: list = []
    impls = implementations(not args.no_bitsandbytes, notes)
    code = F.dynamic_map(True)
    cases = []
    for dtype_name in args.dtypes:
        for n in sizes:
            for bs in args.blocksizes:
                names = [k for k in impls if k != "reference" or n <= ref_max]
                cases.append((dtype_name, n, bs, names))
    total = sum(args.repeats * (1 + 2 * len(c[3])) for c in cases)
    rows = []
    bar = _Bar(total)
    for dtype_name, n, bs, names in cases:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(n, dtype=torch.float32).to(dtype)
        states = {}
        for name in names:  # warm up (map caches, thread pools, page tables)
            states[name] = impls[name][0](x, code, bs)
            impls[name][1](states[name])
        x.clone()
        times = {("clone", "copy"): []}
        cpu = {("clone", "copy"): []}
        for name in names:
            for op in ("quantize", "dequantize"):
                times[(name, op)] = []
                cpu[(name, op)] = []

        def record(key, fn):
            times[key].append(timed(fn))
            cpu[key].append(CPU_TIMES[-1])

        for _ in range(args.repeats):
            record(("clone", "copy"), lambda: x.clone())
            bar.update()
            for name in names:
                q, dq = impls[name]
                record((name, "quantize"), lambda: q(x, code, bs))
                record((name, "dequantize"), lambda: dq(states[name]))
                bar.update(2)
        nblocks = -(-n // bs)
        item = x.element_size()
        moved = {"copy": 2 * n * item, "quantize": n * item + n + 4 * nblocks,
                 "dequantize": n + 4 * nblocks + n * item}
        clone_ts = times[("clone", "copy")]
        for (name, op), ts in times.items():
            med = statistics.median(ts)
            # per round: (bytes/t) / (clone bytes/t_clone), same round
            ratios = [moved[op] * tc / (moved["copy"] * t) for t, tc in zip(ts, clone_ts)]
            rows.append({"dtype": dtype_name, "n": n, "blocksize": bs, "impl": name, "op": op,
                         "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "bytes": moved[op],
                         "GB_s": moved[op] / med / 1e9, "x_clone": statistics.median(ratios),
                         # CPU time of the process (all threads): the work done, which a
                         # busy shared machine distorts less than wall time
                         "cpu_ms": statistics.median(cpu[(name, op)]) * 1e3})
        x = states = None  # free before the next case allocates
    bar.close()
    return {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
            "command": " ".join([Path(sys.executable).name] + sys.argv), "notes": notes,
            "rows": rows}


class _Bar:
    """A tqdm bar counting calls, or nothing when tqdm is not installed."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc="quantize benchmark", unit="call")
        except ImportError:
            self._bar = None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def fmt_size(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else (f"{n >> 10}K" if n % 1024 == 0 else str(n))


def table(result: dict) -> str:
    """Markdown: one row per (dtype, size, blocksize); each cell "GB/s (x clone)"."""
    rows = result["rows"]
    impls = [i for i in ("bnbfuse", "bitsandbytes", "reference") if any(r["impl"] == i for r in rows)]
    cols = [(i, op) for i in impls for op in ("quantize", "dequantize")]
    head = ["dtype", "elements", "blocksize", "clone GB/s"] + [f"{i} {op}" for i, op in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["dtype"], r["n"], r["blocksize"]) for r in rows},
                  key=lambda k: (k[0] != "float32", k[0], k[1], -k[2]))
    for dtype, n, bs in keys:
        sel = {(r["impl"], r["op"]): r for r in rows
               if (r["dtype"], r["n"], r["blocksize"]) == (dtype, n, bs)}
        cells = [dtype, fmt_size(n), str(bs), f"{sel[('clone', 'copy')]['GB_s']:.2f}"]
        for key in cols:
            r = sel.get(key)
            cells.append(f"{r['GB_s']:.2f} ({r['x_clone']:.2f}x)" if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r["dtype"], r["blocksize"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False,
                             sharey="row", sharex=True)
    for col, (dtype, bs) in enumerate(panels):
        sel = [r for r in rows if r["dtype"] == dtype and r["blocksize"] == bs]
        for impl, op in sorted({(r["impl"], r["op"]) for r in sel}):
            pts = sorted((r["n"], r["GB_s"], r["x_clone"]) for r in sel
                         if r["impl"] == impl and r["op"] == op)
            style = {"copy": "k:", "quantize": "-o", "dequantize": "--s"}[op]
            label = f"{impl} {op}" if op != "copy" else "torch.clone"
            xs = [p[0] / 2**20 for p in pts]
            axes[0][col].plot(xs, [p[1] for p in pts], style, label=label)
            axes[1][col].plot(xs, [p[2] for p in pts], style, label=label)
        axes[0][col].set_title(f"{dtype}, blocksize {bs}")
        axes[1][col].axhline(0.5, color="grey", lw=0.8)
        axes[1][col].set_xlabel("elements (Mi)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s (bytes moved / median time)")
    axes[1][0].set_ylabel("x clone bandwidth (median of rounds)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    m = result["machine"]
    fig.suptitle(f"Blockwise quantization on CPU: {m.get('Model name', '?')}, "
                 f"{m['threads']} threads, torch {m['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> None:
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    try:
        plot(result, args.out / "quantize.png")
    except ImportError as err:
        print(f"no plot ({err}); install matplotlib", file=sys.stderr)
    q = [r for r in result["rows"] if r["impl"] == "bnbfuse" and r["op"] == "quantize"]
    if q:
        worst = min(q, key=lambda r: r["x_clone"])
        print(f"\nbnbfuse quantize: {min(r['x_clone'] for r in q):.2f}x .. "
              f"{max(r['x_clone'] for r in q):.2f}x clone bandwidth (worst: {worst['dtype']}, "
              f"{fmt_size(worst['n'])}, blocksize {worst['blocksize']}); target >= 0.50x")
    print(f"results: {args.out / 'quantize.json'}, {args.out / 'quantize.png'}")


if __name__ == "__main__":
    main(ARGS)
