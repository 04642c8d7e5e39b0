"""The ``bnbfuse`` torch.library namespace every op of ``bnbfuse/ops`` is defined in."""
import torch

lib = torch.library.Library("bnbfuse", "DEF")
