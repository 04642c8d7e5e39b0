"""Per-device kernels of the ops declared in ``bnbfuse/ops``.

``reference`` (pure PyTorch) is registered for every device; ``cpu`` and ``cuda`` register
native kernels on top of it when their library loads.
"""
from . import reference  # noqa: F401  (registers the reference kernels)
from .. import _native

if _native.cpu.loaded:
    from . import cpu  # noqa: F401
if _native.cuda.loaded:
    from . import cuda  # noqa: F401
