"""Argument checks shared by the public entry points: one wording for each kind of mistake.

Legend: none (scalars and types only; tensor shape checks live next to the tensors they check:
router.check_x2d, router.validate_routing, layer.check_layer_weights).
Each check raises TypeError for the wrong kind of value and ValueError for a value out of range,
naming the argument, and returns the value so a caller can check and assign in one line.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_int", "check_number", "check_choice", "check_instance", "check_float_dtype"]


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An int (bool refused) with low <= value <= high where given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_number(name: str, value, low: float | None = None, *, strict: bool = False,
                 finite: bool = True) -> float:
    """A real number (bool refused), finite unless finite=False, and >= low (> low when strict)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if value != value or (finite and not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """One of a fixed set of names."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_instance(name: str, value, cls: type, *, allow_none: bool = False):
    """An instance of cls (or None when allow_none)."""
    if value is None and allow_none:
        return value
    if not isinstance(value, cls):
        what = f"a {cls.__module__.split('.')[0]}.{cls.__name__}" if cls.__module__.startswith("moe_ref") \
            else f"a {cls.__name__}"
        raise TypeError(f"{name} must be {what}{' or None' if allow_none else ''}, got {type(value).__name__}")
    return value


def check_float_dtype(name: str, dtype) -> torch.dtype:
    """A floating-point torch.dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype, got {dtype!r}")
    return dtype

