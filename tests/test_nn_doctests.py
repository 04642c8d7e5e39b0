"""The runnable examples in the docstrings of bnbfuse.nn and bnbfuse.quant_tables."""
import doctest
import importlib

import pytest

MODULES = ["bnbfuse.quant_tables", "bnbfuse.nn.embedding", "bnbfuse.nn.standard_embedding",
           "bnbfuse.nn.quantized_table", "bnbfuse.nn.fusion_embedding",
           "bnbfuse.nn.fusion_layer", "bnbfuse.nn.fusion_utils"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
