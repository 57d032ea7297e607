"""The benchmark command line: python -m moe_ref.bench cpu|gpu|merge|plot|tune ... (console script moe-ref-bench).

Legend: T tokens; JSON results and PNG charts are written under --out.
  cpu    our strategies and transformers' experts implementations on the CPU, against the GEMM-only
         bound, with the CPU targets met or missed (glibc keeping freed memory unless --malloc default;
         expert weights prepacked for the grouped strategy and the bound unless --plain)
                                                                              -> cpu.json, cpu.png
  gpu    the device sweep: real MoE shapes x token counts x providers (needs CUDA unless --device cpu)
                                                                              -> gpu.json, gpu_*.png
  merge  join device results (one process per shape) into one JSON
  plot   redraw the charts of a saved result from its JSON: a device sweep (gpu.json), a tuning file
         (tuned.json) or a CPU run (cpu.json)
  tune   tile configs for fused_moe on the GPU at hand                         -> tuned.json, tuned.png
With no sub-command, `cpu` runs. Speed goals are ratios printed here, never timed tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..strategy import strategy_names
from .cpu import CONFIRM_ROUNDS, CPU_PEERS, CPU_STRATEGIES, bench_cpu, cpu_targets, print_table
from .malloc import ALLOCATOR_MODES, allocator, keep_freed_memory
from .providers import GPU_PROVIDERS
from .report import device_info, have_matplotlib, print_summary, write_charts, write_json
from .results import merge_results, read_device_results
from .shapes import CPU_SHAPES, CPU_TOKENS, DTYPES, GPU_SHAPES, GPU_TOKENS, QUICK_TOKENS, SHAPES
from .sweep import run_sweep
from .timing import TIMER_MODES, Timer, measure_limits

__all__ = ["main"]

COMMANDS = ("cpu", "gpu", "merge", "plot", "tune")
TUNED_KIND = "moe_ref tuned configs"  # kernels.configs.TUNED_KIND: redrawing a chart must not need triton


def _stamp(msg: str) -> None:
    print(f"[{_dt.datetime.now(_dt.timezone.utc).strftime('%H:%M:%S')}] {msg}", flush=True)


def token_count(text: str) -> int:
    """An argparse type: a token count T >= 1 (T=0 times only a call's overhead, against an empty bound)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a token count must be an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {n}")
    return n


def _float_type(low: float, strict: bool):
    """An argparse type: a finite float > low (strict) or >= low."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return v
    return parse


positive = _float_type(0.0, strict=True)  # a time budget, a cap, a time limit
non_negative = _float_type(0.0, strict=False)  # a skew


def add_tune_arguments(p) -> None:
    """The `tune` sub-command's options (parsing them needs no triton; running does)."""
    p.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3"], choices=sorted(SHAPES))
    p.add_argument("--tokens", type=token_count, nargs="+", default=[1, 16, 256, 4096, 16384])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--limit", type=int, default=8, help="configs tried per token count (the default first)")
    p.add_argument("--time-limit", type=positive, default=None, help="seconds; token counts past it stay untuned")
    p.add_argument("--device", default="cuda", help="'cpu' runs the loop under TRITON_INTERPRET=1 (a dry run)")
    p.add_argument("--out", default="build/tune", help="folder for tuned.json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_ref.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cpu", help="strategies and transformers' experts on the CPU against the GEMM-only bound")
    c.add_argument("--shapes", nargs="+", default=list(CPU_SHAPES), choices=sorted(SHAPES))
    c.add_argument("--tokens", type=token_count, nargs="+", default=list(CPU_TOKENS))
    c.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    c.add_argument("--strategies", nargs="+", default=list(CPU_STRATEGIES), choices=strategy_names())
    c.add_argument("--peers", nargs="*", default=list(CPU_PEERS), choices=list(CPU_PEERS),
                   help="transformers' experts implementations timed beside ours (none: --peers)")
    c.add_argument("--reps", type=int, default=7, help="timed rounds per case (providers interleaved)")
    c.add_argument("--confirm", type=int, default=CONFIRM_ROUNDS,
                   help="more rounds of the two sides of a target verdict whose limit lies inside the interval of "
                        "its ratio (0: none)")
    c.add_argument("--threads", type=int, default=None,
                   help="torch threads, pinned for the run (default: torch's own choice, recorded)")
    c.add_argument("--malloc", default="keep", choices=ALLOCATOR_MODES,
                   help="keep: glibc keeps freed memory for reuse, as a caching allocator does (moe_ref.bench.malloc); "
                        "default: the allocator as the process started (recorded either way)")
    c.add_argument("--plain", action="store_true",
                   help="do not prepack the expert weights (grouped and the bound on the plain weights too)")
    c.add_argument("--out", default="build/bench")
    c.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("gpu", help="the device sweep (CUDA; --device cpu: a dry run)")
    g.add_argument("--quick", action="store_true", help="5 token counts, a shorter budget per case")
    g.add_argument("--shapes", nargs="+", default=list(GPU_SHAPES), choices=sorted(SHAPES))
    g.add_argument("--tokens", type=token_count, nargs="+", default=None,
                   help="default: 1 4 ... 16384 (--quick: 5 of them)")
    g.add_argument("--providers", nargs="+", default=list(GPU_PROVIDERS))
    g.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    g.add_argument("--skew", type=non_negative, default=0.0, help="Zipf skew of expert popularity (0 = router as is)")
    g.add_argument("--timer", default="auto", choices=TIMER_MODES)
    g.add_argument("--budget-ms", type=positive, default=None, help="measuring time per case (default 60 quick, 200)")
    g.add_argument("--cap-ms", type=positive, default=None,
                   help="skip a provider whose estimated time per call passes this (default 150 quick, 1000)")
    g.add_argument("--time-limit", type=positive, default=None, help="seconds; later cases are skipped, recorded")
    g.add_argument("--device", default="cuda")
    g.add_argument("--tuned", nargs="+", default=[], metavar="JSON", help="tile-config tables (bench tune)")
    g.add_argument("--name", default="gpu", help="stem of the JSON and chart files written under --out")
    g.add_argument("--no-charts", action="store_true", help="write the JSON only (charts later with plot)")
    g.add_argument("--crosscheck-elements", type=int, default=None, metavar="N",
                   help="shapes whose w13 holds more than N elements (default 2^31) always get triton compared "
                        "with grouped at their first token count, time limit or not")
    g.add_argument("--out", default="build/bench-gpu")
    g.add_argument("--no-progress", action="store_true")

    m = sub.add_parser("merge", help="join device results into one JSON")
    m.add_argument("files", nargs="+", metavar="JSON")
    m.add_argument("--out", default=None, help="the merged file, or a folder for gpu.json (default: beside the first)")
    m.add_argument("--charts", action="store_true", help="also draw the merged result's charts")

    pl = sub.add_parser("plot", help="redraw the charts of gpu.json, tuned.json or cpu.json")
    pl.add_argument("file", metavar="JSON")
    pl.add_argument("--out", default=None, help="folder for the PNGs (default: beside the file)")

    add_tune_arguments(sub.add_parser("tune", help="tile configs for fused_moe on the GPU at hand"))
    return p


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["cpu", *argv]
    args = _parser().parse_args(argv)
    return {"cpu": cpu_main, "gpu": gpu_main, "merge": merge_main, "plot": plot_main, "tune": tune_main}[
        args.command](args)


def cpu_main(args) -> int:
    """The CPU benchmark: JSON + chart under --out."""
    if args.reps < 1:
        print(f"--reps must be >= 1, got {args.reps}")
        return 2
    if args.confirm < 0:
        print(f"--confirm must be >= 0, got {args.confirm}")
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"--threads must be >= 1, got {args.threads}")
        return 2
    try:
        alloc = keep_freed_memory() if args.malloc == "keep" else allocator()
    except RuntimeError as e:
        print(e)
        return 2
    threads = args.threads or torch.get_num_threads()
    shapes = [SHAPES[s] for s in args.shapes]
    print(f"bench cpu: {threads} torch threads (pinned), "
          f"{args.reps} interleaved rounds per case (and {args.confirm} more of a verdict within their noise); "
          f"allocator: {alloc}")
    rows = bench_cpu(shapes, args.tokens, args.dtypes, args.strategies, args.peers, args.reps, threads,
                     not args.no_progress, prepack=not args.plain, confirm=args.confirm)
    targets = cpu_targets(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = dict(device_info("cpu"), torch_threads=threads, allocator=alloc)
    result = {"kind": "cpu", "machine": machine, "threads": threads, "shapes": [asdict(s) for s in shapes],
              "reps": args.reps, "confirm": args.confirm, "prepack": not args.plain, "rows": rows, "targets": targets}
    (out / "cpu.json").write_text(json.dumps(result, indent=2))
    print_table(rows, targets)
    if have_matplotlib():
        from ..plots import plot_bench_cpu

        plot_bench_cpu(result).savefig(out / "cpu.png", dpi=120, bbox_inches="tight")
        print(f"wrote {out / 'cpu.json'} and {out / 'cpu.png'}")
    else:
        print(f"wrote {out / 'cpu.json'} (no chart: matplotlib is not installed)")
    return 0


def _load_tuned(files) -> list[dict] | None:
    """Register the tuned tables before the sweep (the triton provider picks its configs from them)."""
    tuned = []
    if files:
        from ..kernels.configs import load_tuned_configs
    for f in files:
        try:
            tuned.append(dict(file=str(f), tables=load_tuned_configs(f)))
        except (OSError, ValueError, KeyError) as e:
            print(f"--tuned {f}: cannot use it: {type(e).__name__}: {e}")
            return None
    return tuned


def gpu_main(args) -> int:
    """The device sweep: JSON written after every token count (partial results survive a kill), charts at the end."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench gpu needs a CUDA device, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu for a dry run")
        return 2
    unknown = [n for n in args.providers if n not in GPU_PROVIDERS and n not in strategy_names()]
    if unknown:
        print(f"--providers: unknown {unknown}; choose from {sorted(set(GPU_PROVIDERS) | set(strategy_names()))}")
        return 2
    if args.crosscheck_elements is not None and args.crosscheck_elements < 0:
        print(f"--crosscheck-elements must be >= 0, got {args.crosscheck_elements}")
        return 2
    tuned = _load_tuned(args.tuned)
    if tuned is None:
        return 2
    shapes = [SHAPES[s] for s in args.shapes]
    tokens = args.tokens or list(QUICK_TOKENS if args.quick else GPU_TOKENS)
    timer = Timer(device, mode=args.timer, budget_ms=args.budget_ms or (60.0 if args.quick else 200.0),
                  min_reps=3 if args.quick else 5)
    cap = args.cap_ms or (150.0 if args.quick else 1000.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    cross = {} if args.crosscheck_elements is None else dict(crosscheck_elements=args.crosscheck_elements)

    def partial(result: dict) -> None:
        result["settings"].update(quick=args.quick, tuned_configs=tuned)
        write_json(result, path)
        done = result["rows"][-1] if result["rows"] else {}
        _stamp(f"{done.get('shape')} T={done.get('tokens')} done ({result['elapsed_s']:.0f} s); wrote {path}")

    _stamp(f"device sweep on {device}: shapes {[s.name for s in shapes]}, tokens {tokens}, providers {args.providers}")
    limits = measure_limits(device, DTYPES[args.dtype], timer,
                            **({} if device.type == "cuda" else dict(copy_bytes=64 << 20, matmul_sizes=(512,))))
    _stamp(f"measured copy {limits['copy_Bps'] / 1e9:.0f} GB/s, matmul {limits['matmul_flops'] / 1e12:.1f} TFLOP/s")
    result = run_sweep(shapes, tokens, args.providers, device=device, dtype=DTYPES[args.dtype], skew=args.skew,
                       timer=timer, cap_ms=cap, time_limit_s=args.time_limit, limits=limits, on_progress=partial,
                       progress=not args.no_progress, **cross)
    result["settings"].update(quick=args.quick, tuned_configs=tuned)
    write_json(result, path)
    print_summary(result)
    if args.no_charts:
        _stamp(f"charts not drawn (--no-charts): python -m moe_ref.bench plot {path.name}")
    elif have_matplotlib():
        for pth in write_charts(result, out, prefix=args.name):
            _stamp(f"wrote {pth}")
    else:
        _stamp(f"matplotlib is not installed here: no charts; redraw them elsewhere with "
               f"`python -m moe_ref.bench plot {path.name}`")
    _stamp(f"wrote {path}")
    return 0


def merge_main(args) -> int:
    """Join device results into one JSON (default: gpu.json beside the first); charts too with --charts."""
    paths = [Path(f) for f in args.files]
    parts, notes = read_device_results(paths)
    for n in notes:
        print(f"merge: {n}")
    if not parts:
        print("merge: none of the files holds a device result; nothing written")
        return 2
    try:
        merged = merge_results(parts)
    except ValueError as e:
        print(f"merge: {e}")
        return 2
    merged["notes"] += notes
    merged["sources"] = [p.name for p in paths]
    dest = Path(args.out) if args.out else paths[0].parent
    dest = dest if dest.suffix == ".json" else dest / "gpu.json"
    write_json(merged, dest)
    ok = sum(r.get("status") == "ok" for r in merged["rows"])
    print(f"merged {len(parts)} of {len(paths)} results ({', '.join(merged['shapes'])}): {ok} of "
          f"{len(merged['rows'])} cases measured, complete={merged['complete']}; wrote {dest}")
    for c in merged["crosschecks"]:
        print(f"cross-check triton vs grouped at {c['shape']}: {c['flag']}")
    if args.charts and have_matplotlib():
        for pth in write_charts(merged, dest.parent, prefix=dest.stem):
            print(f"wrote {pth}")
    elif args.charts:
        print("the charts need matplotlib: none drawn")
    return 0


def plot_main(args) -> int:
    """Redraw the charts of a saved result from its JSON alone: a device sweep (gpu.json, e.g. after a sweep was cut
    short), a tuning file (tuned.json) or a CPU run (cpu.json)."""
    path = Path(args.file)
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"plot: cannot read {path}: {e}")
        return 2
    kind = result.get("kind") if isinstance(result, dict) else None
    if kind not in ("device", "cpu", TUNED_KIND):
        print(f"plot: {path} holds no result of moe_ref.bench (kind {kind!r}; expected a device sweep's gpu.json, "
              "a CPU run's cpu.json or tune's tuned.json)")
        return 2
    if not have_matplotlib():
        print("the charts need matplotlib: pip install matplotlib (or the moe_ref[notebooks] extra)")
        return 2
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    if kind == "device":
        paths = write_charts(result, out)
    else:
        from ..plots import plot_bench_cpu, plot_tuning

        paths = [out / (path.stem + ".png")]
        (plot_tuning if kind == TUNED_KIND else plot_bench_cpu)(result).savefig(paths[0], dpi=120,
                                                                               bbox_inches="tight")
    for pth in paths:
        print(f"wrote {pth}")
    return 0


def tune_main(args) -> int:
    from .tune import run_tune

    return run_tune(args)
