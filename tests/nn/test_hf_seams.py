"""FusionEmbedding at the seams of the Hugging Face stack (issue 14): save_pretrained and
reload, tied heads, resize_token_embeddings / config.vocab_size, PEFT adapters, and
torch.distributed.checkpoint's state-dict helpers in one process. Real transformers and peft
models from tiny configs; nothing is downloaded."""
import warnings

import pytest
import torch

import bnbfuse as bnb
from bnbfuse.nn import FusionEmbedding, add_fusion_tokens

transformers = pytest.importorskip("transformers", reason="transformers not installed")

QUANTS = [None, "int8", "nf4"]
V, N = 96, 6


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    bnb.optim.GlobalOptimManager.get_instance().initialize()


def llama(tie=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def ids(seed=0, high=V + N):
    x = torch.randint(0, high, (2, 9), generator=torch.Generator().manual_seed(seed))
    x[:, 2] = high - 1  # a new token in every row, not in the last position
    return x


# ---- 1. save_pretrained / from_pretrained --------------------------------------------------------
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_stock_from_pretrained_never_loads_codes_as_floats(quant, tmp_path):
    model = llama()
    emb = add_fusion_tokens(model, N, base_quant=quant)
    model.save_pretrained(tmp_path)
    plain, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path,
                                                                output_loading_info=True)
    w = plain.model.embed_tokens.weight
    # the codes are under weight_codes, which the float model does not have: its table is
    # reported missing and newly initialized (the codes 0..255 would have been loaded as values)
    assert "model.embed_tokens.weight" in info["missing_keys"]
    assert "model.embed_tokens.weight_codes" in info["unexpected_keys"]
    assert w.abs().max() < 1.0
    codes = emb.embedding.weight.float()
    assert w.shape != codes.shape or not torch.equal(w, codes)
    # a plain torch load with strict=True refuses it too
    float_model = llama()
    with pytest.raises(RuntimeError, match="embed_tokens.weight"):
        float_model.load_state_dict(model.state_dict())


