"""The benchmark scripts: the CPU run's JSON and chart, the device sweep's logic (run on the CPU at a tiny
shape: timing numbers are meaningless here, the bookkeeping is what is tested), and the device charts
drawn from a SYNTHETIC result built below (made-up numbers, never results)."""

import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import torch

from helpers import cpu_sweep
from moe_ref import bench
from moe_ref.bench import Shape, cli, malloc, providers, results, sweep, targets, timing
from moe_ref.cpu_gemm import GEMM_METHODS
from moe_ref.grouped import FFN_PATHS
from moe_ref.plots import plot_bench_gpu_ratios, plot_bench_gpu_roofline, plot_bench_gpu_times

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = Shape("tiny", 32, 64, 4, 2)


def test_cpu_bench_writes_json_and_png(tmp_path, capsys):
    rc = bench.main(["--shapes", "cpu-small", "--tokens", "4", "--reps", "1", "--dtypes", "fp32", "--threads", "1",
                     "--malloc", "default", "--out", str(tmp_path), "--no-progress"])  # this process's malloc as is
    assert rc == 0
    res = json.loads((tmp_path / "cpu.json").read_text())
    assert res["machine"]["allocator"] == malloc.allocator() and "freed memory kept" not in malloc.allocator()
    assert res["shapes"] == [{"name": "cpu-small", "d_model": 256, "d_ff": 512, "num_experts": 8, "top_k": 2}]
    for key in ("date", "torch", "device", "python", "cpu_count"):
        assert res["machine"][key]
    assert res["threads"] == res["machine"]["torch_threads"] == 1
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    names = {r["provider"] for r in rows}
    assert {"gemm_only", "loop", "grouped", "grouped_mm", "grouped_plain"} <= names  # packed: grouped_plain too
    assert names - {"gemm_only", "loop", "grouped", "grouped_mm", "grouped_plain"} <= {
        "hf_eager", "hf_grouped_mm", "hf_batched_mm"}
    assert "hf_eager" in names  # transformers is a dev dependency: its peers are timed in the same run
    assert res["prepack"] is True
    assert {r["provider"] for r in rows if r["weights"] == "packed"} == {"gemm_only", "grouped"}
    bound = next(r for r in rows if r["provider"] == "gemm_only")
    for r in rows:
        assert (r["shape"], r["dtype"], r["tokens"], r["threads"]) == ("cpu-small", "fp32", 4, 1)
        assert r["seconds"] > 0 and r["iqr_s"] >= 0
        assert r["ratio_to_bound"] == pytest.approx(r["seconds"] / bound["seconds"])  # one round: paired = plain
        assert r["times_s"] == [r["seconds"]]
    assert [t["target"] for t in res["targets"]] == ["grouped <= 1.0x the best transformers experts implementation"]
    assert (tmp_path / "cpu.png").read_bytes()[:8] == PNG_MAGIC
    methods = bound["gemm_methods"]  # what prepack timed fastest, per weight and row count
    assert set(methods) == {"w13", "w2"}
    assert all(set(m.values()) <= set(GEMM_METHODS) for m in methods.values())
    assert not any("gemm_methods" in r for r in rows if r["provider"] != "gemm_only")
    paths = {r["provider"]: r.get("path") for r in rows}  # the way ffn_rows ran each one's expert GEMMs
    assert {p for p, way in paths.items() if way} == {"gemm_only", "grouped", "grouped_plain"}
    assert {paths["gemm_only"], paths["grouped"], paths["grouped_plain"]} <= set(FFN_PATHS) - {"autograd", "empty"}
    out = capsys.readouterr().out
    assert "torch threads (pinned)" in out and "packed once for oneDNN" in out
    assert "x bound  path" in out and f"  {paths['grouped']}" in out
    assert "cpu-small fp32: w13 1:" in out and "; w2 1:" in out


@pytest.mark.parametrize("batched", [True, False])
def test_the_bound_runs_the_gemms_the_grouped_strategy_runs(batched):
    """On ffn_rows's batched path the strategy gathers x straight into the padded buffer (grouped.batched_moe), so
    the bound is the two torch.bmm on a buffer already padded, without ffn_rows's copies; elsewhere ffn_rows."""
    import moe_ref
    from moe_ref import grouped
    layer = moe_ref.MoELayer(moe_ref.MoEConfig(16, 8, 4, 2), dtype=torch.bfloat16, seed=0)
    if moe_ref.packing.prepack_unsupported(layer.w13) is not None:
        pytest.skip("no packed GEMMs here")
    moe_ref.prepack(layer.w13, layer.w2, measure=lambda fns, rounds: {
        k: (0.01 if batched else 100.0) if k == "batched" else 1.0 if k == "packed" else 2.0 for k in fns})  # not mm
    counts = [3, 0, 5, 2]
    x = torch.randn(5, 16).to(torch.bfloat16)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bmm", lambda a, b, real=torch.bmm, **kw: calls.append(("bmm", tuple(a.shape)))
                   or real(a, b, **kw))
        mp.setattr(grouped, "padded_gemms", lambda *a: calls.append(("copies",)))
        bench.gemm_only(x, counts, layer.w13, layer.w2)()
    assert calls == ([("bmm", (4, 5, 16)), ("bmm", (4, 5, 8))] if batched else []), calls  # [E, C, D], [E, C, F]


def test_cpu_bench_plain_leaves_the_weights_unpacked(tmp_path, capsys):
    rc = bench.main(["--shapes", "cpu-small", "--tokens", "2", "--reps", "1", "--dtypes", "bf16", "--threads", "1",
                     "--malloc", "default", "--peers", "--plain", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "cpu.json").read_text())
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    assert res["prepack"] is False and {r["weights"] for r in rows} == {"plain"}
    assert {r["provider"] for r in rows} == {"gemm_only", "loop", "grouped", "grouped_mm"}  # no grouped_plain
    assert not any("gemm_methods" in r for r in rows)
    assert "packed once" not in capsys.readouterr().out


