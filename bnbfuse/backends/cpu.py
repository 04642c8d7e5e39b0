"""CPU kernels from the native library (csrc/cpu), registered for the ``CPU`` key."""
from .. import _native
from .native import NativeBackend, cpu_tail

backend = NativeBackend(_native.cpu, "bnbf_cpu_", "CPU", ((_native.I32,), cpu_tail))
backend.register_all()
