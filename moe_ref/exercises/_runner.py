"""Run a reader's function on generated cases, compare with the library's answer, report what differs.

Legend: none (shared by every checker in moe_ref.exercises).
A checker builds a list of `Case`s (named inputs and the expected output, from moe_ref's own implementation
or the float64 reference) and calls `run_check`. The report prints, in the style of tensor puzzles: the first
failing case, its inputs, the expected and the returned value, and the indices of the elements that differ.
A function that raises NotImplementedError or returns None on the first case is "not attempted": the
checker says so and returns, without raising, so a notebook with untouched stubs still runs top to bottom.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Case", "CheckResult", "run_check", "compare"]

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"
MAX_SHOWN = 6  # differing elements listed per failure
SMALL = 48  # tensors with at most this many elements are printed in full


@dataclass
class Case:
    """One call of the reader's function: fn(*args.values()) must equal `expected`.

    name: what is special about the case ("T=0", "one hot expert", ...).
    args: the arguments in call order, by name (the names are only for the report).
    expected: a tensor, a number, a bool, None, or a tuple of those (compared part by part, named by `parts`).
    rtol/atol: tolerance for floating-point tensors and numbers (integers and bools compare exactly).
    """

    name: str
    args: dict
    expected: Any
    parts: tuple[str, ...] | None = None
    rtol: float = 1e-6
    atol: float = 1e-8


@dataclass
class CheckResult:
    """What a checker found. status: "passed", "failed" or "not attempted"; truthy only when passed."""

    check: str
    status: str
    cases: int
    passed_cases: int = 0
    failed_case: str | None = None
    report: str = ""
    case_names: list[str] = field(default_factory=list)
    expected: str | None = None  # the failing case's expected and returned values, as the report prints them
    got: str | None = None

    def __bool__(self) -> bool:
        return self.status == PASSED

    def __repr__(self) -> str:
        return f"CheckResult({self.check!r}: {self.status}, {self.passed_cases}/{self.cases} cases)"


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _nested(v) -> str:
    return "[" + ", ".join(_nested(x) if isinstance(x, list) else _num(x) for x in v) + "]"


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        head = f"{v.dtype} tensor of shape {list(v.shape)}"
        if v.numel() > SMALL or v.dim() == 0:
            return head if v.dim() else f"{head}: {_num(v.item())}"
        rows = v.detach().cpu().tolist()
        if v.dim() == 2 and v.shape[0] > 1:
            return head + ":\n" + "\n".join(f"      {_nested(r)}" for r in rows)
        return f"{head}: {_nested(rows)}"
    if isinstance(v, (list, tuple)) and len(v) > SMALL:
        return f"{type(v).__name__} of {len(v)} items"
    return repr(v)


def _diff_tensor(expected: torch.Tensor, got: Any, rtol: float, atol: float) -> str | None:
    if not isinstance(got, torch.Tensor):
        try:
            got = torch.as_tensor(got)
        except (TypeError, ValueError, RuntimeError):
            return f"expected a tensor, got {type(got).__name__}"
    if tuple(got.shape) != tuple(expected.shape):
        return f"shape differs: expected {list(expected.shape)}, got {list(got.shape)}"
    e, g = expected.detach().cpu(), got.detach().cpu()
    if g.is_complex() or (g.dtype == torch.bool) != (e.dtype == torch.bool):
        return f"dtype differs: expected {e.dtype}, got {g.dtype}"
    if e.dtype.is_floating_point:
        bad = ~torch.isclose(g.double(), e.double(), rtol=rtol, atol=atol, equal_nan=False)
    else:
        if g.dtype.is_floating_point:
            return f"dtype differs: expected an integer tensor ({e.dtype}), got {g.dtype}"
        bad = g.long() != e.long()
    if not bool(bad.any()):
        return None
    idx = bad.nonzero().tolist()
    lines = [f"{len(idx)} of {e.numel()} elements differ" + (f" (the first {MAX_SHOWN}):" if len(idx) > MAX_SHOWN
                                                            else ":")]
    lines += [f"  at {tuple(i) if len(i) > 1 else i[0]}: expected {_num(e[tuple(i)].item())}, "
              f"got {_num(g[tuple(i)].item())}" for i in idx[:MAX_SHOWN]]
    return "\n".join(lines)


def compare(expected: Any, got: Any, rtol: float = 1e-6, atol: float = 1e-8) -> str | None:
    """None when got equals expected (within rtol/atol for floats), else a message saying what differs."""
    if isinstance(expected, torch.Tensor):
        return _diff_tensor(expected, got, rtol, atol)
    if isinstance(expected, bool) or expected is None:
        if isinstance(got, torch.Tensor) and got.numel() == 1 and got.dtype == torch.bool:
            got = bool(got.item())
        ok = got is None if expected is None else isinstance(got, bool) and got == expected
        return None if ok else f"expected {expected!r}, got {got!r}"
    if isinstance(expected, int):
        if isinstance(got, torch.Tensor) and got.numel() == 1 and not got.dtype.is_floating_point:
            got = int(got.item())
        ok = isinstance(got, int) and not isinstance(got, bool) and got == expected
        return None if ok else f"expected the int {expected}, got {got!r}"
    if isinstance(expected, float):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = float(got.item())
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"expected a number, got {got!r}"
        return None if abs(got - expected) <= atol + rtol * abs(expected) else f"expected {expected!r}, got {got!r}"
    if isinstance(expected, str):
        return None if got == expected else f"expected {expected!r}, got {got!r}"
    raise TypeError(f"compare: unsupported expected value of type {type(expected).__name__}")


def _compare_case(case: Case, got: Any) -> str | None:
    if case.parts is None:
        return compare(case.expected, got, case.rtol, case.atol)
    if not isinstance(got, (tuple, list)) or len(got) != len(case.parts):
        return f"expected a tuple of {len(case.parts)} ({', '.join(case.parts)}), got {_fmt(got)}"
    for name, e, g in zip(case.parts, case.expected, got):
        msg = compare(e, g, case.rtol, case.atol)
        if msg:
            return f"{name}: {msg}"
    return None


def _inputs(case: Case) -> str:
    return "\n".join(f"    {k} = {_fmt(v)}" for k, v in case.args.items())


def _value(case: Case, v: Any) -> str:
    if case.parts is None or not isinstance(v, (tuple, list)) or len(v) != len(case.parts):
        return _fmt(v)
    return "(" + ", ".join(f"{n}={_fmt(e)}" for n, e in zip(case.parts, v)) + ")"


def _explain(case: Case, got: Any, err: str, raised: bool) -> list[str]:
    """The line saying what differs; left out when it would only repeat two plain values of the same type."""
    scalar = case.parts is None and not isinstance(case.expected, torch.Tensor)
    if scalar and not raised and type(got) is type(case.expected):
        return []
    return ["  " + err.replace("\n", "\n  ")]


def run_check(check: str, fn: Callable, cases: Sequence[Case], hint: str = "", verbose: bool = True) -> CheckResult:
    """Call fn on every case in order, stop at the first wrong answer; print the report (verbose) and return it."""
    if not callable(fn):
        raise TypeError(f"{check}: pass your function itself (e.g. {check}(my_fn)), got {type(fn).__name__}")
    name = getattr(fn, "__name__", "your function")
    names = [c.name for c in cases]
    result = CheckResult(check, PASSED, len(cases), case_names=names)
    for i, case in enumerate(cases):
        args = [v.clone() if isinstance(v, torch.Tensor) else v for v in case.args.values()]
        raised = False
        try:
            got = fn(*args)
        except NotImplementedError:
            if i == 0:
                result.status = NOT_ATTEMPTED
                result.report = (f"· {check}: not attempted ({name} raises NotImplementedError). "
                                 f"Replace the stub's body with your code and run the cell again.")
                break
            got, err, raised = None, "raised NotImplementedError", True
        except Exception as e:  # the reader's bug: show it as this case's failure
            raised = True
            got, err = None, f"raised {type(e).__name__}: {e}\n" + "".join(
                traceback.format_exception(type(e), e, e.__traceback__, limit=-2)).rstrip()
        else:
            if got is None and i == 0 and case.expected is not None:
                result.status = NOT_ATTEMPTED
                result.report = (f"· {check}: not attempted ({name} returned None). "
                                 f"Write your code in the stub and run the cell again.")
                break
            err = _compare_case(case, got)
        if err is None:
            result.passed_cases += 1
            continue
        result.status, result.failed_case = FAILED, case.name
        result.expected, result.got = _value(case, case.expected), _value(case, got)
        result.report = "\n".join([
            f"✗ {check}: case {i + 1} of {len(cases)} ({case.name!r}) is wrong; "
            f"{result.passed_cases} passed before it.",
            "  inputs:", _inputs(case),
            f"  expected: {result.expected}",
            f"  got:      {result.got}",
        ] + _explain(case, got, err, raised) + ([f"  hint: {hint}"] if hint else []))
        break
    else:
        result.report = f"✓ {check}: all {len(cases)} cases pass ({', '.join(names)})."
    if verbose:
        print(result.report)
    return result
