"""The strategy registry: every way of computing the same MoE forward, under a stable name.

A strategy is fn(x [T, D], routing, w13 [E, 2F, D], w2 [E, D, F], capacity=C or None) -> StrategyResult.
Routing ids may be -1 (dropped by capacity); those assignments contribute zero.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

STRATEGIES: dict[str, Callable] = {}
# strategies that live outside the core, imported on first use
_LAZY = {"triton": "moe_ref.kernels"}


@dataclass
class StrategyResult:
    y: torch.Tensor  # [T, D] in x's dtype
    computed_rows: int = 0  # token rows through expert FFNs, padding included
    padded_slots: int = 0  # rows computed on padding


def register_strategy(name: str):
    """Decorator: make fn available as layer(x, strategy=name)."""

    def deco(fn):
        STRATEGIES[name] = fn
        return fn

    return deco


def strategy_names() -> list[str]:
    """Every name `layer(x, strategy=...)` accepts, sorted (lazy ones such as "triton" included)."""
    return sorted(set(STRATEGIES) | set(_LAZY))


def get_strategy(name: str) -> Callable:
    if not isinstance(name, str) or name not in strategy_names():
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()}")
    if name not in STRATEGIES:
        importlib.import_module(_LAZY[name])  # registers itself on import
        if name not in STRATEGIES:
            raise RuntimeError(f"{_LAZY[name]} did not register strategy {name!r}")
    return STRATEGIES[name]
