"""Small helpers shared by the benchmark scripts: timing, progress bars, output files and a
description of the machine the figures came from.

Everything here is optional-dependency aware: tqdm and matplotlib are used when installed
(``pip install -e ".[bench]"``) and the scripts still print their table without them.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch


# bitsandbytes 0.50 warns at import, on CPUs with AVX-512 BF16, that it cannot fetch an
# optional 4-bit GEMM from the Hugging Face hub; the benchmarks use none of its 4-bit code.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def ensure_bnbfuse_importable() -> None:
    """Lets ``python benchmarks/x.py`` use the checkout's bnbfuse when it is not installed
    (an installed bnbfuse, e.g. ``pip install -e .``, takes precedence)."""
    import importlib.util
    if importlib.util.find_spec("bnbfuse") is None:
        sys.path.insert(1, str(Path(__file__).resolve().parent.parent))


def median_time(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1,
                sync: Optional[Callable[[], None]] = None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", disable: bool = False):
    """tqdm progress bar on stderr when tqdm is installed, the plain iterable otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False,
                dynamic_ncols=True, file=sys.stderr)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Current resident set size (psutil when installed, /proc otherwise, else the peak)."""
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def tensor_bytes(obj: Any) -> int:
    """Bytes held by every tensor inside ``obj`` (tensors, dicts, lists, tuples), counted once
    per storage so views and shared tensors are not double-counted."""
    seen: set = set()
    total = 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if hasattr(x, "to_local"):  # DTensor: count the local shard
                x = x.to_local()
            try:
                storage = x.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                nbytes = storage.nbytes()
            except (RuntimeError, NotImplementedError):
                key, nbytes = id(x), x.numel() * x.element_size()
            if key not in seen:
                seen.add(key)
                total += nbytes
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(obj)
    return total


def machine_info() -> dict:
    """CPU model, core count, memory, GPU, and library versions, for recording results."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for lib in ("bitsandbytes", "torchao"):
        try:
            from importlib.metadata import version
            info[lib] = version(lib)
        except Exception:  # not installed
            pass
    try:
        import bnbfuse
        info["bnbfuse"] = bnbfuse.__version__
        backends = bnbfuse.backend_info()
        info["bnbfuse_cpu_isa"] = backends.get("cpu_isa")
        info["bnbfuse_native_cpu"] = str(backends.get("cpu", "")).startswith("loaded")
        info["bnbfuse_native_cuda"] = str(backends.get("cuda", "")).startswith("registered")
    except Exception as e:  # the figures are still worth saving without it
        info["bnbfuse"] = f"unavailable: {e}"
    return info


def write_json(path: os.PathLike, data: Any) -> Path:
    """Writes ``data`` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def pyplot():
    """matplotlib.pyplot with a non-interactive backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table; also valid Markdown, so it can be pasted into the docs."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The Python standard library's own ``.py`` sources in a fixed (sorted) order: real text
    that ships with every Python, so the benchmarks need no download."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(p for p in root.rglob("*.py")
                        if "site-packages" not in p.parts and "dist-packages" not in p.parts))


def stdlib_text(n_bytes: int, skip_bytes: int = 0) -> bytes:
    """``n_bytes`` of stdlib source text (files concatenated in sorted order), starting
    ``skip_bytes`` into that stream. Raises if the stdlib is too small."""
    out = bytearray()
    pos = 0
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if pos + len(data) <= skip_bytes:
            pos += len(data)
            continue
        start = max(0, skip_bytes - pos)
        pos += len(data)
        out += data[start:]
        if len(out) >= n_bytes:
            return bytes(out[:n_bytes])
    raise RuntimeError(f"the standard library holds fewer than {n_bytes + skip_bytes} bytes of .py text")
