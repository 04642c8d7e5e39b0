"""FusionLayer (prefix-exact key renaming, caches, forward order) and the fusion helpers."""
import pytest
import torch

from bnbfuse.nn import (FusionEmbedding, FusionLayer, get_fusion_params, register_fusion_module,
                        set_trainable_params)


class Block(torch.nn.Module):
    """A layer whose own children have names containing "layer." and "layer"."""

    def __init__(self, d=4):
        super().__init__()
        self.sublayer = torch.nn.Linear(d, d)      # key "sublayer.weight"
        self.layer = torch.nn.Linear(d, d)         # key "layer.weight" (a child named layer)
        self.layer_norm = torch.nn.LayerNorm(d)    # key "layer_norm.weight"

    def forward(self, x, **kwargs):
        return self.layer_norm(self.layer(self.sublayer(x)))


class Decoder(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def block_keys(prefix):
    return {f"{prefix}{k}" for k in ("sublayer.weight", "sublayer.bias", "layer.weight",
                                     "layer.bias", "layer_norm.weight", "layer_norm.bias")}


def test_state_dict_keeps_original_keys_exactly():
    torch.manual_seed(0)
    original = Decoder([Block() for _ in range(12)])
    fused = Decoder([FusionLayer(b, torch.nn.Linear(4, 4)) for b in original.layers])
    keys = set(fused.state_dict())
    expected = set()
    for i in range(12):
        expected |= block_keys(f"layers.{i}.")
        expected |= {f"layers.{i}.fusion_layer.weight", f"layers.{i}.fusion_layer.bias"}
    assert keys == expected  # child names with "layer." survive (torchtune corrupts them)
    for k, v in original.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v)


def test_original_checkpoint_loads_into_the_right_layers():
    torch.manual_seed(1)
    original = Decoder([Block() for _ in range(12)])
    ckpt = original.state_dict()
    fused = Decoder([FusionLayer(Block(), torch.nn.Linear(4, 4)) for _ in range(12)])
    res = fused.load_state_dict(ckpt, strict=False)
    assert res.unexpected_keys == []
    assert sorted(res.missing_keys) == sorted(
        f"layers.{i}.fusion_layer.{n}" for i in range(12) for n in ("weight", "bias"))
    # keys of sibling layers (layers.1 vs layers.10, layers.11) were not moved between them
    for i in range(12):
        assert torch.equal(fused.layers[i].layer.sublayer.weight, original.layers[i].sublayer.weight)
        assert torch.equal(fused.layers[i].layer.layer.weight, original.layers[i].layer.weight)
    x = torch.randn(3, 4)
    with torch.no_grad():
        for lay in fused.layers:
            lay.fusion_layer.weight.copy_(torch.eye(4))
            lay.fusion_layer.bias.zero_()
    assert torch.allclose(fused(x), original(x), atol=1e-6)


def test_round_trip_and_mixed_siblings():
    torch.manual_seed(2)
    model = torch.nn.Sequential(FusionLayer(Block(), Block()), Block(),
                                FusionLayer(Block(), torch.nn.Linear(4, 4), fusion_first=False))
    sd = model.state_dict()
    assert block_keys("1.") <= set(sd) and block_keys("0.") <= set(sd)
    assert block_keys("0.fusion_layer.") <= set(sd)
    copy = torch.nn.Sequential(FusionLayer(Block(), Block()), Block(),
                               FusionLayer(Block(), torch.nn.Linear(4, 4), fusion_first=False))
    assert copy.load_state_dict(sd).missing_keys == []
    for k, v in copy.state_dict().items():
        assert torch.equal(v, sd[k])


def test_forward_order_and_kwargs():
    calls = []

    class Rec(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x, **kwargs):
            calls.append((self.name, kwargs))
            return x + 1

    FusionLayer(Rec("layer"), Rec("fusion"))(torch.zeros(1), mask=None)
    assert calls == [("fusion", {"mask": None}), ("layer", {"mask": None})]
    calls.clear()
    FusionLayer(Rec("layer"), Rec("fusion"), fusion_first=False)(torch.zeros(1))
    assert [c[0] for c in calls] == ["layer", "fusion"]


class Cached(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.setup, self.resets, self.enabled = None, 0, False

    def setup_caches(self, batch_size, dtype, *, encoder_max_seq_len, decoder_max_seq_len):
        self.setup = (batch_size, dtype, encoder_max_seq_len, decoder_max_seq_len)
        self.enabled = True

    def caches_are_setup(self):
        return self.setup is not None

    def caches_are_enabled(self):
        return self.enabled

    @property
    def cache_enabled(self):
        return self.enabled

    def reset_cache(self):
        self.resets += 1

    def forward(self, x, **kwargs):
        return x


def test_cache_methods_reach_both_layers():
    a, b = Cached(), Cached()
    fused = FusionLayer(a, b)
    assert not fused.caches_are_setup() and not fused.cache_enabled
    fused.setup_caches(2, torch.float32, encoder_max_seq_len=5, decoder_max_seq_len=7)
    assert a.setup == b.setup == (2, torch.float32, 5, 7)
    assert fused.caches_are_setup() and fused.caches_are_enabled() and fused.cache_enabled
    fused.reset_cache()
    assert a.resets == b.resets == 1
    # a fusion layer without caches (a plain Linear) is skipped, not an error
    c = Cached()
    fused2 = FusionLayer(c, torch.nn.Linear(2, 2))
    fused2.setup_cache(1, torch.float16, encoder_max_seq_len=1, decoder_max_seq_len=3)
    fused2.reset_cache()
    assert c.setup == (1, torch.float16, 1, 3) and c.resets == 1 and fused2.caches_are_setup()
    assert not FusionLayer(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).caches_are_setup()


class CachedNoFlag(torch.nn.Module):
    """torchtune's current layers: caches_are_enabled(), no cache_enabled attribute."""

    def caches_are_setup(self):
        return True

    def caches_are_enabled(self):
        return True


def test_cache_enabled_without_per_layer_flags():
    assert FusionLayer(CachedNoFlag(), CachedNoFlag()).cache_enabled
    assert FusionLayer(CachedNoFlag(), torch.nn.Linear(2, 2)).cache_enabled


def test_fusion_params_helpers():
    model = torch.nn.Module()
    model.tok = FusionEmbedding(10, 2, 4)
    model.layers = torch.nn.ModuleList([FusionLayer(Block(), torch.nn.Linear(4, 4))])
    model.head = register_fusion_module(torch.nn.Linear(4, 3))
    model.out = torch.nn.Linear(4, 10)
    assert model.layers[0].fusion_params() == ["fusion_layer.weight", "fusion_layer.bias"]
    params = get_fusion_params(model)
    assert list(params) == ["tok.fusion_embedding.weight", "layers.0.fusion_layer.weight",
                            "layers.0.fusion_layer.bias", "head.weight", "head.bias"]
    assert params["head.weight"] is model.head.weight
    set_trainable_params(model, params)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(params)
    with pytest.raises(ValueError, match="typo"):
        set_trainable_params(model, ["typo"])


def test_get_fusion_params_rejects_bad_names():
    m = torch.nn.Linear(2, 2)
    m.fusion_params = lambda: ["nope"]
    with pytest.raises(ValueError, match="nope"):
        get_fusion_params(torch.nn.Sequential(m))
