"""Token grouping: reorder the T*K (token, choice) assignments so each expert's are contiguous.

Legend: T tokens, K top-k, E experts, N kept assignments (T*K minus dropped), S = T*K slots.
A "slot" is one (token, choice) pair, numbered s = t*K + k. Grouping is a stable sort of the
slots by expert id; two ways to build it are given so they can be compared:
  "argsort":  a stable argsort of the expert ids (torchtitan, HF grouped_mm);
  "counting": histogram -> prefix sum -> each slot's rank within its expert -> scatter
              (the counting sort GPU kernels use: vLLM moe_align_block_size, DeepSpeed cumsum).
Both give the same plan: within an expert, slots stay in token order.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

GROUPING_METHODS = ("argsort", "counting")


@dataclass
class DispatchPlan:
    """Where every assignment goes.

    counts:       [E] int64 kept assignments per expert.
    offsets:      [E+1] int64 exclusive prefix sum of counts: expert e owns rows offsets[e]:offsets[e+1].
    sorted_slots: [N] int64 slot id (t*K + k) of each grouped row.
    token_ids:    [N] int64 token of each grouped row (sorted_slots // K).
    inverse:      [S] int64 grouped row of each slot, -1 for a dropped slot.
    rank:         [S] int64 position of each slot within its expert's block, -1 for dropped.
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_slots: torch.Tensor
    token_ids: torch.Tensor
    inverse: torch.Tensor
    rank: torch.Tensor
    num_tokens: int
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_rows(self) -> int:
        """N, the number of grouped rows."""
        return self.sorted_slots.shape[0]

    def expert_of_row(self) -> torch.Tensor:
        """[N] expert id of each grouped row."""
        return torch.repeat_interleave(torch.arange(self.num_experts, device=self.counts.device), self.counts)


def stable_sort(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.sort(key, stable=True) of a 1-D integer key: (sorted keys, order), the same on every path.

    On the CPU, 16-bit keys are sorted by numpy's stable argsort, a radix sort: torch's CPU sort takes a comparison
    sort below ~16k elements (measured on this project's 2-core dev machine: 8,192 int16 keys in ~280 µs against
    ~30 µs; at 32,768 both radix-sort, 160 µs against 120 µs). A stable sort has one answer: both give the same order.
    """
    if key.device.type == "cpu" and key.dtype == torch.int16 and key.dim() == 1:
        order = _order(key)  # [S] int64
        return key.index_select(0, order), order
    return torch.sort(key, stable=True)


def _order(key: torch.Tensor) -> torch.Tensor:
    """The order alone of stable_sort(key), by the same rule."""
    if key.device.type == "cpu" and key.dtype == torch.int16 and key.dim() == 1:
        return torch.from_numpy(np.argsort(key.numpy(), kind="stable"))  # [S] int64
    return torch.sort(key, stable=True)[1]


def _key(flat: torch.Tensor, num_experts: int, dropping: bool) -> torch.Tensor:
    """The sort key of flat [S] ids: dropped slots get key E so they sort past every real expert; in the narrowest
    integer type that holds E (a stable sort of int16 keys is ~3x faster than of int64)."""
    key_dtype = torch.int16 if num_experts < 2**15 else torch.int64
    return (torch.where(flat >= 0, flat, num_experts) if dropping else flat).to(key_dtype)


def slot_order(topk_ids: torch.Tensor, num_experts: int, dropped: bool) -> torch.Tensor:
    """[S] the slots t*K + k of topk_ids [T, K] stably sorted by expert, dropped slots (-1) last: the order of
    group_by_expert's sorted_slots (its first N), without the sorted keys. dropped: whether any slot is -1."""
    return _order(_key(topk_ids.reshape(-1), num_experts, dropped))  # [S]


SMALL_SLOTS = 64  # up to this many CPU slots (decode) the "argsort" plan is built in Python from one .tolist()


def _py_counts(flat: list[int], num_experts: int) -> list[int]:
    """Kept slots per expert [E] of the ids flat [S] (Python ints), checked to lie in [-1, E-1]."""
    if flat and (max(flat) >= num_experts or min(flat) < -1):
        raise ValueError(f"topk_ids values must be in [-1, {num_experts - 1}], got [{min(flat)}, {max(flat)}]")
    counts = [0] * num_experts
    for e in flat:
        if e >= 0:
            counts[e] += 1
    return counts


def _py_sorted_slots(flat: list[int]) -> list[int]:
    """The kept slots (id >= 0) of the ids flat [S], stably sorted by expert (within an expert: token order)."""
    return sorted((s for s, e in enumerate(flat) if e >= 0), key=flat.__getitem__)


def _small_plan(topk_ids: torch.Tensor, num_experts: int) -> DispatchPlan:
    """The "argsort" plan of a few CPU slots, built in Python: the same tensors as the vectorised path (a stable sort
    of the slots by expert), from one copy of the ids and six small tensors instead of ~20 tensor ops, whose fixed
    costs (a few µs each, more with cold caches between two layers' GEMMs) are most of a decode plan's time."""
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1).tolist()  # [S] ints
    counts = _py_counts(flat, num_experts)
    offsets = [0] * (num_experts + 1)
    for e in range(num_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    sorted_slots = _py_sorted_slots(flat)  # [N]
    inverse, rank = [-1] * len(flat), [-1] * len(flat)
    for row, s in enumerate(sorted_slots):
        inverse[s], rank[s] = row, row - offsets[flat[s]]
    long = torch.long
    return DispatchPlan(counts=torch.tensor(counts, dtype=long), offsets=torch.tensor(offsets, dtype=long),
                        sorted_slots=torch.tensor(sorted_slots, dtype=long),
                        token_ids=torch.tensor([s // K for s in sorted_slots], dtype=long),
                        inverse=torch.tensor(inverse, dtype=long), rank=torch.tensor(rank, dtype=long),
                        num_tokens=T, top_k=K)


def _check_ids(topk_ids) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be a [T, K] tensor, got {getattr(topk_ids, 'shape', topk_ids)}")
    if topk_ids.dtype.is_floating_point:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")


def _counts(flat: torch.Tensor, num_experts: int, keep_valid: bool = False):
    """(dropping, valid [S] or None, counts [E]) of flat [S] int64 ids: dropping, whether some slot is -1; valid
    marks the kept slots, None where every slot is kept (unless keep_valid); the ids are checked to lie in
    [-1, E-1] (one reduction, one sync)."""
    lo, hi = (int(v) for v in torch.aminmax(flat)) if flat.numel() else (0, 0)
    if hi >= num_experts or lo < -1:
        raise ValueError(f"topk_ids values must be in [-1, {num_experts - 1}], got [{lo}, {hi}]")
    dropping = lo < 0  # some slot is -1
    valid = flat >= 0 if dropping or keep_valid else None  # [S]
    return dropping, valid, torch.bincount(flat[valid] if dropping else flat, minlength=num_experts)  # [E]


def slot_counts(topk_ids: torch.Tensor, num_experts: int) -> tuple[list[int], bool]:
    """(rows [E]: kept slots per expert, whether any slot of topk_ids [T, K] is dropped (-1)), with the checks of
    group_by_expert: what a strategy needs to choose its way before it builds a plan (row_plan then builds
    it without counting again). A few CPU slots (decode) are counted in Python from one .tolist()."""
    _check_ids(topk_ids)
    if topk_ids.device.type == "cpu" and topk_ids.numel() <= SMALL_SLOTS:
        flat = topk_ids.reshape(-1).tolist()
        return _py_counts(flat, num_experts), -1 in flat
    dropping, _, counts = _counts(topk_ids.reshape(-1).long(), num_experts)
    return counts.tolist(), dropping


def slot_tokens(slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """The token of each slot index (slot s = t*K + k belongs to token t)."""
    k = max(top_k, 1)  # a power of two divides by a shift (integer division has no vector instructions: ~10x slower)
    return slots >> (k.bit_length() - 1) if k & (k - 1) == 0 else slots // k


def group_by_expert(topk_ids: torch.Tensor, num_experts: int, method: str = "argsort") -> DispatchPlan:
    """Build the DispatchPlan for topk_ids [T, K] (entries -1 are dropped and skipped)."""
    _check_ids(topk_ids)
    if method not in GROUPING_METHODS:
        raise ValueError(f"method must be one of {GROUPING_METHODS}, got {method!r}")
    T, K = topk_ids.shape
    if method == "argsort" and topk_ids.device.type == "cpu" and 0 < T * K <= SMALL_SLOTS:
        return _small_plan(topk_ids, num_experts)
    flat = topk_ids.reshape(-1).long()  # [S]
    dropping, valid, counts = _counts(flat, num_experts, keep_valid=method == "counting")  # bool, [S] or None, [E]
    return _plan(flat, T, K, num_experts, method, dropping, valid, counts)


class RowPlan(NamedTuple):
    """What a forward of the grouped strategy reads of a plan: DispatchPlan's token_ids and inverse alone."""

    token_ids: torch.Tensor  # [N] the token (row of x) of each grouped row
    slot_rows: torch.Tensor  # [S] the grouped row of each slot t*K + k, -1 where it is dropped


def row_plan(topk_ids: torch.Tensor, num_experts: int, rows: list[int], dropped: bool) -> RowPlan:
    """group_by_expert's token_ids and inverse of topk_ids [T, K], given slot_counts's (rows [E], dropped) of these
    very ids: without checking and counting them again, and without the counts, offsets and ranks as tensors
    (the grouped strategy's forward keeps its counts as Python ints and reads no rank)."""
    T, K = topk_ids.shape
    if topk_ids.device.type == "cpu" and 0 < T * K <= SMALL_SLOTS:
        return _small_rows(topk_ids)
    N, dev = sum(rows), topk_ids.device
    slots = slot_order(topk_ids, num_experts, dropped)[:N]  # [N] the slot of each grouped row
    slot_rows = (torch.full((T * K,), -1, dtype=torch.long, device=dev) if dropped
                 else torch.empty(T * K, dtype=torch.long, device=dev))
    slot_rows.scatter_(0, slots, torch.arange(N, device=dev))
    return RowPlan(slot_tokens(slots, K), slot_rows)


def _small_rows(topk_ids: torch.Tensor) -> RowPlan:
    """row_plan of a few CPU slots (ids already checked), in Python as _small_plan builds its plan, but only the two
    tensors a forward reads (each new tensor costs a few µs at decode: ~12 µs against ~40 µs for the whole plan)."""
    K = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).tolist()  # [S] ints
    sorted_slots = _py_sorted_slots(flat)  # [N]
    inverse = [-1] * len(flat)
    for row, s in enumerate(sorted_slots):
        inverse[s] = row
    return RowPlan(_ints([s // K for s in sorted_slots]), _ints(inverse))


def _ints(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A 1-D CPU tensor of these ints (int64 or int32) through an array buffer (~2 µs, against ~4-5 µs for
    torch.tensor of a list)."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array("q" if dtype == torch.int64 else "i", values), dtype=dtype)


def _plan(flat, T, K, num_experts, method, dropping, valid, counts) -> DispatchPlan:
    """The vectorised plan of flat [S] ids, given their counts [E] (and valid [S] where dropping or "counting")."""
    dev, S = flat.device, flat.numel()
    offsets = counts.new_zeros(num_experts + 1)
    torch.cumsum(counts, 0, out=offsets[1:])  # [E+1]
    N = int(offsets[-1]) if dropping else S
    slots = torch.arange(S, device=dev)  # [S]
    if method == "argsort":
        expert_sorted, order = stable_sort(_key(flat, num_experts, dropping))  # [S] each: dropped slots last
        sorted_slots = order[:N]  # [N]
        block_start = offsets.index_select(0, expert_sorted[:N].long())  # [N] first row of each row's expert
        rank = torch.full((S,), -1, dtype=torch.long, device=dev) if dropping else torch.empty_like(slots)
        rank.scatter_(0, sorted_slots, slots[:N] - block_start)
    else:
        # rank of each slot within its expert = how many earlier slots chose the same expert
        onehot = torch.zeros(S, num_experts, dtype=torch.long, device=dev)  # [S, E]
        onehot[valid.nonzero().squeeze(1), flat[valid]] = 1
        rank_all = onehot.cumsum(0) - onehot  # [S, E] exclusive running count per expert
        rank = torch.where(valid, rank_all.gather(1, flat.clamp(min=0)[:, None]).squeeze(1), -1)  # [S]
        dest = offsets[flat.clamp(min=0)] + rank  # [S] grouped row of each slot
        sorted_slots = torch.empty(N, dtype=torch.long, device=dev)
        sorted_slots[dest[valid]] = slots[valid]  # scatter
    inverse = torch.full((S,), -1, dtype=torch.long, device=dev) if dropping else torch.empty_like(slots)
    inverse.scatter_(0, sorted_slots, slots[:N])  # every slot is written unless some are dropped
    token_ids = slot_tokens(sorted_slots, K)  # [N]
    return DispatchPlan(counts=counts, offsets=offsets, sorted_slots=sorted_slots,
                        token_ids=token_ids, inverse=inverse, rank=rank,
                        num_tokens=T, top_k=K)
