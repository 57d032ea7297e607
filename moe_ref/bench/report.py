"""Reporting a benchmark run: the machine it ran on, its JSON, its charts, its table on stdout.

Legend: T tokens; a result is the dict a sweep returns (kind "device") or the CPU bench writes (kind "cpu").
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .providers import REFERENCE_PROVIDER

__all__ = ["device_info", "write_json", "write_charts", "print_summary", "have_matplotlib"]


def device_info(device="cpu") -> dict:
    """Date, platform, versions (python, torch, triton, transformers), threads, and the device's name."""
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    for pkg in ("triton", "transformers"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                    device_memory_GB=round(p.total_memory / 1e9, 1), sm_count=p.multi_processor_count)
    else:
        info["device"] = "cpu: " + (_cpu_model() or platform.processor() or platform.machine())
    return info


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), or None."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def have_matplotlib() -> bool:
    """Charts need matplotlib; a bare GPU machine may lack it (the JSON is written anyway)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_json(result: dict, path: Path) -> None:
    """Atomic write (tmp file + rename) so a killed run leaves the last complete snapshot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def write_charts(result: dict, out: Path, prefix: str = "gpu") -> list[Path]:
    """PNG charts of a device result: times per shape, triton speedups, roofline fractions."""
    from ..plots.bench import plot_bench_gpu_ratios, plot_bench_gpu_roofline, plot_bench_gpu_times

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

