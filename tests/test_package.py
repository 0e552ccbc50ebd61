import importlib

import dat_smt


def test_adapters_import_as_subpackage():
    adapters = importlib.import_module("dat_smt.adapters")
    assert adapters.__name__ == "dat_smt.adapters"


def test_version():
    assert dat_smt.__version__.count(".") == 2
