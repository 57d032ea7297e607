"""Default tile configs and the device limits they are fitted to (moe_ref.kernels.configs, backend.device_limits).

Pure Python: nothing here launches a kernel. Tuned tables and the tuner are in test_tune.py.
"""

from types import SimpleNamespace

import pytest
import torch

from moe_ref.kernels import backend, configs
from moe_ref.kernels.backend import SM90_LIMITS, DeviceLimits, device_limits
from moe_ref.kernels.configs import fit_to_dtype, get_config, smem_bytes, split_config

SHAPES = {"mixtral": (8, 2, 4096, 14336), "qwen3": (128, 8, 2048, 768), "deepseek-v3": (256, 8, 7168, 2048)}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def _fits(cfg: dict, element_size: int, budget: int) -> bool:  # written out here, not configs.fits_smem
    first, second = split_config(cfg)
    return smem_bytes(first, element_size, 2) <= budget and smem_bytes(second, element_size, 1) <= budget


def test_sm90_limits_are_the_hopper_values():
    assert SM90_LIMITS == DeviceLimits(sm_count=132, smem_per_block=232448)
    for dev in (None, "cpu", torch.device("cpu"), "meta"):
        assert device_limits(dev) == SM90_LIMITS


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda.get_device_properties answering with the given properties (and a fresh cache)."""
    def install(**props):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(**props))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        backend._cuda_limits.cache_clear()
    yield install
    backend._cuda_limits.cache_clear()


def test_device_limits_read_the_cuda_device(fake_gpu):
    fake_gpu(major=8, minor=6, multi_processor_count=84, shared_memory_per_block=49152,
             shared_memory_per_block_optin=101376)
    assert device_limits("cuda") == DeviceLimits(84, 101376)
    assert device_limits(torch.device("cuda", 0)) == DeviceLimits(84, 101376)


def test_device_limits_without_the_opt_in_attribute(fake_gpu):
    fake_gpu(major=9, minor=0, multi_processor_count=132, shared_memory_per_block=49152)
    assert device_limits("cuda:0") == SM90_LIMITS  # a Hopper GPU: its documented opt-in maximum
    fake_gpu(major=8, minor=0, multi_processor_count=108, shared_memory_per_block=49152)
    assert device_limits("cuda:0") == DeviceLimits(108, 49152)  # otherwise the limit every block has


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_decode_tiles_are_at_least_64_wide(shape):
    E, K, D, F = SHAPES[shape]
    for T in TOKENS:
        if T * K / E <= 16:
            first, second = split_config(get_config(T, E, K, D, F))
            assert first["BLOCK_M"] == 16 and first["BLOCK_N"] >= 64 and second["BLOCK_N"] >= 64, (shape, T)


def test_prefill_tiles_are_128x128_on_8_warps_where_shared_memory_allows():
    E, K, D, F = SHAPES["mixtral"]
    for dtype_name in ("bfloat16", "float16"):
        for part in split_config(get_config(16384, E, K, D, F, dtype_name)):
            assert (part["BLOCK_M"], part["BLOCK_N"], part["BLOCK_K"], part["num_warps"]) == (128, 128, 64, 8)
            assert part["num_stages"] in (3, 4)
    first, second = split_config(get_config(16384, E, K, D, F, "float32"))  # 4-byte tiles: fewer stages fit
    assert first["num_stages"] == 2 and second["num_stages"] == 3 and first["BLOCK_M"] == 128


@pytest.mark.parametrize("limits", [SM90_LIMITS, DeviceLimits(84, 101376)], ids=["sm90", "99KiB"])
def test_every_default_fits_the_shared_memory_it_was_fitted_to(limits):
    """Down to 99 KiB a block (sm_86/sm_89): below that fp32 prefill tiles do not fit even with 2 stages of
    BLOCK_K 32, and the launcher's shrinking retry (fused_moe._launch) is what runs them."""
    for E, K, D, F in SHAPES.values():
        for T in TOKENS:
            for dtype_name, size in (("bfloat16", 2), ("float32", 4)):
                cfg = get_config(T, E, K, D, F, dtype_name, limits=limits)
                assert _fits(cfg, size, limits.smem_per_block), (T, E, dtype_name, limits, cfg)


def test_the_smem_formula_and_fit():
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    assert smem_bytes(cfg, 2, 2) == 4 * (128 * 64 + 2 * 64 * 128) * 2 == 196608
    assert smem_bytes(cfg, 2, 1) == 4 * (128 * 64 + 64 * 128) * 2
    assert fit_to_dtype(cfg, 2)["num_stages"] == 4  # fits 227 KiB as it is
    tight = fit_to_dtype(cfg, 2, budget=100 * 1024)  # stages go first, then BLOCK_K
    assert (tight["num_stages"], tight["BLOCK_K"]) == (2, 64) and _fits(tight, 2, 100 * 1024)
    assert tight["down"]["num_stages"] == 3  # the second GEMM has one weight tile
    tighter = fit_to_dtype(cfg, 2, budget=60 * 1024)
    assert (tighter["num_stages"], tighter["BLOCK_K"]) == (2, 32) and _fits(tighter, 2, 60 * 1024)
    too_small = fit_to_dtype(cfg, 2, budget=16 * 1024)  # as far as it goes: 2 stages of BLOCK_K 32
    assert (too_small["num_stages"], too_small["BLOCK_K"]) == (2, 32)
    assert not configs.fits_smem(too_small, 2, 16 * 1024) and configs.fits_smem(tighter, 2, 60 * 1024)


def test_get_config_passes_limits_to_the_default_only():
    E, K, D, F = SHAPES["mixtral"]
    small = DeviceLimits(84, 101376)
    assert get_config(16384, E, K, D, F, limits=small) != get_config(16384, E, K, D, F)
    assert get_config(16384, E, K, D, F, limits=small, interpreter=True) == configs.INTERPRETER_CONFIG
