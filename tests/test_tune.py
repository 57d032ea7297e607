"""Tile-config tuning (moe_ref.kernels.tune) and tuned tables on disk (configs.load_tuned_configs).

The tuning loop runs here under Triton's interpreter at a tiny shape: its times mean nothing, what is
tested is the bookkeeping (every candidate checked and timed, a wrong one never kept, the time limit,
the file format) and that the written file is what get_config then uses."""

import importlib.util
import json

import pytest
import torch

import moe_ref.kernels as mk
from moe_ref.bench import Shape
from moe_ref.bench_gpu import Timer
from moe_ref.kernels import configs, tune
from moe_ref.kernels.configs import SMEM_BUDGET, TUNED_CONFIGS, check_config, smem_bytes, split_config

TINY = Shape("tiny", 32, 48, 4, 2)


@pytest.fixture
def clean_tables():
    before = {k: dict(v) for k, v in TUNED_CONFIGS.items()}
    yield
    TUNED_CONFIGS.clear()
    TUNED_CONFIGS.update(before)


def _tune(tokens=(1, 5), limit=3, **kw):
    timer = Timer("cpu", budget_ms=1, min_reps=1, max_reps=1)
    return tune.tune_shape(TINY, list(tokens), dtype=torch.float32, device="cpu", timer=timer, limit=limit,
                           log=lambda msg: None, **kw)


@pytest.mark.parametrize("T", [1, 7, 64, 300, 4096, 16384])
@pytest.mark.parametrize("E,K,D,F", [(8, 2, 4096, 14336), (128, 8, 2048, 768)])
def test_candidates_start_with_the_default_and_fit(T, E, K, D, F):
    for el in (2, 4):
        cands = tune.candidate_configs(T, E, K, D, F, el, limit=8)
        assert 2 <= len(cands) <= 8
        assert split_config(cands[0]) == split_config(configs.fit_to_dtype(configs.default_config(T, E, K, D, F), el))
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)  # no config twice
        for c in cands:
            check_config(c)
            first, second = split_config(c)
            assert smem_bytes(first, el, 2) <= SMEM_BUDGET and smem_bytes(second, el, 1) <= SMEM_BUDGET
        block_ms = {c["BLOCK_M"] for c in cands[1:]}
        if T * K / E <= 16:
            assert block_ms == {16}  # decode: no rows wasted on padding
        if T * K / E > 256:
            assert block_ms == {64, 128}
    assert len(tune.candidate_configs(T, E, K, D, F, limit=1)) == 1
    with pytest.raises(ValueError, match="limit"):
        tune.candidate_configs(T, E, K, D, F, limit=0)


def test_split_k_is_tried_where_the_second_gemm_has_few_programs():
    mixtral_t1 = tune.candidate_configs(1, 8, 2, 4096, 14336)  # 2 experts x 64 N-tiles = 128 programs
    assert [c["down"].get("SPLIT_K", 1) for c in mixtral_t1][:2] == [1, 4]
    assert split_config(mixtral_t1[1])[0] == split_config(mixtral_t1[0])[0]  # otherwise the default
    for args in ((1, 128, 8, 2048, 768), (1, 256, 8, 7168, 2048), (4096, 8, 2, 4096, 14336)):  # enough programs
        assert all(c.get("down", {}).get("SPLIT_K", 1) == 1 for c in tune.candidate_configs(*args)), args
    assert tune.split_k_for(mixtral_t1[0], 1, 8, 2, 4096, 256) == 1  # F too short to split


def test_the_four_kernel_alignment_is_tried_where_auto_uses_one_program():
    aligns = lambda *a: [c.get("ALIGN", "auto") for c in tune.candidate_configs(*a)]
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
    cands = tune.candidate_configs(5, 4, 2, 32, 48, 4, 3)
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
    calls = []

    def fused_moe(x, ids, w, w13, w2, config):
        calls.append(config)
        if len(calls) == 3:  # the second candidate's first call
            raise RuntimeError("out of resources: shared memory\nmore detail")
        return real(x, ids, w, w13, w2, config=config)

    monkeypatch.setattr(tune, "fused_moe", fused_moe)
    entry = _tune(tokens=(5,))
    assert [t["status"] for t in entry["trials"]] == ["ok", "error", "ok"]
    assert entry["trials"][1]["reason"] == "RuntimeError: out of resources: shared memory"
    assert entry["table"]["5"] in (entry["trials"][0]["config"], entry["trials"][2]["config"])


def test_time_limit_leaves_token_counts_untuned():
    entry = _tune(deadline=0.0)  # perf_counter() is past 0 already
    assert entry["table"] == {} and [u["tokens"] for u in entry["untuned"]] == [1, 5]


def test_written_file_is_what_get_config_uses(tmp_path, clean_tables):
    out = tmp_path / "t"
    rc = tune.main(["--device", "cpu", "--shapes", "cpu-small", "--tokens", "2", "--limit", "2", "--dtype", "fp32",
                    "--out", str(out)])
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

        assert bench.main(["--plot", str(out / "tuned.json"), "--out", str(tmp_path / "redraw")]) == 0
        assert (tmp_path / "redraw" / "tuned.png").read_bytes()[:4] == b"\x89PNG"
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


def test_nearest_token_count_on_a_log_scale(clean_tables):
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    mk.register_tuned_configs("Log GPU", 8, 64, 64, "bfloat16", {1: cfg, 4096: dict(cfg, BLOCK_M=128)})
    assert mk.get_config(128, 8, 2, 64, 64, "bfloat16", "Log GPU")["BLOCK_M"] == 128  # 32x from 4096, 128x from 1
    assert mk.get_config(32, 8, 2, 64, 64, "bfloat16", "Log GPU")["BLOCK_M"] == 16
    assert mk.get_config(0, 8, 2, 64, 64, "bfloat16", "Log GPU")["BLOCK_M"] == 16


def test_shipped_tables_load():
    for path in sorted(configs.TUNED_DIR.glob("*.json")):
        assert configs.load_tuned_configs(path) >= 1, path
        assert "cpu" not in json.loads(path.read_text())["machine"]["device"], f"{path}: a dry run, not a GPU table"


def test_tune_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert tune.main(["--shapes", "mixtral"]) == 2
    assert "use --device cpu" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        tune.main(["--device", "cpu", "--limit", "0"])
    assert "--limit must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune.main(["--device", "cpu", "--tokens", "0"])
    assert "--tokens must be >= 1" in capsys.readouterr().err
    monkeypatch.setattr(tune, "interpreter_active", lambda: False)  # as if TRITON_INTERPRET were not set
    assert tune.main(["--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:numpy says something:DeprecationWarning")
def test_a_shrunk_config_is_not_kept_and_other_warnings_do_not_matter(monkeypatch):
    """If the launcher had to shrink a config (shared memory), what ran was not that config: not kept.
    Unrelated warnings (numpy deprecations inside an older Triton interpreter) change nothing."""
    import warnings

    from moe_ref.kernels.fused_moe import TileConfigShrunk

    real = tune.fused_moe
    cands = tune.candidate_configs(5, 4, 2, 32, 48, 4, 3)
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
