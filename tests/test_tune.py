"""Tile-config tuning (moe_ref.bench.tune) and tuned tables on disk (configs.load_tuned_configs).

The tuning loop runs here under Triton's interpreter at a tiny shape: its times mean nothing, what is
tested is the bookkeeping (every candidate checked and timed, a wrong one never kept, the time limit,
the file format) and that the written file is what get_config then uses."""

import importlib.util
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_ref.kernels as mk
from helpers import examples
from moe_ref.bench import Shape, tune
from moe_ref.bench import main as bench_main
from moe_ref.bench.timing import Timer
from moe_ref.kernels import configs
from moe_ref.kernels.backend import SM90_LIMITS, DeviceLimits
from moe_ref.kernels.configs import TUNED_CONFIGS, check_config, smem_bytes, split_config

pytestmark = pytest.mark.slow  # the tuner times kernels under the interpreter: left out of make check

TINY = Shape("tiny", 32, 48, 4, 2)


@pytest.fixture
def clean_tables():
    before = {k: dict(v) for k, v in TUNED_CONFIGS.items()}
    yield
    TUNED_CONFIGS.clear()
    TUNED_CONFIGS.update(before)


def _tune(tokens=(1, 5), limit=3, **kw):
    timer = Timer("cpu", budget_ms=1, min_reps=1)
    return tune.tune_shape(TINY, list(tokens), dtype=torch.float32, device="cpu", timer=timer, limit=limit,
                           log=lambda msg: None, **kw)


@pytest.mark.parametrize("T", [1, 7, 64, 300, 4096, 16384])
@pytest.mark.parametrize("E,K,D,F", [(8, 2, 4096, 14336), (128, 8, 2048, 768)])
def test_candidates_start_with_the_default_and_fit(T, E, K, D, F):
    for el in (2, 4):
        cands = configs.candidate_configs(T, E, K, D, F, el, limit=8)
        assert 2 <= len(cands) <= 8
        assert split_config(cands[0]) == split_config(configs.fit_to_dtype(configs.default_config(T, E, K, D, F), el))
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)  # no config twice
        for c in cands:
            check_config(c)
            first, second = split_config(c)
            budget = SM90_LIMITS.smem_per_block
            assert smem_bytes(first, el, 2) <= budget and smem_bytes(second, el, 1) <= budget
        block_ms = {c["BLOCK_M"] for c in cands[1:]}
        if T * K / E <= 16:
            assert block_ms == {16}  # decode: no rows wasted on padding
        if T * K / E > 256:
            assert block_ms == {64, 128}
    assert len(configs.candidate_configs(T, E, K, D, F, limit=1)) == 1
    with pytest.raises(ValueError, match="limit"):
        configs.candidate_configs(T, E, K, D, F, limit=0)


def test_split_k_is_tried_where_the_second_gemm_has_few_programs():
    mixtral_t1 = configs.candidate_configs(1, 8, 2, 4096, 14336)  # 2 experts x 64 N-tiles = 128 programs
    assert [c["down"].get("SPLIT_K", 1) for c in mixtral_t1][:2] == [1, 4]
    assert split_config(mixtral_t1[1])[0] == split_config(mixtral_t1[0])[0]  # otherwise the default
    for args in ((1, 128, 8, 2048, 768), (1, 256, 8, 7168, 2048), (4096, 8, 2, 4096, 14336)):  # enough programs
        assert all(c.get("down", {}).get("SPLIT_K", 1) == 1 for c in configs.candidate_configs(*args)), args
    assert configs.split_k_for(mixtral_t1[0], 1, 8, 2, 4096, 256) == 1  # F too short to split
    # the programs wanted scale with the GPU's SMs: 128 programs fill two waves of 64 SMs, not of 132
    assert configs.split_k_for(mixtral_t1[0], 1, 8, 2, 4096, 14336, sm_count=64) == 1
    assert configs.split_k_for(mixtral_t1[0], 1, 8, 2, 4096, 14336, sm_count=100) == 2
    small = DeviceLimits(sm_count=100, smem_per_block=64 * 1024)
    for c in configs.candidate_configs(4096, 8, 2, 4096, 14336, 2, limits=small):
        first, second = split_config(c)
        assert smem_bytes(first, 2, 2) <= small.smem_per_block and smem_bytes(second, 2, 1) <= small.smem_per_block


