"""CUDA kernels from the native library (csrc/cuda), registered for the ``CUDA`` key.

Kernels are launched on torch's current stream of the tensors' device, whose index is passed
to the library (every tensor of a call is checked to be on it first: ``cuda_tail``).
"""
from .. import _native
from .native import NativeBackend, cuda_tail

backend = NativeBackend(_native.cuda, "bnbf_cuda_", "CUDA", ((_native.I32, _native.P), cuda_tail),
                        norms_scratch=True)
backend.register_all()
