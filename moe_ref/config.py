"""Configuration objects: the shape of an MoE layer and how capacity is handled.

Legend: T tokens, D d_model, F d_ff per expert, E experts, K top-k, C capacity per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from .validate import check_choice, check_instance, check_int, check_number

SCORINGS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probability")
OVERFLOWS = ("drop", "reroute", "spill", "dropless", "error")


def check_top_k(top_k, num_experts: int) -> None:
    """K must be an int with 1 <= K <= E."""
    check_int("top_k", top_k, 1)
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
        check_int("d_model", self.d_model, 1)
        check_int("d_ff", self.d_ff, 1)
        check_int("num_experts", self.num_experts, 1)
        check_top_k(self.top_k, self.num_experts)
        check_choice("scoring", self.scoring, SCORINGS)

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
        check_number("capacity_factor", self.capacity_factor, 0, strict=True)
        check_int("min_capacity", self.min_capacity, 0)
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice("overflow", self.overflow, OVERFLOWS)


def check_capacity(capacity) -> CapacityConfig | None:
    """capacity must be a moe_ref.CapacityConfig or None (dropless); returns it."""
    return check_instance("capacity", capacity, CapacityConfig, allow_none=True)
