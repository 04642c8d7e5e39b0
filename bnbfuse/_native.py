"""Loads the native kernel libraries (``bnbfuse/lib``) with ctypes.

The libraries expose a plain C ABI (``csrc/include/bnbfuse.h``), so they do not depend on
the installed torch version. When a library is missing, bnbfuse runs on its pure-PyTorch
reference kernels and warns once.

Loading the CUDA library is not enough to use it: it links the CUDA runtime of the toolkit
that built it, which needs a driver of that CUDA major version or newer, and it holds code
for the architectures it was built for only. :func:`cuda_status` decides, once, whether its
kernels are registered (see docs/quickstart.md, "CUDA").
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import warnings
from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent / "lib"

# enum bnbf_dtype
DTYPE_CODES = {}  # filled lazily with torch dtypes (keeps this module importable cheaply)


class OptimizerArgs(ctypes.Structure):
    """Mirror of ``bnbf_optim_args`` in csrc/include/bnbfuse.h.

    Build it with ``OptimizerArgs.from_scalars(optimizer_scalars(...))`` (see
    bnbfuse/ops/optimizer.py), so the native kernels get exactly the float32 scalars the
    reference uses.
    """

    _fields_ = [
        ("gnorm_scale", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("beta3", ctypes.c_float),
        ("one_minus_beta3", ctypes.c_float),
        ("alpha", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("dampening_factor", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("inv_bc1", ctypes.c_float),
        ("inv_sqrt_bc2", ctypes.c_float),
        ("step_size", ctypes.c_float),
        ("lr", ctypes.c_float),
        ("update_scale", ctypes.c_float),
        ("step", ctypes.c_int64),
        ("nesterov", ctypes.c_int32),
    ]

    @classmethod
    def from_scalars(cls, scalars: dict) -> "OptimizerArgs":
        return cls(**{name: scalars[name] for name, _ in cls._fields_})


_E_ARG, _E_INDEX, _E_CUDA, _E_UNSUPPORTED = -1, -2, -3, -4


class NativeLibrary:
    def __init__(self, name: str):
        self.name = name
        self.path = LIB_DIR / f"lib{name}.so"
        self.lib = None
        self.error = None
        if os.environ.get("BNBFUSE_DISABLE_NATIVE"):
            self.error = "disabled by BNBFUSE_DISABLE_NATIVE"
            return
        if not self.path.exists():
            self.error = f"{self.path} not found (build with `pip install .`)"
            return
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as err:
            self.error = str(err)
            return
        for fn in ("bnbf_version", "bnbf_last_error", "bnbf_cpu_isa", "bnbf_cpu_isas_compiled",
                   "bnbf_cuda_archs", "bnbf_cuda_error_string"):
            if hasattr(self.lib, fn):
                getattr(self.lib, fn).restype = ctypes.c_char_p

    @property
    def loaded(self) -> bool:
        return self.lib is not None

    def __getattr__(self, item):
        lib = self.__dict__.get("lib")
        if lib is None:
            raise RuntimeError(f"native library {self.name} is not loaded: {self.error}")
        return getattr(lib, item)

    def function(self, name: str, *argtypes):
        """The C function `name` with its argument types set (restype int status)."""
        fn = getattr(self, name)
        fn.argtypes = list(argtypes)
        fn.restype = ctypes.c_int
        return fn

    def check(self, rc: int, what: str) -> None:
        """Turns a negative status into a Python exception carrying the kernel's message."""
        if rc == 0:
            return
        msg = f"{what}: {self.lib.bnbf_last_error().decode()}"
        if rc == _E_INDEX:
            raise IndexError(msg)
        if rc == _E_UNSUPPORTED:
            raise NotImplementedError(msg)
        if rc == _E_ARG:
            raise ValueError(msg)
        raise RuntimeError(msg)


cpu = NativeLibrary("bnbfuse_cpu")
cuda = NativeLibrary("bnbfuse_cuda")

