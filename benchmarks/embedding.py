"""Forward+backward time and table memory of FusionEmbedding, side by side in one run.

Compared on the same token batch (a share ``--new-frac`` of the ids are new tokens):
  * ``nn.Embedding``         one trainable (V + F, D) table: what resizing the vocabulary does;
  * ``masked routing``       torchtune's FusionEmbedding algorithm: frozen base + trainable
                             fusion table, routed with masked_select / masked_scatter;
  * ``FusionEmbedding``      bnbfuse, base plain (frozen), int8 and NF4: one fused
                             gather+dequantize+route kernel, scatter-add backward.
Each row reports the median of ``--repeats`` timed forward passes and forward+backward
passes (``out.backward(grad)``, gradients reset to None each time; on CUDA, timed with
events after a synchronize), the time ratio to ``nn.Embedding`` (and, for the forward, its
inverse: the speed relative to ``nn.Embedding``), and the table memory: bytes of
all parameters and buffers of the module divided by (V + F) * D ("bytes/param"), and of the
base table alone divided by V * D ("base only"). It then prints the quantization error of
the candidate base-table schemes (the measurement behind the int8 / NF4 choice). Cases run interleaved
round by round, so a noisy neighbour on a shared machine slows all of them alike.

``--isas`` times the FusionEmbedding rows once per CPU instruction-set path of the native
library (e.g. ``generic,avx2,avx512,avx512vbmi``; default: the one dispatched, which
``BNBFUSE_CPU_ISA`` can cap), switching path between calls within each round; the
nn.Embedding and masked-routing rows do not depend on it and are timed once per round.
Paths this CPU or build cannot run are left out with a note. ``--forward-only`` skips the
forward+backward timing.

Example:
    python benchmarks/embedding.py --vocab 32000 --dim 1024 --tokens 4096 --out results/
    python benchmarks/embedding.py --threads 2 --forward-only --isas avx2,avx512vbmi
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000, help="base vocabulary V")
    p.add_argument("--fusion", type=int, default=256, help="new tokens F")
    p.add_argument("--dim", type=int, default=1024, help="embedding dimension D")
    p.add_argument("--tokens", type=int, default=4096, help="ids per batch (batch 8 x seq)")
    p.add_argument("--new-frac", type=float, default=0.05, help="share of ids that are new tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=25, help="timed calls per case (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--devices", nargs="+", default=None,
                   help="cpu and/or cuda (default: cpu, plus cuda when available)")
    p.add_argument("--isas", default=None,
                   help="comma-separated CPU paths of the native library for the FusionEmbedding "
                        "rows: generic, avx2, avx512, avx512vbmi (default: the dispatched one)")
    p.add_argument("--forward-only", action="store_true", help="time the forward only")
    p.add_argument("--out", type=Path, default=Path("results"), help="results directory")
    args = p.parse_args(argv)
    if args.tokens < 8 or args.tokens % 8:
        p.error(f"--tokens must be a positive multiple of 8 (a batch of 8 sequences), got "
                f"{args.tokens}")
    if args.isas is not None:
        args.isas = [i.strip() for i in args.isas.split(",") if i.strip()]
        bad = [i for i in args.isas if i not in ISAS]
        if bad or not args.isas:
            p.error(f"--isas: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(ISAS)}")
    for dev in args.devices or []:
        if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
            p.error(f"--devices {dev}: this torch sees no CUDA GPU")
    return args


ISAS = ["generic", "avx2", "avx512", "avx512vbmi"]  # csrc/cpu/runtime.cpp's kIsas, in order
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bnbfuse  # noqa: E402
from bnbfuse.nn import FusionEmbedding  # noqa: E402


class MaskedRouting(torch.nn.Module):
    """The masked_select / masked_scatter routing of torchtune's FusionEmbedding (any shape)."""

    def __init__(self, vocab, fusion, dim, device, dtype):
        super().__init__()
        self.vocab = vocab
        self.embedding = torch.nn.Embedding(vocab, dim, device=device, dtype=dtype)
        self.embedding.weight.requires_grad_(False)
        self.fusion_embedding = torch.nn.Embedding(fusion, dim, device=device, dtype=dtype)

    def forward(self, ids):
        mask = ids < self.vocab
        base = self.embedding(torch.masked_select(ids, mask))
        new = self.fusion_embedding(torch.masked_select(ids, ~mask) - self.vocab)
        out = torch.empty(*ids.shape, base.shape[-1], device=ids.device, dtype=base.dtype)
        m = mask.unsqueeze(-1).expand_as(out)
        return out.masked_scatter(m, base).masked_scatter(~m, new)


