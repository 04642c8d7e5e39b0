"""Embeddings and fusion modules (bitsandbytes, fairseq2 and torchtune APIs)."""
