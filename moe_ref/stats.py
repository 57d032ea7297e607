"""What a forward pass cost: loads, drops, padding, passes. Nothing is lost without a number.

Legend: T tokens, E experts, K top-k, C capacity per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoEStats:
    """Filled by every strategy.

    expert_counts:  [E] int64, assignments routed to each expert (before capacity).
    capacity:       C per expert, or None when no capacity applies.
    dropped:        assignments dropped (they contribute zero).
    dropped_tokens: tokens that lost all K assignments (zero MoE output).
    rerouted:       assignments moved to another expert by overflow="reroute".
    passes:         expert passes run (1, or more with overflow="spill").
    padded_slots:   expert rows computed on padding (static buffers / aligned tiles).
    computed_rows:  token rows pushed through an expert FFN, padding and waste included
                    (dense: T*E; grouped: kept assignments; padded: E*C per pass).
    """

    expert_counts: torch.Tensor
    capacity: int | None = None
    dropped: int = 0
    dropped_tokens: int = 0
    rerouted: int = 0
    passes: int = 1
    padded_slots: int = 0
    computed_rows: int = 0

    @property
    def routed(self) -> int:
        """Assignments routed (T*K)."""
        return int(self.expert_counts.sum())

    @property
    def useful_rows(self) -> int:
        """Rows that contribute to the output: routed minus dropped."""
        return self.routed - self.dropped

    @property
    def wasted_fraction(self) -> float:
        """Share of computed expert rows that did not contribute (padding, masked-out, dropped)."""
        return 0.0 if self.computed_rows == 0 else 1.0 - self.useful_rows / self.computed_rows


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 histogram of expert ids in topk_ids [T, K] (ids < 0 ignored)."""
    ids = topk_ids.reshape(-1)
    return torch.bincount(ids[ids >= 0], minlength=num_experts)[:num_experts]
