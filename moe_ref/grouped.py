"""Grouped strategies: route -> group by expert -> permute -> contiguous per-expert GEMMs -> unpermute.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, N grouped rows.
"grouped":    one GEMM pair per non-empty expert on its contiguous block (Python loop over experts),
              then the weighted combine (unpermute: one fused gather-weight-sum).
              `grouped_steps` runs the same steps and returns every intermediate (plan, xs, ys, y);
              `ffn_rows` is the one per-expert loop both use, on the blocks `expert_blocks` names; each of its
              GEMMs goes through `ExpertGemms`: after prepack (moe_ref.packing, CPU) by the method timed fastest
              for its row count (moe_ref.cpu_gemm: torch.mm, a column split, or the packed copy), else
              `expert_mm` (one torch.mm, or on a multi-threaded CPU in float32 with few rows, where cpu_gemm.split_pays
              measured that it beats one torch.mm, one torch.bmm over column chunks of the weight, so that every core
              gets a share). Where ffn_rows would run its batched path (one padded torch.bmm per weight), the
              strategy skips the grouped rows altogether: batched_moe gathers x straight into padded rows and
              combines straight out of them, a chunk of experts at a time (padded_ffn).
"grouped_mm": the same work in two calls of torch's grouped GEMM (F.grouped_mm / torch._grouped_mm),
              one group per expert, no loop. Its operands' strides must be multiples of 16 bytes,
              so D and F are zero-padded to that when they are not (exact: zeros add nothing).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as Fn

from .cpu_gemm import GROUPED_MM_DTYPES, SPLIT_ROWS, chunks_for, column_chunks, expert_mm, grouped_mm_fn, plain_chunks
from .grouping import DispatchPlan, RowPlan, _ints, group_by_expert, row_plan, slot_counts, slot_order
from .packing import packed_for
from .permute import combine_slots, permute, unpermute
from .reference import check_weights, swiglu
from .router import Routing, validate_routing
from .strategy import StrategyResult, register_strategy


class GroupedSteps(NamedTuple):
    """The intermediates of the grouped pipeline for x [T, D]."""

    plan: DispatchPlan  # counts [E], offsets [E+1], row order
    xs: torch.Tensor  # [N, D] token rows grouped by expert
    ys: torch.Tensor  # [N, D] each row through its expert's FFN
    y: torch.Tensor  # [T, D] each token's K rows of ys, weighted by its gate weights and summed (unpermute)


def expert_blocks(plan: DispatchPlan) -> Iterator[tuple[int, slice]]:
    """(e, rows) for each expert with work: rows = slice(offsets[e], offsets[e+1]) of the grouped order."""
    bounds = plan.offsets.tolist()  # [E+1]
    for e in _active(bounds):
        yield e, slice(bounds[e], bounds[e + 1])


def _active(bounds: list[int]) -> list[int]:
    """The experts whose block bounds[e]:bounds[e+1] has rows."""
    return [e for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def needs_grad(*ts: torch.Tensor | None) -> bool:
    """True when autograd records: grad mode on and some tensor requires grad (then no out= or in-place)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


STAGED_BYTES = 2 << 20  # gate/up rows [N, 2F] up to this size go through one SwiGLU for all experts (decode) ...
STAGED_BYTES_PER_EXPERT = 128 << 10  # ... or up to this much per expert with rows (many small experts, see ffn_rows)


def expert_ffn_into(e: int, xe: torch.Tensor, up: ExpertGemms, down: ExpertGemms, out: torch.Tensor
                    ) -> torch.Tensor:
    """out [n, D] = expert_ffn(xe [n, D]) through expert e, its GEMMs run by `up` (w13) and `down` (w2).

    No copy beyond the [n, 2F] and [n, F] GEMM outputs: the down GEMM writes straight into `out` (a row block of
    the caller's buffer; it may be xe itself, read in full before out is written), SwiGLU multiplies in place
    into silu(gate). Outside autograd only (ffn_rows runs the autograd case out of place).
    """
    F = down.shape[2]
    h = up.mm(e, xe, xe.new_empty(xe.shape[0], 2 * F))  # [n, 2F]: gate | up
    a = Fn.silu(h[:, :F])  # [n, F]
    a.mul_(h[:, F:])
    return down.mm(e, a, out)  # [n, D]