def build(name, a, device, dtype):
    V, F, D = a.vocab, a.fusion, a.dim
    if name == "nn.Embedding":
        return torch.nn.Embedding(V + F, D, device=device, dtype=dtype)
    if name == "masked routing":
        return MaskedRouting(V, F, D, device, dtype)
    quant = {"FusionEmbedding": None, "FusionEmbedding int8": "int8",
             "FusionEmbedding nf4": "nf4"}[name]
    m = FusionEmbedding(V, F, D, base_quant=quant, device=device, dtype=dtype)
    if quant is None:
        m.embedding.weight.requires_grad_(False)  # frozen base, as in the routing baseline
    return m


CASES = ["nn.Embedding", "masked routing", "FusionEmbedding", "FusionEmbedding int8",
         "FusionEmbedding nf4"]


def native_isa_switch():
    """``force(name)`` pins the native CPU library's path (None: the automatic choice again)
    and returns whether this CPU and build run it; None without the native library."""
    import ctypes

    from bnbfuse import _native

    if not _native.cpu.loaded:
        return None
    fn = _native.cpu.lib.bnbf_cpu_force_isa
    fn.argtypes = [ctypes.c_char_p]
    return lambda name: fn(None if name is None else name.encode()) == 0


def plan_isas(a, device) -> tuple[list, list[str]]:
    """The ISA labels to time the FusionEmbedding rows under on ``device`` (None: whatever
    runs, no switching) and notes on the requested ones left out."""
    if torch.device(device).type != "cpu":
        return [None], []
    force = native_isa_switch()
    if a.isas is None:
        return [bnbfuse.backend_info().get("cpu_isa") if force else None], []
    if force is None:
        return [None], ["--isas ignored: the native CPU library is not loaded (pure-PyTorch "
                        "reference kernels)"]
    keep, notes = [], []
    for isa in a.isas:
        if force(isa):
            keep.append(isa)
        else:
            notes.append(f"{isa}: left out, this CPU or build does not run it")
    force(None)
    return keep, notes


