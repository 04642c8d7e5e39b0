"""State dicts: bit-exact resume, validation, devices, bitsandbytes' layout, and conversion
to and from torch.optim state dicts."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import bnbfuse.functional as F
import bnbfuse.optim as bo


@pytest.fixture(autouse=True)
def _setup():
    bo.GlobalOptimManager.get_instance().initialize()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    bo.GlobalOptimManager.get_instance().initialize()


FACTORIES = {
    "AdamW8bit": lambda ps: bo.AdamW8bit(ps, lr=1e-2),
    "Adam8bit-pc": lambda ps: bo.Adam8bit(ps, lr=1e-2, weight_decay=0.1, percentile_clipping=50),
    "AdamW32bit": lambda ps: bo.AdamW32bit(ps, lr=1e-2),
    "Lion8bit": lambda ps: bo.Lion8bit(ps, lr=1e-3),
    "SGD8bit": lambda ps: bo.SGD8bit(ps, lr=1e-2, momentum=0.9),
    "RMSprop8bit": lambda ps: bo.RMSprop8bit(ps, lr=1e-3),
    "Adagrad8bit": lambda ps: bo.Adagrad8bit(ps, lr=1e-2, lr_decay=0.01),
    "AdEMAMix8bit": lambda ps: bo.AdEMAMix8bit(ps, lr=1e-3, t_alpha=10, t_beta3=10),
    "LAMB8bit": lambda ps: bo.LAMB8bit(ps, lr=1e-3),
    "LARS8bit": lambda ps: bo.LARS8bit(ps, lr=1e-2, momentum=0.9, max_unorm=0.02),
    "AdamW-bf16": lambda ps: bo.AdamW8bit(ps, lr=1e-2),
}


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 8)).to(dtype)


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = model[0].weight.dtype
    for _ in range(steps):
        x = torch.randn(16, 96, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_is_bit_exact(name):
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    m1 = _model(dtype)
    o1 = FACTORIES[name](m1.parameters())
    _train(m1, o1, 7, seed=1)
    _train(m1, o1, 6, seed=2)  # the uninterrupted run

    m2 = _model(dtype)
    o2 = FACTORIES[name](m2.parameters())
    _train(m2, o2, 7, seed=1)
    saved_model = _roundtrip(m2.state_dict())
    saved_opt = _roundtrip(o2.state_dict())
    m3 = _model(dtype)
    m3.load_state_dict(saved_model)
    o3 = FACTORIES[name](m3.parameters())  # a fresh optimizer
    o3.load_state_dict(saved_opt)
    _train(m3, o3, 6, seed=2)

    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(m1.parameters(), m3.parameters()):
        sa, sb = o1.state[pa], o3.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k]


def test_state_dict_layout_and_no_cast_for_bf16_params():
    m = _model(torch.bfloat16)
    o = bo.AdamW8bit(m.parameters())
    _train(m, o, 2, seed=0)
    sd = o.state_dict()
    w_state = sd["state"][0]
    assert set(w_state) == {"step", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}
    assert w_state["step"] == 2
    assert set(sd["state"][1]) == {"step", "state1", "state2"}  # bias: 64 < min_8bit_size
    fresh = bo.AdamW8bit(m.parameters())
    fresh.load_state_dict(sd)
    st = fresh.state[m[0].weight]
    # torch.optim would cast floating state to the parameter's dtype (bf16): we must not
    assert st["state1"].dtype == torch.uint8 and st["absmax1"].dtype == torch.float32
    assert fresh.state[m[0].bias]["state1"].dtype == torch.float32
    # loaded state is a copy: stepping must not change the dict it came from
    snapshot = copy.deepcopy(sd["state"][0]["state1"])
    _train(m, fresh, 1, seed=3)
    assert torch.equal(sd["state"][0]["state1"], snapshot)


def _trained():
    m = _model()
    o = bo.AdamW8bit(m.parameters())
    _train(m, o, 2, seed=0)
    return m, o


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["state"][0].__setitem__("state1", sd["state"][0]["state1"][:10]), "shape"),
    (lambda sd: sd["state"][0].pop("absmax2"), "keys"),
    (lambda sd: sd["state"][0].__setitem__("extra", torch.zeros(3)), "keys"),
    (lambda sd: sd["state"][0].__setitem__("absmax1", sd["state"][0]["absmax1"][:-1]), "absmax1"),
    (lambda sd: sd["state"][0].__setitem__("state2", sd["state"][0]["state2"].float()), "dtype"),
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "parameters"),
    (lambda sd: sd["param_groups"][0].pop("betas"), "betas"),
    (lambda sd: sd["state"].__setitem__(99, {}), "unknown"),
])
def test_mismatched_state_dict_raises_value_error(corrupt, match):
    m, o = _trained()
    sd = copy.deepcopy(o.state_dict())
    corrupt(sd)
    fresh = bo.AdamW8bit(m.parameters())
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("steps", [1, 0], ids=["trained", "no state yet"])
def test_loading_a_torch_state_dict_directly_points_to_the_converter(steps):
    m = _model()
    t = torch.optim.AdamW(m.parameters(), maximize=True)
    _train(m, t, steps, seed=0)
    with pytest.raises(ValueError, match="load_torch_state_dict"):
        bo.AdamW8bit(m.parameters()).load_state_dict(t.state_dict())


def test_state_dict_of_another_class_is_rejected():
    m = _model()
    lion = bo.Lion8bit(m.parameters())
    _train(m, lion, 1, seed=0)
    with pytest.raises(ValueError):
        bo.AdamW8bit(m.parameters()).load_state_dict(lion.state_dict())


# bitsandbytes saves SGD/LARS settings as betas=(momentum, dampening), RMSprop's alpha as
# betas[0], and no Adagrad lr_decay: each loads with the settings it was built with.
@pytest.mark.parametrize("name,kwargs", [
    ("AdamW8bit", dict(lr=1e-3, weight_decay=0.1)),
    ("Lion8bit", dict(lr=1e-4)),
    ("AdEMAMix8bit", dict(lr=1e-3)),
    ("LAMB8bit", dict(lr=1e-3)),
    ("SGD8bit", dict(lr=1e-2, momentum=0.9, dampening=0.1)),
    ("SGD", dict(lr=1e-2, momentum=0.8)),
    ("RMSprop8bit", dict(lr=1e-3, alpha=0.95)),
    ("Adagrad8bit", dict(lr=1e-2)),
    ("LARS8bit", dict(lr=1e-2, momentum=0.9)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_loads_bitsandbytes_state_dict(name, kwargs):
    bnb = pytest.importorskip("bitsandbytes")
    m = _model()
    theirs = getattr(bnb.optim, name)(m.parameters(), **kwargs)
    _train(m, theirs, 3, seed=0)
    ours = getattr(bo, name)(m.parameters(), **kwargs)
    settings = {k: v for k, v in ours.param_groups[0].items() if k != "params"}
    ours.param_groups[0]["lr"] = 123.0  # must come back from the saved dict
    ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert {k: group[k] for k in settings} == settings
    w = m[0].weight
    st = ours.state[w]
    assert st["step"] == 3 and st["state1"].dtype == theirs.state[w]["state1"].dtype
    assert torch.equal(st["state1"], theirs.state[w]["state1"])
    _train(m, ours, 2, seed=1)
    assert ours.state[w]["step"] == 5


def test_load_skips_empty_state_entries():
    # Reading opt.state[p] of a parameter without state leaves {} in the state dict (as in
    # torch.optim, whose load_state_dict accepts it).
    m = _model()
    m[2].weight.requires_grad_(False)
    o = bo.AdamW8bit(m.parameters(), lr=1e-2)
    _train(m, o, 2, seed=0)
    assert o.state[m[2].weight] == {}
    fresh = bo.AdamW8bit(m.parameters(), lr=1e-2)
    fresh.load_state_dict(o.state_dict())
    assert m[2].weight not in fresh.state and fresh.state[m[0].weight]["step"] == 2


def test_load_state_dict_hooks_see_the_state_as_torch_optim_does():
    m, o = _trained()
    sd = o.state_dict()
    for st in sd["state"].values():  # an old layout that a pre-hook migrates
        st["m"] = st.pop("state1")
    seen = []

    def migrate(opt, state_dict):
        seen.append(len(state_dict["state"]))
        for st in state_dict["state"].values():
            st["state1"] = st.pop("m")

    fresh = bo.AdamW8bit(m.parameters())
    fresh.register_load_state_dict_pre_hook(migrate)
    fresh.register_load_state_dict_post_hook(lambda opt: seen.append(len(opt.state)))
    fresh.load_state_dict(sd)
    assert seen == [len(sd["state"])] * 2
    assert torch.equal(fresh.state[m[0].weight]["state1"], o.state[m[0].weight]["state1"])


@pytest.mark.cuda
def test_load_moves_state_to_the_parameter_device():
    m = _model()
    o = bo.AdamW8bit(m.parameters())
    _train(m, o, 2, seed=0)
    sd = o.state_dict()
    mc = _model().cuda()
    oc = bo.AdamW8bit(mc.parameters())
    oc.load_state_dict(sd)
    for k, v in oc.state[mc[0].weight].items():
        if torch.is_tensor(v):
            assert v.device.type == "cuda", k
    mc(torch.randn(4, 96, device="cuda")).sum().backward()
    oc.step()


# ---- torch.optim conversion ---------------------------------------------------------------
def test_export_to_torch_adamw_continues_like_32bit():
    m1 = _model()
    ours = bo.AdamW32bit(m1.parameters(), lr=1e-2, weight_decay=0.05)
    _train(m1, ours, 5, seed=0)
    m2 = _model()
    m2.load_state_dict(m1.state_dict())
    t = torch.optim.AdamW(m2.parameters(), lr=1.0)
    t.load_state_dict(ours.torch_state_dict())
    assert t.param_groups[0]["lr"] == 1e-2 and t.param_groups[0]["weight_decay"] == 0.05
    _train(m1, ours, 5, seed=1)
    _train(m2, t, 5, seed=1)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_export_8bit_dequantizes():
    m = _model()
    o = bo.AdamW8bit(m.parameters(), lr=1e-2)
    _train(m, o, 3, seed=0)
    tsd = o.torch_state_dict()
    st = o.state[m[0].weight]
    expect = F.dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=st["qmap2"],
                                    blocksize=256)
    assert torch.equal(tsd["state"][0]["exp_avg_sq"], expect)
    assert tsd["state"][0]["exp_avg"].dtype == torch.float32
    assert float(tsd["state"][0]["step"]) == 3.0
    t = torch.optim.AdamW(m.parameters())
    t.load_state_dict(tsd)
    _train(m, t, 1, seed=1)  # torch can continue from it


def test_import_from_torch_adamw_mid_run_tracks_torch():
    torch.manual_seed(0)
    ref_model = _model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=0.02)
    _train(ref_model, ref, 5, seed=0)
    model = _model()
    model.load_state_dict(ref_model.state_dict())
    ours = bo.AdamW8bit(model.parameters(), lr=123.0, min_8bit_size=0)
    ours.load_torch_state_dict(ref.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-3 and ours.param_groups[0]["weight_decay"] == 0.02
    st = ours.state[model[0].weight]
    assert st["step"] == 5 and st["state1"].dtype == torch.uint8
    exp_avg = ref.state[ref_model[0].weight]["exp_avg"]
    got = F.dequantize_blockwise(st["state1"], absmax=st["absmax1"], code=st["qmap1"],
                                 blocksize=256)
    assert (~torch.isclose(got, exp_avg, atol=3e-3, rtol=1e-3)).sum() < 20
    # no nonzero second moment became zero (the no-blow-up policy)
    v = F.dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=st["qmap2"],
                               blocksize=256)
    assert not ((v == 0) & (ref.state[ref_model[0].weight]["exp_avg_sq"] > 0)).any()
    cold_model = _model()  # the same switch without the torch state, for contrast
    cold_model.load_state_dict(ref_model.state_dict())
    cold = bo.AdamW8bit(cold_model.parameters(), lr=1e-3, weight_decay=0.02, min_8bit_size=0)
    _train(ref_model, ref, 10, seed=1)
    _train(model, ours, 10, seed=1)
    _train(cold_model, cold, 10, seed=1)
    err = torch.stack([(a - b).abs().mean() for a, b in
                       zip(model.parameters(), ref_model.parameters())]).max()
    cold_err = torch.stack([(a - b).abs().mean() for a, b in
                            zip(cold_model.parameters(), ref_model.parameters())]).max()
    assert err < 1.5e-4 and err < cold_err / 5, (err, cold_err)


def test_torch_round_trip_32bit_is_exact():
    m = _model()
    o = bo.AdamW32bit(m.parameters(), lr=1e-2)
    _train(m, o, 3, seed=0)
    o2 = bo.AdamW32bit(m.parameters())
    o2.load_torch_state_dict(o.torch_state_dict())
    for p in m.parameters():
        for k in ("state1", "state2"):
            assert torch.equal(o.state[p][k], o2.state[p][k])
        assert o2.state[p]["step"] == 3


@pytest.mark.parametrize("ours, theirs", [
    (lambda ps: bo.SGD8bit(ps, lr=1e-2, momentum=0.9),
     lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)),
    (lambda ps: bo.RMSprop8bit(ps, lr=1e-3), lambda ps: torch.optim.RMSprop(ps, lr=1e-3)),
    (lambda ps: bo.Adagrad8bit(ps, lr=1e-2), lambda ps: torch.optim.Adagrad(ps, lr=1e-2)),
])
def test_other_torch_counterparts_round_trip(ours, theirs):
    m = _model()
    t = theirs(m.parameters())
    _train(m, t, 3, seed=0)
    o = ours(m.parameters())
    o.load_torch_state_dict(t.state_dict())
    t2 = theirs(m.parameters())
    t2.load_state_dict(o.torch_state_dict())
    _train(m, t2, 1, seed=1)
    _train(m, o, 1, seed=2)


def test_torch_conversion_errors():
    m = _model()
    t = torch.optim.Adam(m.parameters(), weight_decay=0.1)
    _train(m, t, 1, seed=0)
    with pytest.raises(ValueError, match="coupled"):  # Adam's L2 state into AdamW
        bo.AdamW8bit(m.parameters()).load_torch_state_dict(t.state_dict())
    ams = torch.optim.AdamW(m.parameters(), amsgrad=True)
    _train(m, ams, 1, seed=0)
    with pytest.raises(ValueError, match="amsgrad"):
        bo.AdamW8bit(m.parameters()).load_torch_state_dict(ams.state_dict())
    with pytest.raises(NotImplementedError):
        bo.Lion8bit(m.parameters()).torch_state_dict()
    t = torch.optim.AdamW(m.parameters(), maximize=True)
    _train(m, t, 1, seed=0)
    with pytest.raises(ValueError, match="maximize"):
        bo.AdamW8bit(m.parameters()).load_torch_state_dict(t.state_dict())
    t = torch.optim.AdamW(m.parameters())
    _train(m, t, 1, seed=0)
    sd = t.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to(torch.complex64)
    with pytest.raises(ValueError, match="exp_avg of parameter 0 must be a real"):
        bo.AdamW8bit(m.parameters()).load_torch_state_dict(sd)
    sd["state"][0]["exp_avg"] = [0.0]
    with pytest.raises(ValueError, match="got list"):
        bo.AdamW8bit(m.parameters()).load_torch_state_dict(sd)


def test_torch_state_dict_without_decoupled_weight_decay_key():
    # torch <= 2.6 saved AdamW and Adam groups without "decoupled_weight_decay"; the class
    # that loads the dict decides, as torch.optim.AdamW/Adam do.
    m = _model()
    t = torch.optim.AdamW(m.parameters(), weight_decay=0.1)
    _train(m, t, 1, seed=0)
    sd = t.state_dict()
    for g in sd["param_groups"]:
        del g["decoupled_weight_decay"]
    o = bo.AdamW8bit(m.parameters())
    o.load_torch_state_dict(copy.deepcopy(sd))
    assert o.param_groups[0]["weight_decay"] == 0.1
    a = bo.Adam8bit(m.parameters())
    a.load_torch_state_dict(copy.deepcopy(sd))  # coupled L2, as torch.optim.Adam loads it
    assert a.param_groups[0]["weight_decay"] == 0.1


def _set(key, fn):
    def corrupt(sd):
        st = sd["state"][0]
        st[key] = fn(st[key].clone())
    return corrupt


def _poke(value, index=0):
    def fn(t):
        t.view(-1)[index] = value
        return t
    return fn


# Values a step would turn into NaN parameters: refused, naming the key and the parameter.
@pytest.mark.parametrize("corrupt, match", [
    (_set("absmax1", _poke(float("nan"))), "absmax1 of parameter 0 .*NaN/Inf"),
    (_set("absmax2", _poke(float("inf"), 1)), "absmax2 of parameter 0 .*NaN/Inf"),
    (_set("absmax1", _poke(-0.5)), "absmax1 of parameter 0 .*negative"),
    (_set("qmap1", _poke(float("nan"), 7)), "qmap1 of parameter 0 .*NaN/Inf"),
    (_set("qmap2", _poke(float("-inf"))), "qmap2 of parameter 0 .*NaN/Inf"),
    (_set("qmap1", lambda q: q.flip(0)), "qmap1 of parameter 0 .*ascending"),
    (_set("qmap2", _poke(0.5, 3)), "qmap2 of parameter 0 .*ascending"),
    (_set("qmap1", lambda q: q * 4), r"qmap1 of parameter 0 .*\[-1, 1\]"),
    (lambda sd: sd.pop("state"), "'state'"),
], ids=["nan-absmax", "inf-absmax", "negative-absmax", "nan-qmap", "inf-qmap",
        "unsorted-qmap", "unsorted-qmap2", "qmap-out-of-range", "no-state-key"])
def test_state_dict_values_are_checked(corrupt, match):
    m, o = _trained()
    sd = copy.deepcopy(o.state_dict())
    corrupt(sd)
    fresh = bo.AdamW8bit(m.parameters())
    _train(m, fresh, 1, seed=5)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(sd)
    after = fresh.state_dict()  # nothing changed
    for k, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(v))


def test_load_torch_state_dict_without_state_key_raises():
    m = _model()
    t = torch.optim.AdamW(m.parameters())
    _train(m, t, 1, seed=0)
    sd = t.state_dict()
    del sd["state"]
    ours = bo.AdamW8bit(m.parameters())
    with pytest.raises(ValueError, match="'state'"):
        ours.load_torch_state_dict(sd)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_torch_state_dict_refuses_non_finite_8bit_state(bad):
    # One NaN in exp_avg would make its whole 256-element block's absmax NaN: refused,
    # nothing is loaded. 32-bit state takes it as torch.optim does.
    m = _model()
    t = torch.optim.AdamW(m.parameters())
    _train(m, t, 1, seed=0)
    sd = t.state_dict()
    sd["state"][0]["exp_avg"].view(-1)[300] = bad
    ours = bo.AdamW8bit(m.parameters())
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has 1 NaN/Inf value"):
        ours.load_torch_state_dict(sd)
    assert not ours.state
    wide = bo.AdamW32bit(m.parameters())
    wide.load_torch_state_dict(sd)
    s1 = wide.state[m[0].weight]["state1"].view(-1)
    torch.testing.assert_close(s1[300], torch.tensor(bad), equal_nan=True)
    assert torch.isfinite(s1[:300]).all()


@pytest.mark.parametrize("bad", ["3", 2.5, -1, True, torch.tensor([1.0, 2.0])],
                         ids=["str", "fraction", "negative", "bool", "tensor-of-2"])
def test_step_that_is_not_a_count_is_refused(bad):
    m, o = _trained()
    sd = copy.deepcopy(o.state_dict())
    sd["state"][0]["step"] = bad
    with pytest.raises((TypeError, ValueError), match="step"):
        bo.AdamW8bit(m.parameters()).load_state_dict(sd)
    t = torch.optim.AdamW(m.parameters())
    _train(m, t, 1, seed=0)
    tsd = t.state_dict()
    tsd["state"][0]["step"] = bad
    with pytest.raises((TypeError, ValueError), match="step"):
        bo.AdamW8bit(m.parameters()).load_torch_state_dict(tsd)
    o.state[m[0].weight]["step"] = bad  # set by hand in the live state
    with pytest.raises((TypeError, ValueError), match="step"):
        _train(m, o, 1, seed=1)


def test_step_counts_past_int32_train_and_round_trip():
    m, o = _trained()
    for st in o.state.values():
        st["step"] = 2**32
    _train(m, o, 1, seed=1)
    assert {st["step"] for st in o.state.values()} == {2**32 + 1}
    fresh = bo.AdamW8bit(m.parameters())
    fresh.load_state_dict(_roundtrip(o.state_dict()))
    assert {st["step"] for st in fresh.state.values()} == {2**32 + 1}
    fresh.load_state_dict({**o.state_dict(), "state": {
        k: {**v, "step": torch.tensor(2**32 + 1, dtype=torch.int64)}
        for k, v in o.state_dict()["state"].items()}})
    assert {st["step"] for st in fresh.state.values()} == {2**32 + 1}