class ExpertGemms:
    """How one call of ffn_rows runs the GEMMs a [n, K] @ w[e].t() of one weight stack w [E, N, K]: mm(e, a, out).

    After prepack (moe_ref.packing), by the method its timing chose for n rows (cpu_gemm.GemmChoice: one torch.mm,
    a column split, or the packed copy in oneDNN's blocked layout); without it, expert_mm on the plain weight's
    transposed view, split by columns where column_chunks allows, n <= SPLIT_ROWS and split_pays (measured once per
    thread count). Decided once per call (the
    few µs of the decision are not paid per expert). `experts`: the experts that will be asked for (their views
    only are made when they are few, all E from one unbind otherwise).
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor, experts: list[int], out: torch.Tensor | None = None):
        self.shape = w.shape  # [E, N, K]
        self.packed = packed_for(w)
        self.choice = None if self.packed is None else self.packed.choice
        if self.choice is not None and self.choice.threads not in (0, torch.get_num_threads()):
            _warn_threads(self.packed)
        if self.choice is not None and self.choice.methods == ("packed",) * len(self.choice.methods):
            self.mm = self.packed.mm  # every row count on the packed copy
            return
        self._w, self._experts, self._wt = w, experts, None
        # the timed "split" method, or the plain rule (which splits only where that beats one torch.mm here)
        self.chunks = column_chunks(x, w, out) if self.choice is not None else plain_chunks(x, w, out)

    @property
    def wt(self):
        """The [K, N] transposed views of the experts asked for, made on first use (a loop in C++ needs none)."""
        if self._wt is None:
            w, experts = self._w, self._experts
            few = len(experts) * 4 < w.shape[0]
            self._wt = {e: w[e].t() for e in experts} if few else w.transpose(1, 2).unbind(0)
        return self._wt

    def mm(self, e: int, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [n, N] = a [n, K] @ w[e].t()."""
        n = a.shape[0]
        if self.choice is None:
            return expert_mm(a, self.wt[e], out, chunks_for(n, self.chunks))
        method = self.choice.method_for(n)
        if method == "packed":
            return self.packed.mm(e, a, out)
        return expert_mm(a, self.wt[e], out, self.chunks if method == "split" else 1)


CPP_LOOP = True  # small batches of plain torch.mm GEMMs may loop over the experts in torch's grouped GEMM (C++)


def loop_in_cpp(x: torch.Tensor, w: torch.Tensor, packed, sizes: list[int], out: torch.Tensor | None = None) -> bool:
    """Whether blocks of these row counts (one per expert, 0 for none) of the GEMMs rows-of-x @ w[e].t() may all run
    as plain torch.mm looped inside torch's grouped GEMM (torch_grouped_gemms); packed = packed_for(w); `out` as
    for column_chunks.

    Without prepack: when each already is one plain torch.mm (the same bits: no column split where column_chunks
    or split_pays rule it out, or the blocks are past SPLIT_ROWS). After prepack: when at least half of
    them are by the timed choice (the others then run torch.mm too: measured on the dev machine, a Python loop that
    switches between methods loses more, ~10 µs per GEMM at cpu-fine float32 T=64, than the minority's chosen
    method gains). Never for a fixed "packed" choice (tune=False).
    """
    if packed is None:
        return min(n for n in sizes if n) > SPLIT_ROWS or plain_chunks(x, w, out) == 1
    if packed.choice.threads not in (0, torch.get_num_threads()):
        _warn_threads(packed)
    return packed.choice.mostly_mm(sizes)


