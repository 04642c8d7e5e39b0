import os

import pytest
import torch

# transformers imports DeepSpeed when it is installed; without an explicit accelerator
# DeepSpeed logs a warning to stdout at that import, which doctests would take as output.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # Helper modules (optim_reference, dist_utils, _nearest, optimizer_cases) live beside
    # the tests that use them; tests in other folders import them too.
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for sub in ("ops", "optim", "distributed"):
        path = str(here / sub)
        if path not in sys.path:
            sys.path.insert(0, path)
