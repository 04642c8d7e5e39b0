"""The custom ops of bnbfuse, declared once with ``torch.library``, and their contracts.

One module per op family holds the schemas, the fake (meta) implementations that let
``torch.compile`` trace through the ops, and the argument checks and host-side scalars that
every backend shares: :mod:`~bnbfuse.ops.quantize`, :mod:`~bnbfuse.ops.optimizer`,
:mod:`~bnbfuse.ops.embedding`. :mod:`~bnbfuse.ops.rules` is the table of optimizer kinds.
Kernels are registered per device in ``bnbfuse/backends``: ``cpu`` and ``cuda`` call the
native library; ``reference`` (pure PyTorch) is registered for every device as
``CompositeExplicitAutograd`` and serves wherever no native kernel is registered.
"""
from . import rules  # noqa: F401
from . import quantize  # noqa: F401
from . import optimizer  # noqa: F401
from . import embedding  # noqa: F401
