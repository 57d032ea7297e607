"""Shared test set-up. TRITON_INTERPRET must be set before moe_ref.kernels is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
