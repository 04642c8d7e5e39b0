"""CPU kernels from the native library (csrc/cpu), registered for the ``CPU`` key."""
import torch

from .. import _native
from .native import NativeBackend

backend = NativeBackend(_native.cpu, "bnbf_cpu_", "CPU",
                        (_native.I32, lambda t: torch.get_num_threads()))
backend.register_all()