KEEP_CHILD = """
import json, sys, time, torch
from moe_ref.bench import malloc
before = malloc.allocator()
def fresh_ms():  # a 32 MiB block allocated, written and freed, as a prefill layer's permuted rows are
    t = time.perf_counter()
    for _ in range(10):
        torch.ones(8 << 20)
    return (time.perf_counter() - t) * 100
fresh_ms(); default = min(fresh_ms() for _ in range(3))
after = malloc.keep_freed_memory()
fresh_ms(); kept = min(fresh_ms() for _ in range(3))
print(json.dumps(dict(before=before, after=after, now=malloc.allocator(), default=default, kept=kept)))
"""


@pytest.mark.skipif(malloc._glibc() is None, reason="mallopt's thresholds are glibc's")
def test_keep_freed_memory_reuses_large_blocks():
    """In a fresh process (the setting is process-wide): described before and after, and a freed 32 MiB block is
    reused rather than faulted in again (glibc's default maps it anew on every allocation)."""
    out = subprocess.run([sys.executable, "-c", KEEP_CHILD], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k not in malloc._ENV}).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["before"] == "glibc malloc, default settings"
    assert r["after"] == r["now"] and "freed memory kept" in r["after"] and "1024 MiB" in r["after"]
    assert r["kept"] < r["default"], r  # page faults: several ms per fresh 32 MiB, none for a reused one


def test_keep_freed_memory_explains_where_it_cannot(monkeypatch, capsys):
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert "C library's malloc" in malloc.allocator()
    with pytest.raises(RuntimeError, match="needs glibc's mallopt.*--malloc default"):
        malloc.keep_freed_memory()
    assert bench.main(["cpu", "--malloc", "keep", "--tokens", "1"]) == 2
    assert "needs glibc's mallopt" in capsys.readouterr().out


