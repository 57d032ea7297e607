"""The device benchmark: every provider side by side on real MoE shapes, against the device's own limits.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, H hit experts (distinct experts with >= 1 token).

For each shape (Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B, DeepSeek-V3 routed experts) and each token count,
one routing (random x through the layer's router: balanced-ish; `skew` > 0 biases it Zipf-like) is timed
through every provider, at the strategy level (x, routing -> y; the router and the layer's input checks
are outside the timed region for all of them):
  loop        per-expert boolean selection (Hugging Face eager style, host sync per expert)
  grouped     sort, permute, one GEMM pair per expert, unpermute
  grouped_mm  permute -> grouped_mm -> SwiGLU -> grouped_mm -> combine (torch's grouped GEMM)
  hf_*        Hugging Face transformers' experts implementations (eager, grouped_mm, batched_mm), when
              moe_ref.hf and transformers are installed
  triton      moe_ref.kernels.fused_moe (aligned grouping, fused gather-GEMM-SwiGLU, weighted combine)
  triton_graph  the same kernels captured once per (shape, T) in a CUDA graph and replayed: what a serving
              engine does for decode, where Python and launch overheads are a large share of a call.
              The peers run eagerly (the `loop` and `grouped` strategies sync with the host and
              cannot be captured); CUDA only
Measured in the same run: device copy bandwidth (a large buffer copy, read + write bytes) and a dense
matmul rate (square GEMMs in the benchmark dtype). Each result reports
  ms (median), TFLOP/s of useful work (6*D*F*T*K), GB/s of expert weights touched (H*3*D*F*bytes),
  the fraction of the HBM roofline (weight bytes / 4.3 TB/s nominal, and / measured copy bandwidth),
  the fraction of the measured matmul rate, and max relative error against `grouped` (a sanity check).
A provider is skipped at a (shape, T) when its estimated time per call (linear in T through its last two
measured points) passes `cap_ms`, when it would gather per-assignment weight copies that do not fit in
memory (batched_mm), or when the sweep's time limit is reached; every skip is recorded with its reason.
Shapes whose w13 [E, 2F, D] passes 2^31 elements (DeepSeek-V3: int32 offsets would overflow) always get
triton compared with grouped at their first T, time limit or not (`crosschecks` in the result). A CUDA
fault that poisons the context (illegal address, ...) stops the process's GPU work, recorded as such.
merge_results joins the results of several processes (one per shape) into one.
Runs on CUDA; `device="cpu"` runs the same sweep with wall-clock timing (a dry run of the logic).
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .config import MoEConfig
from .layer import MoELayer
from .strategy import get_strategy

NOMINAL_HBM_BPS = 4.3e12  # H200 HBM3e, bytes/s (the roofline figure)
GPU_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
QUICK_TOKENS = (1, 16, 256, 4096, 16384)
GPU_SHAPES = ("mixtral", "qwen3", "olmoe", "deepseek")
GPU_PROVIDERS = ("loop", "grouped", "grouped_mm", "hf", "triton", "triton_graph")  # "hf": one hf_<impl> each
TRITON_PROVIDERS = ("triton", "triton_graph")  # the providers the targets are evaluated for
TORCH_PROVIDERS = ("dense", "loop", "grouped", "grouped_mm", "padded")
REFERENCE_PROVIDER = "grouped"  # outputs of every provider are compared with this one
AGREE_RTOL = 5e-2  # max |y - y_ref| / max |y_ref| above which a result is flagged (bf16 outputs)
CROSSCHECK_ELEMENTS = 2**31  # w13 [E, 2F, D] past this: int32 offsets overflow, triton is always checked vs grouped
CONTEXT_LOST_MARKERS = ("illegal memory access", "illegal address", "unspecified launch failure",
                        "illegal instruction", "misaligned address", "device-side assert")  # CUDA faults, lower case


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    """A tqdm bar over `total` cases; a no-op when disabled or without tqdm."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="bench", unit="case")
    except ImportError:
        return _NoBar()


# ----------------------------------------------------------------------------------------------- timing

