"""bnbfuse: memory-lean training for PyTorch.

8-bit blockwise optimizers with fused C++/CUDA kernels (``bnbfuse.optim``), a registry that
keeps chosen parameters in 32-bit state, and embeddings built for it (``bnbfuse.nn``).
``import bnbfuse as bnb`` runs code written for bitsandbytes where the names exist there;
:func:`install_as_bitsandbytes` serves code that imports ``bitsandbytes`` by name.
"""
__version__ = "0.1.0"

from . import _native
from . import ops  # noqa: F401
from . import backends  # noqa: F401
from . import functional  # noqa: F401
from . import optim  # noqa: F401
from . import nn  # noqa: F401
from .compat import install_as_bitsandbytes  # noqa: F401

_native.warn_if_missing()


def __getattr__(name: str):
    # bitsandbytes' top-level names bnbfuse leaves out (matmul, ...) explain themselves
    from .compat import missing_name

    raise missing_name("", name)


def backend_info(load_cuda_images: bool = False) -> dict:
    """Which kernel backends are loaded, with the CPU instruction set and CUDA archs.

    ``cuda`` says whether the native CUDA kernels are registered for CUDA tensors and, if not,
    why (library missing, torch without CUDA, driver too old, no kernel image for a device).
    ``cuda_driver`` / ``cuda_runtime`` / ``cuda_devices`` come from the library's probe, run
    again here. With ``load_cuda_images`` the probe also loads the kernels on every device
    (creating a CUDA context on each; ``python -m bnbfuse`` does this), the driver's own answer
    to "is there a kernel image for this GPU"."""
    import torch

    info = {
        "bnbfuse": __version__,
        "torch": torch.__version__,
        "reference": "loaded (pure PyTorch, every device)",
        "cpu": "not loaded: " + str(_native.cpu.error),
        "cpu_isa": None,
        "cpu_isas_compiled": None,
        "cuda": "not loaded: " + str(_native.cuda.error),
        "cuda_archs": None,
        "cuda_driver": None,
        "cuda_runtime": None,
        "cuda_devices": None,
        "torch_cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }
    if _native.cpu.loaded:
        info["cpu"] = f"loaded ({_native.cpu.path})"
        info["cpu_isa"] = _native.cpu.bnbf_cpu_isa().decode()
        info["cpu_isas_compiled"] = _native.cpu.bnbf_cpu_isas_compiled().decode()
    if _native.cuda.loaded:
        archs = _native.cuda.bnbf_cuda_archs().decode()
        info["cuda_archs"] = archs
        status = _native.cuda_status()
        if status.registered:
            info["cuda"] = f"registered ({_native.cuda.path})"
        else:
            info["cuda"] = (f"not registered: {status.reason} (library built for {archs} "
                            f"loaded from {_native.cuda.path})")
        try:
            probe = _native.probe_cuda(load_images=load_cuda_images)
        except RuntimeError as err:
            info["cuda_driver"] = f"unknown ({err})"
        else:
            v = _native.cuda_version_string
            info["cuda_driver"] = (f"CUDA {v(probe.driver_version)}" if probe.driver_version
                                   else "none")
            info["cuda_runtime"] = (f"CUDA {v(probe.runtime_version)} (linked statically; "
                                    f"needs {_native.needed_driver(probe.runtime_version)})")
            if probe.devices:
                info["cuda_devices"] = "; ".join(_device_line(d) for d in probe.devices)
            else:
                info["cuda_devices"] = f"none ({probe.device_count_error or '0 devices'})"
            if status.registered and (why := _native.cuda_unusable_reason(probe, archs)):
                # registered at import from the prediction, refuted by the loaded images
                info["cuda"] += f"; but {why}"
    return info


def _device_line(dev) -> str:
    line = f"cuda:{dev.index} {dev.sm}"
    if dev.image_error is None:
        return line
    return line + (": kernels load" if dev.image_error == "" else f": {dev.image_error}")
