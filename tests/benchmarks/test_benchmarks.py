"""The benchmark scripts run end to end in their tiny CI modes and write their tables,
JSON and PNG (the JSON output is checked)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "embedding.py"


def test_embedding_benchmark_tiny(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("bench_embedding", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parse_args(["--vocab", "4000", "--fusion", "8", "--dim", "128", "--tokens", "128",
                           "--repeats", "2", "--warmup", "1", "--devices", "cpu",
                           "--out", str(tmp_path)])
    result = mod.main(args)
    data = json.loads((tmp_path / "embedding.json").read_text())
    assert (tmp_path / "embedding.png").stat().st_size > 0
    cases = {r["case"]: r for r in data["rows"]}
    assert set(cases) == set(mod.CASES) and result["rows"] == data["rows"]
    assert cases["FusionEmbedding int8"]["base_bytes_per_param"] <= 1.07
    assert cases["FusionEmbedding nf4"]["base_bytes_per_param"] <= 0.57
    chosen = {e["scheme"]: e["rel_error"] for e in data["quantization_error"] if e["chosen"]}
    assert chosen["int8 linear blocks of 64"] <= 0.01 and chosen["nf4 blocks of 64"] <= 0.12
    assert "masked routing" in capsys.readouterr().out


def test_embedding_benchmark_per_isa_forward_only(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from bnbfuse import _native

    if not _native.cpu.loaded:
        pytest.skip("native CPU library not built")
    spec = importlib.util.spec_from_file_location("bench_embedding", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = bnbfuse_cpu_isa()
    args = mod.parse_args(["--vocab", "300", "--fusion", "4", "--dim", "96", "--tokens", "64",
                           "--repeats", "2", "--warmup", "0", "--devices", "cpu",
                           "--forward-only", "--isas", ",".join(mod.ISAS), "--out", str(tmp_path)])
    data = mod.main(args)
    assert bnbfuse_cpu_isa() == before  # the automatic choice is back
    runnable = [i for i in mod.ISAS if f"{i}: left out" not in " ".join(data["notes"])]
    assert "generic" in runnable
    rows = {(r["case"], r["isa"]) for r in data["rows"]}
    fused = [c for c in mod.CASES if c.startswith("FusionEmbedding")]
    assert rows == {(c, i) for c in fused for i in runnable} | {("nn.Embedding", None),
                                                                ("masked routing", None)}
    for r in data["rows"]:
        assert r["forward_ms"] > 0 and r["fwd_bwd_ms"] is None and r["fwd_bwd_ratio"] is None
    out = capsys.readouterr().out
    assert "avx2" in out or "avx2: left out" in " ".join(data["notes"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--isas", "sse9"])


def bnbfuse_cpu_isa():
    import bnbfuse

    return bnbfuse.backend_info()["cpu_isa"]


def _run_script(args, tmp_path, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_memory_benchmark_tiny(tmp_path):
    pytest.importorskip("transformers", reason="the memory benchmark needs the bench extra")
    configs = ["baseline", "bnbfuse-8bit", "fusion-int8", "fusion-nf4"]
    out = _run_script(["benchmarks/memory.py", "--preset", "tiny", "--configs", ",".join(configs)],
                      tmp_path)
    data = json.loads((tmp_path / "memory_tiny.json").read_text())
    assert data["skipped"] == {}, data["skipped"]
    res = {r["config"]: r for r in data["results"]}
    assert list(res) == configs
    base = res["baseline"]
    p = data["params"]
    V, N, d = p["vocab"], p["new_tokens"], p["hidden"]
    # Counted from tensors: the baseline's fp32 AdamW holds exactly two fp32 moments per param.
    assert base["optimizer_state_bytes"] >= 8 * base["params"]
    assert base["grad_bytes"] == 4 * base["params"]
    assert base["embedding_weight_bytes"] == 4 * (V + N) * d
    eight = res["bnbfuse-8bit"]
    assert eight["params_with_8bit_state"] > 0
    assert eight["optimizer_state_bytes"] < base["optimizer_state_bytes"]
    # The embedding keeps 32-bit state: 8 bytes per element, as in the baseline (whose
    # torch AdamW adds a 4-byte step tensor).
    assert 8 * (V + N) * d <= eight["embedding_optimizer_state_bytes"] <= 8 * (V + N) * d + 16
    assert abs(eight["embedding_optimizer_state_bytes"] - base["embedding_optimizer_state_bytes"]) <= 16
    for name, max_bpp in (("fusion-int8", 1.07), ("fusion-nf4", 0.57)):
        r = res[name]
        # Only the new-token table is trained in the embedding: gradient and state are N rows.
        # (the lookup's backward may add one scratch row)
        assert 4 * N * d <= r["embedding_grad_bytes"] <= 4 * (N + 1) * d
        assert r["embedding_weight_bytes"] <= max_bpp * V * d + 4 * (N + 1) * d + 1024
        assert r["optimizer_plus_embedding_bytes"] < eight["optimizer_plus_embedding_bytes"]
        assert data["summary"][name]["optimizer_plus_embedding_saving"] > 0.3
    for r in res.values():
        assert r["peak_bytes"] > r["weight_bytes"] and r["step_time_s"] > 0
        assert 0 < r["eval_loss"] < 1.5 * torch.log(torch.tensor(float(V + N))).item()
        assert len(r["losses"]) == p["steps"]
    # Same initial weights and data: the first loss is the same for every configuration up
    # to the quantized base table.
    assert abs(eight["first_loss"] - base["first_loss"]) < 1e-4
    assert "optimizer+embedding memory" in out
    assert (tmp_path / "memory_tiny.png").exists() == _have("matplotlib")


def _optimizer_step_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import optimizer_step
    finally:
        sys.path.pop(0)
    return optimizer_step


def _run_optimizer_step(tmp_path, *args) -> list:
    """benchmarks/optimizer_step.py's main() with these arguments; its JSON results."""
    pytest.importorskip("tqdm", reason="the benchmarks need the bench extra")
    mod = _optimizer_step_module()
    threads = torch.get_num_threads()  # main() sets --threads
    try:
        mod.main([*args, "--no-progress", "--out", str(tmp_path / "step")])
    finally:
        torch.set_num_threads(threads)
    return json.loads((tmp_path / "step.json").read_text())["results"]


