"""scripts/gpu_check.sh (make gpu-check) in a dry run on the CPU, and the sweep pieces it leans on.

The GPU machine is lent rarely, for one command, and only 8 files come back from its output folder: the script
must not fail there for a reason a CPU machine could have shown (a bash error, a missing flag), must never hold
more than 8 files in OUT, and must leave usable results when a step crashes or the whole run is killed.
Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import cpu_sweep
from moe_ref import bench
from moe_ref.bench import Shape, results, sweep

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TINY = Shape("tiny", 32, 64, 4, 2)  # w13 [4, 128, 32]: 16384 elements
MAX_FILES = 8


# ------------------------------------------------------------------------- the sweep's pieces (fast)

def _sweep(providers, tokens=(1, 2), **kw):
    return cpu_sweep(TINY, providers, tokens, **kw)


@pytest.mark.slow  # the sweep under the Triton interpreter
def test_big_shapes_are_cross_checked_even_past_the_time_limit():
    res = _sweep(["grouped", "loop", "triton"], time_limit_s=0.0, crosscheck_elements=16383)
    by = {(r["tokens"], r["provider"]): r for r in res["rows"]}
    assert by[(1, "grouped")]["status"] == by[(1, "triton")]["status"] == "ok"  # protected at the first T
    assert by[(1, "loop")]["status"] == "skipped" and "time limit" in by[(1, "loop")]["reason"]
    assert by[(2, "triton")]["status"] == "skipped"  # only the first T is protected
    (c,) = res["crosschecks"]
    assert c["shape"] == "tiny" and c["w13_elements"] == 4 * 128 * 32 and c["checked"] and c["tokens"] == [1]
    assert c["flag"] == "ok" and c["max_rel_err"] < 1e-4 and c["agrees"]
    assert c["past_threshold"] == ((by[(1, "triton")]["max_expert_id"] + 1) * 128 * 32 > 16383)
    assert res["settings"]["crosscheck_elements"] == 16383
    # at the default threshold (2^31) this shape is small: the time limit skips everything, no cross-check
    res = _sweep(["grouped", "triton"], time_limit_s=0.0)
    assert res["crosschecks"] == [] and {r["status"] for r in res["rows"]} == {"skipped"}
    assert sweep.needs_crosscheck(bench.SHAPES["deepseek"]) and not sweep.needs_crosscheck(bench.SHAPES["mixtral"])


def test_a_missed_cross_check_is_flagged(monkeypatch):
    real = sweep.make_providers

    def broken_triton(layer, names, notes):
        provs = real(layer, [n for n in names if n != "triton"], notes)
        provs["triton"] = lambda x, r: (_ for _ in ()).throw(RuntimeError("out of resources (simulated)"))
        return provs

    monkeypatch.setattr(sweep, "make_providers", broken_triton)
    (c,) = _sweep(["grouped", "triton"], tokens=(1,), crosscheck_elements=0)["crosschecks"]
    assert c["flag"] == "NOT CHECKED" and not c["checked"]
    assert c["reasons"] == ["RuntimeError: out of resources (simulated)"]
    rows = [dict(shape="tiny", tokens=1, provider="triton", status="ok", max_rel_err=0.5, max_expert_id=3)]
    (c,) = sweep.crosschecks(rows, {"tiny": {"d_model": 32, "d_ff": 64, "num_experts": 4, "top_k": 2}}, 0)
    assert c["flag"] == "MISMATCH" and not c["agrees"] and c["past_threshold"]


def test_a_cuda_fault_stops_the_process_gpu_work_and_says_where(monkeypatch):
    real = sweep.make_providers
    calls = []

    def faulting(layer, names, notes):
        provs = real(layer, ["grouped"], notes)

        def fault(x, r):
            calls.append(x.shape[0])
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

        provs["fault"] = fault
        return provs

    monkeypatch.setattr(sweep, "make_providers", faulting)
    res = _sweep(["grouped", "fault"], tokens=(1, 2, 4))
    by = {(r["tokens"], r["provider"]): r for r in res["rows"]}
    assert by[(1, "grouped")]["status"] == "ok" and by[(1, "fault")]["status"] == "error"
    assert calls == [1]  # nothing ran on the poisoned context after the fault
    for T in (2, 4):
        for p in ("grouped", "fault"):
            assert by[(T, p)]["status"] == "skipped" and "CUDA context lost (tiny T=1 fault" in by[(T, p)]["reason"]
    assert not res["complete"] and res["stopped"].startswith("CUDA context lost at tiny T=1 fault: RuntimeError")
    assert sweep.is_context_lost(RuntimeError("CUDA error: unspecified launch failure"))
    assert not sweep.is_context_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))


DEEPSEEK = dict(d_model=7168, d_ff=2048, num_experts=256, top_k=8)  # w13: 7.5e9 elements
MIXTRAL = dict(d_model=4096, d_ff=14336, num_experts=8, top_k=2)  # w13: 9.4e8 elements


def _part(shape, tokens, ms, complete=True, dims=DEEPSEEK):
    rows = [dict(shape=shape, tokens=T, provider=p, status="ok", median_ms=m * T, max_rel_err=0.0, max_expert_id=0,
                 tflops=1.0, gbps=1.0, hbm_frac_nominal=0.5, hbm_frac_measured=0.5, matmul_frac=0.1, roofline_frac=0.5)
            for T in tokens for p, m in (("grouped_mm", ms), ("triton", ms / 2))]  # SYNTHETIC numbers
    return dict(kind="device", complete=complete, machine=dict(device="SYNTHETIC", date="2000-01-01"),
                settings=dict(dtype="bfloat16", shapes=[shape], tokens=list(tokens), providers=["grouped_mm", "triton"],
                              time_limit_s=10.0),
                limits=dict(copy_Bps=1.0), shapes={shape: dict(name=shape, **dims)},
                rows=rows, skipped=[], notes=[f"{shape}: a note"], elapsed_s=5.0)


def test_merge_results_joins_parts_and_recomputes_the_tables():
    a, b = _part("deepseek-v3-routed", (1, 16), 2.0), _part("mixtral-8x7b", (1, 4), 4.0, complete=False, dims=MIXTRAL)
    m = results.merge_results([a, b])
    assert m["kind"] == "device" and not m["complete"]  # one part was cut short
    assert list(m["shapes"]) == m["settings"]["shapes"] == ["deepseek-v3-routed", "mixtral-8x7b"]
    assert m["settings"]["tokens"] == [1, 4, 16] and m["settings"]["providers"] == ["grouped_mm", "triton"]
    assert len(m["rows"]) == 8 and m["notes"] == ["deepseek-v3-routed: a note", "mixtral-8x7b: a note"]
    assert [p["complete"] for p in m["parts"]] == [True, False] and m["elapsed_s"] == 10.0
    assert {(q["shape"], q["tokens"]): q["triton_vs_grouped_mm"] for q in m["ratios"]} == {
        ("deepseek-v3-routed", 1): 2.0, ("deepseek-v3-routed", 16): 2.0, ("mixtral-8x7b", 1): 2.0,
        ("mixtral-8x7b", 4): 2.0}
    (c,) = m["crosschecks"]  # only DeepSeek-V3's w13 passes 2^31 elements
    assert c["shape"] == "deepseek-v3-routed" and c["flag"] == "ok" and c["tokens"] == [1, 16]
    json.dumps(m)


def test_merge_results_rejects_bad_input():
    with pytest.raises(ValueError, match="parts"):
        results.merge_results([])
    with pytest.raises(ValueError, match=r"parts\[1\] is not a device result"):
        results.merge_results([_part("a", (1,), 1.0), {"kind": "moe_ref tuned configs"}])
    with pytest.raises(ValueError, match=r"parts\[1\] and parts\[0\] both hold shape 'a'"):
        results.merge_results([_part("a", (1,), 1.0), _part("a", (2,), 1.0)])


def test_merge_cli_notes_missing_files_and_draws_charts(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(_part("deepseek-v3-routed", (1,), 1.0)))
    (tmp_path / "bad.json").write_text("{not json")
    rc = bench.main(["merge", str(tmp_path / "a.json"), str(tmp_path / "gone.json"), str(tmp_path / "bad.json"),
                     "--out", str(tmp_path / "m" / "gpu.json"), "--charts"])
    assert rc == 0, capsys.readouterr().out
    m = json.loads((tmp_path / "m" / "gpu.json").read_text())
    assert m["sources"] == ["a.json", "gone.json", "bad.json"] and len(m["rows"]) == 2
    assert "gone.json: missing (its process wrote no result)" in m["notes"]
    assert any(n.startswith("bad.json: unreadable") for n in m["notes"])
    assert (tmp_path / "m" / "gpu_times.png").is_file()
    assert bench.main(["merge", str(tmp_path / "gone.json"), "--out", str(tmp_path / "x.json")]) == 2
    assert "nothing written" in capsys.readouterr().out and not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit):
        bench.main(["merge", str(tmp_path / "a.json"), "--gpu"])


# ----------------------------------------------------------------------- the script itself (slow)

def _watch(out: Path, stop: threading.Event, seen: list[int]) -> None:
    """Count every entry under OUT (files, hidden temp files, folders) every few ms until stopped."""
    while not stop.is_set():
        try:
            seen.append(sum(1 for _ in out.rglob("*")))
        except FileNotFoundError:  # a temp file renamed between listing and stat
            pass
        time.sleep(0.005)


def _start(tmp_path: Path, **extra) -> tuple[subprocess.Popen, Path, Path]:
    out, log = tmp_path / "out", tmp_path / "stdout.txt"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", TRITON_INTERPRET="1",
               TMPDIR=str(tmp_path), GPU_CHECK_TICK_S="1", **extra)
    p = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    return p, out, log


def _logged_counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"OUT holds (\d+) files", text)]


def _archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "results.tar.gz") as t:
        return {m.name.removeprefix("./"): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


@pytest.mark.slow
def test_dry_run_walks_every_phase_with_at_most_8_files(tmp_path):
    stop, seen = threading.Event(), []
    p, out, log = _start(tmp_path)  # the script's own dry plan (shorter sweep budgets time out under CI load)
    watcher = threading.Thread(target=_watch, args=(out, stop, seen))
    watcher.start()
    try:
        rc = p.wait(timeout=600)
    finally:
        stop.set()
        watcher.join()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    for step in ("pytest-gpu: rc=0", "sweep-cpu-small: rc=0", "merge-cpu-small: rc=0", "sweep-cpu: rc=0",
                 "merge-cpu: rc=0", "tune: rc=0"):
        assert step in text, text[-4000:]
    sweeps = [ln for ln in text.splitlines() if "START sweep-" in ln]
    assert len(sweeps) == 2 and not any("--tuned" in ln for ln in sweeps)  # the sweep runs on the default configs
    assert "tests run in one process (GPU_CHECK_TEST_WORKERS=0)" in text  # the dry run's GPU tests all skip
    assert max(seen) <= MAX_FILES and max(_logged_counts(text)) <= MAX_FILES
    assert "checkpoint (final)" in text and "checkpoint (tick)" in text
    names = sorted(x.name for x in out.iterdir())
    assert names == ["env.txt", "gpu.json", "gpu_check.log", "pytest-gpu.xml", "results.tar.gz", "tuned.json"]
    files = _archive(out)
    for name in ("gpu_check.log", "env.txt", "pytest-gpu.xml", "gpu.json", "sweep/cpu-small.json", "sweep/cpu.json",
                 "gpu_times.png", "tune/tuned.json", "tune/tuned.png"):
        assert name in files, sorted(files)
    assert files["gpu.json"] == (out / "gpu.json").read_bytes()
    merged = json.loads(files["gpu.json"])
    assert list(merged["shapes"]) == ["cpu-small", "cpu"] and merged["complete"]
    assert {c["shape"]: c["flag"] for c in merged["crosschecks"]} == {"cpu-small": "ok", "cpu": "NOT CHECKED"}
    assert b"testcase" in files["pytest-gpu.xml"]
    assert not list(tmp_path.glob("gpu-check.*"))  # the scratch folder is removed at the end


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_a_crash_does_not_stop_the_sweep_and_a_kill_keeps_what_was_made(tmp_path):
    """One shape's process fails (an unknown provider), the next runs; SIGKILL to everything mid-sweep."""
    tokens = " ".join(str(2**i) for i in range(14))  # the second shape runs on and on: the kill comes first
    stop, seen = threading.Event(), []
    p, out, log = _start(tmp_path, GPU_CHECK_TESTS_S="0", GPU_CHECK_TUNE_S="0",
                         BENCH_ARGS=f"--tokens {tokens} --cap-ms 1e6",  # no cap: every T runs, slower and slower
                         GPU_CHECK_SWEEP="cpu-small:60:no_such_provider;cpu:200:grouped")
    watcher = threading.Thread(target=_watch, args=(out, stop, seen))
    watcher.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            text = log.read_text()
            done = text.find("cpu T=1 done")
            # two ticks after T=1 of the second shape: the second began packing after its JSON was written
            if done >= 0 and text[done:].count("checkpoint (tick)") >= 2:
                break
            time.sleep(0.2)
        procs = _descendants(p.pid)
        for q in procs:
            q.kill()
        psutil.wait_procs(procs, timeout=30)
    finally:
        stop.set()
        watcher.join()
    text = log.read_text()
    assert done >= 0, text[-4000:]
    assert re.search(r"sweep-cpu-small: rc=[1-9]", text) and "START sweep-cpu " in text, text[-4000:]
    assert max(seen) <= MAX_FILES and max(_logged_counts(text)) <= MAX_FILES
    assert len(list(out.iterdir())) <= MAX_FILES
    files = _archive(out)
    assert "env.txt" in files and "no_such_provider" in files["gpu_check.log"].decode()
    part = json.loads(files["sweep/cpu.json"])  # the shape cut short by the kill: what it measured so far
    assert not part["complete"] and {r["tokens"] for r in part["rows"]} >= {1}
    assert "sweep/cpu-small.json" not in files  # the crashed shape wrote nothing
