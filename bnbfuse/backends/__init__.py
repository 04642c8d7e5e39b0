"""Per-device kernels of the ops declared in ``bnbfuse/ops``.

``reference`` (pure PyTorch) is registered for every device; ``cpu`` registers the native
CPU kernels on top of it when their library loads, ``cuda`` the native CUDA kernels when
their library loads, torch can use CUDA and the library's driver/runtime probe passes
(``bnbfuse._native.cuda_status``). Where it does not, the reference kernels serve CUDA
tensors, with one warning saying why when torch has a usable GPU.
"""
from . import reference  # noqa: F401  (registers the reference kernels)
from .. import _native

if _native.cpu.loaded:
    from . import cpu  # noqa: F401
if _native.cuda_status().registered:
    from . import cuda  # noqa: F401
else:
    _native.warn_cuda_unusable(_native.cuda_status())
