"""Benchmarks: time every strategy side by side, against the GEMM-only bound, in one run.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
`python -m moe_ref.bench` (CPU) times dense / loop / grouped / grouped_mm and the GEMM-only bound
(the same per-expert matmuls on pre-grouped rows: no routing, no data movement) and writes
JSON (machine, versions, shapes, medians) and a PNG chart under build/bench/.
`python -m moe_ref.bench --gpu [--quick]` runs the device sweep of moe_ref.bench_gpu (real MoE
shapes x token counts x providers incl. triton and Hugging Face's experts, against the measured
copy bandwidth and matmul rate) and writes gpu.json + PNG charts under --out (build/bench-gpu).
`python -m moe_ref.bench --plot RESULT.json` redraws the charts of a saved device result.
`python -m moe_ref.bench --merge a.json b.json --out gpu.json [--charts]` joins device results (one
process per shape, as make gpu-check runs them) into one; a missing or unreadable file is noted, not fatal.
Speed goals are ratios printed here, never timed tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bench_gpu import _progress
from .config import MoEConfig
from .layer import MoELayer
from .reference import swiglu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int


SHAPES = {
    "cpu": Shape("cpu", 1024, 2048, 8, 2),
    "cpu-small": Shape("cpu-small", 256, 512, 8, 2),
    "mixtral": Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    "qwen3": Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
    "olmoe": Shape("olmoe-1b-7b", 2048, 1024, 64, 8),
    "deepseek": Shape("deepseek-v3-routed", 7168, 2048, 256, 8),
}


def time_cpu(fn, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_only(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor):
    """A callable doing just the per-expert GEMMs (+SwiGLU) on pre-grouped rows: the compute bound."""
    blocks = [x.new_empty(n, x.shape[1]).normal_() for n in counts]

    def run():
        for e, xb in enumerate(blocks):
            if xb.shape[0]:
                swiglu(xb @ w13[e].t()) @ w2[e].t()

    return run


def machine_info() -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": "cpu: " + (platform.processor() or platform.machine()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def bench_cpu(shape: Shape, token_counts, dtypes, strategies, reps: int, progress: bool = True) -> list[dict]:
    """Median seconds per (dtype, T, provider) on the CPU, with ratios to the GEMM-only bound."""
    cfg = MoEConfig(shape.d_model, shape.d_ff, shape.num_experts, shape.top_k)
    jobs = [(dt, T) for dt in dtypes for T in token_counts]
    bar = _progress(len(jobs) * (len(strategies) + 1), progress)
    rows = []
    for dt_name, T in jobs:
        dtype = DTYPES[dt_name]
        layer = MoELayer(cfg, dtype=dtype, seed=0)
        x = torch.randn(T, shape.d_model, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.inference_mode():
            r = layer.route(x)
            counts = torch.bincount(r.topk_ids.reshape(-1), minlength=shape.num_experts).tolist()
            bound = time_cpu(gemm_only(x, counts, layer.w13, layer.w2), reps=reps)
            bar.update(1)
            rows.append(dict(shape=shape.name, dtype=dt_name, tokens=T, provider="gemm_only", seconds=bound,
                             ratio_to_bound=1.0))
            for s in strategies:
                sec = time_cpu(lambda s=s, L=layer, x=x, r=r: L(x, strategy=s, routing=r), reps=reps)
                rows.append(dict(shape=shape.name, dtype=dt_name, tokens=T, provider=s, seconds=sec,
                                 ratio_to_bound=sec / bound))
                bar.update(1)
    bar.close()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':14} {'dtype':5} {'T':>6} {'provider':11} {'ms':>10} {'x bound':>8}")
    for r in rows:
        print(f"{r['shape']:14} {r['dtype']:5} {r['tokens']:6d} {r['provider']:11} "
              f"{r['seconds'] * 1e3:10.3f} {r['ratio_to_bound']:8.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES), help="CPU run: the shape")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (CPU default 16 2048; device default 1 4 ... 16384)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES), help="CPU run: dtypes")
    p.add_argument("--strategies", nargs="+", default=["dense", "loop", "grouped", "grouped_mm"],
                   help="CPU run: strategies")
    p.add_argument("--reps", type=int, default=5, help="CPU run: timed calls per case")
    p.add_argument("--out", default=None, help="output folder (CPU: build/bench, device: build/bench-gpu)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("device sweep (--gpu)")
    g.add_argument("--gpu", action="store_true", help="run the device sweep (needs CUDA unless --device cpu)")
    g.add_argument("--quick", action="store_true",
                   help="5 token counts, fewer reps (sized for ~4 min on one H200: an estimate, not yet run there)")
    g.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES), help="default: the four model shapes")
    g.add_argument("--providers", nargs="+", default=None, help="default: loop grouped grouped_mm hf triton")
    g.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    g.add_argument("--skew", type=float, default=0.0, help="Zipf skew of expert popularity (0 = router as is)")
    g.add_argument("--timer", default="events", choices=["events", "do_bench"])
    g.add_argument("--budget-ms", type=float, default=None, help="measuring time per case (default 60 quick, 200)")
    g.add_argument("--cap-ms", type=float, default=None,
                   help="skip a provider whose estimated time per call passes this (default 150 quick, 1000)")
    g.add_argument("--time-limit", type=float, default=None, help="seconds; later cases are skipped, recorded")
    g.add_argument("--device", default="cuda", help="'cpu' runs the device sweep on the CPU (a dry run)")
    g.add_argument("--plot", default=None, metavar="JSON",
                   help="only redraw the charts of a saved device result (gpu.json) or tuning file (tuned.json)")
    g.add_argument("--tuned", nargs="+", default=[], metavar="JSON",
                   help="tile-config tables from `python -m moe_ref.kernels.tune` for the triton provider")
    g.add_argument("--name", default="gpu", help="stem of the JSON and chart files written under --out")
    g.add_argument("--no-charts", action="store_true", help="write the JSON only (charts later with --plot)")
    g.add_argument("--crosscheck-elements", type=int, default=None, metavar="N",
                   help="shapes whose w13 holds more than N elements (default 2^31) always get triton compared "
                        "with grouped at their first token count, time limit or not")
    m = p.add_argument_group("merging device results (--merge)")
    m.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="join device results into one JSON: --out is the file (or a folder for gpu.json)")
    m.add_argument("--charts", action="store_true", help="with --merge: also draw the merged result's charts")
    args = p.parse_args(argv)
    if args.merge and (args.gpu or args.plot):
        p.error("--merge cannot be combined with --gpu or --plot")
    if args.charts and not args.merge:
        p.error("--charts goes with --merge (a sweep draws its charts unless --no-charts)")
    if args.crosscheck_elements is not None and args.crosscheck_elements < 0:
        p.error(f"--crosscheck-elements must be >= 0, got {args.crosscheck_elements}")
    if args.merge:
        return merge_main([Path(f) for f in args.merge], Path(args.out) if args.out else None, args.charts)
    if args.plot:
        return plot_main(Path(args.plot), Path(args.out) if args.out else None)
    if args.gpu:
        return gpu_main(args)
    shape = SHAPES[args.shape]
    tokens = args.tokens or [16, 2048]
    rows = bench_cpu(shape, tokens, args.dtypes, args.strategies, args.reps, not args.no_progress)
    out = Path(args.out or "build/bench")
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "shape": asdict(shape), "reps": args.reps, "rows": rows}
    (out / "cpu.json").write_text(json.dumps(result, indent=2))
    print_table(rows)
    try:
        from .plots import plot_bench_cpu

        plot_bench_cpu(result).savefig(out / "cpu.png", dpi=120, bbox_inches="tight")
        print(f"wrote {out / 'cpu.json'} and {out / 'cpu.png'}")
    except ImportError as e:
        print(f"wrote {out / 'cpu.json'} (no chart: {e})")
    return 0


def gpu_main(args) -> int:
    """The device sweep: JSON written after every token count (partial results survive a kill), charts at the end."""
    from . import bench_gpu as bg

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--gpu needs a CUDA device, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu for a dry run")
        return 2
    shapes = [SHAPES[s] for s in (args.shapes or bg.GPU_SHAPES)]
    tokens = args.tokens or list(bg.QUICK_TOKENS if args.quick else bg.GPU_TOKENS)
    providers = args.providers or list(bg.GPU_PROVIDERS)
    from .strategy import strategy_names

    unknown = [n for n in providers if n not in bg.GPU_PROVIDERS and n not in strategy_names()]
    if unknown:
        print(f"--providers: unknown {unknown}; choose from {sorted(set(bg.GPU_PROVIDERS) | set(strategy_names()))}")
        return 2
    budget = args.budget_ms or (60.0 if args.quick else 200.0)
    cap = args.cap_ms or (150.0 if args.quick else 1000.0)
    timer = bg.Timer(device, mode=args.timer, budget_ms=budget, min_reps=3 if args.quick else 5,
                     max_reps=20 if args.quick else 100)
    tuned = []
    if args.tuned:
        from .kernels.configs import load_tuned_configs
    for f in args.tuned:  # registered before the sweep: the triton provider picks its configs from them
        try:
            tuned.append(dict(file=str(f), tables=load_tuned_configs(f)))
        except (OSError, ValueError, KeyError) as e:
            print(f"--tuned {f}: cannot use it: {type(e).__name__}: {e}")
            return 2

    out = Path(args.out or "build/bench-gpu")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    cross = {} if args.crosscheck_elements is None else dict(crosscheck_elements=args.crosscheck_elements)

    def stamp(msg: str) -> None:
        print(f"[{_dt.datetime.now(_dt.timezone.utc).strftime('%H:%M:%S')}] {msg}", flush=True)

    def partial(result: dict) -> None:
        result["settings"].update(quick=args.quick, tuned_configs=tuned)
        bg.write_json(result, path)
        done = result["rows"][-1] if result["rows"] else {}
        stamp(f"{done.get('shape')} T={done.get('tokens')} done ({result['elapsed_s']:.0f} s); wrote {path}")

    stamp(f"device sweep on {device}: shapes {[s.name for s in shapes]}, tokens {tokens}, providers {providers}")
    limits = bg.measure_limits(device, DTYPES[args.dtype], timer,
                               **({} if device.type == "cuda" else dict(copy_bytes=64 << 20, matmul_sizes=(512,))))
    stamp(f"measured copy {limits['copy_Bps'] / 1e9:.0f} GB/s, matmul {limits['matmul_flops'] / 1e12:.1f} TFLOP/s")
    result = bg.run_sweep(shapes, tokens, providers, device=device, dtype=DTYPES[args.dtype], skew=args.skew,
                          timer=timer, cap_ms=cap, time_limit_s=args.time_limit, limits=limits,
                          on_progress=partial, progress=not args.no_progress, **cross)
    result["settings"].update(quick=args.quick, tuned_configs=tuned)
    bg.write_json(result, path)
    bg.print_summary(result)
    if args.no_charts:
        stamp(f"charts not drawn (--no-charts): python -m moe_ref.bench --plot {path.name}")
    elif _have_matplotlib():
        for pth in bg.write_charts(result, out, prefix=args.name):
            stamp(f"wrote {pth}")
    else:
        stamp(f"matplotlib is not installed here: no charts; redraw them elsewhere with "
              f"`python -m moe_ref.bench --plot {path.name}`")
    stamp(f"wrote {path}")
    return 0


def read_device_results(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """The device results among `paths`, and a note for each file that is missing, unreadable or not one."""
    parts, notes = [], []
    for path in paths:
        try:
            res = json.loads(Path(path).read_text())
        except FileNotFoundError:
            notes.append(f"{Path(path).name}: missing (its process wrote no result)")
            continue
        except (OSError, ValueError) as e:
            notes.append(f"{Path(path).name}: unreadable ({type(e).__name__}: {e})")
            continue
        if not isinstance(res, dict) or res.get("kind") != "device":
            notes.append(f"{Path(path).name}: not a device result")
            continue
        parts.append(res)
    return parts, notes


def merge_main(paths: list[Path], out: Path | None, charts: bool) -> int:
    """Join device results into one JSON (default: gpu.json beside the first); charts too with `charts`."""
    from . import bench_gpu as bg

    parts, notes = read_device_results(paths)
    for n in notes:
        print(f"--merge: {n}")
    if not parts:
        print("--merge: none of the files holds a device result; nothing written")
        return 2
    try:
        merged = bg.merge_results(parts)
    except ValueError as e:
        print(f"--merge: {e}")
        return 2
    merged["notes"] += notes
    merged["sources"] = [Path(p).name for p in paths]
    dest = out or paths[0].parent
    dest = dest if dest.suffix == ".json" else dest / "gpu.json"
    bg.write_json(merged, dest)
    ok = sum(r.get("status") == "ok" for r in merged["rows"])
    print(f"merged {len(parts)} of {len(paths)} results ({', '.join(merged['shapes'])}): {ok} of "
          f"{len(merged['rows'])} cases measured, complete={merged['complete']}; wrote {dest}")
    for c in merged["crosschecks"]:
        print(f"cross-check triton vs grouped at {c['shape']}: {c['flag']}")
    if charts and _have_matplotlib():
        for pth in bg.write_charts(merged, dest.parent, prefix=dest.stem):
            print(f"wrote {pth}")
    elif charts:
        print("the charts need matplotlib: none drawn")
    return 0


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_main(path: Path, out: Path | None) -> int:
    """Redraw the charts of a saved device result (e.g. after a sweep was cut short)."""
    from . import bench_gpu as bg

    result = json.loads(path.read_text())
    if not _have_matplotlib():
        print("the charts need matplotlib: pip install matplotlib (or the moe_ref[notebooks] extra)")
        return 2
    # a tuning file (moe_ref.kernels.tune) has one chart; its kind is moe_ref.kernels.configs.TUNED_KIND,
    # spelled out here because importing moe_ref.kernels needs triton and redrawing a chart does not
    if result.get("kind") == "moe_ref tuned configs":
        from .plots import plot_tuning

        dest = (out or path.parent) / (path.stem + ".png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        plot_tuning(result).savefig(dest, dpi=120, bbox_inches="tight")
        print(f"wrote {dest}")
        return 0
    for pth in bg.write_charts(result, out or path.parent):
        print(f"wrote {pth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
