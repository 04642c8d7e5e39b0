"""``ShardedEmbedding``: an embedding table split along its embedding dimension across the
ranks of a ``torch.distributed`` process group (fairseq2's ``ShardedEmbedding``, on plain
``torch.distributed`` instead of a gang)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._override import keep_32bit_state
from .standard_embedding import padding_row


def _resolve_group(process_group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ShardedEmbedding needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    return dist.group.WORLD if process_group is None else process_group


def _all_gather_stacked(local: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """``(world_size, *local.shape)``: every rank's ``local``, stacked in rank order."""
    local = local.contiguous()
    # One flat buffer is the fastest all-gather on NCCL; gloo wants 1-D concatenation too.
    out = local.new_empty(world_size * local.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.reshape(-1), group=group)
    return out.view(world_size, *local.shape)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; the backward keeps this rank's slice.

    Every rank of a tensor-parallel group computes the same loss from the same gathered
    activations, so the gradient of this rank's slice is just its columns of the output
    gradient: no communication in the backward. (``torch.distributed.nn.functional.all_gather``
    instead sums the slice's gradient over the ranks — a reduce-scatter, or an all-to-all
    on gloo — which would scale the gradient by the world size here.)
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, world_size: int, rank: int) -> torch.Tensor:
        ctx.rank, ctx.width = rank, local.shape[-1]
        out = _all_gather_stacked(local, group, world_size)
        return out.movedim(0, -2).reshape(*local.shape[:-1], world_size * ctx.width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo = ctx.rank * ctx.width
        return grad[..., lo:lo + ctx.width].contiguous(), None, None, None


class ShardedEmbedding(nn.Module):
    """An embedding table sharded across its embedding dimension over a process group.

    Rank ``r`` of the group holds columns ``[r * E/W, (r+1) * E/W)`` of the full
    ``(num_embeddings, embed_dim)`` table (``W`` = group size). The forward looks the ids up
    in the local slice and all-gathers the slices along the last dimension, so every rank
    returns the full ``(*, embed_dim)`` embeddings. The gather is autograd-aware: the
    backward hands each rank its own columns of the output gradient (no communication), so
    a rank's ``weight.grad`` is exactly its slice of the gradient the unsharded table would
    get. Like :class:`~bnbfuse.nn.StandardEmbedding`, the weight keeps 32-bit state in
    bnbfuse 8-bit optimizers.

    The weight is a ``DTensor`` of the full shape, sharded on its columns (``Shard(1)``) over
    a device mesh of the group; ``weight.to_local()`` is this rank's slice (what fairseq2's
    ``weight`` holds). So ``torch.distributed.checkpoint`` saves every rank's columns of it
    and of its optimizer state, ``full_tensor()`` gathers it, and optimizers see an ordinary
    tensor-parallel parameter. This is tensor parallelism: **every rank of the group must feed the same ids**
    (combine it with data parallelism over a different group).

    Args:
        num_embeddings: size of the vocabulary (rows of the table).
        embed_dim: dimension of the returned embeddings; must be divisible by the group size.
        pad_idx: if not ``None``, the row at this index gets no gradient (it is never
            updated) and starts as zeros.
        process_group: the ``torch.distributed`` process group to shard over; ``None`` means
            the default (world) group. ``torch.distributed`` must be initialised.
        init_fn: ``init_fn(embed)`` initialises a full :class:`~bnbfuse.nn.StandardEmbedding`
            of the same size (default: that class's default init), which is then sliced.
            The full table is built on the CPU from a seed broadcast from rank 0, so every
            rank starts from the same table, whatever the ranks' RNG states, and the module
            equals ``StandardEmbedding(..., init_fn=init_fn)`` built under that seed.
            (This needs the full table in host memory once; for tables too large for that,
            build with ``device="meta"`` and use :meth:`from_embedding` or load a checkpoint.)
        device, dtype: of the local weight. ``device="meta"`` skips initialisation.

    Shapes:
        - input: ``(*)`` integer ids in ``[0, num_embeddings)``, identical on every rank.
        - output: ``(*, embed_dim)``; ``weight``: ``(num_embeddings, embed_dim)`` DTensor,
          ``weight.to_local()``: ``(num_embeddings, embed_dim // W)``.

    Raises:
        ValueError: ``embed_dim`` is not divisible by the group size, or a size is not positive.
        RuntimeError: ``torch.distributed`` is not initialised.

    Example (run with ``torchrun --nproc-per-node 2 example.py``)::

        import torch, torch.distributed as dist
        import bnbfuse as bnb

        dist.init_process_group("gloo")
        embed = bnb.nn.ShardedEmbedding(32000, 512, pad_idx=0,
                                        init_fn=bnb.nn.init_scaled_embedding)
        embed.weight.to_local().shape          # (32000, 256) on each of 2 ranks
        tokens = torch.randint(0, 32000, (4, 6))
        dist.broadcast(tokens, src=0)          # the same ids on every rank
        x = embed(tokens)                      # (4, 6, 512) on every rank
        full = embed.to_embedding()            # a StandardEmbedding(32000, 512) everywhere
    """

    def __init__(self, num_embeddings: int, embed_dim: int, pad_idx: Optional[int] = None, *,
                 process_group=None, init_fn: Optional[Callable[[nn.Module], None]] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if num_embeddings <= 0 or embed_dim <= 0:
            raise ValueError(f"num_embeddings and embed_dim must be positive, got "
                             f"{num_embeddings} and {embed_dim}")
        pad_idx = padding_row(pad_idx, num_embeddings)
        group = _resolve_group(process_group)
        world_size = dist.get_world_size(group)
        if embed_dim % world_size != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by the size of the "
                             f"process group ({world_size})")
        self.num_embeddings = num_embeddings
        self.embed_dim = embed_dim
        self.pad_idx = pad_idx
        self.padding_idx = self.pad_idx  # nn.Embedding's name, for code that reads it
        self.process_group = group
        self.world_size = world_size
        self.rank = dist.get_rank(group)
        self.sharded_embed_dim = embed_dim // world_size
        self.init_fn = init_fn
        self._set_local_weight(torch.empty(num_embeddings, self.sharded_embed_dim,
                                           device=device, dtype=dtype))
        self.reset_parameters()
        keep_32bit_state(self, "weight")  # like StandardEmbedding

    def _set_local_weight(self, local: torch.Tensor, requires_grad: bool = True) -> None:
        """Makes ``local`` (this rank's columns) the weight: a DTensor sharded on dim 1."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        kind = local.device.type
        if kind == "meta":  # the mesh names where the data will live once materialised
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = DeviceMesh.from_group(self.process_group, kind)
        full = (self.num_embeddings, self.embed_dim)
        self.weight = nn.Parameter(
            DTensor.from_local(local, mesh, [Shard(1)], run_check=False, shape=full,
                               stride=(self.embed_dim, 1)),
            requires_grad=requires_grad)

    def local_weight(self) -> torch.Tensor:
        """This rank's columns of the table, ``(num_embeddings, embed_dim // W)`` (a view)."""
        return self.weight.to_local()

    def _columns(self) -> slice:
        lo = self.rank * self.sharded_embed_dim
        return slice(lo, lo + self.sharded_embed_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialises the table (collective: every rank of the group must call it)."""
        if self.local_weight().device.type == "meta":
            return
        from . import StandardEmbedding

        # Every rank draws a seed (so all ranks' RNG streams advance alike), rank 0's wins.
        seed = [int(torch.randint(0, 2**62, (1,)).item())]
        dist.broadcast_object_list(seed, group=self.process_group, group_src=0)
        # Built on the CPU with only the CPU generator touched: CPU and CUDA RNGs differ,
        # and the same seed must give the same table on every device.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed[0])
            full = StandardEmbedding(self.num_embeddings, self.embed_dim, self.pad_idx,
                                     init_fn=self.init_fn, dtype=self.weight.dtype)
        self.local_weight().copy_(full.weight[:, self._columns()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Looks up ``x`` (shape ``(*)``); returns the full embeddings ``(*, embed_dim)``."""
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"ShardedEmbedding takes integer ids, got {x.dtype}")
        # to_local() is differentiable: weight.grad comes back as a DTensor like the weight
        local = F.embedding(x, self.local_weight(), self.pad_idx)
        if self.world_size == 1:
            return local
        return _GatherLastDim.apply(local, self.process_group, self.world_size, self.rank)

    @staticmethod
    def from_embedding(embed: nn.Module, process_group=None) -> "ShardedEmbedding":
        """Shards ``embed`` (a ``StandardEmbedding`` or ``nn.Embedding``) over the group.

        Each rank keeps its columns of ``embed.weight`` (copied, on the same device and
        dtype); ``embed`` must hold the same table on every rank. Its pad index
        (``pad_idx`` or ``padding_idx``), ``init_fn`` and ``requires_grad`` carry over.
        """
        weight = getattr(embed, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"from_embedding takes an embedding module with a 2-D weight, got "
                            f"{type(embed).__name__}")
        # Only a plain lookup shards: anything more in the forward would be silently lost.
        extras = [name for name, off in (("max_norm", None), ("scale_grad_by_freq", False),
                                         ("sparse", False))
                  if getattr(embed, name, off) != off]
        if any(isinstance(m, torch.nn.LayerNorm) for m in embed.modules()):
            extras.append("a LayerNorm")
        if extras:
            raise ValueError(f"from_embedding shards a plain lookup table; this "
                             f"{type(embed).__name__} also has {', '.join(extras)}, which "
                             "ShardedEmbedding would drop")
        pad_idx = getattr(embed, "pad_idx", getattr(embed, "padding_idx", None))
        sharded = ShardedEmbedding(weight.shape[0], weight.shape[1], pad_idx,
                                   process_group=process_group,
                                   init_fn=getattr(embed, "init_fn", None),
                                   device="meta", dtype=weight.dtype)
        sharded._set_local_weight(weight.detach()[:, sharded._columns()].clone(),
                                  weight.requires_grad)
        return sharded

    @torch.no_grad()
    def to_embedding(self, device=None) -> nn.Module:
        """Gathers the full table into a :class:`~bnbfuse.nn.StandardEmbedding` on every rank
        (collective), on ``device`` (default: this module's device). Exact inverse of
        :meth:`from_embedding`."""
        from . import StandardEmbedding

        local = self.local_weight().detach().contiguous()
        if self.world_size == 1:
            full = local.clone()
        else:
            parts = _all_gather_stacked(local, self.process_group, self.world_size)
            full = parts.movedim(0, 1).reshape(self.num_embeddings, self.embed_dim)
        embed = StandardEmbedding(self.num_embeddings, self.embed_dim, self.pad_idx,
                                  init_fn=self.init_fn, device="meta", dtype=full.dtype)
        embed.weight = nn.Parameter(full.to(device if device is not None else full.device),
                                    requires_grad=self.weight.requires_grad)
        return embed

    def extra_repr(self) -> str:
        s = (f"num_embeddings={self.num_embeddings}, embed_dim={self.embed_dim}, "
             f"sharded_embed_dim={self.sharded_embed_dim}, world_size={self.world_size}")
        if self.pad_idx is not None:
            s += f", pad_idx={self.pad_idx}"
        if self.init_fn is not None:
            s += f", init_fn={getattr(self.init_fn, '__name__', self.init_fn)}"
        return s
