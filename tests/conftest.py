import os
from pathlib import Path

import pytest
import torch

from dat_smt.ops._extension import load_extension

REFERENCE_DIR = Path(
    os.environ.get("DAT_SMT_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The shared reference material (fixtures, manifests) produced by running the official code."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference folder {REFERENCE_DIR} is absent; set DAT_SMT_REFERENCE_DIR to point at it")
    return REFERENCE_DIR.resolve()


@pytest.fixture
def extension_calls(monkeypatch):
    """Records ``(operator name, arguments)`` of every call to the C++ extension's operators (which still run);
    skips the test where the extension's CPU kernels could not be built."""
    status = load_extension()
    if not status["cpu"]:
        pytest.skip(f"the C++ extension could not be built: {status['reason']}")
    calls = []
    operators = torch.ops.dat_smt_ext

    class Recorder:
        def __getattr__(self, name):
            operator = getattr(operators, name)

            def record(*args):
                calls.append((name, args))
                return operator(*args)

            return record

    monkeypatch.setattr(torch.ops, "dat_smt_ext", Recorder())
    return calls
