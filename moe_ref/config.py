"""Configuration objects: the shape of an MoE layer and how capacity is handled.

Legend: T tokens, D d_model, F d_ff per expert, E experts, K top-k, C capacity per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

SCORINGS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probability")
OVERFLOWS = ("drop", "reroute", "spill", "dropless", "error")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_top_k(top_k, num_experts: int) -> None:
    """K must be an int with 1 <= K <= E."""
    _check_int("top_k", top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts, got top_k={top_k} > num_experts={num_experts}")


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing rule of one MoE layer (SwiGLU experts, as Mixtral).

    renormalize: rescale the K selected weights to sum to 1 (Mixtral, Qwen3-MoE);
    False keeps the raw router probabilities (Qwen2-MoE, OLMoE).
    scoring: "softmax" over all E logits (default) or "sigmoid" per expert (DeepSeek-V3 style).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    renormalize: bool = True
    scoring: str = "softmax"

    def __post_init__(self) -> None:
        _check_int("d_model", self.d_model, 1)
        _check_int("d_ff", self.d_ff, 1)
        _check_int("num_experts", self.num_experts, 1)
        check_top_k(self.top_k, self.num_experts)
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")

    def expert_flops_per_row(self) -> int:
        """FLOPs of one token row through one SwiGLU expert: 2*D*2F + 2*F*D."""
        return 6 * self.d_model * self.d_ff


@dataclass(frozen=True)
class CapacityConfig:
    """How many assignments each expert may take, and what happens to the rest.

    C = max(min_capacity, ceil(T * K * capacity_factor / E)).
    drop_policy: which assignments an expert keeps when over C:
      "position"    — all first choices before any second choice, earlier tokens first (GShard);
      "probability" — the C with the highest gate weight (ties: earlier token).
    overflow: what happens to assignments over C:
      "drop"     — they contribute zero (a token losing all K gets zero MoE output);
      "reroute"  — moved to the token's next-best expert that still has room;
      "spill"    — run in further passes of at most C per expert; nothing lost;
      "dropless" — capacity ignored;
      "error"    — raise, naming the expert, its load and C.
    """

    capacity_factor: float = 1.25
    min_capacity: int = 1
    drop_policy: str = "position"
    overflow: str = "drop"

    def __post_init__(self) -> None:
        cf = self.capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)):
            raise TypeError(f"capacity_factor must be a number, got {type(cf).__name__}")
        if not cf > 0 or cf != cf or cf == float("inf"):
            raise ValueError(f"capacity_factor must be a finite number > 0, got {cf}")
        _check_int("min_capacity", self.min_capacity, 0)
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be one of {OVERFLOWS}, got {self.overflow!r}")