def table_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def timer(device):
    if torch.device(device).type == "cuda":  # "cuda:1" too
        def run(fn):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def bench_device(a, device, bar, isas):
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    n_new = int(round(a.tokens * a.new_frac))
    ids = torch.cat([torch.randint(0, a.vocab, (a.tokens - n_new,), generator=g),
                     torch.randint(a.vocab, a.vocab + a.fusion, (n_new,), generator=g)])
    ids = ids[torch.randperm(a.tokens, generator=g)].view(8, -1).to(device)
    grad = torch.randn(*ids.shape, a.dim, generator=g).to(device=device, dtype=dtype)
    modules = {name: build(name, a, device, dtype) for name in CASES}
    ref_out = modules["nn.Embedding"](ids)  # all cases must produce the same shape
    run = timer(device)
    force = native_isa_switch() if isas != [None] else None
    # (case, ISA): bnbfuse's rows once per ISA, the others (no native kernel) once
    keys = [(name, isa) for name in CASES
            for isa in (isas if name.startswith("FusionEmbedding") else [None])]
    fwd = {k: [] for k in keys}
    both = {k: [] for k in keys}

    def fwd_only(m):
        with torch.no_grad():
            m(ids)

    def fwd_bwd(m):
        for p in m.parameters():
            p.grad = None
        m(ids).backward(grad)

    try:
        for r in range(a.warmup + a.repeats):
            for name, isa in keys:
                m = modules[name]
                if force is not None and isa is not None:
                    force(isa)
                t1 = run(lambda: fwd_only(m))
                t2 = None if a.forward_only else run(lambda: fwd_bwd(m))
                if r >= a.warmup:
                    fwd[name, isa].append(t1)
                    both[name, isa].append(t2)
                bar.update(1)
        rows = []
        med = statistics.median
        base_f = med(fwd["nn.Embedding", None])
        base_b = None if a.forward_only else med(both["nn.Embedding", None])
        for name, isa in keys:
            m = modules[name]
            if force is not None and isa is not None:
                force(isa)
            # every path gives the same bits (tests/ops/test_isa_codecs.py); here only a
            # guard that the timed call did the lookup asked for
            assert m(ids).shape == ref_out.shape
            f = med(fwd[name, isa])
            b = None if a.forward_only else med(both[name, isa])
            nbytes = table_bytes(m)
            base = m.embedding if hasattr(m, "embedding") else m
            base_rows = a.vocab if hasattr(m, "embedding") else a.vocab + a.fusion
            rows.append({"device": device, "case": name, "isa": isa, "forward_ms": f * 1e3,
                         "fwd_bwd_ms": None if b is None else b * 1e3,
                         "fwd_ratio": f / base_f, "fwd_speed": base_f / f,
                         "fwd_bwd_ratio": None if b is None else b / base_b,
                         "table_bytes": nbytes,
                         "bytes_per_param": nbytes / ((a.vocab + a.fusion) * a.dim),
                         "base_bytes_per_param": table_bytes(base) / (base_rows * a.dim)})
    finally:
        if force is not None:
            force(None)
    return rows


