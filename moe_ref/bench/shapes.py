"""The MoE shapes and token counts the benchmarks run.

Legend: D d_model, F d_ff, E experts, K top-k.
Model shapes: Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B, DeepSeek-V3's routed experts; small CPU presets.
Token counts: decode (1..64) through prefill (up to 16384).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Shape", "SHAPES", "DTYPES", "GPU_SHAPES", "GPU_TOKENS", "QUICK_TOKENS", "CPU_TOKENS", "CPU_SHAPES",
           "dtype_name"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One MoE layer's sizes: d_model D, d_ff F (per expert), num_experts E, top_k K."""

    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int


SHAPES = {
    "cpu": Shape("cpu", 1024, 2048, 8, 2),
    "cpu-fine": Shape("cpu-fine", 512, 256, 64, 8),  # fine-grained experts: many small GEMMs
    "cpu-small": Shape("cpu-small", 256, 512, 8, 2),
    "mixtral": Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    "qwen3": Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
    "olmoe": Shape("olmoe-1b-7b", 2048, 1024, 64, 8),
    "deepseek": Shape("deepseek-v3-routed", 7168, 2048, 256, 8),
}
GPU_SHAPES = ("mixtral", "qwen3", "olmoe", "deepseek")
GPU_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
QUICK_TOKENS = (1, 16, 256, 4096, 16384)
CPU_TOKENS = (1, 16, 64, 256, 1024, 4096)
CPU_SHAPES = ("cpu", "cpu-fine")


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(dtype).replace("torch.", "")
