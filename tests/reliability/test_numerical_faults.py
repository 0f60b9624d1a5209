"""Numerical faults in PPO, injected with ``RLHF_FAULT``: a NaN score or a NaN loss skips the update (the weights
stay those of the last good update) and is counted; too many bad updates in a row stop the run with a message and a
checkpoint of the last good weights."""

from __future__ import annotations

import pytest
import torch
from support import demo_rows, save_tiny_sft_and_reward, write_jsonl

from rlhf.checkpoint import latest_checkpoint, read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.errors import TrainingDiverged
from rlhf.tracking import read_metrics
from stages import ppo


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    sft, rm = save_tiny_sft_and_reward(root)
    prompts = write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", 40))
    return root, sft, rm, prompts


def run(models, name, *extra, snapshots=None):
    root, sft, rm, prompts = models
    cfg = load_config(PPOConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", "data.eval_path=null", "data.eval_fraction=0.1", "eval.num_prompts=2",
        "eval.gold_judge=false",
        "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=6", "rollout.score_norm=none",
        "ppo.num_updates=4", "ppo.num_minibatches=2", "ppo.micro_batch_size=4", "optim.learning_rate=1e-2", *extra])

    def snapshot(step, trained):
        if snapshots is not None:
            snapshots[step] = [p.detach().clone() for p in trained.trained.parameters()]

    return ppo.run(cfg, on_update=snapshot)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("fault", ["nan_scores", "nan_loss"])
def test_a_non_finite_update_is_skipped_and_counted(models, monkeypatch, caplog, fault):
    monkeypatch.setenv("RLHF_FAULT", f"{fault}:2")
    snapshots = {}
    out = run(models, fault, snapshots=snapshots)
    rows = {r["step"]: r for r in read_metrics(out) if "ppo/skipped_updates" in r}
    assert [rows[s]["ppo/skipped_updates"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    what = "reward-model scores" if fault == "nan_scores" else "gradients"
    assert f"update 2 skipped: non-finite {what}" in caplog.text
    if fault == "nan_scores":
        assert same(snapshots[1], snapshots[2])  # nothing of update 2 reached the weights
        assert rows[2]["ppo/optimizer_steps"] == 0
    assert not same(snapshots[2], snapshots[3])  # training goes on
    assert all(torch.isfinite(p).all() for p in snapshots[4])
    assert read_manifest(out)["status"] == "complete"


def test_too_many_bad_updates_in_a_row_stop_with_the_last_good_weights(models, monkeypatch):
    monkeypatch.setenv("RLHF_FAULT", "nan_scores:2+")
    snapshots = {}
    with pytest.raises(TrainingDiverged, match=r"2 updates in a row \(the last: update 3\) had non-finite "
                                               r"reward-model scores.*step_3.*checkpoint.resume=true"):
        run(models, "diverged", "ppo.max_bad_updates=2", snapshots=snapshots)
    out = models[0] / "diverged" / "ppo"
    assert read_manifest(out) is None  # the output is not complete
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step_3"
    assert same(snapshots[1], snapshots[3])
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")  # policy and critic, as trained
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


def test_target_kl_stops_the_epochs_of_an_update_that_moved_too_far(models):
    free = run(models, "all-epochs", "ppo.ppo_epochs=3")
    capped = run(models, "kl-capped", "ppo.ppo_epochs=3", "ppo.target_kl=1e-6")
    rows = {name: [r for r in read_metrics(out) if "ppo/epochs" in r] for name, out in
            (("free", free), ("capped", capped))}
    assert [r["ppo/epochs"] for r in rows["free"]] == [3, 3, 3, 3]
    assert [r["ppo/optimizer_steps"] for r in rows["free"]] == [6, 6, 6, 6]
    # The first epoch moves the policy by more than 1e-6 (the learning rate is large), so only it runs.
    assert all(r["ppo/approx_kl"] > 1e-6 for r in rows["capped"])
    assert [r["ppo/epochs"] for r in rows["capped"]] == [1, 1, 1, 1]
    assert [r["ppo/optimizer_steps"] for r in rows["capped"]] == [2, 2, 2, 2]
