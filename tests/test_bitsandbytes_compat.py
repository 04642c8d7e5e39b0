"""The bitsandbytes drop-in: install_as_bitsandbytes() (with a real Hugging Face Trainer for
each bitsandbytes optimizer name), the explained AttributeError of the names bnbfuse leaves
out, and the docs table of every bitsandbytes 0.50 name."""
import importlib.util
import inspect
import math
import sys
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import torch

import bnbfuse
from bnbfuse import compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, name", [(m, n) for m, names in compat.OUT_OF_SCOPE.items()
                                          for n in names])
def test_out_of_scope_names_explain_themselves(module, name):
    mod = bnbfuse if not module else getattr(bnbfuse, module)
    with pytest.raises(AttributeError, match="optimizers, embeddings and blockwise") as info:
        getattr(mod, name)
    assert f"{name} is not provided by bnbfuse" in str(info.value)
    assert not hasattr(mod, name)


def test_a_name_bitsandbytes_lacks_gets_the_usual_error():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchLayer'"):
        bnbfuse.nn.NoSuchLayer
    assert "Linear8bitLt" in str(pytest.raises(AttributeError, lambda: bnbfuse.nn.Linear8bitLt).value)


def test_every_bitsandbytes_name_is_provided_or_explained():
    for module, names in compat.BNB_NAMES.items():
        for name in names:
            provided = compat._provided(module, name)
            assert provided != (name in compat.OUT_OF_SCOPE[module]), (module, name)
    assert all(compat._provided("optim", n) for n in compat.BNB_NAMES["optim"])


def test_name_list_is_bitsandbytes_own():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb = pytest.importorskip("bitsandbytes")
        import bitsandbytes.functional  # noqa: F401
    if bnb.__version__ != compat.BNB_VERSION:
        pytest.skip(f"bitsandbytes {bnb.__version__} installed, the list is of {compat.BNB_VERSION}")
    for module, names in compat.BNB_NAMES.items():
        mod = getattr(bnb, module)
        public = sorted(n for n in dir(mod) if not n.startswith("_")
                        and (inspect.isclass(getattr(mod, n)) or inspect.isfunction(getattr(mod, n)))
                        and getattr(getattr(mod, n), "__module__", "").startswith("bitsandbytes"))
        assert tuple(public) == names, module


def test_docs_table_is_current():
    text = (ROOT / "docs" / "bitsandbytes.md").read_text()
    start, end = "<!-- names:start -->\n", "\n<!-- names:end -->"
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == compat.markdown_table(), "regenerate: python -m bnbfuse --bitsandbytes-names"
    assert "bitsandbytes.md" in (ROOT / "mkdocs.yml").read_text()


def test_install_as_bitsandbytes_and_uninstall():
    before = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "bitsandbytes"}
    with bnbfuse.install_as_bitsandbytes() as alias:
        import bitsandbytes as bnb
        from bitsandbytes.optim import AdamW, GlobalOptimManager

        assert bnb is alias.module and bnb.__version__ == compat.BNB_VERSION
        assert bnb.nn is bnbfuse.nn and bnb.functional is bnbfuse.functional
        assert issubclass(AdamW, bnbfuse.optim.AdamW) and "bitsandbytes" in str(AdamW)
        assert GlobalOptimManager is bnbfuse.optim.GlobalOptimManager
        assert importlib.util.find_spec("bitsandbytes") is not None
        from bitsandbytes.optim.optimizer import Optimizer8bit
        assert Optimizer8bit is bnbfuse.optim.Optimizer8bit
        with pytest.raises(ModuleNotFoundError):
            import bitsandbytes.autograd  # noqa: F401  (not aliased: never the real package)
        with pytest.raises(AttributeError, match="not provided"):
            bnb.matmul
        w = torch.nn.Parameter(torch.randn(64, 96))
        opt = bnb.optim.PagedAdamW8bit([w])
        w.grad = torch.randn_like(w)
        opt.step()
        assert opt.state[w]["state1"].dtype == torch.uint8 and opt.is_paged
    after = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "bitsandbytes"}
    assert after == before and not alias.installed


TRAINER_NAMES = ["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                 "lion_8bit", "paged_lion_8bit", "ademamix_8bit", "rmsprop_bnb_8bit"]
CLASS_OF = {"adamw": "AdamW", "lion": "Lion", "ademamix": "AdEMAMix", "rmsprop": "RMSprop"}


@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_hugging_face_trainer_optimizer_names_run_on_bnbfuse(name):
    pytest.importorskip("accelerate")
    with bnbfuse.install_as_bitsandbytes():
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        data = [{"input_ids": torch.randint(0, 128, (16,)), "labels": torch.randint(0, 128, (16,))}
                for _ in range(8)]
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(
                output_dir=out, optim=name, use_cpu=True, max_steps=2,
                per_device_train_batch_size=4, report_to=[], save_strategy="no",
                learning_rate=1e-3, disable_tqdm=True)
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
            result = trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    kind = next(v for k, v in CLASS_OF.items() if name.startswith((k, "paged_" + k)))
    assert isinstance(opt, getattr(bnbfuse.optim, kind)) and type(opt).__module__ == "bitsandbytes.optim"
    assert opt.is_paged == name.startswith("paged")
    eight = "8bit" in name
    assert opt.defaults["optim_bits"] == (8 if eight else 32)
    emb = model.model.embed_tokens.weight                     # 8,192 elements
    q = model.model.layers[0].self_attn.q_proj.weight         # 4,096 elements
    # Trainer asks for 32-bit embedding state inside an 8-bit optimizer; bnbfuse honours it
    assert opt.state[emb]["state1"].dtype == torch.float32
    assert opt.state[q]["state1"].dtype == (torch.uint8 if eight else torch.float32)
    assert math.isfinite(result.training_loss)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert "model.embed_tokens.weight" in moved and len(moved) == len(start)
    assert isinstance(sys.modules.get("bitsandbytes", types.ModuleType("x")), types.ModuleType)