def test_the_four_kernel_alignment_is_tried_where_auto_uses_one_program():
    aligns = lambda *a: [c.get("ALIGN", "auto") for c in configs.candidate_configs(*a)]
    assert aligns(16, 8, 2, 4096, 14336)[:2] == ["auto", "chunked"]  # 32 slots: one program by default
    assert "chunked" not in aligns(1, 8, 2, 4096, 14336)  # T=1 has no alignment kernel at all
    assert "chunked" not in aligns(4096, 8, 2, 4096, 14336)  # 8192 slots: auto is the four kernels already


def test_tune_shape_checks_times_and_keeps_the_fastest():
    entry = _tune()
    assert (entry["E"], entry["D"], entry["F"], entry["K"]) == (4, 32, 48, 2)
    assert set(entry["table"]) == {"1", "5"} and not entry["untuned"]
    for T in (1, 5):
        trials = [t for t in entry["trials"] if t["tokens"] == T]
        assert len(trials) == 3 and trials[0]["default"] and not any(t["default"] for t in trials[1:])
        assert all(t["status"] == "ok" and t["median_ms"] > 0 and t["max_rel_err"] < 1e-4 for t in trials), trials
        assert all("y" not in t for t in trials)  # outputs are not kept in the record
        fastest = min(trials, key=lambda t: t["median_ms"])
        assert entry["table"][str(T)] == fastest["config"]
        assert entry["speedup_vs_default"][str(T)] == pytest.approx(trials[0]["median_ms"] / fastest["median_ms"])
    json.dumps(entry)


def test_a_config_that_disagrees_is_never_kept(monkeypatch):
    real = tune.fused_moe
    cands = configs.candidate_configs(5, 4, 2, 32, 48, 4, 3)
    bad_block_n = next(c["BLOCK_N"] for c in cands if c["BLOCK_N"] != cands[0]["BLOCK_N"])

    def fused_moe(x, ids, w, w13, w2, config):  # a kernel that is wrong for one BLOCK_N
        y = real(x, ids, w, w13, w2, config=config)
        return y + 1.0 if config["BLOCK_N"] == bad_block_n else y

    monkeypatch.setattr(tune, "fused_moe", fused_moe)
    entry = _tune(tokens=(5,))
    statuses = [t["status"] for t in entry["trials"]]
    assert statuses[0] == "ok" and "wrong" in statuses, statuses
    wrong = [t for t in entry["trials"] if t["status"] == "wrong"]
    assert all(t["config"]["BLOCK_N"] == bad_block_n and "max rel err" in t["reason"] for t in wrong)
    assert entry["table"]["5"]["BLOCK_N"] != bad_block_n


def test_a_failing_config_is_recorded_and_the_others_still_run(monkeypatch):
    real = tune.fused_moe
    seen = []  # the distinct configs called, in order

    def fused_moe(x, ids, w, w13, w2, config):
        if config not in seen:
            seen.append(config)
        if len(seen) >= 2 and config == seen[1]:  # every call of the second candidate fails
            raise RuntimeError("out of resources: shared memory\nmore detail")
        return real(x, ids, w, w13, w2, config=config)

    monkeypatch.setattr(tune, "fused_moe", fused_moe)
    entry = _tune(tokens=(5,))
    assert [t["status"] for t in entry["trials"]] == ["ok", "error", "ok"]
    assert entry["trials"][1]["reason"] == "RuntimeError: out of resources: shared memory"
    assert entry["table"]["5"] in (entry["trials"][0]["config"], entry["trials"][2]["config"])


def test_the_file_is_saved_after_every_token_count(tmp_path, monkeypatch):
    """A run stopped while it measures a token count keeps every token count before it on disk."""
    out = tmp_path / "t"
    path = out / "tuned.json"
    real = tune._trial
    on_disk = {}  # T -> the token counts tuned in the file when T's first candidate starts

    def trial(T, *args):
        if T not in on_disk:
            on_disk[T] = set(json.loads(path.read_text())["entries"][0]["table"]) if path.exists() else set()
        if T == 7:
            raise KeyboardInterrupt  # stopped during the third token count
        return real(T, *args)

    monkeypatch.setattr(tune, "_trial", trial)
    with pytest.raises(KeyboardInterrupt):
        bench_main(["tune", "--device", "cpu", "--shapes", "cpu-small", "--tokens", "2", "5", "7", "--limit", "1",
                   "--dtype", "fp32", "--out", str(out)])
    assert on_disk == {2: set(), 5: {"2"}, 7: {"2", "5"}}
    data = json.loads(path.read_text())
    assert not data["complete"] and set(data["entries"][0]["table"]) == {"2", "5"}