def test_cpu_bench_rejects_bad_counts(capsys):
    assert bench.main(["cpu", "--reps", "0"]) == 2
    assert bench.main(["cpu", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().out
    for argv, why in ((["gpu", "--budget-ms", "0"], "must be > 0, got 0"), (["gpu", "--cap-ms", "-5"], "must be > 0"),
                      (["gpu", "--skew", "-1"], "must be >= 0, got -1"), (["gpu", "--skew", "nan"], "must be >= 0"),
                      (["gpu", "--time-limit", "0"], "must be > 0"), (["tune", "--time-limit", "x"], "a number")):
        with pytest.raises(SystemExit) as exc:  # refused by argparse, before a device is looked for
            bench.main(argv)
        assert exc.value.code == 2 and why in capsys.readouterr().err, argv
    for command in ("cpu", "gpu", "tune"):  # a token count below 1 is refused before anything runs
        for bad, why in (("0", "must be >= 1, got 0"), ("-5", "must be >= 1, got -5"), ("x", "must be an integer")):
            with pytest.raises(SystemExit) as exc:
                bench.main([command, "--tokens", "16", bad])
            assert exc.value.code == 2 and why in capsys.readouterr().err, (command, bad)


def _fake_clock(seconds: dict[str, list[float]]):
    """clock for time_cpu: each callable's calls take the listed seconds in turn (keyed by fn.__name__)."""
    def clock(fn, threads):
        it = iter(seconds[fn.__name__])
        return lambda: next(it)
    return clock


def _named(name):
    def f():
        return None
    f.__name__ = name
    return f


def test_time_cpu_interleaves_pins_threads_and_keeps_median_and_iqr():
    order = []
    fns = {n: (lambda n=n: order.append(n)) for n in ("a", "b", "c")}
    before = torch.get_num_threads()
    seen = []

    def clock(fn, threads):
        seen.append((threads, torch.get_num_threads()))
        return lambda: (fn(), 0.001)[1]

    t = timing.time_cpu(fns, rounds=12, warmup=1, threads=1, clock=clock)
    assert order[:3] == ["a", "b", "c"]  # one warm-up round
    rounds = [order[i:i + 3] for i in range(3, len(order), 3)]
    assert len(rounds) == 12 and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # interleaved: each once a round
    behind = {n: {r[i - 1] for r in rounds for i in range(1, 3) if r[i] == n} for n in fns}  # within a round
    assert all(b == set(fns) - {n} for n, b in behind.items()), behind  # each fn ran right after each other one
    assert seen == [(1, 1)] * 3 and torch.get_num_threads() == before  # pinned, then restored
    assert t["a"]["threads"] == 1 and t["a"]["times_s"] == [0.001] * 12 and t["a"]["iqr_s"] == 0
    again = []
    timing.time_cpu({n: (lambda n=n: again.append(n)) for n in fns}, rounds=12, warmup=1, clock=clock)
    assert again == order  # seeded: the same orders on every run
    t = timing.time_cpu({"f": _named("f")}, rounds=5, warmup=0, clock=_fake_clock({"f": [5, 1, 3, 2, 4]}))
    assert t["f"]["median_s"] == 3 and t["f"]["iqr_s"] == pytest.approx(2.0)  # quartiles 2 and 4
    for bad in (dict(rounds=0), dict(warmup=-1), dict(threads=0), dict(threads=True)):
        with pytest.raises(ValueError):
            timing.time_cpu({"f": _named("f")}, **bad)


def test_after_times_each_call_right_after_its_setup():
    """timing.after: the default clock (torch.utils.benchmark) runs the setup untimed before each timed call, and
    once before its two warm-up calls; called directly the callable is just fn; time_cpu's rows are the same."""
    log = []

    def setup():
        log.append("setup")

    def part():
        log.append("part")
        return 7

    timed = timing.after(setup, part)
    assert timed() == 7 and timed.__name__ == "part" and log == ["part"]
    log.clear()
    clock = timing._benchmark_clock(timed, 1)
    assert clock() > 0
    assert log == ["setup", "part", "part", "setup", "part"]  # warm-up pair, then the timed call right after setup
    log.clear()
    t = timing.time_cpu({"part": timed}, rounds=2, warmup=0, threads=1)
    assert len(t["part"]["times_s"]) == 2 and log == ["setup", "part", "part", "setup", "part"] * 2
    log.clear()
    timing._benchmark_clock(part, 1)()  # a plain callable: no setup
    assert log == ["part"] * 3


def test_distrust_flags_beating_the_bound_and_wide_spreads(capsys):
    def t(med, iqr=0.0):
        return dict(median_s=med, iqr_s=iqr)

    timed = {"bound": t(1.0), "ok": t(1.2, 0.1), "fast": t(0.9), "tie": t(0.96), "noisy": t(2.0, 0.5)}
    flags = timing.distrust(timed, "bound")
    assert set(flags) == {"fast", "noisy"}  # 4 % under the bound is within BEAT_BOUND; 10 % is not
    assert "0.90x its own bound" in flags["fast"] and "spread 25 %" in flags["noisy"]
    assert timing.distrust({"bound": t(1.0, 0.3)}, "bound") == {"bound": "spread 30 % of the median (IQR)"}
    with pytest.raises(KeyError):
        timing.distrust(timed, "nope")
    assert not timing.warn_if_busy({})
    assert timing.warn_if_busy(flags, "T=16")
    out = capsys.readouterr().out
    assert "WARNING (T=16)" in out and "can't be trusted" in out and "fast:" in out


def test_paired_ratio_compares_round_by_round():
    """A slow phase that hits a provider's rounds and its bound's alike cancels in the paired ratio."""
    t = timing.time_cpu({"bound": _named("bound"), "f": _named("f")}, rounds=3, warmup=0,
                        clock=_fake_clock({"bound": [1.0, 5.0, 4.0], "f": [1.0, 10.0, 2.0]}))
    assert t["f"]["median_s"] / t["bound"]["median_s"] == 0.5  # the medians come from different rounds
    assert timing.paired_ratio(t["f"], t["bound"]) == 1.0  # per round: 1.0, 2.0, 0.5
    flags = timing.distrust(t, "bound")  # both noisy, but f is not "faster than its bound" (0.5x by the medians)
    assert set(flags) == {"bound", "f"} and all("spread" in why for why in flags.values())
    assert timing.paired_ratio(dict(median_s=3.0), dict(median_s=2.0)) == 1.5  # no per-round times: the medians


def test_cpu_bench_marks_untrusted_rows_with_a_fake_clock(tmp_path, capsys):
    """A provider 'faster' than the bound and a noisy one are flagged in the rows, the table and the chart."""
    from moe_ref.bench import cpu
    from moe_ref.plots import plot_bench_cpu

    def clock(fn, threads):
        # the bound's callable is a closure named run; the strategies are lambdas over get_strategy(...)
        name = fn.__name__
        ts = iter([1.0, 1.0, 1.0] if name == "run" else [0.5, 0.5, 0.5] if clock.n == 0 else [1.0, 2.0, 3.0])
        clock.n += name != "run"
        return lambda: next(ts)

    clock.n = 0
    rows = cpu.bench_cpu(TINY, [3], ["fp32"], strategies=("loop", "grouped"), peers=(), reps=3,
                         progress_bar=False, clock=clock)
    by = {r["provider"]: r for r in rows}
    assert "warning" not in by["gemm_only"]
    assert "its own bound" in by["loop"]["warning"] and "spread" in by["grouped"]["warning"]
    targets = cpu.cpu_targets(rows, min_tokens=1)
    assert targets == [dict(shape="tiny", dtype="fp32", tokens=3, trusted=False, met=False, value=2.0, limit=1.10,
                            target="grouped <= 1.10x the GEMM-only bound at T >= 1", ci=[1.0, 3.0], coverage=0.75,
                            rounds=3)]
    cpu.print_table(rows, targets)
    out = capsys.readouterr().out
    assert "! 0.50x its own bound" in out and "MISSED" in out and "(untrusted case)" in out
    assert "[75 % interval 1.00-3.00x over 3 rounds; the limit lies inside it: within this run's noise]" in out
    assert "targets: 0 of 1 met; 1 verdict(s) within this run's noise" in out
    assert "can't be trusted" in out.splitlines()[-1]
    fig = plot_bench_cpu({"rows": rows, "threads": 1, "machine": {"device": "cpu: fake", "torch": "x",
                                                                  "date": "2026-12-02"}})
    assert "untrusted" in fig.axes[0].get_title()
    [legend] = fig.legends  # one for the figure, none inside a panel, naming the red circles and the target line
    assert not any(ax.get_legend() for ax in fig.axes)
    assert {"gemm_only", "loop", "grouped", "grouped_plain", "untrusted: the machine looked busy",
            "1.10x: grouped's target at T >= 1024"} == {t.get_text() for t in legend.get_texts()}
    fig.savefig(tmp_path / "c.png")


def _ratio_clock(grouped: list[float]):
    """clock for bench_cpu: the bound (a closure named run) takes 1 s a call, the grouped strategy (the one lambda,
    no peers, no plain weights) the listed seconds in turn across time_cpu calls, the parts 0.01 s; calls counted."""
    seconds = iter(grouped)

    def clock(fn, threads):
        name = fn.__name__
        clock.calls[name] = clock.calls.get(name, 0) + 1
        return lambda: 1.0 if name == "run" else next(seconds) if name == "<lambda>" else 0.01

    clock.calls = {}
    return clock


@pytest.mark.parametrize("first, confirmed", [
    ([1.0, 1.05, 1.08, 1.12, 1.2, 1.06, 1.09], True),  # 1.10 inside [1.00, 1.20] after 7 rounds: 24 more are timed
    ([1.0, 1.05, 1.08, 1.04, 1.02, 1.06, 1.09], False),  # [1.00, 1.09]: the verdict stands, nothing more is timed
])
def test_cpu_bench_times_more_rounds_of_a_verdict_within_noise(first, confirmed, capsys):
    from moe_ref.bench import cpu

    clock = _ratio_clock(first + [1.05] * cpu.CONFIRM_ROUNDS)
    rows = cpu.bench_cpu(TINY, [1024], ["fp32"], strategies=("grouped",), peers=(), reps=7, progress_bar=False,
                         clock=clock, prepack=False)
    by = {r["provider"]: r for r in rows}
    n = 7 + cpu.CONFIRM_ROUNDS * confirmed
    assert by["grouped"]["rounds"] == by["gemm_only"]["rounds"] == len(by["grouped"]["times_s"]) == n
    assert all(by[f"grouped:{p}"]["rounds"] == 7 for p in cpu.PARTS)  # only the verdict's two sides again
    assert clock.calls == {"run": 1 + confirmed, "<lambda>": 1 + confirmed, "plan_part": 1, "gather": 1,
                           "combine": 1}
    [t] = cpu.cpu_targets(rows)
    assert t["rounds"] == n and t["met"] and not cpu._within_noise(t)
    assert t["ci"] == ([1.05, 1.05] if confirmed else [1.0, 1.09])  # the 10th and 22nd of 31 sorted ratios
    c7, c31 = timing.median_ci([0.0] * 7)[2], timing.median_ci([0.0] * 31)[2]  # 98.4 %, 97.1 %
    # two looks: the first interval or the last may miss the median, so their shortfalls add up (95.5 %)
    assert t["coverage"] == (pytest.approx(c31 - (1 - c7)) if confirmed else c7)
    assert by["grouped"].get("first_rounds") == (7 if confirmed else None)
    cpu.print_table(rows, [t])
    assert f"interval {t['ci'][0]:.2f}-{t['ci'][1]:.2f}x over {n} rounds]" in capsys.readouterr().out
    none = cpu.bench_cpu(TINY, [1024], ["fp32"], strategies=("grouped",), peers=(), reps=7, progress_bar=False,
                         clock=_ratio_clock(first), prepack=False, confirm=0)
    assert {r["rounds"] for r in none} == {7}


def test_cpu_bench_confirms_a_peer_verdict_with_every_peer(monkeypatch):
    """More rounds may make another peer the best: each peer gets them, so the verdict pairs all of its rounds."""
    from moe_ref.bench import cpu

    seconds = {"run": [1.0] * 7, "grouped": [1.0] * 31, "hf_eager": [1.05] * 31,
               "hf_grouped_mm": [0.9, 1.2, 0.95, 1.1, 0.98, 1.03, 1.01] + [1.2] * 24}
    its = {n: iter(ts) for n, ts in seconds.items()}  # the bound (run) has no more than its 7 rounds

    def clock(fn, threads):
        return lambda: next(its[fn.__name__])

    fns = {n: _named(n) for n in ("grouped", "hf_eager", "hf_grouped_mm")}
    monkeypatch.setattr(cpu, "_providers", lambda *a: (dict(fns), {}))
    rows = cpu.bench_cpu(TINY, [3], ["fp32"], strategies=("grouped",), peers=("hf_eager", "hf_grouped_mm"), reps=7,
                         progress_bar=False, clock=clock, prepack=False)
    by = {r["provider"]: r for r in rows}
    assert {n: by[n]["rounds"] for n in by} == {"gemm_only": 7, "grouped": 31, "hf_eager": 31, "hf_grouped_mm": 31}
    [t] = cpu.cpu_targets(rows)  # after 7 rounds hf_grouped_mm was the best, with 1.0 inside [0.83, 1.11]
    assert t["peer"] == "hf_eager" and t["rounds"] == 31 and t["met"] and not cpu._within_noise(t)


def test_extend_appends_rounds_and_pairs_the_shared_ones():
    a = timing.time_cpu({"f": _named("f")}, rounds=3, warmup=0, clock=_fake_clock({"f": [3.0, 1.0, 2.0]}))["f"]
    more = dict(median_s=5.0, iqr_s=0.0, times_s=[5.0, 4.0], threads=a["threads"])
    both = timing.extend(a, more)
    assert both["times_s"] == [3.0, 1.0, 2.0, 5.0, 4.0] and both["median_s"] == 3.0 and both["iqr_s"] == 2.0
    bound = dict(median_s=1.0, times_s=[1.0, 1.0, 2.0])  # timed in the first three rounds only
    assert timing.paired_ratio(both, bound) == 1.0  # the ratios 3, 1, 1 of the rounds both were in
    assert timing.paired_ratio_ci(both, bound)[:2] == (1.0, 3.0)
    with pytest.raises(ValueError, match="thread count"):
        timing.extend(a, dict(more, threads=a["threads"] + 1))


def test_median_ci_is_two_order_statistics_with_their_binomial_coverage():
    lo, hi, cov = timing.median_ci([float(v) for v in range(15, 0, -1)])  # any order
    assert (lo, hi) == (4.0, 12.0) and cov == pytest.approx(1 - 2 * 576 / 2**15)  # P(B <= 3) = 576 / 2^15
    assert timing.median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[:2] == (1.0, 6.0)  # n = 6: the range, 96.9 %
    assert timing.median_ci([1.0, 2.0, 3.0])[2] == 0.75  # too few rounds for 95 %: the range, and it says so
    assert timing.median_ci([2.0]) == (2.0, 2.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        timing.median_ci([])
    with pytest.raises(ValueError, match="confidence"):
        timing.median_ci([1.0], confidence=1.0)
    rng = __import__("random").Random(7)  # it covers the true median (1.0 for a log-normal) as often as it says
    hits = sum(lo <= 1.0 <= hi for lo, hi, _ in (timing.median_ci([rng.lognormvariate(0, 0.3) for _ in range(15)])
                                                 for _ in range(2000)))
    assert 0.94 <= hits / 2000 <= 0.99


def test_paired_ratio_ci_reads_the_rounds():
    a, b = dict(median_s=2.0, times_s=[2.0, 3.0, 4.0, 2.0, 1.0, 6.0]), dict(median_s=1.0, times_s=[1.0] * 6)
    assert timing.paired_ratio_ci(a, b)[:2] == (1.0, 6.0)
    assert timing.paired_ratio_ci(dict(median_s=2.0), b) is None  # no rounds kept


def test_cpu_targets_compare_grouped_with_the_best_peer():
    def row(p, sec, T=2048):
        return dict(shape="s", dtype="bf16", tokens=T, provider=p, status="ok", seconds=sec,
                    ratio_to_bound=sec / 1.0)
    rows = [row("gemm_only", 1.0), row("grouped", 1.05), row("hf_eager", 1.3), row("hf_grouped_mm", 1.0),
            dict(shape="s", dtype="bf16", tokens=2048, provider="hf_batched_mm", status="skipped", reason="big"),
            row("gemm_only", 1.0, T=16), row("grouped", 2.0, T=16)]
    got = {(t["tokens"], "bound" if "bound" in t["target"] else "peer"): t for t in cpu_targets_of(rows)}
    assert got[(2048, "bound")]["met"] and got[(2048, "bound")]["trusted"]
    peer = got[(2048, "peer")]
    assert peer["peer"] == "hf_grouped_mm" and peer["value"] == pytest.approx(1.05) and not peer["met"]
    assert set(got) == {(2048, "bound"), (2048, "peer")}  # T=16: below min_tokens, and no peer measured there


def cpu_targets_of(rows):
    from moe_ref.bench.cpu import cpu_targets
    return cpu_targets(rows)


def test_batched_mm_is_skipped_past_its_memory_budget(monkeypatch):
    from moe_ref.bench import cpu
    monkeypatch.setattr(cpu, "BATCHED_MM_BYTES", 1)
    rows = cpu.bench_cpu(TINY, [2], ["fp32"], strategies=("grouped",), reps=1, progress_bar=False)
    skipped = {r["provider"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "GiB of weights" in skipped["hf_batched_mm"]


def _sweep(providers, tokens=(1, 5), **kw):
    return cpu_sweep(TINY, providers, tokens, **kw)


def test_device_sweep_bookkeeping_on_cpu():
    seen = []
    res = _sweep(["loop", "grouped", "grouped_mm", "triton", "triton_graph"],
                 on_progress=lambda r: seen.append(len(r["rows"])))
    assert res["notes"] == ["tiny: triton_graph provider skipped: CUDA graphs need a CUDA device"]
    assert res["complete"] and seen == [4, 8]  # partial results after every token count
    json.dumps(res)  # serialisable as is
    lim = res["limits"]
    assert lim["copy_Bps"] > 0 and lim["matmul_flops"] > 0 and lim["nominal_hbm_Bps"] == 4.3e12
    D, F, K, el = TINY.d_model, TINY.d_ff, TINY.top_k, 4
    for r in res["rows"]:
        assert r["status"] == "ok", r
        assert ("config" in r) == (r["provider"] == "triton")  # the tile config triton ran with
        assert r["flops"] == 6 * D * F * r["tokens"] * K
        assert 1 <= r["hit_experts"] <= min(TINY.num_experts, r["tokens"] * K)
        assert r["weight_bytes"] == r["hit_experts"] * 3 * D * F * el
        s = r["median_ms"] * 1e-3
        assert r["tflops"] == pytest.approx(r["flops"] / s / 1e12)
        assert r["gbps"] == pytest.approx(r["weight_bytes"] / s / 1e9)
        assert r["hbm_frac_nominal"] == pytest.approx(r["weight_bytes"] / 4.3e12 / s)
        assert r["matmul_frac"] == pytest.approx(r["flops"] / lim["matmul_flops"] / s)
        assert r["max_rel_err"] < 1e-4 and r["agrees"]  # every provider computes the same layer (fp32)
    ms = {(r["tokens"], r["provider"]): r["median_ms"] for r in res["rows"]}
    for q in res["ratios"]:
        T = q["tokens"]
        assert q["triton_vs_grouped_mm"] == pytest.approx(ms[(T, "grouped_mm")] / ms[(T, "triton")])
        assert q["triton_vs_loop"] == pytest.approx(ms[(T, "loop")] / ms[(T, "triton")])
    assert [q["tokens"] for q in res["ratios"]] == [1, 5]


@pytest.mark.slow  # the sweep under the Triton interpreter
def test_device_sweep_skips_are_recorded():
    res = _sweep(["grouped", "loop"], tokens=(1, 2, 64), cap_ms=1e-9)
    # two measured points are needed for an estimate: T=1 and T=2 run, T=64 is skipped by the cap
    by = {(r["tokens"], r["provider"]): r for r in res["rows"]}
    assert by[(2, "loop")]["status"] == "ok"
    assert by[(64, "loop")]["status"] == "skipped" and "cap" in by[(64, "loop")]["reason"]
    assert {(s["tokens"], s["provider"]) for s in res["skipped"]} == {(64, "grouped"), (64, "loop")}
    res = _sweep(["grouped"], tokens=(1,), time_limit_s=0.0)
    assert res["rows"][0]["status"] == "skipped" and "time limit" in res["skipped"][0]["reason"]


@pytest.mark.slow  # the sweep under the Triton interpreter
def test_device_sweep_records_provider_errors(monkeypatch):
    real = sweep.make_providers

    def with_failing(layer, names, notes):
        provs = real(layer, ["grouped"], notes)

        def boom(x, r):
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")

        provs["boom"] = boom
        return provs

    monkeypatch.setattr(sweep, "make_providers", with_failing)
    res = _sweep(["grouped", "boom"], tokens=(1, 2))
    by = {(r["tokens"], r["provider"]): r for r in res["rows"]}
    assert by[(1, "grouped")]["status"] == "ok" and by[(2, "grouped")]["status"] == "ok"  # the sweep went on
    assert by[(1, "boom")]["status"] == "error"
    assert by[(1, "boom")]["reason"] == "RuntimeError: CUDA out of memory (simulated)"
    assert len(res["skipped"]) == 2


def test_make_providers_names_hf_implementations():
    layer = providers.make_layer(TINY, torch.float32, "cpu")
    assert layer.w13.shape == (4, 128, 32) and layer.w13.device.type == "cpu"
    notes = []
    provs = sweep.make_providers(layer, ["grouped", "hf"], notes)
    hf = [p for p in provs if p != "grouped"]
    try:
        import moe_ref.hf  # noqa: F401
    except ImportError:
        assert hf == [] and "Hugging Face" in notes[0]
    else:
        assert hf and all(p.startswith("hf_") for p in hf), (hf, notes)


def test_make_layer_draws_weights_on_the_device():
    shape = Shape("mid", 64, 96, 5, 2)
    layer = providers.make_layer(shape, torch.bfloat16, "cpu", seed=3)
    assert isinstance(layer, providers.MoELayer) and layer.cfg.num_experts == 5
    for name, size, std in (("router_weight", (5, 64), 64**-0.5), ("w13", (5, 192, 64), 64**-0.5),
                            ("w2", (5, 64, 96), 96**-0.5)):
        w = getattr(layer, name)
        assert w.shape == size and w.dtype == torch.bfloat16 and not w.requires_grad
        assert w.float().std().item() == pytest.approx(std, rel=0.1)
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert layer(x, strategy="grouped").output.shape == (4, 64)


def test_skip_reason_linear_estimate():
    last = {"loop": [(1, 2.0), (16, 5.0)]}  # slope 0.2 ms per token
    r = sweep._skip_reason("loop", TINY, 1024, 2, last, cap_ms=100.0, device="cpu")
    assert r is not None and "estimated 207 ms" in r
    assert sweep._skip_reason("loop", TINY, 256, 2, last, cap_ms=100.0, device="cpu") is None  # 53 ms
    assert sweep._skip_reason("loop", TINY, 10**6, 2, {"loop": [(1, 2.0)]}, cap_ms=1.0, device="cpu") is None


def test_timer_rejects_bad_mode():
    with pytest.raises(ValueError, match="timer mode"):
        timing.Timer("cpu", mode="stopwatch")
    with pytest.raises(ValueError, match="CUDA"):
        timing.Timer("cpu", mode="do_bench")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_flag_without_cuda_says_so(capsys):
    assert bench.main(["gpu", "--out", "/nonexistent-never-written"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out


# ------------------------------------------------------------------ charts on a SYNTHETIC result

def synthetic_result(complete=True) -> dict:
    """A made-up device result (SYNTHETIC numbers, for drawing only): triton twice as fast as grouped_mm,
    triton_graph three times."""
    rows = []
    for shape in ("mixtral-8x7b", "qwen3-30b-a3b"):
        for T in (1, 16, 256):
            for p, ms in (("grouped_mm", 1.0 + T / 100), ("triton", (1.0 + T / 100) / 2), ("loop", 3.0 + T / 10),
                          ("triton_graph", (1.0 + T / 100) / 3)):
                rows.append(dict(shape=shape, tokens=T, provider=p, status="ok", median_ms=ms, tflops=T / ms,
                                 gbps=1000 / ms, hbm_frac_nominal=0.3 / ms, hbm_frac_measured=0.35 / ms,
                                 matmul_frac=T / 1000 / ms, roofline_frac=0.4 / ms))
        rows.append(dict(shape=shape, tokens=256, provider="hf_batched_mm", status="skipped", reason="memory"))
    return dict(kind="device", complete=complete, rows=rows, ratios=targets.ratios(rows),
                shapes={"mixtral-8x7b": {}, "qwen3-30b-a3b": {}},
                machine=dict(device="SYNTHETIC", torch="x", triton="y", date="2000-01-01"),
                settings=dict(dtype="bfloat16"), limits=dict(copy_Bps=4e12, matmul_flops=7e14))


@pytest.mark.slow  # draws every device chart
def test_gpu_charts_from_synthetic_result(tmp_path):
    res = synthetic_result(complete=False)
    fig = plot_bench_gpu_times(res)
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["mixtral-8x7b", "qwen3-30b-a3b"]
    assert sorted(line.get_label() for line in axes[0].get_lines()) == ["grouped_mm", "loop", "triton", "triton_graph"]
    tri = next(line for line in axes[0].get_lines() if line.get_label() == "triton")
    assert list(tri.get_xdata()) == [1, 16, 256]
    assert "PARTIAL" in fig._suptitle.get_text() and "SYNTHETIC" in fig._suptitle.get_text()
    plt.close(fig)
    fig = plot_bench_gpu_ratios(res)
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "triton vs grouped_mm")
    assert list(line.get_ydata()) == pytest.approx([2.0, 2.0, 2.0])
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "triton_graph vs grouped_mm")
    assert list(line.get_ydata()) == pytest.approx([3.0, 3.0, 3.0]) and line.get_linestyle() == "--"
    plt.close(fig)
    fig = plot_bench_gpu_roofline(res)
    assert any("HBM" in ln.get_label() for ln in fig.axes[0].get_lines())
    assert any(ln.get_label().startswith("triton_graph:") for ln in fig.axes[0].get_lines())
    plt.close(fig)
    for plot in (plot_bench_gpu_times, plot_bench_gpu_ratios, plot_bench_gpu_roofline):
        fig = plot(res)
        [legend] = fig.legends  # one for the figure, below the panels; none inside a panel, where it hid lines
        assert not any(ax.get_legend() for ax in fig.axes)
        labels = [t.get_text() for t in legend.get_texts()]
        drawn = {ln.get_label() for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        assert len(labels) == len(set(labels)) and set(labels) == drawn, (plot.__name__, labels, drawn)
        plt.close(fig)
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert bench.main(["plot", str(tmp_path / "r.json")]) == 0
    for name in ("gpu_times.png", "gpu_ratios.png", "gpu_roofline.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_targets_on_synthetic_rows():
    res = synthetic_result()
    graph_hbm, tri_peak, tri_mm = (t.name for t in targets.TARGETS)
    got = {(t["target"], t["shape"], t["tokens"]): t for t in targets.evaluate_targets(res["rows"])}
    assert got[(tri_mm, "mixtral-8x7b", 1)]["met"] is True  # 2x faster than grouped_mm
    assert got[(tri_mm, "mixtral-8x7b", 256)]["value"] == pytest.approx(2.0)
    assert got[(tri_mm, "qwen3-30b-a3b", 16)]["provider"] == "triton"
    assert got[(graph_hbm, "qwen3-30b-a3b", 1)]["value"] == pytest.approx(0.3 / ((1.0 + 1 / 100) / 3))
    assert got[(graph_hbm, "qwen3-30b-a3b", 1)]["met"] is True and got[(graph_hbm, "qwen3-30b-a3b", 1)]["provider"] \
        == "triton_graph"
    assert (graph_hbm, "mixtral-8x7b", 256) not in got  # only up to 64 tokens
    assert not any(k[0] == tri_peak for k in got)  # no 8192+ token rows in this result
    slow = [dict(r, median_ms=r["median_ms"] * 3) if r["provider"] == "triton" else r for r in res["rows"]]
    missed = {(t["target"], t["shape"], t["tokens"]): t for t in targets.evaluate_targets(slow)}
    assert missed[(tri_mm, "mixtral-8x7b", 16)]["met"] is False  # 2/3 of grouped_mm's speed: a miss
    spec = targets.targets_as_data()
    assert [t["threshold"] for t in spec] == [0.7, 0.6, 1.1] and spec[0]["max_tokens"] == 64


def test_load_device_results_finds_runs_in_subfolders_and_ignores_cpu_runs(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.json").write_text(json.dumps({"machine": {"date": "2026-01-03"}, "rows": [{}]}))
    (tmp_path / "h200-a").mkdir()
    for name, date in (("h200-a/gpu.json", "2026-01-01"), ("h200-b.json", "2026-01-02")):
        (tmp_path / name).write_text(json.dumps({"kind": "device", "machine": {"date": date}, "rows": [{}]}))
    (tmp_path / "broken.json").write_text("{not json")
    found = results.load_device_results(tmp_path)
    assert [r["machine"]["date"] for r in found] == ["2026-01-02", "2026-01-01"]  # newest first
    assert found[1]["_path"].endswith("h200-a/gpu.json")
    assert results.load_device_results(tmp_path / "missing") == []
    assert results.load_device_results(None) == []


@pytest.mark.slow  # the sweep under the Triton interpreter
def test_without_matplotlib_the_sweep_still_writes_its_json(tmp_path, monkeypatch, capsys):
    """A bare GPU machine may lack matplotlib: the measured JSON must survive, the charts are redrawn elsewhere."""
    monkeypatch.setattr(cli, "have_matplotlib", lambda: False)
    rc = bench.main(["gpu", "--device", "cpu", "--shapes", "cpu-small", "--tokens", "1", "--dtype", "fp32",
                     "--providers", "loop", "grouped", "--budget-ms", "5", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["rows"] and all(r["status"] == "ok" for r in res["rows"])
    assert not list(tmp_path.glob("*.png"))
    assert "no charts" in capsys.readouterr().out
    assert bench.main(["plot", str(tmp_path / "gpu.json")]) == 2
    assert "need matplotlib" in capsys.readouterr().out


@pytest.mark.slow  # the sweep under the Triton interpreter
def test_tuned_tables_are_loaded_and_recorded(tmp_path, monkeypatch):
    """--tuned FILE registers the tables before the sweep and the result says which files were used."""
    from moe_ref.kernels.configs import TUNED_CONFIGS, TUNED_KIND

    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps(dict(kind=TUNED_KIND, machine=dict(device="Test GPU"), dtype="float32", entries=[
        dict(shape="cpu-small", E=8, D=256, F=512, K=2, table={"1": cfg}, trials=[], untuned=[])])))
    monkeypatch.setattr(cli, "have_matplotlib", lambda: False)
    try:
        rc = bench.main(["gpu", "--device", "cpu", "--shapes", "cpu-small", "--tokens", "1", "--dtype", "fp32",
                         "--providers", "loop", "--budget-ms", "5", "--out", str(tmp_path), "--no-progress",
                         "--tuned", str(tuned)])
        assert rc == 0
        assert TUNED_CONFIGS["Test GPU"][(8, 256, 512, "float32")] == {1: cfg}
    finally:
        TUNED_CONFIGS.pop("Test GPU", None)
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["settings"]["tuned_configs"] == [dict(file=str(tuned), tables=1)]
    for bad in (tmp_path / "missing.json", tmp_path / "gpu.json"):  # absent; not a tuned-config file
        assert bench.main(["gpu", "--device", "cpu", "--tuned", str(bad), "--out", str(tmp_path / "x")]) == 2


def test_graph_replayer_captures_once_per_inputs_and_replays(monkeypatch):
    """The caching logic of the triton_graph provider, with torch.cuda's graph API faked on the CPU
    (the real capture and replay are checked in tests/test_kernels_gpu.py on a GPU)."""
    import contextlib

    log = []

    class FakeGraph:
        def replay(self):
            log.append("replay")

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext(log.append("capture")))

    def fn(x, r):
        log.append("eager")
        return x * 2

    run = providers.graph_replayer(fn)
    r = type("R", (), {"topk_ids": torch.zeros(3, 2, dtype=torch.long), "topk_weights": torch.ones(3, 2)})()
    x = torch.ones(3, 4)
    y = run(x, r)
    assert log == ["eager", "eager", "capture", "eager", "replay"]  # 2 warm-ups, the captured call, a replay
    assert torch.equal(y, x * 2)
    log.clear()
    assert run(x, r) is y and log == ["replay"]  # same inputs: replay only, the graph's own output
    log.clear()
    x2 = torch.ones(5, 4)
    run(x2, r)
    assert log == ["eager", "eager", "capture", "eager", "replay"]  # other inputs: a new capture


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched", [True, False])
def test_grouped_parts_are_the_strategys_own_work(dtype, batched):
    """What the bench times as grouped's parts outside the bound is what the strategy itself does: its gather gives
    the rows the GEMMs read, its combine the strategy's very output (the same bits), its plan the plan of that way."""
    import moe_ref
    from helpers import make_case
    from moe_ref import grouped
    from moe_ref.bench.cpu import PARTS, grouped_parts

    layer, x = make_case(40, 32, 16, 6, 2, seed=3)
    low = moe_ref.MoELayer(layer.cfg, dtype=dtype)
    low.load_state_dict(layer.state_dict())
    fast = 0.01 if batched else 100.0  # prepack's fake timing: the padded bmm wins, or never does
    moe_ref.prepack(low.w13, low.w2, measure=lambda fns, rounds: {
        k: fast if k == "batched" else 1.0 if k == "packed" else 2.0 for k in fns})
    xd, r = x.to(dtype), layer.route(x)
    with torch.inference_mode():
        parts = grouped_parts(xd, r, low.w13, low.w2)
        assert list(parts) == [f"grouped:{p}" for p in PARTS]
        steps = grouped.grouped_steps(xd, r, low.w13, low.w2)
        path = grouped.ffn_path(steps.xs, steps.plan.offsets.tolist(), low.w13, low.w2, steps.xs)
        assert (path == "batched") == batched, path
        plan, rows = parts["grouped:plan"](), parts["grouped:gather"]()
        if batched:  # padded rows, chunk by chunk: each expert's block at e*C, padding rows repeat token 0
            assert isinstance(plan, grouped.PaddedPlan)
            assert torch.equal(torch.cat(rows), xd.index_select(0, plan.src))
            assert torch.equal(torch.cat(rows).index_select(0, plan.rows.dest), steps.xs)
        else:  # the permute
            assert torch.equal(plan.token_ids, steps.plan.token_ids)
            assert torch.equal(rows, steps.xs)
        assert torch.equal(parts["grouped:combine"](), GROUPED_Y(xd, r, low.w13, low.w2))


def GROUPED_Y(x, r, w13, w2):
    from moe_ref.strategy import get_strategy
    return get_strategy("grouped")(x, r, w13, w2).y


def test_cpu_bench_times_grouped_parts_where_the_bound_target_applies(monkeypatch, capsys):
    """At T >= PARTS_MIN_TOKENS the bench times grouped's plan, gather and combine, each right after the bound: rows
    part_of grouped, after gemm_only, their ratios and bound_plus_parts (1 + their sum) in the bound target; a
    part's own spread leaves the case trusted; the chart draws no part."""
    from moe_ref.bench import cpu
    from moe_ref.plots import plot_bench_cpu

    def clock(fn, threads):
        name = fn.__name__
        ts = {"run": [1.0] * 3, "plan_part": [0.01, 0.02, 0.05], "gather": [0.02] * 3, "combine": [0.03] * 3}
        it = iter(ts.get(name, [1.05] * 3))  # the bound is a closure named run; grouped a lambda
        return lambda: next(it)
    monkeypatch.setattr(cpu, "PARTS_MIN_TOKENS", 3)
    rows = cpu.bench_cpu(TINY, [2, 3], ["fp32"], strategies=("grouped",), peers=(), reps=3, progress_bar=False,
                         clock=clock)
    parts = {(r["tokens"], r["provider"]): r for r in rows if r.get("part_of")}
    assert set(parts) == {(3, "grouped:plan"), (3, "grouped:gather"), (3, "grouped:combine")}  # not at T=2
    assert all(r["part_of"] == "grouped" and r["after"] == "gemm_only" and "weights" not in r for r in parts.values())
    assert "spread" in parts[(3, "grouped:plan")]["warning"]  # 0.01, 0.02, 0.05: IQR 0.02 over a median of 0.02
    assert parts[(3, "grouped:gather")]["ratio_to_bound"] == pytest.approx(0.02)
    (bound,) = [t for t in cpu.cpu_targets(rows, min_tokens=3) if "bound" in t["target"]]
    assert bound["trusted"] and bound["met"] and bound["value"] == pytest.approx(1.05)
    assert set(bound["parts"]) == set(cpu.PARTS) and bound["parts"]["plan"] == pytest.approx(0.02)
    assert bound["bound_plus_parts"] == pytest.approx(1.0 + sum(bound["parts"].values()))
    cpu.print_table(rows, [bound])
    out = capsys.readouterr().out
    assert ("outside the bound, each part right after its GEMMs: plan 0.020x + gather 0.020x + combine 0.030x, "
            "bound + parts 1.07x") in out
    fig = plot_bench_cpu({"rows": rows, "threads": 1, "machine": {"device": "cpu: fake", "torch": "x",
                                                                  "date": "2026-12-06"}})
    labels = {t.get_text() for lg in fig.legends for t in lg.get_texts()}
    assert "grouped" in labels and not any(label.startswith("grouped:") for label in labels), labels


def test_plot_redraws_a_cpu_run_and_names_what_it_cannot_read(tmp_path, capsys):
    rows = [dict(shape="tiny", dtype="fp32", tokens=T, provider=p, status="ok", seconds=s, iqr_s=0.0,
                 ratio_to_bound=s / 1.0) for T in (1, 4) for p, s in (("gemm_only", 1.0), ("grouped", 1.05))]
    cpu_json = tmp_path / "run" / "cpu.json"
    cpu_json.parent.mkdir()
    cpu_json.write_text(json.dumps({"kind": "cpu", "rows": rows, "threads": 1, "targets": [],
                                    "machine": {"device": "cpu: fake", "torch": "x", "date": "2026-12-07"}}))
    assert bench.main(["plot", str(cpu_json), "--out", str(tmp_path / "new" / "dir")]) == 0  # the folder is made
    assert (tmp_path / "new" / "dir" / "cpu.png").read_bytes()[:8] == PNG_MAGIC
    assert "cpu.png" in capsys.readouterr().out
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else", "rows": []}))
    for name, why in (("missing.json", "cannot read"), ("text.json", "cannot read"),
                      ("other.json", "holds no result of moe_ref.bench (kind 'something else'")):
        assert bench.main(["plot", str(tmp_path / name)]) == 2
        assert why in capsys.readouterr().out, name
