"""moe_ref.tiny: the shipped checkpoint, the byte codec, routing traces, the quality cost of capacity, training.

Legend: B batch, S sequence, T = B*S tokens, E experts, K top-k, V vocabulary.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[hf]')")

import moe_ref  # noqa: E402
from moe_ref import tiny  # noqa: E402
from moe_ref.hf import patch_model  # noqa: E402
from moe_ref.tiny.train import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny.load_tiny_moe()


@pytest.fixture(scope="module")
def quality():
    """A small quality table: prefill and decode, every overflow, cf 0.5 and 2.0, on 4 x 64 held-out bytes."""
    return tiny.quality_table([0.5, 2.0], seq_len=64)


# ------------------------------------------------------------------------------------------ checkpoint

def test_the_shipped_checkpoint_loads_in_eval_mode(model):
    from transformers import PreTrainedModel

    assert isinstance(model, PreTrainedModel) and not model.training
    c = model.config
    assert (c.vocab_size, c.num_local_experts, c.num_experts_per_tok) == (tiny.VOCAB_SIZE, 8, 2)
    assert (tiny.CHECKPOINT_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    assert (tiny.CHECKPOINT_DIR / "loss.png").stat().st_size > 1000


def test_the_training_log_says_what_was_trained():
    log = tiny.training_log()
    for key in ("steps", "final_heldout_loss", "final_train_loss", "python", "seed", "wall_time_s", "machine"):
        assert key in log, key
    h = log["history"]
    assert len(h["train_loss"]) == log["steps"] and len(h["eval_step"]) == len(h["heldout_loss"]) > 0
    assert log["final_heldout_loss"] < h["heldout_loss"][0] < log["uniform_loss"]  # it learned
    assert log["wall_time_s"] < 25 * 60


@pytest.mark.slow
def test_heldout_loss_is_below_three_nats_per_byte(model):
    loss = evaluate(model, tiny.heldout_windows(8, 257))
    assert loss < 3.0, f"held-out loss {loss:.3f} nats/byte (uniform is 5.55)"


def test_load_tiny_moe_names_a_bad_path(tmp_path):
    with pytest.raises(ValueError, match="path"):
        tiny.load_tiny_moe(tmp_path)


# ------------------------------------------------------------------------------------------ the byte codec

@given(st.text())
def test_encode_decode_round_trip(text):
    ids = tiny.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() == len(text.encode("utf-8"))
    assert ids.numel() == 0 or int(ids.max()) < 256
    assert tiny.decode(ids) == text and tiny.decode(ids[None]) == text and tiny.decode(ids.tolist()) == text


@pytest.mark.parametrize("text", ["", "\ud800 lone surrogate", "naïve 😀 ∑", "\x00\n\t"])
def test_round_trip_of_awkward_strings(text):
    assert tiny.decode(tiny.encode(text)) == text


def test_decode_skips_specials_and_replaces_invalid_bytes():
    ids = torch.tensor([tiny.BOS, 104, 105, tiny.EOS, tiny.PAD])
    assert tiny.decode(ids) == "hi"
    assert tiny.decode([0xFF, 104]) == "\ufffdh"


def test_codec_and_heldout_name_bad_input():
    with pytest.raises(TypeError, match="text"):
        tiny.encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        tiny.decode([tiny.VOCAB_SIZE])
    with pytest.raises(ValueError, match="ids"):
        tiny.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_tokens"):
        tiny.heldout_ids(0)
    with pytest.raises(ValueError, match="length"):
        tiny.heldout_windows(2, 0)


def test_corpus_is_a_fixed_split_by_file():
    files = tiny.corpus_files()
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f or f.startswith("test/") for f in files)
    from moe_ref.tiny.data import is_heldout

    held = [f for f in files if is_heldout(f)]
    assert 0 < len(held) < len(files) // 10
    ids = tiny.heldout_ids(500)
    assert ids.shape == (1, 500) and torch.equal(ids, tiny.heldout_ids(500))
    assert "import" in tiny.decode(tiny.heldout_ids(20000))


# ------------------------------------------------------------------------------------------ routing traces

@pytest.mark.slow
def test_routing_traces_are_what_the_model_routes(model):
    ids = tiny.heldout_windows(2, 40)  # [B, S]
    traces = tiny.routing_traces(ids, model=model)
    assert len(traces) == model.config.num_hidden_layers
    with patch_model(model, record_routing=True) as report:
        model(input_ids=ids)
    for tr, stats in zip(traces, report.layers):
        r = stats.routings[0]
        assert tr.topk_ids.shape == (80, 2) and torch.equal(tr.topk_ids, r.topk_ids)
        torch.testing.assert_close(tr.topk_weights, r.topk_weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tr.topk_weights.sum(-1), torch.ones(80))
    loads = tiny.layer_loads(traces, 8)
    assert loads.shape == (len(traces), 8) and (loads.sum(-1) == 160).all()


@pytest.mark.slow
def test_a_trace_is_a_routing_any_layer_takes(model):
    trace = tiny.routing_traces(tiny.heldout_windows(1, 64), model=model)[1]  # [64, K]
    layer = moe_ref.MoELayer(moe_ref.MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2), seed=0)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = layer.to(torch.float64)(x, strategy="grouped", routing=trace).output
    y_ref = moe_ref.reference_moe(x, trace, layer.w13, layer.w2)
    torch.testing.assert_close(y, y_ref)


def test_neighbour_sharing_counts_pairs():
    ids = torch.tensor([[0, 1], [1, 2], [3, 4], [3, 5], [6, 7]])  # pairs: share, none, first choice, none
    r = moe_ref.Routing(topk_ids=ids, topk_weights=torch.full((5, 2), 0.5))
    s = tiny.neighbour_sharing(r, num_experts=8)
    assert s["any"] == pytest.approx(0.5) and s["top1"] == pytest.approx(0.25)
    assert s["any_uniform"] == pytest.approx(1 - 15 / 28) and s["top1_uniform"] == pytest.approx(1 / 8)
    inside = tiny.neighbour_sharing(r, 8, seq_len=2)  # sequences of 2 tokens: pairs (0,1) and (2,3) only
    assert inside["any"] == pytest.approx(1.0) and inside["top1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="routing"):
        tiny.neighbour_sharing(moe_ref.Routing(topk_ids=ids[:1], topk_weights=torch.ones(1, 2)), 8)


@pytest.mark.slow
def test_trained_layers_are_not_uniform(model):
    traces = tiny.routing_traces(tiny.heldout_windows(4, 256), model=model)
    sharing = [tiny.neighbour_sharing(r, 8, seq_len=256) for r in traces]
    assert max(s["any"] for s in sharing) > sharing[0]["any_uniform"] + 0.05  # neighbours share experts


# ------------------------------------------------------------------------------------------ quality cost

def _row(rows, phase, overflow, cf):
    (row,) = [r for r in rows if (r["phase"], r["overflow"], r["capacity_factor"]) == (phase, overflow, cf)]
    return row


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_dropless_and_spill_reproduce_the_models_loss(quality, phase):
    for overflow, cf in (("dropless", None), ("spill", 0.5)):
        row = _row(quality, phase, overflow, cf)
        assert row["loss"] == pytest.approx(row["base_loss"], abs=1e-4) and row["agreement"] > 0.99
        assert row["drop_share"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_dropping_at_capacity_factor_half_raises_the_loss(quality, phase):
    row = _row(quality, phase, "drop/position", 0.5)
    assert row["drop_share"] > 0.3 and row["loss"] > row["base_loss"] + 0.05 and row["agreement"] < 0.95
    generous = _row(quality, phase, "drop/position", 2.0)
    assert generous["drop_share"] < row["drop_share"] and generous["loss"] < row["loss"]


@pytest.mark.slow
def test_decode_capacity_comes_from_one_steps_tokens(quality):
    assert _row(quality, "decode", "drop/position", 2.0)["capacity"] == 2  # ceil(4 * 2 * 2.0 / 8)
    assert _row(quality, "prefill", "drop/position", 2.0)["capacity"] == 4 * 64 * 2 * 2 // 8


def test_quality_table_names_bad_settings(model):
    with pytest.raises(ValueError, match="overflows"):
        tiny.quality_table([1.0], overflows=["drop"], model=model)
    with pytest.raises(ValueError, match="phases"):
        tiny.quality_table([1.0], phases=["train"], model=model)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        tiny.quality_table([1.0], seq_len=0, model=model)
    with pytest.raises(ValueError, match="num_windows must be a positive int, got 0"):
        tiny.quality_table([1.0], batch_size=0, model=model)


@pytest.mark.slow
def test_generate_runs_patched_and_decode_steps_drop(model):
    prompts = tiny.heldout_windows(4, 16)  # [B, 16]
    with patch_model(model, capacity=moe_ref.CapacityConfig(capacity_factor=1.0)) as report:
        out = model.generate(prompts, max_new_tokens=8, do_sample=False)
    assert out.shape == (4, 24) and torch.equal(out[:, :16], prompts)
    assert all(s.calls == 8 and s.capacity == 1 for s in report.layers)  # prefill + 7 steps of B = 4 tokens
    assert sum(s.dropped for s in report.layers) > 0
    dropless = model.generate(prompts, max_new_tokens=8, do_sample=False)
    assert dropless.shape == out.shape
    assert isinstance(tiny.decode(out[0]), str)


# ------------------------------------------------------------------------------------------ README, training

def test_readme_hugging_face_snippet_runs_as_written():
    text = (ROOT / "README.md").read_text()
    after = text.split("A Hugging Face model", 1)[1]
    code = re.search(r"```python\n(.*?)```", after, flags=re.S).group(1)
    assert "load_tiny_moe" in code and "input_ids =" in code
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["report"].layers and ns["report"].layers[0].tokens == ns["input_ids"].numel()


@pytest.mark.slow
def test_training_smoke_run_finishes_within_a_minute(tmp_path):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "moe_ref.tiny", "train", "--smoke", "--no-progress",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 6 and log["final_heldout_loss"] < log["uniform_loss"] + 0.5
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "loss.png").is_file()
    reloaded = tiny.load_tiny_moe(tmp_path)
    assert not reloaded.training and reloaded.config.num_local_experts == 4


def test_train_config_names_bad_values():
    from moe_ref.tiny.train import TrainConfig

    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)


@pytest.mark.parametrize("argv, why", [
    (["train", "--steps", "0"], "steps must be a positive int, got 0"),
    (["train", "--seq-len", "-1"], "seq_len must be a positive int, got -1"),
    (["quality", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["quality", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_cli_refuses_bad_settings_before_any_work(argv, why, capsys):
    from moe_ref.tiny.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and why in capsys.readouterr().err
