"""benchmarks/embedding.py runs end to end at a tiny size and writes its table, JSON and PNG."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "embedding.py"


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
