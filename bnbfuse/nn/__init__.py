"""Embeddings and fusion modules (bitsandbytes, fairseq2 and torchtune APIs)."""
from .sharded import ShardedEmbedding  # noqa: E402,F401
