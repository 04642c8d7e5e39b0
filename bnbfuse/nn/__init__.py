"""Embeddings and fusion modules (bitsandbytes, fairseq2 and torchtune APIs).

- :class:`Embedding`, :class:`StableEmbedding`: bitsandbytes' names; 32-bit optimizer state.
- :class:`StandardEmbedding`, :func:`init_scaled_embedding`: fairseq2's constructor.
- :class:`FusionEmbedding` (base table plain, int8 or NF4 + trainable new tokens),
  :class:`FusionLayer`, :func:`register_fusion_module`, :func:`get_fusion_params`,
  :func:`set_trainable_params`: torchtune's fusion API; :func:`add_fusion_tokens` swaps a
  model's token embedding for a FusionEmbedding in one call.
"""
from .embedding import Embedding, StableEmbedding
from .fusion_embedding import FusionEmbedding
from .fusion_layer import FusionLayer
from .fusion_utils import (add_fusion_tokens, get_fusion_params, register_fusion_module,
                           set_trainable_params)
from .lookup import fusion_embedding_lookup
from .quantized_table import QuantizedEmbeddingTable
from .standard_embedding import StandardEmbedding, init_scaled_embedding

__all__ = [
    "Embedding", "StableEmbedding", "StandardEmbedding", "init_scaled_embedding",
    "FusionEmbedding", "FusionLayer", "QuantizedEmbeddingTable", "add_fusion_tokens",
    "get_fusion_params", "register_fusion_module", "set_trainable_params",
    "fusion_embedding_lookup",
]
from .sharded import ShardedEmbedding  # noqa: E402,F401
