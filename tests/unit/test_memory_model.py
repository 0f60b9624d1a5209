"""The memory model: each component as the sharding rules give it, the fit recovering known constants, and the
fitted model against the runs it was fitted on and the family it was not (benchmarks/scale_results.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.memory_model import FITTED, MIB, Constants, Setting, Shape, fit, predict, scale_run_shape

GPT2 = Shape(policy=110_000_000, critic=110_000_000, reward=110_000_000, layers=12, width=768, vocab=32768,
             pass_tokens=192, max_live_parameters=3 * 12 * 768 * 768)
ONE = Setting(1, 0)
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "scale_results.json"


def test_components_follow_the_sharding_rules():
    c = Constants(runtime_mib=500.0, activation_bytes=100.0)
    one, ddp = predict(GPT2, ONE, c), predict(GPT2, Setting(2, 0), c)
    zero2, zero3 = predict(GPT2, Setting(2, 2), c), predict(GPT2, Setting(2, 3), c)
    assert one["trained_weights"] == pytest.approx(220e6 * 4 / MIB)
    assert one["optimizer"] == pytest.approx(220e6 * 8 / MIB)  # Adam's two moments, fp32
    # DDP: everything of one process, and its gradient buckets on top.
    assert ddp["gradients"] == 2 * one["gradients"] and ddp["trained_weights"] == one["trained_weights"]
    # ZeRO-2: moments and gradients in halves, and a master partition (half of the fp32 weights).
    assert zero2["optimizer"] == pytest.approx(one["optimizer"] / 2 + one["trained_weights"] / 2)
    assert zero2["gradients"] == one["gradients"] / 2
    # ZeRO-3: weights too, and the whole policy gathered for generation.
    for key in ("trained_weights", "frozen_weights", "optimizer", "gradients"):
        assert zero3[key] == pytest.approx(one[key] / 2), key
    assert zero3["generation_gathered"] == pytest.approx(110e6 * 4 / MIB) and one["generation_gathered"] == 0
    # bf16 weights under ZeRO-3 keep an fp32 master partition.
    bf16 = predict(Shape(**{**GPT2.__dict__, "weight_bytes": 2}), Setting(2, 3), c)
    assert bf16["optimizer"] == pytest.approx(one["optimizer"] / 2 + one["trained_weights"] / 2)
    # LoRA loads no reference.
    lora = predict(Shape(**{**GPT2.__dict__, "trainable": 111_000_000}), Setting(2, 0, lora=True), c)
    assert lora["frozen_weights"] == pytest.approx(110e6 * 4 / MIB)
    assert one["peak"] == pytest.approx(one["static"] + one["training"])


def test_the_fit_recovers_the_constants_that_made_the_peaks():
    truth = Constants(runtime_mib=612.0, activation_bytes=37.5)
    runs = [(Shape(**{**GPT2.__dict__, "pass_tokens": tokens}), setting, predict(
        Shape(**{**GPT2.__dict__, "pass_tokens": tokens}), setting, truth)["peak"])
        for tokens in (192, 768) for setting in (ONE, Setting(2, 0), Setting(2, 2))]
    fitted = fit(runs)
    assert fitted.runtime_mib == pytest.approx(612.0) and fitted.activation_bytes == pytest.approx(37.5)


def test_the_fitted_model_predicts_the_measured_peaks_within_15_percent():
    """Fitted on the GPT-2 runs; the Qwen2 runs (grouped-query attention, a gated MLP, an untied head) are held
    out."""
    runs = json.loads(RESULTS.read_text())
    assert {r["run"] for r in runs} >= {"gpt2-1proc", "gpt2-1proc-long", "gpt2-ddp", "gpt2-zero3", "qwen2-1proc"}
    for run in runs:
        shape, setting = scale_run_shape(run)
        predicted = predict(shape, setting, FITTED)["peak"]
        assert predicted == pytest.approx(run["peak_rss_mib"], rel=0.15), (run["run"], predicted)
