"""Shared test set-up. TRITON_INTERPRET must be set before moe_ref.kernels is imported.

torch and hypothesis are imported in the processes that run tests, never in pytest-xdist's controller (which
only hands tests out): under `make check` that saves seconds before the workers even start.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _runs_tests(config) -> bool:
    """False in xdist's controller process (it collects nothing); True in workers and in plain runs."""
    return bool(os.environ.get("PYTEST_XDIST_WORKER")) or not getattr(config.option, "numprocesses", None)


def pytest_configure(config):
    if not _runs_tests(config):
        return
    import torch

    try:  # hypothesis is a dev dependency; a bare GPU machine (make gpu-check) may lack it and needs none of it
        from hypothesis import HealthCheck, settings
    except ImportError:
        pass
    else:
        settings.register_profile(
            "moe", deadline=None, max_examples=int(os.environ.get("MOE_REF_HYPOTHESIS_EXAMPLES", "40")),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        settings.load_profile("moe")

    # one intra-op thread per xdist worker (make check runs -n 2): two workers of two threads each on two cores
    # spin against each other, and a small matmul can then take a thousand times longer
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def two_threads():
    """torch at 2 intra-op threads for the test (make test runs 1), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