def test_progress_reports_each_token_count_of_each_shape():
    seen = []
    tiny2 = Shape("tiny2", 32, 48, 4, 1)
    result = tune.tune([TINY, tiny2], [1, 5], dtype=torch.float32, device="cpu", limit=1, log=lambda msg: None,
                       on_progress=lambda r: seen.append([(e["shape"], sorted(e["table"])) for e in r["entries"]]))
    assert seen == [[("tiny", ["1"])], [("tiny", ["1", "5"])],
                    [("tiny", ["1", "5"]), ("tiny2", ["1"])], [("tiny", ["1", "5"]), ("tiny2", ["1", "5"])]]
    assert result["complete"] and [e["shape"] for e in result["entries"]] == ["tiny", "tiny2"]


def test_time_limit_leaves_token_counts_untuned():
    entry = _tune(deadline=0.0)  # perf_counter() is past 0 already
    assert entry["table"] == {} and [u["tokens"] for u in entry["untuned"]] == [1, 5]


def test_written_file_is_what_get_config_uses(tmp_path, clean_tables):
    out = tmp_path / "t"
    rc = bench_main(["tune", "--device", "cpu", "--shapes", "cpu-small", "--tokens", "2", "--limit", "2",
                     "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "tuned.json").read_text())
    assert data["kind"] == configs.TUNED_KIND and data["complete"] and data["dtype"] == "float32"
    if importlib.util.find_spec("matplotlib"):  # a bare GPU machine may lack it: then the JSON only
        assert (out / "tuned.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert not (out / "tuned.png").exists()
    (entry,) = data["entries"]
    if importlib.util.find_spec("matplotlib"):  # the chart can be redrawn from the JSON alone
        from moe_ref import bench

        assert bench.main(["plot", str(out / "tuned.json"), "--out", str(tmp_path / "redraw")]) == 0
        assert (tmp_path / "redraw" / "tuned.png").read_bytes()[:4] == b"\x89PNG"
        from moe_ref.plots import plot_tuning

        fig = plot_tuning(data)
        [legend] = fig.legends  # one below the panels, none inside one
        assert not any(ax.get_legend() for ax in fig.axes)
        assert [t.get_text() for t in legend.get_texts()] == ["configs tried", "default config", "kept (fastest)"]
    assert configs.load_tuned_configs(out / "tuned.json") == 1
    dev = data["machine"]["device"]
    got = mk.get_config(2, entry["E"], entry["K"], entry["D"], entry["F"], "float32", dev)
    assert got == entry["table"]["2"]
    default = configs.fit_to_dtype(configs.default_config(2, entry["E"], entry["K"], entry["D"], entry["F"]), 4)
    assert mk.get_config(2, entry["E"], entry["K"], entry["D"], entry["F"], "float32", "another GPU") == default


def test_load_rejects_other_files(tmp_path):
    p = tmp_path / "gpu.json"
    p.write_text(json.dumps({"kind": "device", "rows": []}))
    with pytest.raises(ValueError, match="not a tuned-config file"):
        configs.load_tuned_configs(p)
    with pytest.raises(FileNotFoundError):
        configs.load_tuned_configs(tmp_path / "missing.json")


def test_nearest_token_count_on_a_log_scale_within_2x(clean_tables):
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3)
    mk.register_tuned_configs("Log GPU", 8, 64, 64, "bfloat16", {t: dict(cfg, GROUP_M=1000 + t) for t in (1, 16, 4096)})
    used = lambda T: mk.get_config(T, 8, 2, 64, 64, "bfloat16", "Log GPU")["GROUP_M"] - 1000  # marks the entry
    assert [used(T) for T in (1, 2, 8, 11, 32, 2048, 8192)] == [1, 1, 16, 16, 16, 4096, 4096]
    for T in (0, 3, 7, 33, 100, 2047, 8193, 16384):  # no tuned count within 2x: the default
        want = split_config(configs.fit_to_dtype(configs.default_config(T, 8, 2, 64, 64), 2))
        assert split_config(mk.get_config(T, 8, 2, 64, 64, "bfloat16", "Log GPU")) == want, T
        assert configs.launch_configs(T, 8, 2, 64, 64, "bfloat16", "Log GPU", False) == want, T


def test_a_table_cut_short_at_decode_never_lends_its_tile_to_prefill(clean_tables):
    """A tuning run stopped after T=1 and T=16: T=16384 must not run their BLOCK_M=16 decode tile."""
    decode = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    mk.register_tuned_configs("Cut GPU", 8, 4096, 14336, "bfloat16", {1: decode, 16: dict(decode, BLOCK_N=64)})
    got = mk.get_config(16384, 8, 2, 4096, 14336, "bfloat16", "Cut GPU")
    assert split_config(got) == split_config(mk.get_config(16384, 8, 2, 4096, 14336, "bfloat16"))
    assert got["BLOCK_M"] == 128
    assert mk.get_config(16, 8, 2, 4096, 14336, "bfloat16", "Cut GPU") == dict(decode, BLOCK_N=64)
    assert mk.get_config(24, 8, 2, 4096, 14336, "bfloat16", "Cut GPU") == dict(decode, BLOCK_N=64)


@settings(max_examples=examples(60), deadline=None)
@given(counts=st.sets(st.integers(1, 1 << 15), min_size=1, max_size=6), T=st.integers(0, 1 << 16))
def test_a_tuned_entry_serves_only_token_counts_within_2x(counts, T):
    """Random tables: an entry tuned at t is used only for t/2 <= T <= 2t, and whenever one is, the one used is
    the nearest on a log scale; otherwise the default."""
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3)
    table = {t: dict(cfg, GROUP_M=t) for t in counts}  # GROUP_M marks which entry was used
    before = dict(TUNED_CONFIGS)
    try:
        mk.register_tuned_configs("Random GPU", 8, 64, 64, "bfloat16", table)
        got = mk.get_config(T, 8, 2, 64, 64, "bfloat16", "Random GPU")
    finally:
        TUNED_CONFIGS.clear()
        TUNED_CONFIGS.update(before)
    reach = [t for t in counts if t / 2 <= T <= 2 * t]
    if not reach:
        assert split_config(got) == split_config(configs.fit_to_dtype(configs.default_config(T, 8, 2, 64, 64), 2))
        return
    t = got["GROUP_M"]
    assert got == table[t] and t in reach
    assert all(abs(math.log(t / T)) <= abs(math.log(u / T)) for u in reach)


def test_register_rejects_bad_token_counts():
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    for bad in (0, -4, "16", True):
        with pytest.raises(ValueError, match="token counts"):
            mk.register_tuned_configs("Bad GPU", 8, 64, 64, "bfloat16", {bad: cfg})
    assert "Bad GPU" not in TUNED_CONFIGS


def test_shipped_tables_load():
    for path in sorted(configs.TUNED_DIR.glob("*.json")):
        assert configs.load_tuned_configs(path) >= 1, path
        assert "cpu" not in json.loads(path.read_text())["machine"]["device"], f"{path}: a dry run, not a GPU table"


def test_tune_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert bench_main(["tune", "--shapes", "mixtral"]) == 2
    assert "use --device cpu" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys, monkeypatch):
    assert bench_main(["tune", "--device", "cpu", "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # refused by the parser, as every sub-command's --tokens
        bench_main(["tune", "--device", "cpu", "--tokens", "0"])
    assert exc.value.code == 2 and "a token count must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(tune, "interpreter_active", lambda: False)  # as if TRITON_INTERPRET were not set
    assert bench_main(["tune", "--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:numpy says something:DeprecationWarning")
def test_a_shrunk_config_is_not_kept_and_other_warnings_do_not_matter(monkeypatch):
    """If the launcher had to shrink a config (shared memory), what ran was not that config: not kept.
    Unrelated warnings (numpy deprecations inside an older Triton interpreter) change nothing."""
    import warnings

    from moe_ref.kernels.fused_moe import TileConfigShrunk

    real = tune.fused_moe
    cands = configs.candidate_configs(5, 4, 2, 32, 48, 4, 3)
    shrink_n = next(c["BLOCK_N"] for c in cands if c["BLOCK_N"] != cands[0]["BLOCK_N"])

    def fused_moe(x, ids, w, w13, w2, config):
        warnings.warn("numpy says something", DeprecationWarning, stacklevel=2)
        if config["BLOCK_N"] == shrink_n:
            warnings.warn("_down_kernel: out of resources; retrying with num_stages=1", TileConfigShrunk, stacklevel=2)
        return real(x, ids, w, w13, w2, config=config)

    monkeypatch.setattr(tune, "fused_moe", fused_moe)
    entry = _tune(tokens=(5,))
    statuses = [t["status"] for t in entry["trials"]]
    assert statuses[0] == "ok" and "shrunk" in statuses, statuses
    assert all(t["config"]["BLOCK_N"] == shrink_n for t in entry["trials"] if t["status"] == "shrunk")
    assert entry["table"]["5"]["BLOCK_N"] != shrink_n
