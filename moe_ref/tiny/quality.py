"""The quality cost of capacity on the trained model: held-out loss and next-token agreement with dropless.

Legend: B batch (sequences), S sequence, V vocabulary, E experts, K top-k, C capacity, cf capacity factor.
prefill: one forward over [B, S]; capacity counts all B*S tokens of the call.
decode:  capacity counts the B tokens of one step (C = max(1, ceil(B*K*cf/E))). Computed teacher-forced:
         the MoE blocks see position s of every sequence as its own call, which is what incremental
         decoding with a KV cache does (causal attention: a position depends only on earlier ones).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as Fn
from torch import nn

from ..config import CapacityConfig
from ..hf import HFMoEBlock, patch_model

__all__ = ["OVERFLOW_SETTINGS", "PerStepMoE", "format_quality", "quality_table"]

# label -> (overflow, drop_policy)
OVERFLOW_SETTINGS = {
    "drop/position": ("drop", "position"),
    "drop/probability": ("drop", "probability"),
    "reroute": ("reroute", "position"),
    "spill": ("spill", "position"),
}
PHASES = ("prefill", "decode")


class PerStepMoE(nn.Module):
    """Runs a patched block one position at a time: hidden [B, S, D] -> S calls of [B, 1, D] (decode capacity)."""

    def __init__(self, block: HFMoEBlock):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        steps = [self.block(hidden_states[:, s:s + 1]) for s in range(hidden_states.shape[1])]  # S x [B, 1, D]
        if isinstance(steps[0], tuple):  # (hidden, router_logits [B, E]) from blocks that return both
            return torch.cat([h for h, _ in steps], dim=1), torch.cat([g for _, g in steps], dim=0)
        return torch.cat(steps, dim=1)  # [B, S, D]


@contextlib.contextmanager
def _per_step(model: nn.Module):
    """Wrap every HFMoEBlock of a patched model in PerStepMoE for the duration of the block."""
    swaps = []
    for name, m in list(model.named_modules()):
        if isinstance(m, HFMoEBlock):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, PerStepMoE(m))
            swaps.append((parent, attr, m))
    try:
        yield
    finally:
        for parent, attr, m in swaps:
            setattr(parent, attr, m)


def _score(logits: torch.Tensor, labels: torch.Tensor, ref_top: torch.Tensor) -> tuple[float, float]:
    """(mean cross entropy in nats/byte, share of positions whose argmax equals ref_top [B, S])."""
    loss = Fn.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    return float(loss), float((logits.argmax(-1) == ref_top).float().mean())


def _run(model, inputs, labels, ref_top, phase: str, capacity: CapacityConfig | None, strategy: str) -> dict:
    with patch_model(model, strategy=strategy, capacity=capacity) as report:
        with _per_step(model) if phase == "decode" else contextlib.nullcontext():
            logits = model(input_ids=inputs).logits  # [B, S, V]
    loss, agree = _score(logits, labels, ref_top)
    routed = sum(s.routed for s in report.layers)
    return dict(loss=loss, agreement=agree, drop_share=sum(s.dropped for s in report.layers) / routed,
                rerouted_share=sum(s.rerouted for s in report.layers) / routed,
                capacity=report.layers[0].capacity)


@torch.no_grad()
def quality_table(capacity_factors=(0.5, 1.0, 1.25, 2.0), overflows=tuple(OVERFLOW_SETTINGS),
                  phases=PHASES, model=None, batch_size: int = 4, seq_len: int = 256,
                  strategy: str = "grouped") -> list[dict]:
    """Held-out loss (nats/byte) and next-token agreement with the dropless model, per phase, overflow and cf.

    model: a transformers MoE LM (default: the shipped tiny model); the text is heldout_windows(batch_size,
    seq_len + 1). One row per (phase, overflow label, cf) plus a "dropless" row per phase (cf None):
    phase, overflow, capacity_factor, capacity (C of the last call), loss, agreement, drop_share
    (assignments dropped / routed), rerouted_share, tokens. The unpatched model's loss is in every row
    as base_loss.
    """
    from .data import heldout_windows
    from .model import load_tiny_moe

    bad = [o for o in overflows if o not in OVERFLOW_SETTINGS]
    if bad:
        raise ValueError(f"overflows: unknown {bad}; choose from {list(OVERFLOW_SETTINGS)}")
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise ValueError(f"phases: unknown {bad}; choose from {list(PHASES)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    model = load_tiny_moe() if model is None else model
    ids = heldout_windows(batch_size, seq_len + 1).to(model.device)  # [B, S + 1]
    inputs, labels = ids[:, :-1], ids[:, 1:]  # [B, S]
    base = model(input_ids=inputs).logits  # [B, S, V]
    base_loss, _ = _score(base, labels, base.argmax(-1))
    ref_top = base.argmax(-1)  # [B, S]
    rows = []
    for phase in phases:
        rows.append(dict(phase=phase, overflow="dropless", capacity_factor=None, tokens=labels.numel(),
                         base_loss=base_loss, **_run(model, inputs, labels, ref_top, phase, None, strategy)))
        for label in overflows:
            ov, policy = OVERFLOW_SETTINGS[label]
            for cf in capacity_factors:
                cap = CapacityConfig(capacity_factor=cf, drop_policy=policy, overflow=ov)
                rows.append(dict(phase=phase, overflow=label, capacity_factor=cf, tokens=labels.numel(),
                                 base_loss=base_loss, **_run(model, inputs, labels, ref_top, phase, cap, strategy)))
    return rows


def format_quality(rows: list[dict]) -> str:
    """A markdown table of quality_table rows (loss and its rise over dropless, agreement, drops)."""
    head = "| phase | overflow | capacity factor | C | held-out loss | vs dropless | agreement | dropped | rerouted |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cf = "-" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}"
        cap = "-" if r["capacity"] is None else str(r["capacity"])
        lines.append(f"| {r['phase']} | {r['overflow']} | {cf} | {cap} | {r['loss']:.4f} | "
                     f"{r['loss'] - r['base_loss']:+.4f} | {r['agreement']:.1%} | {r['drop_share']:.1%} | "
                     f"{r['rerouted_share']:.1%} |")
    return "\n".join(lines)