def torch_loop_fits(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch_grouped_gemms can run these operands: a CPU torch with a grouped GEMM, a dtype it takes,
    row strides and data pointers on 16-byte boundaries (its operand rule), contiguous operands."""
    elt = xs.element_size()
    return (xs.device.type == "cpu" and xs.dtype in GROUPED_MM_DTYPES and grouped_mm_fn() is not None
            and w13.is_contiguous() and w2.is_contiguous() and xs.is_contiguous()
            and (xs.shape[1] * elt) % 16 == 0 and (w2.shape[2] * elt) % 16 == 0
            and xs.data_ptr() % 16 == 0 and w13.data_ptr() % 16 == 0 and w2.data_ptr() % 16 == 0)


def torch_grouped_gemms(xs: torch.Tensor, bounds: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """ffn_rows's small-batch steps (every expert's up GEMM, one SwiGLU, every down GEMM) with each loop of plain
    torch.mm GEMMs in one call of torch's grouped GEMM: on the CPU it runs the same torch.mm on each expert's block,
    from C++ (the same bits; ~3 µs of Python saved per GEMM, ~0.3-0.6 ms per call at decode with E=64). It visits
    every one of the E groups, empty ones included (~1-3 µs each), so ffn_rows uses it when at least a quarter of
    the experts have rows (measured on the dev machine, float32: with 2-5 of 8 experts, or 16-21 of 64, it was
    4-13% faster than the Python loop; with 8 of 64, 16% slower).
    Returns a new [N, D] tensor (copying it into a caller's buffer would cost one more pass over it).
    """
    F = w2.shape[2]
    offs = _ints(bounds[1:], torch.int32)  # [E] end row of each block
    gmm = grouped_mm_fn()
    h = gmm(xs, w13.transpose(1, 2), offs=offs)  # [N, 2F]: gate | up
    a = Fn.silu(h[:, :F])  # [N, F]
    a.mul_(h[:, F:])
    return gmm(a, w2.transpose(1, 2), offs=offs)  # [N, D], a new tensor: torch's grouped GEMM takes no out=


BATCHED = True  # after prepack, a batch may run as one padded torch.bmm per weight where that was timed faster
BATCHED_MARGIN = 0.95  # ... by this factor at least (timing noise: the estimates where it loses are >= 1.03x)
BATCHED_BYTES = 256 << 20  # ... and its [E*C, 2F] gate/up buffer fits in this (memory: the loop's stay per expert)
PADDED_CHUNK_BYTES = 9 << 20  # padded_ffn's chunks of experts: rows, gate/up, SwiGLU and outputs within this


def batched_pays(pu, pd, sizes: list[int]) -> bool:
    """Whether prepack's timings say one padded torch.bmm per weight (padded_gemms: every expert's block padded to
    the busiest one's C rows) beats these blocks' GEMMs one by one, for the packs pu, pd = packed_for(w13),
    packed_for(w2): the "batched" seconds at C rows for all E experts against BATCHED_MARGIN x the sum of each
    block's chosen method, both weights together (GemmChoice.batched_seconds and loop_seconds: linear in rows
    between the timed counts). False without prepack's timing. Measured on the dev machine (Xeon, 2 threads), the
    grouped strategy with the padded path (batched_moe, chunked) against the loop it would run otherwise: cpu-fine
    bf16 0.61x at T=64, 0.80x at T=256, 0.88x at T=1024, 0.80x at T=2048 and 0.61x at T=4096, all taken (the
    timings say 0.6x-0.88x: they time one unchunked bmm, and the loop on its own rows rather than on a forward's);
    slower for E=8 large experts (1.06-1.41x at T=256-4096, but 0.89x at T=2048) and for float32 cpu-fine
    (1.06-1.23x), where it is not taken (the timings say 1.03x-1.32x)."""
    if pu is None or pd is None:
        return False
    E, C = len(sizes), max(sizes)
    bu, bd = pu.choice.batched_seconds(C, E), pd.choice.batched_seconds(C, E)
    if bu is None or bd is None:
        return False
    return bu + bd < BATCHED_MARGIN * (pu.choice.loop_seconds(sizes) + pd.choice.loop_seconds(sizes))


class PaddedRows(NamedTuple):
    """Where the batched path puts grouped rows: expert e's block in rows e*C .. e*C + C of a padded [E*C, D]."""

    experts: int  # E
    capacity: int  # C, the largest block
    dest: torch.Tensor  # [N] row in [E*C] of each grouped row


def padded_rows(bounds: list[int], sizes: list[int]) -> PaddedRows:
    """The padded layout of blocks with these bounds [E+1] and sizes [E] (row i of block e goes to e*C + i), on the
    CPU. Built in numpy: a few small arrays cost ~1 µs each against ~5 µs per torch op (13 µs against 33 µs at E=64,
    N=8192 on the dev machine)."""
    E, N, C = len(sizes), bounds[-1], max(sizes)
    shift = np.arange(0, E * C, C) - np.asarray(bounds[:-1], dtype=np.int64)  # [E] a block's grouped -> padded rows
    return PaddedRows(E, C, torch.from_numpy(np.repeat(shift, sizes) + np.arange(N)))


def padded_chunk(rows: PaddedRows, d_model: int, d_ff: int, element_size: int) -> int:
    """Experts per chunk of padded_ffn: all E where they fit, else the largest power of two whose chunk of rows,
    gate/up, SwiGLU and outputs (C * (2D + 3F) elements per expert) fits in PADDED_CHUNK_BYTES (one at least), so
    that each step reads what the one before it wrote while that is still in cache. Measured on the dev machine
    (Xeon, 2 threads, cpu-fine bf16, the strategy's own time): 8 experts a chunk were fastest at T=1024 (C=166; 11,
    13 or 16: 3-4 % slower, all 64 at once 13 % slower) and at T=2048 (4 or 12: 5-8 % slower), 4 about as fast as
    6 or 8 at T=4096 (C=586; 2 or 3: 17-30 % slower)."""
    E, C = rows.experts, rows.capacity
    fit = PADDED_CHUNK_BYTES // max(1, C * (2 * d_model + 3 * d_ff) * element_size)
    return E if fit >= E else 1 << (max(fit, 1).bit_length() - 1)


def padded_chunks(rows: PaddedRows, d_model: int, d_ff: int, element_size: int) -> list[tuple[int, int]]:
    """padded_ffn's chunks [(e0, e1)]: experts e0 .. e1-1 at a time, padded_chunk of them (the last one fewer)."""
    g = padded_chunk(rows, d_model, d_ff, element_size)
    return [(e0, min(rows.experts, e0 + g)) for e0 in range(0, rows.experts, g)]


def padded_ffn(buf: torch.Tensor, rows: PaddedRows, w13: torch.Tensor, w2: torch.Tensor,
               src: torch.Tensor | None = None) -> torch.Tensor:
    """The batched path's GEMMs alone: buf [E*C, D] (the rows of the padded layout) -> [E*C, D] as torch.bmm,
    [e, C, D] @ w13^T -> SwiGLU -> @ w2^T, over chunks of e experts (padded_chunk; one chunk at decode). Each output
    row depends on its own input row alone, so the padding rows may hold anything finite; they cost GEMM rows,
    which at decode are nearly free beside reading the weights once per call.

    src [E*C]: buf is x [T, D] instead, and padded row i is x[src[i]], gathered chunk by chunk just before its
    GEMMs (the grouped strategy's way: the gathered rows are still in cache when the first bmm reads them)."""
    E, C, F, D = rows.experts, rows.capacity, w2.shape[2], w2.shape[1]
    out = buf.new_empty(E * C, D)  # [E*C, D]
    for e0, e1 in padded_chunks(rows, D, F, buf.element_size()):
        lo, hi = e0 * C, e1 * C  # the chunk's padded rows
        xb = buf[lo:hi] if src is None else buf.index_select(0, src[lo:hi])  # [e*C, D]
        h = torch.bmm(xb.view(e1 - e0, C, -1), w13[e0:e1].transpose(1, 2))  # [e, C, 2F]: gate | up
        a = Fn.silu(h[..., :F])  # [e, C, F]
        a.mul_(h[..., F:])
        torch.bmm(a, w2[e0:e1].transpose(1, 2), out=out[lo:hi].view(e1 - e0, C, D))
    return out


def padded_gemms(xs: torch.Tensor, bounds: list[int], sizes: list[int], w13: torch.Tensor, w2: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    """ffn_rows's batched path on grouped rows: padded_ffn gathering its padded rows from xs [N, D] (expert e's block
    at rows e*C .., padded_rows; padding rows repeat grouped row 0), then each row's output written back to out
    [N, D] in grouped order (out may be xs: xs is read in full first). The grouped strategy gathers from x instead
    (batched_moe): each chunk's rows are gathered into a new tensor in both, so every bmm reads the same values at
    the same alignment and gives the same bits (a bmm on a view at another offset of a bigger buffer may not)."""
    rows = padded_rows(bounds, sizes)
    dest = rows.dest.to(xs.device)  # [N] padded row of each grouped row
    src = torch.zeros(rows.experts * rows.capacity, dtype=torch.long, device=xs.device)  # [E*C] grouped row of each
    src[dest] = torch.arange(bounds[-1], device=xs.device)
    return torch.index_select(padded_ffn(xs, rows, w13, w2, src=src), 0, dest, out=out)  # [N, D]


class PaddedPlan(NamedTuple):
    """The grouped strategy's plan on the padded path, built from the routing alone (no DispatchPlan)."""

    rows: PaddedRows  # the padded layout: expert e's rows at e*C .. e*C + C (dest [N]: of each grouped row)
    src: torch.Tensor  # [E*C] the token of each padded row (padding rows: token 0)
    slot_rows: torch.Tensor  # [S] the padded row of each slot (t*K + k), -1 where the slot is dropped
    dropped: bool  # whether any slot is


def padded_plan(topk_ids: torch.Tensor, sizes: list[int], dropped: bool) -> PaddedPlan:
    """The padded path's plan of topk_ids [T, K] (checked: grouping.slot_counts gives sizes [E] and dropped):
    the slots stably sorted by expert, as group_by_expert sorts them, so grouped row i (of expert e, rank r) lands
    on padded row e*C + r. Against group_by_expert + padded_rows + unpermute's lookup it skips the ranks, the
    inverse permutation and the grouped-order token ids: the padded rows need only where each slot goes. Built in
    numpy on the CPU, like padded_rows (the padded path is a CPU path: it is taken by prepack's CPU timings); the
    tensors go to topk_ids's device."""
    T, K = topk_ids.shape
    rows = padded_rows([0, *itertools.accumulate(sizes)], sizes)  # dest [N]: the padded row of each grouped row
    E, C, N, dev = rows.experts, rows.capacity, rows.dest.shape[0], topk_ids.device
    slots = slot_order(topk_ids.cpu(), E, dropped)[:N].numpy()  # [N] the slot of each grouped row
    dest = rows.dest.numpy()
    # padding rows repeat token 0: a GEMM's output row depends on its own input row alone, and theirs go unread
    src = np.zeros(E * C, dtype=np.int64)
    src[dest] = slots // K
    slot_rows = np.full(T * K, -1, dtype=np.int64) if dropped else np.empty(T * K, dtype=np.int64)
    slot_rows[slots] = dest
    return PaddedPlan(rows._replace(dest=rows.dest.to(dev)), torch.from_numpy(src).to(dev),
                      torch.from_numpy(slot_rows).to(dev), dropped)


def batched_moe(x: torch.Tensor, topk_ids: torch.Tensor, sizes: list[int], dropped: bool,
                topk_weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                plan: PaddedPlan | None = None) -> torch.Tensor:
    """The grouped strategy where ffn_rows would take its batched path, without the grouped rows [N, D]: x [T, D]
    gathered straight into padded rows (chunk by chunk, by padded_ffn), and the combine reading each kept slot's
    output from its padded row (padded_plan). Against permute + padded_gemms + unpermute it never writes or reads
    back grouped rows [N, D], on the way in or out, for the same bits: each kept row meets the same GEMMs in the
    same buffer, and the combine sums the same products in the same order. sizes [E], dropped: from
    grouping.slot_counts of topk_ids [T, K]; plan: their padded_plan where the caller has it already. Returns
    y [T, D]."""
    plan = padded_plan(topk_ids, sizes, dropped) if plan is None else plan
    ys = padded_ffn(x, plan.rows, w13, w2, src=plan.src)  # [E*C, D]
    return combine_slots(ys, plan.slot_rows, topk_weights, dropped=dropped)


class ForwardPlan(NamedTuple):
    """What the grouped strategy's forward (outside autograd) decides and builds before it copies a row."""

    path: str  # ffn_rows's way (one of FFN_PATHS)
    sizes: list[int]  # [E] rows per expert
    bounds: list[int]  # [E+1] each expert's block of grouped rows
    dropped: bool  # whether any slot is dropped
    xs: torch.Tensor | None  # [N, D] the grouped rows' buffer, still empty (None on the batched path: no xs)
    plan: RowPlan | PaddedPlan  # padded_plan on the batched path, row_plan on every other


def forward_plan(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> ForwardPlan:
    """The grouped strategy's plan of a forward on x [T, D] and topk_ids [T, K] (checked ids): the slot counts
    first (the padded path needs no grouped-order plan), ffn_rows's way decided on the layout of the [N, D] buffer
    the rows will be permuted into, then the plan that way reads."""
    E = w13.shape[0]
    counts, dropped = slot_counts(topk_ids, E)  # [E]
    bounds = [0, *itertools.accumulate(counts)]  # [E+1]
    xs = x.new_empty(bounds[-1], x.shape[1])  # [N, D]: ffn_rows's way is decided on its layout, then filled
    path, sizes = _decide(xs, bounds, w13, w2, xs)
    if path == "batched":  # x straight into the padded rows and the combine straight out of them: no xs
        return ForwardPlan(path, sizes, bounds, dropped, None, padded_plan(topk_ids, sizes, dropped))
    return ForwardPlan(path, sizes, bounds, dropped, xs, row_plan(topk_ids, E, counts, dropped))


def _warn_threads(packed) -> None:
    if not packed.warned_threads:
        packed.warned_threads = True
        warnings.warn(f"the GEMMs of an expert weight {list(packed.shape)} were timed by prepack with "
                      f"{packed.choice.threads} torch threads and now run with {torch.get_num_threads()}: the choice "
                      "may no longer be the fastest; call prepack again (MoELayer.prepack())", RuntimeWarning,
                      stacklevel=4)


FFN_PATHS = ("autograd", "empty", "cpp_loop", "batched", "staged", "per_expert")  # ffn_rows's ways (ffn_path)


def ffn_path(xs: torch.Tensor, bounds: list[int], w13: torch.Tensor, w2: torch.Tensor,
             out: torch.Tensor | None = None) -> str:
    """Which of ffn_rows's ways these arguments take (one of FFN_PATHS; ffn_rows makes the same decision):
    "autograd" (out of place per expert), "empty" (no rows), "cpp_loop" (torch's grouped GEMM loops in C++),
    "batched" (one padded torch.bmm per weight), "staged" (every up GEMM, one SwiGLU, every down GEMM) or
    "per_expert" (each expert's GEMM pair in turn). xs may be an empty tensor of the right shape: only its shape,
    dtype, device, strides and alignment are read."""
    return _decide(xs, bounds, w13, w2, out)[0]


def _decide(xs, bounds, w13, w2, out) -> tuple[str, list[int] | None]:
    """(path, sizes [E] rows per expert) for ffn_rows and ffn_path."""
    E, N, F = w13.shape[0], bounds[-1], w2.shape[2]
    if needs_grad(xs, w13, w2):
        return "autograd", None
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]  # [E] rows per expert
    idle = sizes.count(0)
    if idle == E:
        return "empty", sizes
    staged = N * 2 * F * xs.element_size() <= max(STAGED_BYTES, (E - idle) * STAGED_BYTES_PER_EXPERT)
    pu, pd = packed_for(w13), packed_for(w2)  # looked up once for both decisions
    if (staged and CPP_LOOP and 4 * (E - idle) >= E and torch_loop_fits(xs, w13, w2)
            and loop_in_cpp(xs, w13, pu, sizes) and loop_in_cpp(xs, w2, pd, sizes, out)):
        return "cpp_loop", sizes  # torch's loop visits all E groups: >= 1/4 have rows here
    if BATCHED and E * max(sizes) * 2 * F * xs.element_size() <= BATCHED_BYTES and batched_pays(pu, pd, sizes):
        return "batched", sizes
    return ("staged" if staged else "per_expert"), sizes


def ffn_rows(xs: torch.Tensor, bounds: list[int], w13: torch.Tensor, w2: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """ys [N, D] with ys[a:b] = expert_ffn(xs[a:b]) through expert e for each block a, b = bounds[e], bounds[e+1].

    The one per-expert loop of the grouped strategy and of the benchmark's GEMM-only bound: one GEMM pair per
    expert with work, on contiguous row blocks of xs [N, D]. ys is `out` [N, D] (which may be xs itself; None: a
    new buffer), written block by block, except where the loop runs inside torch's grouped GEMM: that returns its
    own new tensor and leaves out as it was (it takes no out=, and a copy would cost a pass over [N, D]).
    Each step costs a few µs of calls, so the loop is arranged to make few of them:
      - large batches: expert_ffn_into per expert (its [n, 2F] and [n, F] intermediates stay small, in cache);
      - small batches (gate/up rows [N, 2F] within STAGED_BYTES, or STAGED_BYTES_PER_EXPERT per expert with rows):
        every expert's first GEMM into one [N, 2F] buffer, one SwiGLU over all of it, then every expert's down GEMM:
        two calls per expert instead of six, for one more pass over [N, 2F]. Measured on the dev machine (Xeon, 2
        threads): with E=64 small experts staging [N, 2F] of 4-8 MiB was 2-13% faster than per expert, with E=8
        large ones 3% slower at 8 MiB;
      - row blocks from one split when most experts have work, one slice per expert with work when few do
        (decode: E views would cost more than the few experts' GEMMs);
      - small batches where at least 1/4 of the experts have rows and their GEMMs are (mostly, after prepack) plain
        torch.mm: the two loops of GEMMs inside torch's grouped GEMM (torch_grouped_gemms: torch.mm per block, C++);
      - otherwise, after prepack, where its timings say so (batched_pays) and the padded gate/up buffer [E*C, 2F]
        fits in BATCHED_BYTES: one padded torch.bmm per weight over all E experts (padded_gemms);
      - every GEMM through ExpertGemms: by the method prepack timed fastest for its row count (torch.mm, a column
        split or the packed copy), else one torch.mm each (float32 on few rows, several threads: split by columns).
    Either way each row gets its expert's GEMMs and the same elementwise SwiGLU (the same bits for the same
    methods; another method sums the same products in another order). ffn_path names the way a call takes.
    """
    path, sizes = _decide(xs, bounds, w13, w2, out)
    return _run(path, sizes, xs, bounds, w13, w2, out)


def _run(path: str, sizes: list[int] | None, xs: torch.Tensor, bounds: list[int], w13: torch.Tensor,
         w2: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """ffn_rows by the way _decide chose."""
    E, N, F = w13.shape[0], bounds[-1], w2.shape[2]
    if path == "autograd":  # out of place per expert, each block sliced as it is written
        out = xs.new_empty(N, w2.shape[1]) if out is None else out  # [N, D]
        for e in _active(bounds):
            rows = slice(bounds[e], bounds[e + 1])
            out[rows] = swiglu(xs[rows] @ w13[e].t()) @ w2[e].t()
        return out
    if path == "cpp_loop":
        return torch_grouped_gemms(xs, bounds, w13, w2)
    out = xs.new_empty(N, w2.shape[1]) if out is None else out  # [N, D]
    if path == "empty":
        return out
    if path == "batched":
        return padded_gemms(xs, bounds, sizes, w13, w2, out)
    active = [e for e, n in enumerate(sizes) if n]
    few = len(active) * 4 < E

    def blocks(t: torch.Tensor):  # t's row block of each expert, indexed by e
        return {e: t[bounds[e]:bounds[e + 1]] for e in active} if few else t.split(sizes)

    up, down = ExpertGemms(xs, w13, active), ExpertGemms(xs, w2, active, out)
    xb, ob = blocks(xs), blocks(out)
    if path == "per_expert":
        for e in active:
            expert_ffn_into(e, xb[e], up, down, ob[e])
        return out
    h = xs.new_empty(N, 2 * F)  # [N, 2F]: gate | up of every row
    hb = blocks(h)
    for e in active:
        up.mm(e, xb[e], hb[e])
    a = Fn.silu(h[:, :F])  # [N, F]
    a.mul_(h[:, F:])
    ab = blocks(a)
    for e in active:
        down.mm(e, ab[e], ob[e])
    return out


def grouped_ffn(xs: torch.Tensor, plan: DispatchPlan, w13: torch.Tensor, w2: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """ys [N, D]: each expert's FFN on its contiguous block of xs [N, D] (the blocks expert_blocks names).

    Written into `out` where ffn_rows writes in place (default: a new [N, D] buffer; out=xs overwrites each block
    with its output); use the returned tensor, which is not `out` where the loop ran inside torch's grouped GEMM.
    """
    return ffn_rows(xs, plan.offsets.tolist(), w13, w2, out)


def grouped_steps(x2d: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor,
                  method: str = "argsort") -> GroupedSteps:
    """The "grouped" strategy on x2d [T, D] step by step: group (by `method`), permute, expert FFNs, combine.

    Returns GroupedSteps(plan, xs [N, D], ys [N, D], y [T, D]); y is bit for bit the strategy's output (which
    runs the same steps but writes ys over xs, one [N, D] buffer instead of two; on ffn_rows's batched path it
    makes neither, batched_moe).
    Routing ids may be -1 (dropped): those assignments are skipped and contribute zero.
    """
    E, _, _ = check_weights(x2d, w13, w2)
    validate_routing(routing, x2d.shape[0], E, allow_dropped=True)
    plan = group_by_expert(routing.topk_ids, E, method=method)
    xs = permute(x2d, plan)  # [N, D]
    ys = grouped_ffn(xs, plan, w13, w2)  # [N, D]
    return GroupedSteps(plan, xs, ys, unpermute(ys, plan, routing.topk_weights))


@register_strategy("grouped")
def grouped_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
                capacity: int | None = None) -> StrategyResult:
    if needs_grad(x, w13, w2):
        plan = group_by_expert(r.topk_ids, w13.shape[0])
        ys = grouped_ffn(permute(x, plan), plan, w13, w2)  # [N, D], out of place
        return StrategyResult(unpermute(ys, plan, r.topk_weights), computed_rows=plan.num_rows)
    f = forward_plan(x, r.topk_ids, w13, w2)
    if f.path == "batched":
        y = batched_moe(x, r.topk_ids, f.sizes, f.dropped, r.topk_weights, w13, w2, f.plan)
        return StrategyResult(y, computed_rows=f.bounds[-1])
    torch.index_select(x, 0, f.plan.token_ids, out=f.xs)  # permute
    # each expert's output overwrites its own input block: one [N, D] buffer, not two
    ys = _run(f.path, f.sizes, f.xs, f.bounds, w13, w2, f.xs)  # [N, D]
    y = combine_slots(ys, f.plan.slot_rows, r.topk_weights, dropped=f.dropped)  # unpermute
    return StrategyResult(y, computed_rows=f.bounds[-1])


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_expert_weights(w13: torch.Tensor, w2: torch.Tensor, multiple: int):
    """Zero-pad D and F up to `multiple` elements: w13 [E, 2F, D] -> [E, 2Fp, Dp], w2 -> [E, Dp, Fp]."""
    E, F2, D = w13.shape
    F = F2 // 2
    Dp, Fp = _pad_to(D, multiple), _pad_to(F, multiple)
    if (Dp, Fp) == (D, F):
        return w13, w2
    w13p = w13.new_zeros(E, 2 * Fp, Dp)
    w13p[:, :F, :D] = w13[:, :F]  # gate rows
    w13p[:, Fp:Fp + F, :D] = w13[:, F:]  # up rows (padded gate rows give silu(0)*0 = 0)
    w2p = w2.new_zeros(E, Dp, Fp)
    w2p[:, :D, :F] = w2
    return w13p, w2p


@register_strategy("grouped_mm")
def grouped_mm_moe(x: torch.Tensor, r: Routing, w13: torch.Tensor, w2: torch.Tensor,
                   capacity: int | None = None) -> StrategyResult:
    gmm = grouped_mm_fn()
    if gmm is None:
        raise RuntimeError(f"strategy 'grouped_mm' needs torch.nn.functional.grouped_mm or torch._grouped_mm, "
                           f"which torch {torch.__version__} lacks; use strategy='grouped'")
    if x.dtype not in GROUPED_MM_DTYPES:
        raise TypeError(f"strategy 'grouped_mm' supports {GROUPED_MM_DTYPES}, got {x.dtype}; "
                        "use strategy='grouped' for float64")
    E, D = w13.shape[0], x.shape[1]
    plan = group_by_expert(r.topk_ids, E)
    if plan.num_rows == 0:
        return StrategyResult(torch.zeros_like(x), computed_rows=0)
    multiple = 16 // x.element_size()  # 16-byte stride rule
    w13p, w2p = pad_expert_weights(w13, w2, multiple)
    Dp, Fp = w13p.shape[2], w2p.shape[2]
    xs = permute(x, plan)  # [N, D]
    if Dp != D:
        xs = Fn.pad(xs, (0, Dp - D))  # [N, Dp]
    offs = plan.offsets[1:].to(torch.int32)  # [E] end row of each expert's group
    h = gmm(xs, w13p.transpose(1, 2), offs=offs)  # [N, 2Fp]: gate | up
    if needs_grad(x, w13, w2):  # autograd: the same steps out of place
        ys = gmm(swiglu(h), w2p.transpose(1, 2), offs=offs)  # [N, Dp]
    else:
        a = Fn.silu(h[:, :Fp])  # [N, Fp], SwiGLU in place
        a.mul_(h[:, Fp:])
        ys = gmm(a, w2p.transpose(1, 2), offs=offs)  # [N, Dp]
    y = unpermute(ys, plan, r.topk_weights)  # [T, Dp]
    return StrategyResult(y if Dp == D else y[:, :D].contiguous(), computed_rows=plan.num_rows)