def test_optimizer_step_benchmark_tiny(tmp_path):
    numel = 102_400  # 0.1M rounded up to a multiple of 4096
    results = _run_optimizer_step(tmp_path, "--sizes", "0.1", "--dtypes", "fp32,bf16",
                                  "--repeats", "3", "--only", "fused,bnbfuse")
    rows = {(r["optimizer"], r["dtype"]): r for r in results}
    assert set(rows) == {(o, d) for o in ("torch AdamW fused", "bnbfuse AdamW8bit",
                                          "bnbfuse AdamW32bit") for d in ("fp32", "bf16")}
    for (name, dtype), r in rows.items():
        assert "error" not in r, r
        assert r["numel"] == numel and r["repeats"] == 3 and r["mparam_s"] > 0
        assert r["vs_torch_fused"] > 0
    # codes (2 bytes) + two absmax floats per 256 + two 256-float maps, per parameter
    eight = rows[("bnbfuse AdamW8bit", "fp32")]["state_bytes_per_param"]
    assert 2.0 < eight < 2.0 + (8 / 256 + 2048 / numel + 0.001)
    assert 8.0 <= rows[("bnbfuse AdamW32bit", "fp32")]["state_bytes_per_param"] < 8.001
    assert rows[("torch AdamW fused", "fp32")]["vs_torch_fused"] == 1.0
    for r in rows.values():
        assert r["tensors"] == 1 and 0 < r["min_seconds"] <= r["seconds"]


