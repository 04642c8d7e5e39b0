"""Embeddings and fusion modules (bitsandbytes, fairseq2 and torchtune APIs).

- :class:`Embedding`, :class:`StableEmbedding`: bitsandbytes' names; 32-bit optimizer state.
- :class:`Embedding8bit`, :class:`Embedding4bit`, :class:`EmbeddingNF4`, :class:`EmbeddingFP4`:
  bitsandbytes' frozen quantized tables (inference, or a frozen vocabulary).
- :class:`StandardEmbedding`, :func:`init_scaled_embedding`: fairseq2's constructor.
- :class:`FusionEmbedding` (base table plain, int8 or NF4 + trainable new tokens),
  :class:`FusionLayer`, :func:`register_fusion_module`, :func:`get_fusion_params`,
  :func:`set_trainable_params`: torchtune's fusion API; :func:`add_fusion_tokens` swaps a
  model's token embedding for a FusionEmbedding in one call; :func:`from_pretrained_fused`
  reloads a Hugging Face checkpoint saved after it, :func:`resize_fusion_tokens` changes
  the number of new tokens.
- :class:`ShardedEmbedding`: fairseq2's embedding-dimension sharding over a
  ``torch.distributed`` process group.
"""
from .embedding import Embedding, StableEmbedding
from .fusion_embedding import FusionEmbedding
from .fusion_layer import FusionLayer
from .fusion_utils import (add_fusion_tokens, get_fusion_params, register_fusion_module,
                           set_trainable_params)
from .hf import from_pretrained_fused, resize_fusion_tokens
from .lookup import fusion_embedding_lookup
from .quantized_embedding import Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4
from .quantized_table import QuantizedEmbeddingTable
from .sharded import ShardedEmbedding
from .standard_embedding import StandardEmbedding, init_scaled_embedding

__all__ = [
    "Embedding", "StableEmbedding", "StandardEmbedding", "init_scaled_embedding",
    "Embedding8bit", "Embedding4bit", "EmbeddingNF4", "EmbeddingFP4",
    "FusionEmbedding", "FusionLayer", "QuantizedEmbeddingTable", "add_fusion_tokens",
    "get_fusion_params", "register_fusion_module", "set_trainable_params",
    "fusion_embedding_lookup", "ShardedEmbedding", "from_pretrained_fused",
    "resize_fusion_tokens",
]


def __getattr__(name: str):
    # bitsandbytes names bnbfuse leaves out explain themselves (bnbfuse/compat.py)
    from ..compat import missing_name

    raise missing_name("nn", name)
