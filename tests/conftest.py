"""Shared test setup. `pytest --dtype fp32` (or bf16) runs the end-to-end tests in that
precision; the default, auto, is what `python train.py` picks on this machine."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                     help="train.py --dtype for the end-to-end tests")
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (minutes each)")


@pytest.fixture
def dtype_flag(request):
    return ["--dtype", request.config.getoption("--dtype")]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread is fastest (a second costs more in overhead
    than it brings) and does not fight other processes for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes, not seconds: run only with `pytest --slow`")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        skip = pytest.mark.skip(reason="slow: run with `pytest --slow`")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(skip)