_warned = False


def warn_if_missing() -> None:
    global _warned
    if not cpu.loaded and not _warned:
        _warned = True
        warnings.warn(
            f"bnbfuse: native CPU library not loaded ({cpu.error}); using the pure-PyTorch "
            "reference kernels, which are correct but slower. `python -m bnbfuse` shows "
            "which backends load.",
            RuntimeWarning,
            stacklevel=3,
        )


# ---- CUDA: may the loaded library's kernels serve CUDA tensors? ----------------------------
PROBE_MAX_DEVICES = 64  # BNBF_CUDA_PROBE_MAX_DEVICES
PROBE_LOAD_IMAGES = 1   # BNBF_CUDA_PROBE_LOAD_IMAGES


class CudaProbeInfo(ctypes.Structure):
    """Mirror of ``bnbf_cuda_probe_info`` in csrc/include/bnbfuse.h (the C side checks the
    size)."""

    _fields_ = [
        ("driver_version", ctypes.c_int32),
        ("runtime_version", ctypes.c_int32),
        ("device_count", ctypes.c_int32),
        ("device_count_error", ctypes.c_int32),
        ("devices_probed", ctypes.c_int32),
        ("images_checked", ctypes.c_int32),
        ("compute_capability", ctypes.c_int32 * PROBE_MAX_DEVICES),
        ("image_error", ctypes.c_int32 * PROBE_MAX_DEVICES),
        ("message", ctypes.c_char * 512),
    ]


@dataclasses.dataclass(frozen=True)
class CudaDevice:
    """One device as the probe saw it. ``capability`` is (major, minor), None if unknown;
    ``image_error`` is None when images were not loaded, "" when the kernels load, else the
    CUDA error."""

    index: int
    capability: tuple | None
    image_error: str | None = None

    @property
    def sm(self) -> str:
        return "sm_unknown" if self.capability is None else "sm_%d%d" % self.capability


@dataclasses.dataclass(frozen=True)
class CudaProbe:
    """What ``bnbf_cuda_probe`` found (versions as CUDA writes them: 13000 is 13.0; a
    driver_version of 0 means no driver)."""

    ok: bool
    driver_version: int
    runtime_version: int
    devices: tuple
    device_count_error: str | None
    images_checked: bool
    message: str


def cuda_version_string(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


# Oldest Linux driver branch of each CUDA major version (NVIDIA's CUDA compatibility table),
# for messages only: the probe compares CUDA versions, which is what the driver reports.
_DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}


def needed_driver(runtime_version: int) -> str:
    """'a CUDA 13.0 driver (r580 or newer)': what a runtime of that version needs (any
    driver of its major version: CUDA minor version compatibility)."""
    major = runtime_version // 1000
    branch = _DRIVER_BRANCH.get(major)
    return f"a CUDA {major}.0 driver" + (f" (r{branch} or newer)" if branch else " or newer")


