"""bnbfuse on torch.distributed: ShardedEmbedding, 8-bit optimizers under DDP and FSDP2,
distributed checkpoints. Every test runs 2 gloo ranks on the CPU (tests/dist_utils.py) with
a time limit, so a hang fails the test instead of blocking CI."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


# ---- ShardedEmbedding --------------------------------------------------------------------
def _sharded_embedding_body(rank, world):
    import torch.nn.functional as F

    import bnbfuse as bnb

    out = {}
    torch.manual_seed(100 + rank)  # different RNG states: the init must not depend on them
    num, dim, pad = 37, 8, 3
    emb = bnb.nn.ShardedEmbedding(num, dim, pad)
    out["local_shape"] = tuple(emb.local_weight().shape)
    out["weight"] = (type(emb.weight).__name__, tuple(emb.weight.shape), str(emb.weight.placements))
    full = emb.to_embedding()
    out["full_type"] = type(full).__name__
    out["full"] = full.weight.detach().clone()
    out["local"] = emb.local_weight().detach().clone()

    # forward == lookup in the full table; backward == this rank's slice of the full gradient
    ids = torch.tensor([[0, 3, 5, 36], [5, 5, 3, 11]])
    w = torch.linspace(-1, 1, 2 * 4 * dim).reshape(2, 4, dim)
    y = emb(ids)
    out["fwd_ok"] = torch.equal(y, F.embedding(ids, full.weight.detach()))
    (y * w).sum().backward()
    ref = full.weight.detach().clone().requires_grad_(True)
    (F.embedding(ids, ref, pad) * w).sum().backward()
    cols = slice(rank * dim // world, (rank + 1) * dim // world)
    grad = emb.weight.grad.to_local()  # a DTensor like the weight
    out["grad_ok"] = torch.equal(grad, ref.grad[:, cols])
    out["pad_grad_zero"] = bool((grad[pad] == 0).all())
    out["grad_nonzero"] = bool(grad[5].abs().sum() > 0)

    # from_embedding / to_embedding round trip, on a table with a recognisable layout
    src = bnb.nn.StandardEmbedding(num, dim, pad)
    with torch.no_grad():
        src.weight.copy_(torch.arange(num * dim, dtype=torch.float32).reshape(num, dim))
    sh = bnb.nn.ShardedEmbedding.from_embedding(src)
    out["from_slice_ok"] = torch.equal(sh.local_weight(), src.weight.detach()[:, cols])
    back = sh.to_embedding()
    out["roundtrip_ok"] = (torch.equal(back.weight, src.weight) and back.pad_idx == pad
                           and back.embed_dim == dim)
    out["from_fwd_ok"] = torch.equal(sh(ids), src(ids))

    # init_fn receives the full StandardEmbedding; the module holds its slice
    def init_arange(e):
        with torch.no_grad():
            e.weight.copy_(torch.arange(e.num_embeddings * e.embed_dim,
                                        dtype=torch.float32).reshape(e.num_embeddings, -1))
    e2 = bnb.nn.ShardedEmbedding(num, dim, init_fn=init_arange)
    out["init_fn_ok"] = torch.equal(e2.local_weight(), src.weight.detach()[:, cols])

    # training with an 8-bit optimizer: the table keeps 32-bit (elementwise) state, so the
    # sharded run is the full run's slice, bit for bit
    import bnbfuse.optim as bo
    sh_opt = bo.AdamW8bit(sh.parameters(), lr=1e-2)
    full_opt = bo.AdamW8bit(src.parameters(), lr=1e-2)
    for step in range(3):
        ids_s = (ids * (step + 1)) % num
        (sh(ids_s) * w).sum().backward()
        (src(ids_s) * w).sum().backward()
        for o in (sh_opt, full_opt):
            o.step()
            o.zero_grad()
    out["train_ok"] = torch.equal(sh.local_weight(), src.weight.detach()[:, cols])
    out["train_32bit"] = sh_opt.state[sh.weight]["state1"].dtype == torch.float32

    # only plain lookup tables shard: what the forward would lose raises
    out["extras"] = []
    for extra in (bnb.nn.StableEmbedding(num, dim), torch.nn.Embedding(num, dim, max_norm=1.0)):
        try:
            bnb.nn.ShardedEmbedding.from_embedding(extra)
            out["extras"].append("no error")
        except ValueError as e:
            out["extras"].append(str(e))

    # embed_dim not divisible by the group size
    try:
        bnb.nn.ShardedEmbedding(num, 7)
        out["bad_dim"] = "no error"
    except ValueError as e:
        out["bad_dim"] = str(e)

    # a sub-group: each rank alone in its own group -> unsharded
    groups = [dist.new_group([r]) for r in range(world)]
    solo = bnb.nn.ShardedEmbedding(num, dim, process_group=groups[rank])
    out["solo_shape"] = tuple(solo.local_weight().shape)
    out["solo_fwd_ok"] = torch.equal(solo(ids), F.embedding(ids, solo.local_weight()))
    return out


def test_sharded_embedding():
    res = run_workers(_sharded_embedding_body, world_size=WORLD, timeout=90)
    for rank, r in enumerate(res):
        assert r["local_shape"] == (37, 4)
        assert r["weight"] == ("DTensor", (37, 8), "(Shard(dim=1),)")
        assert r["full_type"] == "StandardEmbedding"
        assert r["fwd_ok"] and r["grad_ok"] and r["grad_nonzero"], rank
        assert r["pad_grad_zero"], rank
        assert r["from_slice_ok"] and r["roundtrip_ok"] and r["from_fwd_ok"], rank
        assert r["init_fn_ok"], rank
        assert r["train_ok"] and r["train_32bit"], rank
        assert "divisible" in r["bad_dim"], r["bad_dim"]
        assert "LayerNorm" in r["extras"][0] and "max_norm" in r["extras"][1], r["extras"]
        assert r["solo_shape"] == (37, 8) and r["solo_fwd_ok"]
    # identical initial table on every rank although their RNGs differed; pad row zeroed
    assert torch.equal(res[0]["full"], res[1]["full"])
    assert torch.equal(res[0]["full"][:, :4], res[0]["local"])
    assert torch.equal(res[0]["full"][:, 4:], res[1]["local"])
    assert (res[0]["full"][3] == 0).all() and res[0]["full"].abs().sum() > 0


def _sharded_embedding_dcp_body(rank, world, root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import bnbfuse as bnb

    ids = torch.tensor([[1, 2, 3, 0], [7, 7, 19, 4]])

    def step(emb, opt):
        emb(ids).square().sum().backward()
        opt.step()
        opt.zero_grad()

    torch.manual_seed(0)
    emb = bnb.nn.ShardedEmbedding(20, 8, pad_idx=0)
    opt = bnb.optim.AdamW8bit(emb.parameters(), lr=1e-2)
    step(emb, opt)
    msd, osd = get_state_dict(emb, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=root)
    torch.manual_seed(1)  # another initial table: everything must come from the checkpoint
    emb2 = bnb.nn.ShardedEmbedding(20, 8, pad_idx=0)
    opt2 = bnb.optim.AdamW8bit(emb2.parameters(), lr=1e-2)
    msd2, osd2 = get_state_dict(emb2, opt2)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=root)
    set_state_dict(emb2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    same = (torch.equal(emb2.local_weight(), emb.local_weight())
            and all(torch.equal(opt2.state[emb2.weight][k], v)  # the local state
                    for k, v in opt.state[emb.weight].items() if isinstance(v, torch.Tensor)))
    step(emb, opt)
    step(emb2, opt2)
    return {"restored": same, "resumed": torch.equal(emb2.local_weight(), emb.local_weight()),
            "local": emb.local_weight().detach().clone()}


def test_sharded_embedding_dcp_checkpoint_keeps_every_rank_columns(tmp_path):
    res = run_workers(_sharded_embedding_dcp_body, str(tmp_path), world_size=WORLD, timeout=120)
    for r in res:
        assert r["restored"] and r["resumed"]
    assert not torch.equal(res[0]["local"], res[1]["local"])  # two different column blocks


def test_sharded_embedding_needs_process_group():
    import bnbfuse as bnb

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        bnb.nn.ShardedEmbedding(10, 4)


# ---- shared model for the optimizer tests ------------------------------------------------
def _mlp(seed: int = 0) -> torch.nn.Module:
    # fc1.weight: 301 x 16 = 4816 elements globally (>= 4096: 8-bit state), about 2400 per
    # rank under FSDP2 (< 4096); 301 rows also make the shards uneven (151 / 150).
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 301), torch.nn.ReLU(),
                               torch.nn.Linear(301, 8))


def _batch(step: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)


def _fsdp(model, world, hsdp=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # hsdp: a 2-D (replicate, shard) mesh, placements (Replicate(), Shard(0))
    mesh = (init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
            if hsdp else init_device_mesh("cpu", (world,)))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, opt, steps, start, rank=0, world=1):
    for s in range(start, start + steps):
        x, y = _batch(s)
        n = x.shape[0] // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _full_params(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


# ---- FSDP2: state on the local shard, min_8bit_size on the global size, tracking ----------
def _fsdp_tracking_body(rank, world):
    import bnbfuse as bnb

    model = _fsdp(_mlp(), world)
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    _train(model, opt, 12, 0, rank, world)
    out = {"params": _full_params(model), "state": {}}
    for name, p in model.named_parameters():
        st = opt.state[p]
        out["state"][name] = {
            "dtensor": type(p).__name__, "global": p.numel(), "local": p.to_local().numel(),
            "state1_dtype": st["state1"].dtype,
            "state1_shape": tuple(st["state1"].shape), "local_shape": tuple(p.to_local().shape),
            "has_absmax": "absmax1" in st}
    if rank == 0:  # the single-process run on the full batch
        ref = _mlp()
        ref_opt = bnb.optim.AdamW8bit(ref.parameters(), lr=1e-3)
        _train(ref, ref_opt, 12, 0)
        out["ref"] = _full_params(ref)
    return out


def test_fsdp2_adamw8bit_tracks_single_process():
    res = run_workers(_fsdp_tracking_body, world_size=WORLD, timeout=120)
    st = res[0]["state"]
    w1 = st["0.weight"]
    assert w1["dtensor"] == "DTensor" and w1["global"] >= 4096 > w1["local"]
    # 8-bit state although the local shard is below min_8bit_size; kept on the local shard
    assert w1["state1_dtype"] == torch.uint8 and w1["has_absmax"]
    for name, s in st.items():
        assert s["state1_shape"] == s["local_shape"], name
        if s["global"] < 4096:
            assert s["state1_dtype"] == torch.float32 and not s["has_absmax"], name
    # The 8-bit blocks of 256 follow each rank's shard (rank 1's fc1 shard starts at
    # element 2416, mid-block), so the block maxima and thus the rounding differ from the
    # single-process run; with 32-bit state the two runs agree to ~1e-7.
    ref = res[0]["ref"]
    moved = 0.0
    for name, p in res[0]["params"].items():
        assert torch.equal(p, res[1]["params"][name])  # both ranks hold the same model
        d = (p - ref[name]).abs()
        assert d.max() < 5e-3, (name, float(d.max()))
        assert d.mean() < 1e-4, (name, float(d.mean()))
        moved = max(moved, float((ref[name] - _mlp().state_dict()[name]).abs().max()))
    assert moved > 5e-3  # the runs really trained (12 steps of about lr = 1e-3)


# ---- FSDP2 + torch.distributed.checkpoint: bit-identical resume ---------------------------
_DCP_CONFIGS = {  # name: (optimizer, kwargs, HSDP mesh)
    "AdamW8bit": ("AdamW8bit", dict(lr=1e-2, weight_decay=0.1), False),
    # two moments stacked in state1 (a leading dim of 2), gradient-norm history
    "AdEMAMix8bit": ("AdEMAMix8bit", dict(lr=1e-2, percentile_clipping=50), False),
    "AdamW8bit-hsdp": ("AdamW8bit", dict(lr=1e-2), True),
}


def _opt_state(model, opt) -> dict:
    return {f"{n}.{k}": (v.clone() if isinstance(v, torch.Tensor) else v)
            for n, p in model.named_parameters() for k, v in opt.state[p].items()}


def _dcp_body(rank, world, ckpt_root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import bnbfuse as bnb

    out = {}
    for name, (cls, kwargs, hsdp) in _DCP_CONFIGS.items():
        ckpt_dir = os.path.join(ckpt_root, name)

        def make():
            model = _fsdp(_mlp(), world, hsdp)
            return model, getattr(bnb.optim, cls)(model.parameters(), **kwargs)

        model, opt = make()
        _train(model, opt, 3, 0, rank, world)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
        kinds = {k: type(v).__name__ for k, v in osd["state"]["0.weight"].items()}
        if kinds["state1"] != "DTensor":
            # The optimizer class does not apply bnbfuse.distributed's conversion yet: every
            # rank's shard would be saved as rank 0's (see docs/distributed.md).
            return {"integrated": False, "kinds": kinds}
        _train(model, opt, 4, 3, rank, world)
        straight, straight_state = _full_params(model), _opt_state(model, opt)

        model2, opt2 = make()  # fresh: untrained weights, no optimizer state yet
        msd2, osd2 = get_state_dict(model2, opt2)
        dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=ckpt_dir)
        set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
        loaded_step = opt2.state[model2[0].weight]["step"]
        _train(model2, opt2, 4, 3, rank, world)
        resumed, resumed_state = _full_params(model2), _opt_state(model2, opt2)
        out[name] = {
            "kinds": kinds, "loaded_step": loaded_step, "placements": str(model[0].weight.placements),
            "shape1": tuple(opt.state[model[0].weight]["state1"].shape),
            "params_equal": all(torch.equal(straight[k], resumed[k]) for k in straight),
            "state_equal": {k: (torch.equal(v, resumed_state[k]) if isinstance(v, torch.Tensor)
                                else v == resumed_state[k]) for k, v in straight_state.items()},
            "state_keys": sorted(k for k in straight_state if k.startswith("0.weight."))}
    return {"integrated": True, **out}


def test_fsdp2_dcp_resume_is_bit_identical(tmp_path):
    res = run_workers(_dcp_body, str(tmp_path), world_size=WORLD, timeout=150)
    assert all(r["integrated"] for r in res), "optimizer state_dict is not DCP-ready"
    for rank, r in enumerate(res):
        for name in _DCP_CONFIGS:
            c = r[name]
            # per-rank 8-bit tensors travel as DTensors, the rest stays plain
            assert c["kinds"]["state1"] == "DTensor" and c["kinds"]["absmax1"] == "DTensor"
            assert c["kinds"]["qmap1"] == "Tensor"
            assert c["loaded_step"] == 3
            assert c["params_equal"], (rank, name)
            bad = [k for k, ok in c["state_equal"].items() if not ok]
            assert not bad, (rank, name, bad)
        assert r["AdamW8bit"]["state_keys"] == [
            f"0.weight.{k}" for k in ("absmax1", "absmax2", "qmap1", "qmap2", "state1", "state2",
                                      "step")]
        assert r["AdEMAMix8bit"]["shape1"] == (2, 151 - rank, 16)
        assert "0.weight.gnorm_vec" in r["AdEMAMix8bit"]["state_keys"]
        assert "Replicate" in r["AdamW8bit-hsdp"]["placements"]
    assert os.path.exists(tmp_path / "AdamW8bit" / ".metadata")


# ---- bnbfuse.distributed conversions, independent of the optimizer class -------------------
def _conversion_body(rank, world):
    import bnbfuse as bnb
    from bnbfuse import distributed as bd

    out = {}
    for cls in ("AdamW8bit", "AdEMAMix8bit"):
        model = _fsdp(_mlp(), world)
        opt = getattr(bnb.optim, cls)(model.parameters(), lr=1e-2)
        _train(model, opt, 2, 0, rank, world)
        local_sd = torch.optim.Optimizer.state_dict(opt)  # plain torch packing: local tensors
        sd = bd.dtensor_optimizer_state_dict(opt, local_sd)
        st = sd["state"][0]
        back = bd.local_optimizer_state_dict(opt, sd)
        same = all(
            (torch.equal(v, back["state"][i][k]) if isinstance(v, torch.Tensor)
             else v == back["state"][i][k])
            for i, s0 in local_sd["state"].items() for k, v in s0.items())
        out[cls] = {
            "state1": (type(st["state1"]).__name__, tuple(st["state1"].shape),
                       str(st["state1"].placements)),
            "absmax1": (type(st["absmax1"]).__name__, tuple(st["absmax1"].shape)),
            "qmap1": type(st["qmap1"]).__name__, "roundtrip": same,
            "state_untouched": all(not bd.is_dtensor(v) for s0 in opt.state.values()
                                   for v in s0.values()),
        }
    # plain parameters: both conversions are the identity
    plain = _mlp()
    popt = bnb.optim.AdamW8bit(plain.parameters())
    _train(plain, popt, 1, 0)
    psd = torch.optim.Optimizer.state_dict(popt)
    out["plain_identity"] = (bd.dtensor_optimizer_state_dict(popt, psd) is psd
                             and bd.local_optimizer_state_dict(popt, psd) is psd)
    # DTensor state for a parameter that is not sharded any more: a clear error
    try:
        bd.state_to_local(plain[0].weight, {"state1": st["state1"]})
        out["plain_error"] = "no error"
    except ValueError as e:
        out["plain_error"] = str(e)
    return out


def test_state_dict_conversion_round_trip():
    res = run_workers(_conversion_body, world_size=WORLD, timeout=90)
    for rank, r in enumerate(res):
        a, m = r["AdamW8bit"], r["AdEMAMix8bit"]
        assert a["state1"][:2] == ("DTensor", (301, 16)) and "Shard(dim=0)" in a["state1"][2]
        # stored where each block starts: one slot per row of 16 (ceil(16 / 256) = 1), a
        # shape that does not depend on the world size
        assert a["absmax1"] == ("DTensor", (301, 1))
        assert m["state1"][:2] == ("DTensor", (2, 301, 16)) and "Shard(dim=1)" in m["state1"][2]
        assert m["absmax1"] == ("DTensor", (2, 301, 1))  # two moments
        for c in (a, m):
            assert c["qmap1"] == "Tensor" and c["roundtrip"] and c["state_untouched"], rank
        assert r["plain_identity"]
        assert "plain tensor" in r["plain_error"]


# ---- torch.optim conversion under FSDP2 -------------------------------------------------------
def _torch_conversion_body(rank, world):
    import bnbfuse as bnb

    out = {}
    # bnbfuse -> torch.optim.AdamW on the same FSDP2 parameters: DTensor state, and steps
    model = _fsdp(_mlp(), world)
    opt = bnb.optim.AdamW32bit(model.parameters(), lr=1e-2)
    _train(model, opt, 2, 0, rank, world)
    tsd = opt.torch_state_dict()
    out["exp_avg_type"] = type(tsd["state"][0]["exp_avg"]).__name__
    topt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    topt.load_state_dict(tsd)
    _train(model, topt, 1, 2, rank, world)
    out["torch_after"] = _full_params(model)
    # the same, never converted: 32-bit state follows torch.optim closely
    ref = _fsdp(_mlp(), world)
    ropt = bnb.optim.AdamW32bit(ref.parameters(), lr=1e-2)
    _train(ref, ropt, 3, 0, rank, world)
    out["bnb_3_steps"] = _full_params(ref)
    # torch.optim.AdamW (DTensor state) -> bnbfuse 8-bit
    model = _fsdp(_mlp(), world)
    topt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, topt, 2, 0, rank, world)
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)
    opt.load_torch_state_dict(topt.state_dict())
    out["loaded_step"] = opt.state[model[0].weight]["step"]
    _train(model, opt, 1, 2, rank, world)
    return out


def test_torch_optim_conversion_under_fsdp2():
    res = run_workers(_torch_conversion_body, world_size=WORLD, timeout=120)
    for r in res:
        assert r["exp_avg_type"] == "DTensor" and r["loaded_step"] == 2
        for k, v in r["torch_after"].items():
            torch.testing.assert_close(v, r["bnb_3_steps"][k], rtol=1e-5, atol=1e-6)


# ---- tensor parallelism: Partial gradients -----------------------------------------------------
class _TPNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        self.w1 = torch.nn.Linear(16, 32)
        self.w2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(self.norm(x))))


def _tp_body(rank, world):
    import bnbfuse as bnb
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("bnbfuse", "torch"):
        m = _TPNet()
        # the sequence-parallel LayerNorm's weight gets a Partial (per-rank sum) gradient
        parallelize_module(m, mesh, {"norm": SequenceParallel(),
                                     "w1": ColwiseParallel(input_layouts=Shard(1)),
                                     "w2": RowwiseParallel(output_layouts=Shard(1))})
        opt = (bnb.optim.AdamW(m.parameters(), lr=1e-2) if name == "bnbfuse"
               else torch.optim.AdamW(m.parameters(), lr=1e-2))
        for _ in range(3):
            m(x[:, rank * 2:(rank + 1) * 2]).square().sum().backward()  # a local output
            out.setdefault("placements", str(m.norm.weight.grad.placements))
            opt.step()
            opt.zero_grad()
        out[name] = {k: p.to_local().detach().clone() for k, p in m.named_parameters()}
    return out


def test_tensor_parallel_partial_gradients_are_reduced():
    res = run_workers(_tp_body, world_size=WORLD, timeout=120)
    assert "Partial" in res[0]["placements"]
    for r in res:
        for k, v in r["bnbfuse"].items():
            torch.testing.assert_close(v, r["torch"][k], rtol=1e-5, atol=1e-6)
    # the replicated LayerNorm weight stays identical on both ranks
    assert torch.equal(res[0]["bnbfuse"]["norm.weight"], res[1]["bnbfuse"]["norm.weight"])


# ---- DDP: unchanged --------------------------------------------------------------------------
def _ddp_body(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import bnbfuse as bnb

    model = DDP(_mlp())
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)
    _train(model, opt, 6, 0, rank, world)
    out = {"params": {k: v.detach().clone() for k, v in model.module.named_parameters()}}
    if rank == 0:  # one process, the gradient averaged over the two half batches
        ref = _mlp()
        ref_opt = bnb.optim.AdamW8bit(ref.parameters(), lr=1e-2)
        for s in range(6):
            x, y = _batch(s)
            grads = []
            for r in range(world):
                n = x.shape[0] // world
                ref.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(ref(x[r * n:(r + 1) * n]),
                                             y[r * n:(r + 1) * n]).backward()
                grads.append([p.grad.clone() for p in ref.parameters()])
            for p, *gs in zip(ref.parameters(), *grads):
                p.grad = sum(g / world for g in gs)
            ref_opt.step()
        out["ref"] = {k: v.detach().clone() for k, v in ref.named_parameters()}
        out["eightbit"] = ref_opt.state[ref[0].weight]["state1"].dtype == torch.uint8
    return out


def test_ddp_equals_single_process_with_averaged_gradient():
    res = run_workers(_ddp_body, world_size=WORLD, timeout=90)
    assert res[0]["eightbit"]
    for name, p in res[0]["params"].items():
        assert torch.equal(p, res[1]["params"][name])
        # DDP's mean of two gradients (a/2 + b/2, exact in binary) is the reference's
        # average bit for bit, so the runs agree exactly
        assert torch.equal(p, res[0]["ref"][name]), (
            name, float((p - res[0]["ref"][name]).abs().max()))


# ---- FusionEmbedding inside an FSDP2-sharded model ----------------------------------------
class _Tiny(torch.nn.Module):
    def __init__(self, base_quant):
        super().__init__()
        import bnbfuse as bnb

        torch.manual_seed(0)
        self.tok = bnb.nn.FusionEmbedding(64, 8, 32, base_quant=base_quant)
        self.proj = torch.nn.Linear(32, 200)  # 6400 elements: 8-bit state

    def forward(self, ids):
        return self.proj(self.tok(ids))


def _fusion_ids(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 72, (4, 6), generator=g), torch.randn(4, 6, 200, generator=g)


def _fusion_body(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import bnbfuse as bnb

    out = {}
    for quant in ("int8", None):
        model = _Tiny(quant)
        base0 = {k: v.clone() for k, v in model.tok.embedding.state_dict().items()}
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.tok, mesh=mesh)
        fully_shard(model.proj, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
        ref = _Tiny(quant)
        ref_opt = bnb.optim.AdamW8bit(ref.parameters(), lr=1e-3)
        first_equal = None
        for s in range(5):
            ids, y = _fusion_ids(s)
            half = ids.shape[0] // world
            yhat = model(ids[rank * half:(rank + 1) * half])
            if first_equal is None:
                first_equal = torch.equal(yhat, ref(ids)[rank * half:(rank + 1) * half])
            torch.nn.functional.mse_loss(yhat, y[rank * half:(rank + 1) * half]).backward()
            grads = {n: p.grad is not None for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(ref(ids), y).backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        got, want = _full_params(model), _full_params(ref)
        out[str(quant)] = {
            "first_equal": first_equal, "grads": grads,
            "diff": {k: float((got[k] - want[k]).abs().max()) for k in got},
            "moved": float((got["tok.fusion_embedding.weight"]
                            - _Tiny(quant).tok.fusion_embedding.weight).abs().max()),
            "base_unchanged": all(torch.equal(v, model.tok.embedding.state_dict()[k])
                                  for k, v in base0.items()) if quant else True,
            "proj_8bit": opt.state[model.proj.weight]["state1"].dtype == torch.uint8,
            "fusion_32bit": opt.state[model.tok.fusion_embedding.weight]["state1"].dtype
            == torch.float32,
        }
    return out


def test_fusion_embedding_in_fsdp2_model():
    res = run_workers(_fusion_body, world_size=WORLD, timeout=120)
    for rank, r in enumerate(res):
        for quant, q in r.items():
            assert q["first_equal"], (rank, quant)
            assert q["base_unchanged"] and q["proj_8bit"] and q["fusion_32bit"], (rank, quant)
            assert q["grads"]["tok.fusion_embedding.weight"], (rank, quant)
            assert q["moved"] > 1e-3, (rank, quant)
            for name, d in q["diff"].items():
                assert d < 5e-3, (rank, quant, name, d)
        # a quantized base is frozen: only the new-token table and the head train
        assert set(n for n, g in r["int8"]["grads"].items() if g) == {
            "tok.fusion_embedding.weight", "proj.weight", "proj.bias"}
