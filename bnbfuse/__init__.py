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


def backend_info() -> dict:
    """Which kernel backends are loaded, with the CPU instruction set and CUDA archs."""
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
        "torch_cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }
    if _native.cpu.loaded:
        info["cpu"] = f"loaded ({_native.cpu.path})"
        info["cpu_isa"] = _native.cpu.bnbf_cpu_isa().decode()
        info["cpu_isas_compiled"] = _native.cpu.bnbf_cpu_isas_compiled().decode()
    if _native.cuda.loaded:
        info["cuda"] = f"loaded ({_native.cuda.path})"
        info["cuda_archs"] = _native.cuda.bnbf_cuda_archs().decode()
    return info
