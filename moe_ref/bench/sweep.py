"""The device sweep: every provider side by side on real MoE shapes, against the device's own limits.

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
  the fraction of the matmul rate (790 TFLOP/s nominal bf16, and measured), and max relative error against
  `grouped` (a sanity check).
A provider is skipped at a (shape, T) when its estimated time per call (linear in T through its last two
measured points) passes `cap_ms`, when it would gather per-assignment weight copies that do not fit in
memory (batched_mm), or when the sweep's time limit is reached; every skip is recorded with its reason.
Shapes whose w13 [E, 2F, D] passes 2^31 elements (DeepSeek-V3: int32 offsets would overflow) always get
triton compared with grouped at their first T, time limit or not (`crosschecks` in the result). A CUDA
fault that poisons the context (illegal address, ...) stops the process's GPU work, recorded as such.
merge_results joins the results of several processes (one per shape) into one.
Runs on CUDA; `device="cpu"` runs the same sweep timed by the CPU harness (timing.time_cpu: providers
interleaved round by round, threads pinned; a dry run of the logic).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

import torch

from .providers import (
    GPU_PROVIDERS,
    REFERENCE_PROVIDER,
    TRITON_PROVIDERS,
    make_layer,
    make_providers,
    make_routing,
    max_rel_err,
    output_tensor,
    triton_config,
)
from .report import device_info
from .shapes import dtype_name
from .targets import evaluate_targets, ratios, targets_as_data
from .timing import Timer, distrust, free_memory, measure_limits, resolve_device, summary, time_cpu
from .timing import progress as progress_bar

__all__ = ["run_sweep", "case_metrics", "crosschecks", "needs_crosscheck", "is_context_lost", "summarize",
           "AGREE_RTOL", "CROSSCHECK_ELEMENTS"]

AGREE_RTOL = 5e-2  # max |y - y_ref| / max |y_ref| above which a result is flagged (bf16 outputs)

CROSSCHECK_ELEMENTS = 2**31  # w13 [E, 2F, D] past this: int32 offsets overflow, triton is always checked vs grouped

CONTEXT_LOST_MARKERS = ("illegal memory access", "illegal address", "unspecified launch failure",
                        "illegal instruction", "misaligned address", "device-side assert")  # CUDA faults, lower case



def _free_bytes(device) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


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
                matmul_frac=flops / limits["matmul_flops"] / s,
                matmul_frac_nominal=flops / limits["nominal_matmul_flops"] / s, roofline_frac=roof / s)


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
                settings=dict(dtype=dtype_name(dtype), tokens=list(tokens),
                              shapes=[s.name for s in shapes], providers=list(providers), skew=skew,
                              timer=timer.mode, budget_ms=timer.budget_ms, min_reps=timer.min_reps,
                              l2_flush=timer.mode == "do_bench", cap_ms=cap_ms,
                              time_limit_s=time_limit_s, reference=REFERENCE_PROVIDER, agree_rtol=AGREE_RTOL,
                              crosscheck_elements=crosscheck_elements, targets=targets_as_data()),
                limits=None, shapes={s.name: asdict(s) for s in shapes}, rows=[], skipped=[], notes=[])


def summarize(result: dict) -> None:
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
            summarize(self.result)
            self.result["elapsed_s"] = self.elapsed()
            if on_progress:
                on_progress(self.result)
            bar.update(1)
        del provs, layer
        if not self.lost:
            free_memory(self.device)

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
        warmed = {}  # name -> row, for the CPU's interleaved timing
        for name in order:
            row = dict(base, provider=name)
            reason = self.reason(name, shape, T, last, protect)
            if reason:
                self.record(row, reason)
                continue
            try:
                self.warm_up(provs[name], name, x, r, ref, row)
                if not self.timer.cuda:
                    warmed[name] = row
                    continue
                with torch.inference_mode():
                    tm = self.timer(lambda fn=provs[name], x=x, r=r: fn(x, r))
            except Exception as e:  # OOM, unsupported dtype, a provider's bug: record it, keep going
                self.record(row, self.fail(f"{shape.name} T={T} {name}", e), "error")
                if not self.lost:
                    free_memory(self.device)
                continue
            self.finish(row, tm, shape, T, hit, x, last)
        if warmed:  # the CPU: every warmed provider timed round by round by the one CPU harness
            with torch.inference_mode():
                timed = time_cpu({n: (lambda fn=provs[n], x=x, r=r: fn(x, r)) for n in warmed},
                                 rounds=self.timer.min_reps, warmup=0)  # warmed up above
            flags = distrust(timed)
            for name, row in warmed.items():
                t = timed[name]
                tm = dict(summary([v * 1e3 for v in t["times_s"]]), iqr_ms=t["iqr_s"] * 1e3, threads=t["threads"])
                if name in flags:
                    row["warning"] = flags[name]
                self.finish(row, tm, shape, T, hit, x, last)
        del x, r, ref

    def finish(self, row: dict, tm: dict, shape, T: int, hit: int, x: torch.Tensor, last: dict) -> None:
        """Record a timed provider's row with its derived metrics."""
        name = row["provider"]
        metrics = case_metrics(shape, T, hit, self.el, tm["median_ms"], self.result["limits"])
        row.update(status="ok", **tm, **metrics)
        if name in TRITON_PROVIDERS:  # the tile config it ran with (a tuned table's entry, or the default)
            row["config"] = triton_config(x, shape)
        last.setdefault(name, []).append((T, tm["median_ms"]))
        self.result["rows"].append(row)

    def warm_up(self, fn: Callable, name: str, x: torch.Tensor, r, ref: dict, row: dict) -> None:
        """The first call (compiles; its output is checked against the reference's)."""
        with torch.inference_mode():
            t0 = time.perf_counter()
            y = output_tensor(fn(x, r))  # [T, D]
            self.timer.sync()
            row["first_call_s"] = time.perf_counter() - t0
            if "y" not in ref and name == REFERENCE_PROVIDER:
                ref["y"] = y.float()
            if "y" in ref:
                row["max_rel_err"] = max_rel_err(y, ref["y"])
                row["agrees"] = bool(row["max_rel_err"] <= AGREE_RTOL)
            del y


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
    device = resolve_device(device)
    timer = timer or Timer(device)
    result = _new_result(shapes, tokens, providers, device, dtype, skew, timer, cap_ms, time_limit_s,
                         crosscheck_elements)
    result["limits"] = limits or measure_limits(device, dtype, timer)
    sweep = _Sweep(result, device, dtype, timer, cap_ms, time_limit_s, skew, seed, crosscheck_elements)
    bar = progress_bar(len(shapes) * len(tokens), progress)
    for shape in shapes:
        sweep.shape(shape, tokens, providers, on_progress, bar)
    bar.close()
    summarize(result)
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

