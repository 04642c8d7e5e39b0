"""8-bit and 32-bit optimizers (bitsandbytes names) and the override registry."""
from .manager import GlobalOptimManager, keep_32bit_embeddings

__all__ = ["GlobalOptimManager", "keep_32bit_embeddings"]