def quant_error(a) -> list[dict]:
    """mean |error| / mean |w| of the candidate base-table schemes on a randn(4096, D) table:
    the chosen ones (linear int8 and NF4 in row blocks of 64) beside the alternatives."""
    from bnbfuse import row_quantization as rq
    from bnbfuse.functional import dequantize_blockwise, quantize_blockwise

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, a.dim, generator=g)
    mean_w = w.abs().mean()
    rows = []

    def add(name, deq, nbytes, chosen=False):
        rows.append({"scheme": name, "rel_error": float((deq - w).abs().mean() / mean_w),
                     "bytes_per_param": nbytes / w.numel(), "chosen": chosen})

    for scheme in ("int8", "nf4"):
        for bs in dict.fromkeys([rq.DEFAULT_BLOCKSIZE, 128, a.dim]):
            if bs > a.dim and bs != rq.DEFAULT_BLOCKSIZE:
                continue
            codes, absmax = rq.quantize_table(w, scheme, bs)
            label = f"{scheme} linear" if scheme == "int8" else "nf4"
            label += (" row-wise absmax" if bs == a.dim and bs != rq.DEFAULT_BLOCKSIZE
                      else f" blocks of {bs}")
            add(label, rq.dequantize_table(codes, absmax, scheme, bs, a.dim),
                rq.table_bytes(4096, a.dim, scheme, bs), chosen=bs == rq.DEFAULT_BLOCKSIZE)
    for bs in dict.fromkeys([rq.DEFAULT_BLOCKSIZE, a.dim]):
        codes, state = quantize_blockwise(w, blocksize=bs)
        add(f"int8 dynamic map {'row-wise' if bs == a.dim else f'blocks of {bs}'}",
            dequantize_blockwise(codes, state), w.numel() + 4 * state.absmax.numel())
    return rows


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "bnbfuse": bnbfuse.__version__,
            "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
            "backends": {k: v for k, v in bnbfuse.backend_info().items()
                         if k in ("cpu", "cpu_isa", "cuda")}}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def label(r) -> str:
    name = r["case"].replace("FusionEmbedding", "Fusion")
    return f"{name} ({r['isa']})" if r.get("isa") else name


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(1, len(devices) + 1, figsize=(5.5 * (len(devices) + 1), 4.2))
    for ax, dev in zip(axes, devices):
        rs = [r for r in rows if r["device"] == dev]
        x = range(len(rs))
        ax.bar([i - 0.2 for i in x], [r["forward_ms"] for r in rs], 0.4, label="forward")
        if all(r["fwd_bwd_ms"] is not None for r in rs):
            ax.bar([i + 0.2 for i in x], [r["fwd_bwd_ms"] for r in rs], 0.4,
                   label="forward+backward")
        ax.set_xticks(list(x), [label(r) for r in rs], rotation=30, ha="right")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"time per batch ({dev})")
        ax.legend()
    rs = [r for r in rows if r["device"] == devices[0]]
    rs = [r for i, r in enumerate(rs) if r["case"] not in {q["case"] for q in rs[:i]}]
    ax = axes[-1]
    ax.bar(range(len(rs)), [r["bytes_per_param"] for r in rs], color="tab:green")
    ax.set_xticks(range(len(rs)), [r["case"].replace("FusionEmbedding", "Fusion") for r in rs],
                  rotation=30, ha="right")
    ax.set_ylabel("bytes / param")
    ax.set_title("table memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(a) -> dict:
    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    devices = a.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    plans = {dev: plan_isas(a, dev) for dev in devices}
    notes = [n for _, ns in plans.values() for n in ns]
    per_round = {dev: sum(len(isas) if name.startswith("FusionEmbedding") else 1
                          for name in CASES) for dev, (isas, _) in plans.items()}
    bar = tqdm(total=sum(per_round.values()) * (a.warmup + a.repeats),
               desc="embedding benchmark", unit="case")
    rows = []
    for dev in devices:
        if plans[dev][0]:
            rows += bench_device(a, dev, bar, plans[dev][0])
        else:
            notes.append(f"{dev}: no requested ISA runs here, nothing timed")
    bar.close()
    # "x nn.Emb": time / nn.Embedding's time (lower is faster); "speed": its inverse, the
    # "at least 1.0x nn.Embedding" of the targets
    header = (f"{'device':6} {'case':22} {'isa':10} {'fwd ms':>9} {'x nn.Emb':>8} {'speed':>6} "
              f"{'fwd+bwd ms':>11} {'x nn.Emb':>8} {'bytes/param':>11} {'base only':>9}")
    print(f"\nV={a.vocab} F={a.fusion} D={a.dim} tokens={a.tokens} new={a.new_frac:.0%} "
          f"dtype={a.dtype} threads={torch.get_num_threads()} median of {a.repeats}")
    for n in notes:
        print(f"note: {n}")
    print(header)
    print("-" * len(header))

    def num(v, width, digits):
        return f"{'-':>{width}}" if v is None else f"{v:{width}.{digits}f}"

    for r in rows:
        print(f"{r['device']:6} {r['case']:22} {r['isa'] or '-':10} {r['forward_ms']:9.3f} "
              f"{r['fwd_ratio']:8.2f} {r['fwd_speed']:5.2f}x {num(r['fwd_bwd_ms'], 11, 3)} "
              f"{num(r['fwd_bwd_ratio'], 8, 2)} {r['bytes_per_param']:11.4f} "
              f"{r['base_bytes_per_param']:9.4f}")
    errors = quant_error(a)
    print(f"\nbase-table quantization error on randn(4096, {a.dim}) (mean |error| / mean |w|)")
    for e in errors:
        print(f"  {e['scheme']:32} {100 * e['rel_error']:6.2f} %  {e['bytes_per_param']:.4f} "
              f"bytes/param{'  <- used' if e['chosen'] else ''}")
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "machine": machine_info(), "notes": notes, "rows": rows,
              "quantization_error": errors}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "embedding.json").write_text(json.dumps(result, indent=2))
    plot(rows, a.out / "embedding.png")
    print(f"results: {a.out / 'embedding.json'}, {a.out / 'embedding.png'}")
    return result


if __name__ == "__main__":
    main(ARGS)
