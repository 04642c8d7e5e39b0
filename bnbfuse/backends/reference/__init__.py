"""Pure-PyTorch reference kernels: the specification the native kernels are tested against.

They run on any device and are registered as ``CompositeExplicitAutograd``, so they serve
every device that has no native kernel. They favour clarity over speed. One module per op
family: :mod:`.quantize`, :mod:`.optimizer`, :mod:`.embedding`.
"""
from .quantize import (block_divisor, blocks_of, dequantize_blockwise,  # noqa: F401
                       quantize_blockwise, quantize_to_map)
from .optimizer import (optimizer_norms_8bit_blockwise, optimizer_norms_32bit,  # noqa: F401
                        optimizer_rule, optimizer_update_8bit_blockwise,
                        optimizer_update_32bit, quantize_state, dequantize_state, sqrt32)
from .embedding import fusion_embedding_lookup  # noqa: F401
