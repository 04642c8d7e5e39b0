"""Registers 32-bit optimizer state for an embedding's weight (shared by the modules here)."""
from __future__ import annotations

import torch


def keep_32bit_state(module: torch.nn.Module, param_name: str = "weight") -> None:
    """Every bnbfuse 8-bit optimizer keeps ``module.<param_name>``'s state in 32 bits.

    Registered on the module (not the Parameter object), so it survives ``.to()``,
    ``load_state_dict(assign=True)`` and sharding replacing the Parameter.
    """
    from ..optim import GlobalOptimManager

    GlobalOptimManager.get_instance().register_module_override(
        module, param_name, {"optim_bits": 32})
