"""``python -m bnbfuse``: the backend report and its --help."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bnbfuse", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_describes_the_report():
    proc = _run("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m bnbfuse")
    assert "backends" in proc.stdout


def test_unknown_argument_is_an_error():
    proc = _run("--frobnicate")
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr


def test_report_names_every_backend():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    for key in ("bnbfuse", "torch", "reference", "cpu", "cuda"):
        assert f" {key}: " in proc.stdout
