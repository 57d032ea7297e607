"""One expert's GEMM on the CPU, three ways, and the choice among them by timing them on the weight itself.

Legend: w [E, N, K] an expert weight stack (w13 [E, 2F, D] or w2 [E, D, F]); one expert's GEMM takes a [n, K]
(its n rows) to out [n, N] = a @ w[e].t().
  "mm":     one torch.mm on the weight's transposed view (MKL in float32; oneDNN in bfloat16, which reorders the
            weight into its blocked layout on every call);
  "split":  one torch.bmm over column chunks of the weight (a view), so that every thread gets a share (expert_mm;
            float32 on a multi-threaded CPU only: column_chunks says when it applies);
  "packed": oneDNN's linear on the weight packed once into its blocked layout (moe_ref.packing).
Which is fastest depends on the machine, the dtype, the weight's size and n. Measured on two 2-core machines of this
project (one GEMM, 2 threads): on an AMD EPYC, MKL keeps a float32 product with few rows on one thread, so "split"
and "packed" beat "mm" by up to 2x at decode; on an Intel Xeon "mm" is as fast as either at 1 row and 2-3x faster
than "packed" on small weights ([512, 256]: ~6 µs against ~21 µs, oneDNN's fixed cost per call), while "packed"
wins at 4-64 rows on large ones, and bfloat16 "packed" wins up to ~64-256 rows on both. No fixed rule holds on
both, so prepack (tune=True) times the candidates on the weight itself at a few row counts (choose_gemms), and the
grouped strategy runs n rows with the method that was fastest at the nearest of them (GemmChoice.method_for).
Every method gives each output element the same products, summed in another order: equal within rounding.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn
from torch.utils.benchmark import Timer

__all__ = ["GEMM_METHODS", "GROUPED_MM_DTYPES", "grouped_mm_fn", "CHOICE_ROWS", "GemmChoice",
           "choose_gemms", "fixed_choice", "time_gemms", "column_chunks", "chunks_for", "expert_mm", "packed_linear",
           "SPLIT_ROWS", "SPLIT_MIN_COLS", "SPLIT_DTYPES", "SPLIT_PAYS", "split_pays", "plain_chunks"]

GEMM_METHODS = ("mm", "split", "packed")
CHOICE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)  # rows per expert at which prepack times the methods
COLD_BYTES = 16 << 20  # a timed pass cycles through experts until it reads this much weight (past the L2 caches)
ROUNDS = 5  # interleaved rounds per row count; the median decides
MM_TABLE_ROWS = 4096  # GemmChoice.mostly_mm looks row counts below this up in a table
BATCHED_ROWS = 1024  # prepack also times one torch.bmm over the experts ("batched") up to this many rows each

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

SPLIT_ROWS = 256  # float32 CPU GEMMs on at most this many rows may run as column chunks (column_chunks)
SPLIT_MIN_COLS = 64  # the narrowest column chunk expert_mm makes
SPLIT_DTYPES = (torch.float32,)
SPLIT_PAYS: bool | None = None  # force split_pays' answer (tests, or a user who knows the machine); None: measure
PROBE_ROWS = (2, 16)  # split_pays times both methods at these row counts ...
PROBE_SHAPE = (16, 512, 512)  # ... on 16 float32 experts of [512, 512] (16 MiB: not from cache)
_SPLIT_PAYS: dict[int, bool] = {}  # torch's thread count -> the measured answer


def grouped_mm_fn():
    """torch's grouped GEMM, or None when this torch has none."""
    return getattr(Fn, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def column_chunks(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> int:
    """How many column chunks expert_mm may split a GEMM rows-of-x [n, K] @ w[e].t() into (1: one torch.mm),
    for expert weights w [E, N, K] and (when given) the buffer `out` whose row blocks take the products.

    More than one only on a CPU with torch threads > 1, in a SPLIT_DTYPES dtype, w and out contiguous: the largest
    P of 64, 32, ..., 2 with P <= 4 x threads that divides N into chunks of >= SPLIT_MIN_COLS columns. Without a
    measured choice it is used for blocks of at most SPLIT_ROWS rows (chunks_for says which); decided once per
    call of ffn_rows, as it costs µs that a loop over many experts would pay on every GEMM.
    """
    threads = torch.get_num_threads()
    if (threads < 2 or x.device.type != "cpu" or x.dtype not in SPLIT_DTYPES or not w.is_contiguous()
            or (out is not None and not out.is_contiguous())):
        return 1
    N = w.shape[1]
    return next((p for p in (64, 32, 16, 8, 4, 2)
                 if p <= 4 * threads and N % p == 0 and N // p >= SPLIT_MIN_COLS), 1)


def chunks_for(rows: int, chunks: int) -> int:
    """The column chunks for a block of `rows` rows: `chunks` (column_chunks) up to SPLIT_ROWS rows, else 1."""
    return chunks if rows <= SPLIT_ROWS else 1


def expert_mm(a: torch.Tensor, wt: torch.Tensor, out: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """out [n, N] = a [n, K] @ wt [K, N], one expert's GEMM on a plain weight; wt is the transpose of its [N, K]
    weight (a view).

    chunks == 1: one torch.mm. chunks = P > 1 (N divisible by P, the weight and out contiguous): one torch.bmm over
    the weight's N output columns as P chunks [P, K, N/P] (a view: no weight copy), its [P, n, N/P] result copied
    into out's columns (n x N elements: small beside the weight). torch.bmm shares its batch among the threads,
    where MKL may keep a product with few rows on one (see the module docstring for when that pays).
    """
    if chunks == 1:
        return torch.mm(a, wt, out=out)
    n, K = a.shape
    C = wt.shape[1] // chunks
    t = torch.bmm(a.expand(chunks, n, K), wt.t().view(chunks, C, K).transpose(1, 2))  # [P, n, C]
    out.view(n, chunks, C).copy_(t.transpose(0, 1))
    return out


def packed_linear(a: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [n, N] = a [n, K] @ w.t() on one expert's packed weight (packing.PackedWeight: oneDNN's blocked layout);
    the op returns a new [n, N] product, copied into out."""
    y = torch.ops.mkldnn._linear_pointwise(a if a.is_contiguous() else a.contiguous(), packed, None, "none", [], "")
    return out.copy_(y)


@dataclass(frozen=True)
class GemmChoice:
    """The GEMM method for each row count of one weight stack: `methods[i]` was fastest at `rows[i]` rows.

    method_for(n) takes the timed row count nearest to n on a log scale (the boundaries are the geometric means of
    neighbours), the first below rows[0] and the last beyond rows[-1]. `seconds[i]` holds the medians that chose
    methods[i] ({method: seconds per GEMM}; empty for a fixed choice); `threads` is torch's thread count then (0: a
    fixed choice, for any count).
    """

    rows: tuple[int, ...]
    methods: tuple[str, ...]
    seconds: tuple[dict[str, float], ...] = ()
    threads: int = 0
    _limits: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _mm_at: tuple[bool, ...] = field(init=False, repr=False, compare=False)  # [n]: method_for(n) == "mm"
    _mm_below: int = field(init=False, repr=False, compare=False)
    _cost: list[float] | None = field(init=False, repr=False, compare=False)  # [i]: methods[i]'s seconds at rows[i]
    _cost_at: tuple[float, ...] | None = field(init=False, repr=False, compare=False)  # [n]: _linear of _cost at n
    _batched: tuple[tuple[int, ...], tuple[float, ...]] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.rows or len(self.rows) != len(self.methods) or list(self.rows) != sorted(set(self.rows)):
            raise ValueError(f"rows must be increasing and match methods, got {self.rows} and {self.methods}")
        bad = [m for m in self.methods if m not in GEMM_METHODS]
        if bad:
            raise ValueError(f"unknown GEMM method(s) {bad}; expected one of {GEMM_METHODS}")
        limits = tuple(math.sqrt(a * b) for a, b in zip(self.rows, self.rows[1:]))
        at = [bisect.bisect_left(limits, n) for n in range(MM_TABLE_ROWS)]  # [n]: index of the nearest timed count
        object.__setattr__(self, "_limits", limits)
        object.__setattr__(self, "_mm_at", tuple(self.methods[i] == "mm" for i in at))
        object.__setattr__(self, "_mm_below", next((n for n in range(1, MM_TABLE_ROWS) if not self._mm_at[n]),
                                                   MM_TABLE_ROWS))  # blocks of 1 .. _mm_below - 1 rows: all "mm"
        timed = len(self.seconds) == len(self.rows)
        cost = [s[m] for s, m in zip(self.seconds, self.methods)] if timed else None
        object.__setattr__(self, "_cost", cost)
        object.__setattr__(self, "_cost_at", None if cost is None else tuple(
            _linear(self.rows, cost, n) for n in range(MM_TABLE_ROWS)))
        at = [(n, s["batched"]) for n, s in zip(self.rows, self.seconds) if "batched" in s] if timed else []
        object.__setattr__(self, "_batched", tuple(zip(*at)) if at else None)  # (row counts, seconds) of the bmm

    def method_for(self, n: int) -> str:
        """The method for a block of n rows."""
        return self.methods[bisect.bisect_left(self._limits, n)]

    @property
    def uses_packed(self) -> bool:
        """Whether some row count runs on the oneDNN-packed copy."""
        return "packed" in self.methods

    def mostly_mm(self, sizes: list[int]) -> bool:
        """Whether at least half of the blocks of these row counts run as one plain torch.mm (blocks of 0 rows,
        which run nothing, are not counted). A table lookup per block below MM_TABLE_ROWS rows: a forward asks
        this with E blocks, on the clock."""
        top = max(sizes, default=0)
        if top < self._mm_below:
            return True  # every block with rows is a torch.mm (the common case at decode: one lookup)
        zeros = sizes.count(0)
        if top < MM_TABLE_ROWS:
            mm = sum(map(self._mm_at.__getitem__, sizes)) - zeros * self._mm_at[0]
        else:
            mm = sum(self.method_for(n) == "mm" for n in sizes if n)
        return 2 * mm >= len(sizes) - zeros

    def loop_seconds(self, sizes: list[int]) -> float | None:
        """The timed seconds of these blocks' GEMMs one by one, each by its method: for a block of n rows the chosen
        method's median, linear in n between the timed row counts around it (and from 0 at 0 rows), proportional
        to n past the last (_linear); a table lookup per block below MM_TABLE_ROWS rows, as in mostly_mm. None for
        a fixed choice."""
        cost = self._cost_at
        if cost is None:
            return None
        if max(sizes, default=0) < MM_TABLE_ROWS:
            return sum(map(cost.__getitem__, sizes))
        return sum(_linear(self.rows, self._cost, n) for n in sizes)

    def batched_seconds(self, rows: int, experts: int) -> float | None:
        """The timed seconds of one torch.bmm over `experts` blocks of `rows` rows (padded: every expert the same
        rows), from "batched" as _linear in rows over the row counts where it was timed (up to BATCHED_ROWS), so
        proportional to rows past the last of them; None where it was not timed (a fixed choice, or a choice made
        without the bmm)."""
        if self._batched is None:
            return None
        return _linear(*self._batched, rows) * experts

    def as_dict(self) -> dict:
        """{rows: {method, us: the medians in µs}}, for a JSON record or a printout."""
        return {str(n): dict(method=m, us={k: round(v * 1e6, 2) for k, v in (s or {}).items()})
                for n, m, s in zip(self.rows, self.methods, self.seconds or [None] * len(self.rows))}


def _linear(rows, seconds, n: int) -> float:
    """seconds timed at the increasing row counts `rows`, at n rows: linear between the counts around n and from
    (0, 0) below the first; proportional to n past the last (a GEMM of many rows costs about its rows)."""
    if n <= 0:
        return 0.0
    i = bisect.bisect_left(rows, n)  # rows[i-1] < n <= rows[i]
    if i == len(rows):
        return seconds[-1] * n / rows[-1]
    if rows[i] == n:
        return seconds[i]
    r0, s0 = (rows[i - 1], seconds[i - 1]) if i else (0, 0.0)
    return s0 + (seconds[i] - s0) * (n - r0) / (rows[i] - r0)


def fixed_choice(method: str) -> GemmChoice:
    """One method at every row count, whatever the thread count (prepack with tune=False: "packed")."""
    return GemmChoice((1,), (method,))


def _measure(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed by torch.utils.benchmark, interleaved round by round."""
    threads = torch.get_num_threads()  # Timer would run on its default of 1 thread

    def timer(f):
        return Timer("f()", globals={"f": f}, num_threads=threads)

    for fn in fns.values():
        fn()  # warm: first-call allocations and oneDNN's primitive cache
    number = {k: max(1, math.ceil(2e-3 / max(timer(f).timeit(1).median, 1e-7)))
              for k, f in fns.items()}  # ~2 ms per measurement
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # a new order each round (seeded): no method always runs right after the same one
        for k in order:
            times[k].append(timer(fns[k]).timeit(number[k]).median)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _candidates(a3: torch.Tensor, o3: torch.Tensor, w: torch.Tensor, experts: range, chunks: int,
                packed: tuple | None) -> dict[str, Callable[[], object]]:
    """{method: one pass, a GEMM of a3[i] [n, K] into o3[i] [n, N] for the i-th expert} for the methods that apply:
    every expert its own rows in and out, as the blocks of a forward."""
    wt = [(a3[i], w[e].t(), o3[i]) for i, e in enumerate(experts)]  # rows, [K, N] view, out
    fns = {"mm": lambda: [torch.mm(a, t, out=o) for a, t, o in wt]}
    if chunks > 1:
        fns["split"] = lambda: [expert_mm(a, t, o, chunks) for a, t, o in wt]
    if packed is not None:
        fns["packed"] = lambda: [packed_linear(a, packed[e], o) for (a, _, o), e in zip(wt, experts)]
    return fns


def _batched_pass(a3: torch.Tensor, o3: torch.Tensor, w: torch.Tensor, experts: range) -> Callable[[], object]:
    """The pass of _candidates as one torch.bmm of a3 [m, n, K] (one block per expert) by the m experts' weights."""
    w3 = w[experts.start:experts.stop].transpose(1, 2)
    return lambda: torch.bmm(a3, w3, out=o3)


def time_gemms(w: torch.Tensor, packed: tuple | None, rows: tuple[int, ...] = CHOICE_ROWS, rounds: int = ROUNDS,
               measure: Callable | None = None, batched: bool = False) -> list[dict[str, float]]:
    """For each row count n: {method: median seconds per GEMM of n rows} of w's candidate methods.

    A timed pass runs one GEMM per expert over enough experts to read COLD_BYTES of weight (all E where they hold
    less), as a forward does, at every row count. Measured on the dev machine (Xeon, bf16, cpu-fine w13 at 128 rows):
    a pass cut down to 5 experts (2.5 MiB, from the L2 caches) or 16 (8 MiB) timed mm and packed within noise of each
    other and chose either from run to run, where in the forward's loop packed was 14% faster; over 32 experts
    (16 MiB) packed won by 10-20% every time. Each expert of a pass reads rows of its own and writes an output of its
    own, as a forward's blocks do: when they all shared one [n, K] block and one output, the cpu-fine bf16 loop at
    T=4096 (~512 rows per expert) was estimated at 17 ms of GEMMs, against 38 ms in the forward, while the padded
    bmm, timed on rows of its own, was estimated at 0.68x of its forward: prepack chose the loop, which was 1.3x
    slower. It makes prepack slower at many rows (2-7 s per layer there).
    Candidates: "mm"; "split" where column_chunks allows it and n <= SPLIT_ROWS; "packed" when `packed` (one packed
    tensor per expert) is given; with `batched`, "batched" (one torch.bmm over the pass's experts) for
    n <= BATCHED_ROWS, timed apart from the others (it reads the plain weights, which it would leave in cache for
    whichever of them ran next: "mm" then reads those same weights, "packed" its own copy).
    `measure(fns, rounds)` -> {name: seconds per call} replaces the timer (tests).
    """
    measure = measure or _measure
    E, N, K = w.shape
    gen = torch.Generator().manual_seed(0)
    out_rows = []
    with torch.no_grad():
        for n in rows:
            per = N * K * w.element_size()
            m = max(1, min(E, math.ceil(COLD_BYTES / per)))
            a3 = torch.randn(m, n, K, generator=gen).to(w.dtype)  # [m, n, K]: every expert its own rows
            o3 = torch.empty(m, n, N, dtype=w.dtype)  # [m, n, N]
            chunks = column_chunks(a3[0], w, o3[0]) if n <= SPLIT_ROWS else 1
            seconds = measure(_candidates(a3, o3, w, range(m), chunks, packed), rounds)
            if batched and n <= BATCHED_ROWS:
                seconds.update(measure({"batched": _batched_pass(a3, o3, w, range(m))}, rounds))
            out_rows.append({k: v / m for k, v in seconds.items()})
    return out_rows


def choose_gemms(w: torch.Tensor, packed: tuple | None, rows: tuple[int, ...] = CHOICE_ROWS,
                 rounds: int = ROUNDS, measure: Callable | None = None) -> GemmChoice:
    """The fastest per-block method at each row count (time_gemms, "batched" timed too and kept in the seconds),
    as a GemmChoice."""
    seconds = time_gemms(w, packed, rows, rounds, measure, batched=True)
    methods = tuple(min((k for k in s if k in GEMM_METHODS), key=s.get) for s in seconds)
    return GemmChoice(tuple(rows), methods, tuple(seconds), torch.get_num_threads())


def split_pays(measure: Callable | None = None) -> bool:
    """Whether the column split (expert_mm with column_chunks) beats one torch.mm for a float32 GEMM on few rows on
    this machine at torch's current thread count: the rule of the plain path (grouped without prepack) for blocks of
    at most SPLIT_ROWS rows.

    It depends on the BLAS, not on the weight: MKL kept such products on one thread on the AMD EPYC of this project's
    development (the split took 0.39-0.91x of one torch.mm there) and shared them on an Intel Xeon (the split 1.1-1.4x
    slower). So it is measured once per thread count in a process (time_gemms at PROBE_ROWS on PROBE_SHAPE, ~0.1 s, on
    the first plain float32 forward with more than one thread), and yes only where the split wins at every probed
    row count. SPLIT_PAYS, when not None, answers instead. `measure` replaces the timer (tests).
    """
    if SPLIT_PAYS is not None:
        return SPLIT_PAYS
    threads = torch.get_num_threads()
    if threads not in _SPLIT_PAYS or measure is not None:
        w = torch.randn(*PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            times = time_gemms(w, None, PROBE_ROWS, ROUNDS, measure)
        _SPLIT_PAYS[threads] = all("split" in t and t["split"] < t["mm"] for t in times)
    return _SPLIT_PAYS[threads]


def plain_chunks(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> int:
    """The column chunks of the plain rule (no prepack): column_chunks where split_pays, else 1 (one torch.mm).
    The probe runs only where column_chunks would split."""
    chunks = column_chunks(x, w, out)
    return chunks if chunks == 1 or split_pays() else 1