@pytest.mark.parametrize("quant", QUANTS)
def test_from_pretrained_fused_is_exact(quant, tmp_path):
    model = llama()
    emb = add_fusion_tokens(model, N, base_quant=quant, extend_head=True)
    with torch.no_grad():
        emb.fusion_embedding.weight.add_(torch.randn_like(emb.fusion_embedding.weight))
    assert model.config.bnbfuse_fusion["base_quant"] == quant
    model.save_pretrained(tmp_path)
    again = bnb.nn.from_pretrained_fused(transformers.LlamaForCausalLM, tmp_path)
    emb2 = again.get_input_embeddings()
    assert isinstance(emb2, FusionEmbedding) and emb2.quantized == (quant is not None)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sorted(sd) == sorted(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = ids(1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
    # a checkpoint without the marker is refused, naming what it needs
    plain_dir = tmp_path / "plain"
    llama().save_pretrained(plain_dir)
    with pytest.raises(ValueError, match="add_fusion_tokens"):
        bnb.nn.from_pretrained_fused(transformers.LlamaForCausalLM, plain_dir)


def test_plain_checkpoint_still_loads_into_quantized_fusion_embedding():
    pretrained = llama(seed=4)
    model = llama(seed=5)
    emb = add_fusion_tokens(model, N, base_quant="int8")
    res = model.load_state_dict(pretrained.state_dict(), strict=False)
    assert res.missing_keys == ["model.embed_tokens.fusion_embedding.weight"]
    ref = FusionEmbedding.from_embedding(pretrained.get_input_embeddings(), N, base_quant="int8")
    assert torch.equal(emb.embedding.weight, ref.embedding.weight)
    assert torch.equal(emb.embedding.absmax, ref.embedding.absmax)


def test_legacy_codes_under_weight_still_load():
    # checkpoints written before the codes got their own key
    src = FusionEmbedding(20, 2, 16, base_quant="int8")
    sd = src.state_dict()
    sd["weight"] = sd.pop("weight_codes")
    dst = FusionEmbedding(20, 2, 16, base_quant="int8")
    dst.load_state_dict(sd)
    assert torch.equal(dst.embedding.weight, src.embedding.weight)
    # ... and into a plain one they are refused, whatever their key
    for key in ("weight", "weight_codes"):
        bad = {key: src.embedding.weight, "fusion_embedding.weight": torch.zeros(2, 16)}
        with pytest.raises(RuntimeError, match="quantized base"):
            FusionEmbedding(20, 2, 16).load_state_dict(bad, strict=False)


# ---- 2. tied embeddings ------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_tied_model_extend_head_stays_consistent(quant, tmp_path):
    model = llama(tie=True)
    table = model.lm_head.weight.detach().clone()
    emb = add_fusion_tokens(model, N, base_quant=quant, extend_head=True)
    assert model.config.tie_word_embeddings is False and model.config.vocab_size == V + N
    assert torch.equal(model.lm_head.weight[:V], table)
    model.tie_weights()  # no AttributeError, and it leaves the pair alone
    assert model.get_input_embeddings() is emb and model.lm_head.weight.shape == (V + N, 32)
    model.train()
    x = ids(2)
    loss = model(input_ids=x, labels=x).loss  # labels include the new tokens
    loss.backward()
    assert torch.isfinite(loss) and emb.fusion_embedding.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    again = bnb.nn.from_pretrained_fused(transformers.LlamaForCausalLM, tmp_path)
    assert again.config.tie_word_embeddings is False
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


# ---- 3. resize_token_embeddings, config.vocab_size ----------------------------------------------
def test_resize_token_embeddings_names_the_bnbfuse_way():
    model = llama()
    add_fusion_tokens(model, N, base_quant="int8")
    with pytest.raises(AttributeError, match="resize_fusion_tokens"):
        model.resize_token_embeddings(V + 2 * N)


@pytest.mark.parametrize("quant", QUANTS)
def test_resize_fusion_tokens(quant):
    model = llama()
    emb = add_fusion_tokens(model, N, base_quant=quant, extend_head=True)
    old_rows = emb.fusion_embedding.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    bnb.nn.resize_fusion_tokens(model, N + 3)
    assert emb.fusion_vocab_size == N + 3 and emb.num_embeddings == V + N + 3
    assert torch.equal(emb.fusion_embedding.weight[:N], old_rows)
    assert model.config.vocab_size == V + N + 3 == model.lm_head.weight.shape[0]
    assert model.config.bnbfuse_fusion["fusion_vocab_size"] == N + 3
    assert torch.equal(model.lm_head.weight[:V + N], old_head)
    x = ids(3, high=V + N + 3)
    assert torch.isfinite(model(input_ids=x, labels=x).loss)
    opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad])
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert opt.state[emb.fusion_embedding.weight]["state1"].dtype == torch.float32
    trained = emb.fusion_embedding.weight.detach().clone()
    bnb.nn.resize_fusion_tokens(model, 2)  # shrink: the first rows stay
    assert torch.equal(emb.fusion_embedding.weight, trained[:2])
    assert model.lm_head.weight.shape[0] == V + 2


def test_extend_head_updates_vocab_size_for_the_loss():
    model = llama()
    add_fusion_tokens(model, N, base_quant="int8", extend_head=True)
    assert model.config.vocab_size == V + N
    x = ids(4)
    out = model(input_ids=x, labels=x)
    assert out.logits.shape[-1] == V + N and torch.isfinite(out.loss)


# ---- 6. PEFT --------------------------------------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft not installed")


def _peft_model(modules_to_save, quant="int8"):
    model = llama(seed=7)
    add_fusion_tokens(model, N, base_quant=quant, extend_head=True)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                          modules_to_save=modules_to_save)
    return peft.get_peft_model(model, cfg)