def probe_cuda(lib: NativeLibrary | None = None, load_images: bool = False) -> CudaProbe:
    """Runs ``bnbf_cuda_probe`` of the CUDA library.

    Without ``load_images`` it creates no CUDA context (versions, device count, compute
    capabilities). With it, each device loads a kernel of the library, which creates that
    device's primary context: `python -m bnbfuse` does it, ``import bnbfuse`` does not (in a
    job with one process per GPU, a context on every GPU per process would waste memory).
    Raises RuntimeError if the library is not loaded or predates the probe.
    """
    lib = cuda if lib is None else lib
    if not lib.loaded:
        raise RuntimeError(f"native CUDA library not loaded: {lib.error}")
    if not hasattr(lib.lib, "bnbf_cuda_probe"):
        raise RuntimeError(f"{lib.path.name} predates the driver probe: rebuild it with "
                           "`pip install -e .`")
    fn = lib.function("bnbf_cuda_probe", ctypes.POINTER(CudaProbeInfo), I64, I32)
    info = CudaProbeInfo()
    rc = fn(ctypes.byref(info), ctypes.sizeof(info), PROBE_LOAD_IMAGES if load_images else 0)
    if rc not in (0, _E_CUDA):
        raise RuntimeError(f"bnbf_cuda_probe: {lib.bnbf_last_error().decode()}")

    def error_string(code: int) -> str:
        return lib.bnbf_cuda_error_string(code).decode()

    devices = []
    for d in range(info.devices_probed):
        cc = info.compute_capability[d]
        image = None
        if info.images_checked:
            image = "" if info.image_error[d] == 0 else error_string(info.image_error[d])
        devices.append(CudaDevice(d, None if cc < 0 else divmod(cc, 10), image))
    return CudaProbe(ok=rc == 0, driver_version=info.driver_version,
                     runtime_version=info.runtime_version, devices=tuple(devices),
                     device_count_error=(None if info.device_count_error == 0
                                         else error_string(info.device_count_error)),
                     images_checked=bool(info.images_checked),
                     message=info.message.decode(errors="replace"))


def _parse_arch(name: str):
    """'sm_90' -> ('sm', 9, 0, ''); 'compute_120' -> ('compute', 12, 0, ''); 'sm_90a' ->
    ('sm', 9, 0, 'a'); None for anything else."""
    kind, _, num = name.partition("_")
    suffix = num[-1] if num[-1:] in ("a", "f") else ""
    digits = num[:-1] if suffix else num
    if kind not in ("sm", "compute") or len(digits) < 2 or not digits.isdigit():
        return None
    return kind, int(digits[:-1]), int(digits[-1]), suffix


def arch_runs_on(name: str, capability: tuple) -> bool:
    """Whether code compiled as `name` (an entry of bnbf_cuda_archs) runs on a device of
    compute capability (major, minor): machine code runs on its major version's same or
    newer minors, PTX is compiled by the driver for its version or any newer one; the
    arch-specific 'a' variants run on exactly their version, the family 'f' ones on their
    major's same or newer minors."""
    parsed = _parse_arch(name)
    if parsed is None:
        return False
    kind, major, minor, suffix = parsed
    if suffix == "a":
        return (major, minor) == tuple(capability)
    if kind == "sm" or suffix == "f":
        return major == capability[0] and minor <= capability[1]
    return (major, minor) <= tuple(capability)


def cuda_unusable_reason(probe: CudaProbe, archs: str) -> str | None:
    """Why the library's kernels cannot serve this machine's devices, or None if they can.

    Decided from the probe (driver, runtime, devices) and the architectures the library was
    built for; a device none of them runs on rules the library out for all (one dispatch
    key serves every CUDA device, and its kernels would fail there with
    cudaErrorNoKernelImageForDevice). Images loaded by the probe (``load_images``) are the
    driver's own answer and overrule the prediction.
    """
    runtime = cuda_version_string(probe.runtime_version)
    if probe.driver_version == 0:
        return (f"no NVIDIA driver found ({probe.device_count_error or 'driver version 0'}); "
                f"the library's CUDA {runtime} runtime needs "
                f"{needed_driver(probe.runtime_version)}")
    if probe.driver_version < probe.runtime_version // 1000 * 1000:
        return (f"driver too old: it supports CUDA {cuda_version_string(probe.driver_version)}, "
                f"the library's CUDA {runtime} runtime needs "
                f"{needed_driver(probe.runtime_version)}; update the driver or rebuild bnbfuse "
                "with a CUDA toolkit the driver supports")
    if not probe.devices:
        return f"no usable CUDA device ({probe.device_count_error or '0 devices'})"
    built = archs.split()
    for dev in probe.devices:
        if dev.image_error:  # the driver tried and failed
            return (f"no kernel image for device {dev.index} ({dev.sm}): {dev.image_error}; "
                    f"the library is built for {archs}")
        if dev.capability is None or dev.image_error == "":
            continue  # unknown: leave it to the driver; "" : it loaded
        runs = [a for a in built if arch_runs_on(a, dev.capability)]
        if not runs:
            return (f"no kernel image for device {dev.index} ({dev.sm}): the library is built "
                    f"for {archs}; rebuild with BNBFUSE_CUDA_ARCHS including "
                    f"{dev.capability[0]}{dev.capability[1]}")
        if (all(a.startswith("compute_") for a in runs)
                and probe.driver_version < probe.runtime_version):
            # PTX from a CUDA X.y toolkit needs a driver of X.y or newer to compile it
            return (f"device {dev.index} ({dev.sm}) has only PTX in the library ({', '.join(runs)}),"
                    f" which the driver (CUDA {cuda_version_string(probe.driver_version)}) cannot"
                    f" compile: it needs a CUDA {runtime} driver")
    if not probe.ok:  # the C side refused for a reason not handled above
        return probe.message
    return None