def test_optimizer_step_benchmark_many_tensors(tmp_path):
    results = _run_optimizer_step(tmp_path, "--sizes", "0.1", "--dtypes", "fp32", "--repeats",
                                  "2", "--tensors", "5", "--only", "fused,bnbfuse AdamW8bit")
    rows = {r["optimizer"]: r for r in results}
    assert set(rows) == {"torch AdamW fused", "bnbfuse AdamW8bit"}
    # 0.1M over 5 tensors: 5 x 20480 (each rounded up to a multiple of 4096)
    for r in rows.values():
        assert "error" not in r, r
        assert r["tensors"] == 5 and r["numel"] == 5 * 20480
    # the state of all five tensors is counted: codes, absmax and maps of each
    eight = rows["bnbfuse AdamW8bit"]["state_bytes_per_param"]
    assert 2.0 < eight < 2.0 + (8 / 256 + 5 * 2048 / (5 * 20480) + 0.001)
    with pytest.raises(SystemExit):
        _optimizer_step_module().main(["--tensors", "0"])


def test_optimizer_step_deepspeed_left_out_with_a_reason(monkeypatch):
    mod = _optimizer_step_module()
    # as if not installed (also when an earlier test imported it: its submodules are cached)
    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    cands, notes = mod.contenders(torch.device("cpu"))
    assert "DeepSpeedCPUAdam" not in [name for name, _ in cands]
    (note,) = [n for n in notes if "DeepSpeedCPUAdam" in n]
    assert "\n" not in note and "deepspeed" in note.lower()
    # --only without it: DeepSpeed is not even probed
    cands, notes = mod.contenders(torch.device("cpu"), lambda name: "fused" in name)
    assert [name for name, _ in cands] == ["torch AdamW fused"]
    assert not any("DeepSpeedCPUAdam" in n for n in notes)


def test_optimizer_step_deepspeed_contender(tmp_path):
    pytest.importorskip("tqdm", reason="the benchmarks need the bench extra")
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional contender")
    mod = _optimizer_step_module()
    factory, why = mod.deepspeed_cpu_adam()
    if factory is None:
        pytest.skip(f"DeepSpeed's cpu_adam op does not load here: {why}")
    results = _run_optimizer_step(tmp_path, "--sizes", "0.1", "--dtypes", "fp32,bf16",
                                  "--repeats", "2", "--only", "fused,deepspeed")
    rows = {(r["optimizer"], r["dtype"]): r for r in results}
    for dtype in ("fp32", "bf16"):
        r = rows[("DeepSpeedCPUAdam", dtype)]
        assert "error" not in r, r
        assert r["state_bytes_per_param"] == 8.0  # fp32 moments, also for bf16 parameters
    # the same AdamW step as torch's: a few steps of both land on the same parameters
    (p1,), opt1 = mod.make_run(factory, 4096, torch.float32, torch.device("cpu"))
    (p2,), opt2 = mod.make_run(lambda ps: torch.optim.AdamW(ps, lr=mod.LR, betas=mod.BETAS,
                                                         eps=mod.EPS, weight_decay=mod.WD),
                            4096, torch.float32, torch.device("cpu"))
    for _ in range(3):
        opt1.step()
        opt2.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-5, atol=1e-6)


def test_train_parity_ci(tmp_path):
    _run_script(["benchmarks/train_parity.py", "--ci"], tmp_path)
    data = json.loads((tmp_path / "train_parity_ci.json").read_text())
    ref, q = data["runs"]
    assert ref["optimizer"] == "adamw32" and q["optimizer"] == "bnbfuse8"
    assert len(ref["train_loss"]) == data["config"]["steps"] == len(q["train_loss"])
    # It learned something: well below the uniform 8 bits/byte = ln(256) nats.
    assert ref["final_eval_loss"] < 0.8 * torch.log(torch.tensor(256.0)).item()
    assert abs(q["final_eval_loss"] / ref["final_eval_loss"] - 1) <= data["tol"] == 0.01
    assert data["passed"] is True
    # 8-bit state: < 4.5 bytes/param in this tiny model (the 32-bit embeddings and small
    # biases dominate), 8 bytes/param for torch's AdamW.
    assert q["optimizer_state_bytes"] < 0.6 * ref["optimizer_state_bytes"]
    assert (tmp_path / "train_parity_ci.png").exists() == _have("matplotlib")


def _have(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
