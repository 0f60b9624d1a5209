"""The README's main command, end to end, as a user runs it, and the negative control on its outputs (slow)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from support import wandb_run_contents

from rlhf.checkpoint import read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.launcher import REPO_ROOT

pytestmark = pytest.mark.slow

MAIN_COMMAND = "accelerate launch launch/ppo.py"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    readme = (REPO_ROOT / "README.md").read_text()
    assert MAIN_COMMAND in readme  # the test runs what the README tells users to run
    # The same launchers and demo configs, in a copy of the checkout so runs/ of the user's tree stays untouched.
    work = tmp_path_factory.mktemp("demo") / "checkout"
    shutil.copytree(REPO_ROOT, work, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "build",
                                                                   ".whl"))
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    started = time.perf_counter()
    done = subprocess.run(MAIN_COMMAND, shell=True, cwd=work, env=env, capture_output=True, text=True,
                          timeout=1800)
    wall_s = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    sys.stderr.write(f"main command: {wall_s:.0f} s\n{done.stdout[-1500:]}\n")
    return work / "runs" / "demo", done.stdout


def test_main_command_builds_every_stage_and_ppo_beats_the_sft_policy(demo_run):
    run_dir, stdout = demo_run
    sft = read_manifest(run_dir / "sft")
    reward = read_manifest(run_dir / "reward")
    ppo = read_manifest(run_dir / "ppo")
    assert sft["metrics"]["eval/loss"] < 1.7
    assert reward["metrics"]["eval/accuracy"] > 0.65  # noisy labels: the annotator errs on ~15% of pairs
    assert "built first: sft, reward" in stdout and "gold_combined" in stdout
    assert (run_dir / "report" / "report.html").is_file() and (run_dir / "report" / "reward_curves.png").is_file()
    # The dashboards are on: one offline W&B run per stage in the run's group, the upload command printed last.
    lines = stdout.splitlines()
    assert lines[-3] == "W&B: 3 offline runs (group demo); upload with", lines[-3:]
    synced = [run_dir.parent.parent / path for path in shlex.split(lines[-2])[2:]]
    assert lines[-2].startswith("  wandb sync ") and len(synced) == 3
    runs = {wandb_run_contents(path)["run"].job_type: wandb_run_contents(path)["run"].run_group for path in synced}
    assert runs == {"sft": "demo", "reward": "demo", "ppo": "demo"}
    assert lines[-1] == "TensorBoard: tensorboard --logdir runs/demo"
    m = ppo["metrics"]
    # Held-out prompts at the training temperature, before (the SFT policy) and after PPO.
    assert m["final/num_prompts"] >= 500
    # Floors below the README's band (PPO seeds 0-2 with constraints.txt: positive 0.88-0.92, gold 0.942-0.951,
    # KL 3.23-3.59, score 1.92-2.12, grammatical and EOS 0.97-0.99), with room for another CPU or thread count
    # (one thread: positive 0.95, gold 0.962, KL 3.91); the SFT policy is at positive 0.31, gold 0.75.
    assert m["final/gold_positive"] >= 0.84
    assert m["final/gold_combined"] >= 0.92
    assert m["final/gold_combined"] >= m["initial/gold_combined"] + 0.15
    assert 2.0 <= m["final/kl"] <= 5.0  # the KL penalty holds: 5.4 at kl_coef 0.1, far more without it
    assert m["final/score_mean"] >= 1.5 and m["final/score_mean"] > m["initial/score_mean"]
    assert m["final/gold_grammatical"] >= max(0.95, m["initial/gold_grammatical"] - 0.02)
    assert m["final/eos_rate"] >= max(0.95, m["initial/eos_rate"] - 0.02)


@pytest.mark.parametrize("pairs", ["sft", "generator"])
def test_the_reward_model_is_an_imperfect_proxy_of_the_gold_judge(demo_run, pairs, capsys):
    """Fresh pairs, ordered by the demo's reward model and by the gold judge: mostly the same way, never always
    (0.75 on SFT-sample pairs and 0.76 on generator pairs at the demo's seed; data/README.md)."""
    import json

    from rlhf.demo.agreement import main as agreement

    run_dir, _ = demo_run
    assert agreement(["--pairs", pairs, "--sft", str(run_dir / "sft"), "--reward", str(run_dir / "reward"),
                      "--prompts", str(REPO_ROOT / "data" / "demo" / "eval_prompts.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] >= 350
    assert 0.70 <= result["agreement_combined"] <= 0.90


def test_without_the_kl_penalty_the_reward_model_is_hacked(demo_run):
    """Negative control: the proxy can be exploited, and the default KL penalty is what stops it. The alarms that
    read neither the KL nor the gold judge fire before the held-out gold score falls 0.1 below its best; on the
    shipped demo none fires."""
    from rlhf.tracking import read_metrics
    from stages import ppo as ppo_stage

    run_dir, _ = demo_run
    default = read_manifest(run_dir / "ppo")["metrics"]
    assert read_manifest(run_dir / "ppo")["alarms"] == {}
    cfg = load_config(PPOConfig, REPO_ROOT / "configs" / "ppo" / "demo.yaml", [
        f"run_dir={run_dir}", f"output_dir={run_dir / 'ppo-no-kl'}", "ppo.kl_coef=0",
        f"ppo.num_updates={3 * load_config(PPOConfig, REPO_ROOT / 'configs' / 'ppo' / 'demo.yaml').ppo.num_updates}",
        "eval.every=10", "alarms.max_kl=null", "alarms.gold_drop=null",
    ])
    out = ppo_stage.run(cfg)
    hacked = read_manifest(out)["metrics"]
    fired = read_manifest(out)["alarms"]
    best, fell_at = -1.0, None
    for row in read_metrics(out):
        if "eval/gold_combined" in row:
            best = max(best, row["eval/gold_combined"])
            if fell_at is None and row["eval/gold_combined"] <= best - 0.1:
                fell_at = row["step"]
    assert fired and fell_at is not None and min(fired.values()) < fell_at, (fired, fell_at)
    assert hacked["final/score_mean"] > default["final/score_mean"]  # the reward model likes it more...
    # ...while the gold judge likes it less: grammar collapses and the combined score drops below the default's.
    assert hacked["final/gold_grammatical"] < default["final/gold_grammatical"] - 0.1
    assert hacked["final/gold_combined"] < default["final/gold_combined"]