def _train(pm, steps=2):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for s in range(steps):
        x = ids(10 + s)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("quant", QUANTS)
def test_peft_modules_to_save_fusion_embedding_round_trips(quant, tmp_path):
    pm = _peft_model(["fusion_embedding"], quant)
    _train(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no bnbfuse warning on this path
        warnings.filterwarnings("ignore", message=".*config file.*")  # peft's offline note
        pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    fusion_keys = [k for k in saved if "embed_tokens" in k]
    assert fusion_keys == ["base_model.model.model.embed_tokens.fusion_embedding.weight"]
    x = ids(20)
    with torch.no_grad():
        want = pm(input_ids=x).logits
    fresh = llama(seed=7)
    add_fusion_tokens(fresh, N, base_quant=quant, extend_head=True)
    torch.manual_seed(99)  # a different draw of the new rows: the adapter must restore them
    with torch.no_grad():
        fresh.get_input_embeddings().fusion_embedding.weight.normal_()
    again = peft.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, want)


def test_peft_without_modules_to_save_warns():
    pm = _peft_model(None)
    fusion = pm.base_model.model.model.embed_tokens.fusion_embedding
    fusion.weight.requires_grad_(True)  # trained, but PEFT would not save it
    _train(pm, 1)
    with pytest.warns(UserWarning, match="modules_to_save=\\['fusion_embedding'\\]"):
        peft.utils.get_peft_model_state_dict(pm)


# ---- 4. torch.distributed.checkpoint helpers, one process ---------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_dcp_state_dict_helpers(quant, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)

    def make(seed):
        model = llama(seed=seed)
        add_fusion_tokens(model, N, base_quant=quant, extend_head=True)
        model.train()
        opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  min_8bit_size=256)
        return model, opt

    def step(model, opt, s):
        x = ids(30 + s)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    model, opt = make(0)
    step(model, opt, 0)
    msd, osd = get_state_dict(model, opt)
    prefix = "model.embed_tokens."
    want = ({prefix + "weight", prefix + "fusion_embedding.weight"} if quant is None else
            {prefix + k for k in ("weight_codes", "weight_absmax", "weight_qmap",
                                  "fusion_embedding.weight")})
    assert {k for k in msd if k.startswith(prefix)} == want
    assert (prefix + "fusion_embedding.weight") in osd["state"]
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    step(model, opt, 1)
    x = ids(40)
    with torch.no_grad():
        straight = model(input_ids=x).logits

    model2, opt2 = make(1)
    msd2, osd2 = get_state_dict(model2, opt2)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    step(model2, opt2, 1)
    with torch.no_grad():
        assert torch.equal(model2(input_ids=x).logits, straight)
    # the full (gathered) state dict loads back as well
    full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))[0]
    model3, opt3 = make(2)
    set_state_dict(model3, opt3, model_state_dict=full, optim_state_dict=get_state_dict(
        model3, opt3)[1], options=StateDictOptions(full_state_dict=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, model3.state_dict()[k]), k


# ---- accelerate ---------------------------------------------------------------------------------
def test_accelerate_save_state_load_state(tmp_path):
    accelerate = pytest.importorskip("accelerate", reason="accelerate not installed")

    def make():
        model = llama(seed=8)
        add_fusion_tokens(model, N, base_quant="int8", extend_head=True)
        model.train()
        opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  min_8bit_size=256)
        acc = accelerate.Accelerator(cpu=True)
        return acc, *acc.prepare(model, opt)

    def step(acc, model, opt, s):
        x = ids(50 + s)
        acc.backward(model(input_ids=x, labels=x).loss)
        opt.step()
        opt.zero_grad()

    acc, model, opt = make()
    step(acc, model, opt, 0)
    acc.save_state(str(tmp_path / "state"))
    step(acc, model, opt, 1)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    acc2, model2, opt2 = make()
    acc2.load_state(str(tmp_path / "state"))
    step(acc2, model2, opt2, 1)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k]), k
