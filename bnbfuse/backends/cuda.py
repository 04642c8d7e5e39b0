"""CUDA kernels from the native library (csrc/cuda), registered for the ``CUDA`` key.

Kernels are launched on torch's current stream of the tensor's device.
"""
import torch

from .. import _native
from .native import NativeBackend

backend = NativeBackend(_native.cuda, "bnbf_cuda_", "CUDA",
                        (_native.P, lambda t: torch.cuda.current_stream(t.device).cuda_stream))
backend.register_all()
