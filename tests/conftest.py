import os

import pytest
import torch

# Under pytest-xdist each worker is its own process: one intra-op thread each
# keeps the workers from oversubscribing the cores (which slows small ops ~20x).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def pytest_addoption(parser):
    parser.addoption(
        "--device", action="store", default="cpu", help="device of the contract tests (cpu, cuda)"
    )
    parser.addoption(
        "--dtype",
        action="store",
        default="float64",
        choices=sorted(_DTYPES),
        help="dtype of the contract tests (tolerances scale with its eps)",
    )


@pytest.fixture
def device(request) -> torch.device:
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return device


@pytest.fixture
def dtype(request) -> torch.dtype:
    return _DTYPES[request.config.getoption("--dtype")]


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny problems: fastest, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