@dataclasses.dataclass(frozen=True)
class CudaStatus:
    """Whether the CUDA library's kernels serve CUDA tensors, and why not.

    ``registered`` is decided once per process (at ``import bnbfuse``); ``reason`` says why
    not (None when registered); ``probe`` is the probe that decided it (None when the probe
    was not run: library missing, or torch without CUDA)."""

    registered: bool
    reason: str | None
    probe: CudaProbe | None = None


def decide_cuda(lib: NativeLibrary | None = None, probe=probe_cuda) -> CudaStatus:
    """Decides whether the CUDA kernels may be registered: the library loads, torch can use
    CUDA (``torch.cuda.is_available()``) and the probe passes. ``probe`` is the function that
    probes (tests pass a fake one)."""
    import torch

    lib = cuda if lib is None else lib
    if not lib.loaded:
        return CudaStatus(False, f"library not loaded: {lib.error}")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"torch has no CUDA: torch {torch.__version__} is a CPU build"
        else:
            why = (f"torch sees no CUDA device: torch.cuda.is_available() is False (torch "
                   f"{torch.__version__}, built for CUDA {torch.version.cuda})")
        return CudaStatus(False, why)
    try:
        result = probe(lib)
    except RuntimeError as err:
        return CudaStatus(False, str(err))
    archs = lib.bnbf_cuda_archs().decode()
    why = cuda_unusable_reason(result, archs)
    return CudaStatus(why is None, why, result)


_cuda_status: CudaStatus | None = None
_cuda_warned = False


def cuda_status() -> CudaStatus:
    """The process's decision (see :func:`decide_cuda`), made on first use."""
    global _cuda_status
    if _cuda_status is None:
        _cuda_status = decide_cuda()
    return _cuda_status


def warn_cuda_unusable(status: CudaStatus) -> None:
    """Warns once per process that CUDA tensors run on the reference kernels, and why.

    Only where torch can use CUDA: on a CPU-only torch (or without a GPU) no CUDA tensor
    exists, so a warning at every import would be noise; `python -m bnbfuse` still says why.
    """
    global _cuda_warned
    import torch

    if status.registered or _cuda_warned or not torch.cuda.is_available():
        return
    _cuda_warned = True
    warnings.warn(
        f"bnbfuse: native CUDA kernels not registered: {status.reason}. CUDA tensors use the "
        "pure-PyTorch reference kernels, which are correct but slower. `python -m bnbfuse` "
        "shows the details.",
        RuntimeWarning,
        stacklevel=3,
    )


def dtype_code(dtype) -> int:
    import torch

    if not DTYPE_CODES:
        DTYPE_CODES.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2})
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"bnbfuse kernels take float32, float16 or bfloat16, got {dtype}") from None


# Argument type shorthands for NativeLibrary.function
P = ctypes.c_void_p
I32 = ctypes.c_int
I64 = ctypes.c_int64


def ptr(t):
    """Raw data pointer of a tensor, or None for None."""
    return None if t is None else t.data_ptr()