def _quantile(sorted_ts: list[float], q: float) -> float:
    i = q * (len(sorted_ts) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (i - lo)


def _summary(ts: list[float]) -> dict:
    ts = sorted(ts)
    return dict(median_ms=statistics.median(ts), p20_ms=_quantile(ts, 0.2), p80_ms=_quantile(ts, 0.8),
                min_ms=ts[0], reps=len(ts))


class Timer:
    """Median of several timed calls of fn (milliseconds), on CUDA with events, else wall clock.

    `mode="events"`: torch.cuda.Event pairs around each call, the L2 cache flushed before each
    (a 256 MiB buffer zeroed outside the timed region, as triton.testing.do_bench does), the
    number of calls set from a first timed call so the measurement takes about budget_ms.
    `mode="do_bench"`: triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8]); that
    signature is the same in triton 3.6 and 3.9 (fast_flush was removed in 3.2; not passed here).
    """

    def __init__(self, device: torch.device, mode: str = "events", budget_ms: float = 100.0,
                 min_reps: int = 3, max_reps: int = 50, flush_l2: bool = True):
        if mode not in ("events", "do_bench"):
            raise ValueError(f"timer mode must be 'events' or 'do_bench', got {mode!r}")
        self.device = _device(device)
        self.cuda = self.device.type == "cuda"
        if mode == "do_bench" and not self.cuda:
            raise ValueError("timer mode 'do_bench' needs a CUDA device")
        self.mode, self.budget_ms, self.min_reps, self.max_reps = mode, budget_ms, min_reps, max_reps
        self.flush = (torch.empty(256 << 20, dtype=torch.int8, device=self.device)
                      if self.cuda and flush_l2 and mode == "events" else None)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> dict:
        if self.mode == "do_bench":
            import triton.testing

            med, p20, p80 = triton.testing.do_bench(fn, warmup=max(1, int(self.budget_ms / 4)),
                                                    rep=max(1, int(self.budget_ms)), quantiles=[0.5, 0.2, 0.8])
            return dict(median_ms=med, p20_ms=p20, p80_ms=p80, min_ms=None, reps=None)
        est = self._one(fn)  # one timed call sets the count (fn was called once before, for warm-up)
        n = int(min(self.max_reps, max(self.min_reps, self.budget_ms // max(est, 1e-3))))
        if est * n > 4 * self.budget_ms:  # a slow call: a few reps are enough
            n = max(1, min(n, self.min_reps))
        return _summary([est] + self._many(fn, n - 1) if n > 1 else [est])

    def _one(self, fn) -> float:
        return self._many(fn, 1)[0]

    def _many(self, fn, n: int) -> list[float]:
        if n <= 0:
            return []
        if not self.cuda:
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return ts
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        self.sync()
        for i in range(n):
            if self.flush is not None:
                self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        self.sync()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def measure_limits(device: torch.device, dtype: torch.dtype, timer: Timer, copy_bytes: int = 1 << 30,
                   matmul_sizes=(4096, 8192)) -> dict:
    """The device's measured copy bandwidth (bytes/s, read + write) and best dense matmul rate (FLOP/s)."""
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = timer(lambda d=dst, s=src: d.copy_(s))["median_ms"]
    del src, dst
    best, best_n = 0.0, None
    for n in matmul_sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=c)
        t = timer(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c))["median_ms"]
        rate = 2 * n**3 / (t * 1e-3)
        if rate > best:
            best, best_n = rate, n
        del a, b, c
    _free(device)
    return dict(copy_Bps=2 * copy_bytes / (t_copy * 1e-3), copy_bytes=copy_bytes, matmul_flops=best,
                matmul_n=best_n, matmul_dtype=str(dtype).replace("torch.", ""), nominal_hbm_Bps=NOMINAL_HBM_BPS)


# ------------------------------------------------------------------------------------------- the layer

def make_layer(shape, dtype: torch.dtype, device, seed: int = 0) -> MoELayer:
    """A MoELayer whose weights are drawn on `device` directly, in `dtype`.

    MoELayer's own init draws float32 weights on the CPU (45 GB and minutes for DeepSeek-V3's
    256 experts), so the layer is built on the meta device and its weights are filled in place:
    same scaled-normal init, different random numbers.
    """
    cfg = MoEConfig(shape.d_model, shape.d_ff, shape.num_experts, shape.top_k)
    try:
        with torch.device("meta"):
            layer = MoELayer(cfg, dtype=dtype)
        layer = layer.to_empty(device=device)
    except (RuntimeError, TypeError, ValueError):  # a torch whose meta tensors refuse the CPU generator
        layer = MoELayer.__new__(MoELayer)
        torch.nn.Module.__init__(layer)
        layer.cfg = cfg
        E, D, F = shape.num_experts, shape.d_model, shape.d_ff
        for name, size in (("router_weight", (E, D)), ("w13", (E, 2 * F, D)), ("w2", (E, D, F))):
            w = torch.empty(size, dtype=dtype, device=device)
            layer.register_parameter(name, torch.nn.Parameter(w, requires_grad=False))
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        layer.router_weight.normal_(0.0, shape.d_model**-0.5, generator=g)  # [E, D]
        layer.w13.normal_(0.0, shape.d_model**-0.5, generator=g)  # [E, 2F, D]
        layer.w2.normal_(0.0, shape.d_ff**-0.5, generator=g)  # [E, D, F]
    return layer


def make_routing(layer: MoELayer, T: int, skew: float, seed: int):
    """x [T, D] (standard normal) and its Routing through the layer's router; skew > 0 biases it Zipf-like."""
    dev, dt = layer.w13.device, layer.w13.dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(T, layer.cfg.d_model, generator=g, device=dev).to(dt)  # [T, D]
    if skew > 0:
        from .skew import skewed_routing

        r = skewed_routing(x, layer.router_weight, layer.cfg.top_k, skew, renormalize=layer.cfg.renormalize)
    else:
        r = layer.route(x)
    return x, r


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (0 for empty outputs): one number to flag a provider or config that disagrees."""
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


def _tensor(out) -> torch.Tensor:
    """The output tensor of a provider (tensor, StrategyResult.y or MoEOutput.output)."""
    for attr in ("y", "output"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def make_providers(layer: MoELayer, names, notes: list[str]) -> dict[str, Callable]:
    """{provider: fn(x, routing) -> y}; providers that cannot be built are left out with a note."""
    providers: dict[str, Callable] = {}
    w13, w2 = layer.w13, layer.w2
    for name in names:
        if name == "hf":
            try:
                hf = importlib.import_module("moe_ref.hf")
                for impl, fn in hf.hf_experts_providers(layer).items():
                    providers[impl if impl.startswith("hf_") else f"hf_{impl}"] = fn
            except Exception as e:  # absent (ImportError/AttributeError) or broken on this version: note it
                notes.append(f"Hugging Face providers skipped: {type(e).__name__}: {e}")
        elif name in TRITON_PROVIDERS:
            if name == "triton_graph" and not w13.is_cuda:
                notes.append("triton_graph provider skipped: CUDA graphs need a CUDA device")
                continue
            try:
                kernels = importlib.import_module("moe_ref.kernels")
                fused = kernels.fused_moe
                eager = lambda x, r, f=fused: f(x, r.topk_ids, r.topk_weights, w13, w2)
                providers[name] = eager if name == "triton" else graph_replayer(eager)
            except Exception as e:  # no triton, or moe_ref.kernels failed to import: note it, time the rest
                notes.append(f"{name} provider skipped: {type(e).__name__}: {e}")
        else:
            fn = get_strategy(name)
            providers[name] = lambda x, r, f=fn: f(x, r, w13, w2)
    return providers


def graph_replayer(fn: Callable) -> Callable:
    """fn(x, routing) -> y, captured in a CUDA graph on the first call with given inputs and replayed after.

    A replay reads the inputs' current contents (same tensors, new values are fine) and returns the graph's
    own output tensor. One graph is kept: a call with other tensors (another T) captures anew. The capture
    is preceded by two eager calls on a side stream (compiles the kernels, settles the allocator)."""
    state: dict = {}

    def run(x: torch.Tensor, r) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), r.topk_ids.data_ptr(), r.topk_weights.data_ptr())
        if state.get("key") != key:
            state.clear()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn(x, r)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = fn(x, r)  # [T, D] the graph's output buffer
            state.update(key=key, graph=graph, y=y, inputs=(x, r))  # inputs kept alive with the graph
        state["graph"].replay()
        return state["y"]

    return run


def _triton_config(x: torch.Tensor, shape) -> dict | None:
    """The tile config fused_moe picks for x at this shape (None if moe_ref.kernels cannot say)."""
    try:
        from .kernels.fused_moe import pick_config

        return pick_config(x, shape.num_experts, shape.top_k, shape.d_ff)
    except Exception:  # no triton: the provider was skipped anyway
        return None


def _device(device) -> torch.device:
    """torch.device with an explicit index for CUDA ('cuda' -> 'cuda:<current>')."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _free_bytes(device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


# ---------------------------------------------------------------------------------------------- sweep

def case_metrics(shape, T: int, hit: int, el: int, ms: float, limits: dict) -> dict:
    """Rates and roofline fractions of one measured time (ms) at T tokens with `hit` experts touched."""
    D, F, K = shape.d_model, shape.d_ff, shape.top_k
    flops = 6 * D * F * T * K
    wbytes = hit * 3 * D * F * el
    s = ms * 1e-3
    roof = max(wbytes / limits["copy_Bps"], flops / limits["matmul_flops"])
    return dict(tflops=flops / s / 1e12, gbps=wbytes / s / 1e9,
                hbm_frac_nominal=wbytes / limits["nominal_hbm_Bps"] / s,
                hbm_frac_measured=wbytes / limits["copy_Bps"] / s,
                matmul_frac=flops / limits["matmul_flops"] / s, roofline_frac=roof / s)


def _skip_reason(name: str, shape, T: int, el: int, last: dict, cap_ms: float, device) -> str | None:
    """Why a provider should not run at (shape, T), or None."""
    if "batched_mm" in name:  # gathers one copy of the expert weights per assignment
        need = T * shape.top_k * 3 * shape.d_model * shape.d_ff * el
        free = _free_bytes(device)
        if free is not None and need > 0.6 * free:
            return f"would gather {need / 1e9:.1f} GB of per-assignment weight copies ({free / 1e9:.0f} GB free)"
    pts = last.get(name, [])
    if len(pts) >= 2:  # linear through the last two measured points (one point says nothing about slope)
        (t1, ms1), (t2, ms2) = pts[-2], pts[-1]
        est = ms2 + max(0.0, (ms2 - ms1) / (t2 - t1)) * (T - t2)
        if est > cap_ms:
            return (f"estimated {est:.0f} ms per call (linear from {ms1:.1f} ms at T={t1} and {ms2:.1f} ms at "
                    f"T={t2}) > cap {cap_ms:.0f} ms")
    return None


def is_context_lost(e: BaseException) -> bool:
    """True for errors after which the process's CUDA context is unusable (illegal address, launch failure...)."""
    msg = str(e).lower()
    return any(m in msg for m in CONTEXT_LOST_MARKERS)


def needs_crosscheck(shape, elements: int = CROSSCHECK_ELEMENTS) -> bool:
    """True when the shape's w13 [E, 2F, D] holds more than `elements` elements (2^31: past int32 offsets)."""
    s = shape if isinstance(shape, dict) else asdict(shape)
    return s["num_experts"] * 2 * s["d_ff"] * s["d_model"] > elements


def _error_message(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _new_result(shapes, tokens, providers, device, dtype, skew, timer, cap_ms, time_limit_s, crosscheck_elements):
    return dict(kind="device", machine=device_info(device), complete=False,
                settings=dict(dtype=str(dtype).replace("torch.", ""), tokens=list(tokens),
                              shapes=[s.name for s in shapes], providers=list(providers), skew=skew,
                              timer=timer.mode, budget_ms=timer.budget_ms, min_reps=timer.min_reps,
                              max_reps=timer.max_reps, l2_flush=timer.flush is not None, cap_ms=cap_ms,
                              time_limit_s=time_limit_s, reference=REFERENCE_PROVIDER, agree_rtol=AGREE_RTOL,
                              crosscheck_elements=crosscheck_elements),
                limits=None, shapes={s.name: asdict(s) for s in shapes}, rows=[], skipped=[], notes=[])


def _summarize(result: dict) -> None:
    """(Re)compute the derived tables of a result from its rows: ratios, targets, cross-checks."""
    result["ratios"] = ratios(result["rows"])
    result["targets"] = evaluate_targets(result["rows"])
    elements = result.get("settings", {}).get("crosscheck_elements", CROSSCHECK_ELEMENTS)
    result["crosschecks"] = crosschecks(result["rows"], result.get("shapes", {}), elements)


class _Sweep:
    """The state of one sweep: the result being filled, the clock, and whether the CUDA context is still usable."""

    def __init__(self, result: dict, device, dtype, timer: Timer, cap_ms: float, time_limit_s, skew: float,
                 seed: int, crosscheck_elements: int):
        self.result, self.device, self.dtype, self.timer = result, device, dtype, timer
        self.cap_ms, self.time_limit_s, self.skew, self.seed = cap_ms, time_limit_s, skew, seed
        self.crosscheck_elements = crosscheck_elements
        self.el = torch.empty(0, dtype=dtype).element_size()
        self.t_start = time.perf_counter()
        self.lost: str | None = None  # where the CUDA context was lost, once it is

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def record(self, row: dict, reason: str, status: str = "skipped") -> None:
        row.update(status=status, reason=reason)
        self.result["skipped"].append(dict(shape=row["shape"], tokens=row["tokens"], provider=row["provider"],
                                           reason=reason))
        self.result["rows"].append(row)

    def fail(self, where: str, e: BaseException) -> str:
        """The message of error e; marks the context lost when e is a CUDA fault (the rest is then skipped)."""
        msg = _error_message(e)
        if is_context_lost(e) and self.lost is None:
            self.lost = f"{where}: {msg}"
            print(f"CUDA context lost at {where}: every later case of this process is skipped", flush=True)
        return msg

    def skip_case(self, shape, T: int, names, reason: str, status: str = "skipped") -> None:
        for name in names:
            self.record(dict(shape=shape.name, tokens=T, provider=name), reason, status)

    def lost_reason(self) -> str:
        return f"CUDA context lost ({self.lost}): no GPU work can run in this process"

    def reason(self, name: str, shape, T: int, last: dict, protect: set) -> str | None:
        """Why provider `name` does not run at (shape, T), or None."""
        if self.lost:
            return self.lost_reason()
        if self.time_limit_s is not None and self.elapsed() > self.time_limit_s and name not in protect:
            return f"sweep time limit {self.time_limit_s:.0f} s reached"
        return _skip_reason(name, shape, T, self.el, last, self.cap_ms, self.device)

    def shape(self, shape, tokens, providers, on_progress, bar) -> None:
        """Every token count of one shape; a layer that cannot be built is recorded as an error per case."""
        layer = provs = None
        if not self.lost:
            try:
                layer = make_layer(shape, self.dtype, self.device, self.seed)
                notes: list[str] = []
                provs = make_providers(layer, providers, notes)
                self.result["notes"] += [f"{shape.name}: {n}" for n in notes]
                for n in notes:
                    print(f"note ({shape.name}): {n}", flush=True)
            except Exception as e:  # OOM for the weights, a CUDA fault: every case of the shape says so
                msg = self.fail(f"{shape.name} layer", e)
                for T in tokens:
                    self.skip_case(shape, T, providers, f"layer not built: {msg}", "error")
                layer = provs = None
        order = sorted(providers if provs is None else provs, key=lambda n: n != REFERENCE_PROVIDER)  # reference 1st
        last: dict[str, list[tuple[int, float]]] = {}  # provider -> [(T, ms)] measured so far
        protect = {REFERENCE_PROVIDER, "triton"} if needs_crosscheck(shape, self.crosscheck_elements) else set()
        for i, T in enumerate(tokens):
            if self.lost:
                self.skip_case(shape, T, order, self.lost_reason())
            elif provs is not None:  # the cross-check of a big shape runs at its first T whatever the clock says
                self.case(shape, layer, provs, order, T, last, protect if i == 0 else set())
            _summarize(self.result)
            self.result["elapsed_s"] = self.elapsed()
            if on_progress:
                on_progress(self.result)
            bar.update(1)
        del provs, layer
        if not self.lost:
            _free(self.device)

    def case(self, shape, layer, provs: dict, order: list[str], T: int, last: dict, protect: set) -> None:
        """Every provider at one (shape, T), the reference first."""
        try:
            x, r = make_routing(layer, T, self.skew, self.seed + T)  # x [T, D]
            counts = torch.bincount(r.topk_ids.reshape(-1), minlength=shape.num_experts)  # [E]
            hit = int((counts > 0).sum())
            base = dict(shape=shape.name, tokens=T, hit_experts=hit, max_expert_load=int(counts.max()),
                        max_expert_id=int(r.topk_ids.max()), flops=6 * shape.d_model * shape.d_ff * T * shape.top_k,
                        weight_bytes=hit * 3 * shape.d_model * shape.d_ff * self.el)
        except Exception as e:  # OOM for x at a huge T, a CUDA fault
            self.skip_case(shape, T, order, f"routing failed: {self.fail(f'{shape.name} T={T} routing', e)}", "error")
            return
        ref: dict = {}  # "y": the reference provider's output [T, D] in float32
        for name in order:
            row = dict(base, provider=name)
            reason = self.reason(name, shape, T, last, protect)
            if reason:
                self.record(row, reason)
                continue
            try:
                tm = self.measure(provs[name], name, x, r, ref, row)
            except Exception as e:  # OOM, unsupported dtype, a provider's bug: record it, keep going
                self.record(row, self.fail(f"{shape.name} T={T} {name}", e), "error")
                if not self.lost:
                    _free(self.device)
                continue
            metrics = case_metrics(shape, T, hit, self.el, tm["median_ms"], self.result["limits"])
            row.update(status="ok", **tm, **metrics)
            if name in TRITON_PROVIDERS:  # the tile config it ran with (a tuned table's entry, or the default)
                row["config"] = _triton_config(x, shape)
            last.setdefault(name, []).append((T, tm["median_ms"]))
            self.result["rows"].append(row)
        del x, r, ref

    def measure(self, fn: Callable, name: str, x: torch.Tensor, r, ref: dict, row: dict) -> dict:
        """Warm-up call (compiles; its output is checked against the reference), then the timed calls."""
        with torch.inference_mode():
            t0 = time.perf_counter()
            y = _tensor(fn(x, r))  # [T, D]
            self.timer.sync()
            row["first_call_s"] = time.perf_counter() - t0
            if "y" not in ref and name == REFERENCE_PROVIDER:
                ref["y"] = y.float()
            if "y" in ref:
                row["max_rel_err"] = max_rel_err(y, ref["y"])
                row["agrees"] = bool(row["max_rel_err"] <= AGREE_RTOL)
            del y
            return self.timer(lambda fn=fn, x=x, r=r: fn(x, r))


def run_sweep(shapes, tokens, providers=GPU_PROVIDERS, *, device="cuda", dtype=torch.bfloat16, skew: float = 0.0,
              timer: Timer | None = None, cap_ms: float = 200.0, time_limit_s: float | None = None,
              limits: dict | None = None, on_progress: Callable[[dict], None] | None = None,
              progress: bool = True, seed: int = 0, crosscheck_elements: int = CROSSCHECK_ELEMENTS) -> dict:
    """Time every provider at every (shape, T); returns the result dict (see module doc).

    on_progress(result) is called after every token count so a caller can write partial results.
    For a shape whose w13 holds more than `crosscheck_elements` elements, `grouped` and `triton` run at the
    first token count even past the time limit, so that triton's output is compared with grouped's there
    (result["crosschecks"] says whether it was). A CUDA fault that poisons the context stops the GPU work:
    every later case is recorded as skipped, "complete" stays False and "stopped" says where it happened.
    """
    device = _device(device)
    timer = timer or Timer(device)
    result = _new_result(shapes, tokens, providers, device, dtype, skew, timer, cap_ms, time_limit_s,
                         crosscheck_elements)
    result["limits"] = limits or measure_limits(device, dtype, timer)
    sweep = _Sweep(result, device, dtype, timer, cap_ms, time_limit_s, skew, seed, crosscheck_elements)
    bar = _progress(len(shapes) * len(tokens), progress)
    for shape in shapes:
        sweep.shape(shape, tokens, providers, on_progress, bar)
    bar.close()
    _summarize(result)
    result["elapsed_s"] = sweep.elapsed()
    result["complete"] = sweep.lost is None
    if sweep.lost:
        result["stopped"] = f"CUDA context lost at {sweep.lost}"
    return result


def crosschecks(rows: list[dict], shapes: dict, elements: int = CROSSCHECK_ELEMENTS) -> list[dict]:
    """For each shape whose w13 [E, 2F, D] holds more than `elements` elements (2^31: int32 offsets overflow):
    whether triton's output was compared with grouped's, at which T, the largest error, and whether a checked
    case routed to an expert whose w13 slab ends past `elements` (past_threshold). flag: "ok", "MISMATCH",
    or "NOT CHECKED" with the reasons the triton rows give."""
    out = []
    for name, s in shapes.items():
        if not s or not needs_crosscheck(s, elements):
            continue
        slab = 2 * s["d_ff"] * s["d_model"]  # elements of one expert's w13
        tri = [r for r in rows if r["shape"] == name and r["provider"] == "triton"]
        done = [r for r in tri if "max_rel_err" in r]
        entry = dict(shape=name, w13_elements=s["num_experts"] * slab, threshold=elements, checked=bool(done),
                     tokens=[r["tokens"] for r in done])
        if done:
            err = max(r["max_rel_err"] for r in done)
            entry.update(max_rel_err=err, agrees=err <= AGREE_RTOL, flag="ok" if err <= AGREE_RTOL else "MISMATCH",
                         past_threshold=any((r.get("max_expert_id", -1) + 1) * slab > elements for r in done))
        else:
            entry.update(flag="NOT CHECKED",
                         reasons=sorted({r.get("reason", "no reference output") for r in tri}) or ["no triton row"])
        out.append(entry)
    return out


def merge_results(parts: list[dict]) -> dict:
    """One device result from several (e.g. one process per shape): rows, skips and notes concatenated, the
    derived tables recomputed; `parts` keeps each part's shapes, limits, machine date, completeness."""
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"parts must be a non-empty list of device results, got {parts!r:.80}")
    seen: dict[str, int] = {}
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("kind") != "device":
            kind = p.get("kind") if isinstance(p, dict) else type(p).__name__
            raise ValueError(f"parts[{i}] is not a device result (kind {kind!r})")
        for name in p.get("shapes", {}):
            if name in seen:
                raise ValueError(f"parts[{i}] and parts[{seen[name]}] both hold shape {name!r}")
            seen[name] = i
    first = parts[0]
    settings = dict(first.get("settings", {}))
    settings.update(shapes=list(seen), providers=_union(p.get("settings", {}).get("providers", []) for p in parts),
                    tokens=sorted(set(_union(p.get("settings", {}).get("tokens", []) for p in parts))))
    merged = dict(kind="device", machine=first.get("machine", {}), complete=all(p.get("complete") for p in parts),
                  settings=settings, limits=next((p["limits"] for p in parts if p.get("limits")), None),
                  shapes={k: v for p in parts for k, v in p.get("shapes", {}).items()},
                  rows=[r for p in parts for r in p.get("rows", [])],
                  skipped=[s for p in parts for s in p.get("skipped", [])],
                  notes=[n for p in parts for n in p.get("notes", [])],
                  elapsed_s=sum(p.get("elapsed_s", 0.0) for p in parts),
                  parts=[dict(shapes=list(p.get("shapes", {})), complete=bool(p.get("complete")),
                              stopped=p.get("stopped"), date=p.get("machine", {}).get("date"),
                              elapsed_s=p.get("elapsed_s"), limits=p.get("limits"),
                              time_limit_s=p.get("settings", {}).get("time_limit_s")) for p in parts])
    _summarize(merged)
    return merged


def _union(lists) -> list:
    out: list = []
    for xs in lists:
        out += [x for x in xs if x not in out]
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Speedups per (shape, T) of each Triton provider v (triton, triton_graph) over its peers:
    v_vs_grouped_mm = t(grouped_mm)/t(v), v_vs_loop, v_vs_grouped, v_vs_best_hf (> 1: v is faster)."""
    ok = {(r["shape"], r["tokens"], r["provider"]): r["median_ms"] for r in rows if r.get("status") == "ok"}
    out = []
    for shape, T in sorted({(s, t) for s, t, _ in ok}, key=lambda c: (c[0], c[1])):
        row = dict(shape=shape, tokens=T)
        hf = [v for (s, t, p), v in ok.items() if s == shape and t == T and p.startswith("hf_")]
        for v in TRITON_PROVIDERS:
            tri = ok.get((shape, T, v))
            if tri is None:
                continue
            for peer in ("grouped_mm", "loop", "grouped"):
                if (shape, T, peer) in ok:
                    row[f"{v}_vs_{peer}"] = ok[(shape, T, peer)] / tri
            if hf:
                row[f"{v}_vs_best_hf"] = min(hf) / tri
        if len(row) > 2:
            out.append(row)
    return out


TARGETS = (
    # (name, shapes (None = all), token predicate, metric key in rows/ratios, threshold); "triton" in the
    # name and key stands for each of TRITON_PROVIDERS in turn
    ("triton >= 1.1x grouped_mm", ("mixtral-8x7b", "qwen3-30b-a3b"), lambda T: True, "triton_vs_grouped_mm", 1.1),
    ("triton >= 5x loop from 256 tokens", ("mixtral-8x7b", "qwen3-30b-a3b"), lambda T: T >= 256, "triton_vs_loop", 5.0),
    ("triton >= 70% of HBM roofline (4.3 TB/s) at 1-64 tokens", None, lambda T: T <= 64, "hbm_frac_nominal", 0.7),
    ("triton >= 60% of measured matmul rate at 8192+ tokens", None, lambda T: T >= 8192, "matmul_frac", 0.6),
)


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each issue target for each Triton provider at each (shape, T) measured: value, threshold, met.
    Unmeasured cases are absent."""
    rat = {(r["shape"], r["tokens"]): r for r in ratios(rows)}
    out = []
    for v in TRITON_PROVIDERS:
        tri = {(r["shape"], r["tokens"]): r for r in rows if r["provider"] == v and r.get("status") == "ok"}
        for name, shapes, pred, key, thr in TARGETS:
            name, src = name.replace("triton", v, 1), rat if key.startswith("triton_vs") else tri
            key = key.replace("triton", v, 1) if key.startswith("triton_vs") else key
            for (shape, T), r in sorted(src.items()):
                if (shapes is None or shape in shapes) and pred(T) and key in r:
                    out.append(dict(target=name, provider=v, shape=shape, tokens=T, value=r[key], threshold=thr,
                                    met=bool(r[key] >= thr)))
    return out


# ---------------------------------------------------------------------------------------------- output

def device_info(device) -> dict:
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    for pkg in ("triton", "transformers"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # not installed
            info[pkg] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                    device_memory_GB=round(p.total_memory / 1e9, 1), sm_count=p.multi_processor_count)
    else:
        info["device"] = "cpu: " + (platform.processor() or platform.machine())
    return info


def write_json(result: dict, path: Path) -> None:
    """Atomic write (tmp file + rename) so a killed run leaves the last complete snapshot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def write_charts(result: dict, out: Path, prefix: str = "gpu") -> list[Path]:
    """PNG charts of a device result: times per shape, triton speedups, roofline fractions."""
    from .plots.bench import plot_bench_gpu_ratios, plot_bench_gpu_roofline, plot_bench_gpu_times

    out = Path(out)
    paths = []
    for suffix, fn in (("times", plot_bench_gpu_times), ("ratios", plot_bench_gpu_ratios),
                       ("roofline", plot_bench_gpu_roofline)):
        p = out / f"{prefix}_{suffix}.png"
        fn(result).savefig(p, dpi=110, bbox_inches="tight")
        paths.append(p)
    return paths


def print_summary(result: dict) -> None:
    lim = result["limits"]
    print(f"device {result['machine']['device']}: copy {lim['copy_Bps'] / 1e12:.2f} TB/s, "
          f"matmul {lim['matmul_flops'] / 1e12:.0f} TFLOP/s ({lim['matmul_dtype']}, n={lim['matmul_n']})")
    print(f"{'shape':20} {'T':>6} {'provider':16} {'ms':>10} {'TFLOP/s':>8} {'GB/s':>8} "
          f"{'HBM%':>6} {'mm%':>6} {'err':>8}")
    for r in result["rows"]:
        if r.get("status") == "ok":
            print(f"{r['shape']:20} {r['tokens']:6d} {r['provider']:16} {r['median_ms']:10.3f} {r['tflops']:8.1f} "
                  f"{r['gbps']:8.0f} {100 * r['hbm_frac_nominal']:6.1f} {100 * r['matmul_frac']:6.1f} "
                  f"{r.get('max_rel_err', float('nan')):8.1e}")
        else:
            print(f"{r['shape']:20} {r['tokens']:6d} {r['provider']:16} {r['status']}: {r['reason']}")
    for c in result.get("crosschecks", []):
        print(f"cross-check triton vs {REFERENCE_PROVIDER} at {c['shape']} (w13 {c['w13_elements']:.2e} elements): "
              f"{c['flag']}" + (f", max rel err {c['max_rel_err']:.1e} at T={c['tokens']}" if c["checked"]
                                else f": {'; '.join(c['reasons'])}"))
    for t in result.get("targets", []):
        print(f"target {t['target']}: {t['shape']} T={t['tokens']}: {t['value']:.2f} "
              f"(>= {t['threshold']}) {'met' if t['met'] else 'NOT met'}")


def find_results_dir(start: Path | None = None) -> Path | None:
    """docs/results of this checkout: searched upward from `start` (cwd), then beside the installed package."""
    here = Path(start or Path.cwd()).resolve()
    for d in [here, *here.parents, Path(__file__).resolve().parents[1]]:
        if (d / "docs" / "results").is_dir():
            return d / "docs" / "results"
    return None


def load_device_results(folder: Path | None) -> list[dict]:
    """Every committed device result (JSON with kind == "device") in folder or below, newest first; [] if none."""
    if folder is None or not Path(folder).is_dir():
        return []
    out = []
    for p in sorted(Path(folder).rglob("*.json")):  # a folder per run is fine
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict) and res.get("kind") == "device" and res.get("rows"):
            res["_path"] = str(p)
            out.append(res)
    return sorted(out, key=lambda r: r.get("machine", {}).get("date", ""), reverse=True)
