"""moe_ref.serving: transformers' continuous batching with moe_ref blocks equals plain generate; what it records.

Legend: T tokens in a step, E experts, K top-k, C capacity per expert, H distinct experts a call touches.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[hf]')")

import moe_ref  # noqa: E402
from moe_ref.serving import generate_reference, serve  # noqa: E402
from moe_ref.serving.cli import PROMPTS, format_steps  # noqa: E402
from moe_ref.tiny import encode  # noqa: E402
from moe_ref.tiny.model import SMOKE_SIZE, build_model, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(**SMOKE_SIZE), seed=0).eval()  # E=4, K=2, random weights, no checkpoint


def _prompts(n=4):
    return [encode(p).tolist() for p in PROMPTS[:n]]


@pytest.mark.slow
def test_dropless_continuous_batching_equals_generate(model):
    prompts = _prompts()
    ref = generate_reference(model, prompts, max_new_tokens=6)
    res = serve(model, prompts, max_new_tokens=6, max_batch_tokens=16)
    assert res.outputs == ref and all(len(o) == 6 for o in res.outputs)
    assert not any(type(m).__name__ == "HFMoEBlock" for m in model.modules())  # restored afterwards
    assert generate_reference(model, prompts, max_new_tokens=6) == ref  # and the model still generates as before
    # what was recorded: every step ran every layer once; the step's tokens are its decodes plus its prefill
    layers = sum(1 for m in model.modules() if moe_ref.hf.is_sparse_moe_block(m))
    assert len(res.calls) == layers * len(res.steps)
    for c in res.calls:
        assert c["tokens"] == c["decode_seqs"] + c["prefill_tokens"] <= 16
        assert c["hit"] == sum(1 for n in c["loads"] if n) <= 4 and sum(c["loads"]) == 2 * c["tokens"]
        assert c["dropped"] == 0 and c["capacity"] is None
    assert sum(s["prefill_tokens"] for s in res.steps) + sum(s["decode_seqs"] for s in res.steps) == \
        sum(len(p) for p in prompts) + len(prompts) * 5  # prompts + one decode per token after the first
    assert any(s["decode_seqs"] and s["prefill_tokens"] for s in res.steps)  # decodes and prefill share steps
    assert "step" in format_steps(res)


@pytest.mark.slow
def test_decode_time_capacity_drops_in_a_real_loop(model):
    cap = moe_ref.CapacityConfig(capacity_factor=1.0)
    res = serve(model, _prompts(), max_new_tokens=6, capacity=cap, max_batch_tokens=16)
    for c in res.calls:  # C follows each step's T, as the capacity formula says
        assert c["capacity"] == max(1, math.ceil(c["tokens"] * 2 * 1.0 / 4))
        assert c["dropped"] >= max(0, c["max_load"] - c["capacity"])
    share = res.decode_drop_share()
    assert sum(c["dropped"] for c in res.calls) > 0 and 0 <= share["decode"] <= 1 and 0 <= share["mixed"] <= 1


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[1, -2]]), r"prompts\[0\] must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(num_blocks=1, prompts=[list(range(1, 40))]), "cannot hold all requests"),
    (dict(page_size=2), "page_size must be >= 4"),
    (dict(capacity=1.25), "capacity must be"),
])
def test_bad_input_is_refused(kw, match):
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 2, **kw}
    with pytest.raises((ValueError, TypeError), match=match):  # checked before the model is touched
        serve(object(), args.pop("prompts"), **args)


@pytest.mark.slow
def test_check_command_passes_on_the_trained_model():
    res = subprocess.run([sys.executable, "-m", "moe_ref.serving", "--check"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{len(PROMPTS)}/{len(PROMPTS)} outputs equal plain generate" in res.stdout


def test_cli_needs_something_to_do():
    from moe_ref.serving.cli import main

    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize("argv, why", [
    (["--check", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--check", "--max-batch-tokens", "-2"], "--max-batch-tokens must be >= 1, got -2"),
    (["--capacity-factor", "0"], "--capacity-factor must be > 0, got 0.0"),
    (["--capacity-factor", "nan"], "--capacity-factor must be > 0, got nan"),
])
def test_cli_refuses_bad_settings_before_loading_the_model(argv, why, capsys):
    from moe_ref.serving.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and why in capsys.readouterr().err
