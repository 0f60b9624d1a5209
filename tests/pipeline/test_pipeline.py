"""The pipeline runner on the demo stages with tiny step counts: what runs, what is skipped, what a config change
reruns, and what the trackers hold.

The stages run in this process here (`run_stage_in_process`, the same configs and outputs as the real launch); the
last test runs ``rlhf run`` as the user does, each stage in its own ``accelerate launch`` process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import demo_rows, wandb_run_contents, write_jsonl

from rlhf.checkpoint import (manifest_path, read_manifest, report_html_path, report_plot_path, stage_output_dir)
from rlhf.errors import CheckpointError, ConfigError, StageFailed
from rlhf.launcher import REPO_ROOT, launch
from rlhf.pipeline import StageState, load_pipeline, pipeline_main, run_pipeline, run_stage_in_process
from rlhf.tracking import read_metrics

STAGES = ["sft", "reward", "ppo", "evaluate"]


def write_pipeline(root: Path, *, report_to: str = "[jsonl]", name: str = "tiny", dpo: bool = False) -> Path:
    """The demo pipeline on 64-row slices of the demo data, with a few steps per stage; ``dpo``: with the DPO
    branch from the same SFT output too, and the evaluation of both policies."""
    data = {}
    for stem in ("sft", "preferences", "prompts", "eval_prompts"):
        data[stem] = write_jsonl(root / f"{stem}.jsonl", demo_rows(f"{stem}.jsonl", 64))
    stages = {
        "sft": [f"data.path={data['sft']}", "train.max_steps=2", "data.eval_fraction=0.1"],
        "reward": [f"data.path={data['preferences']}", "train.max_steps=2", "data.eval_fraction=0.1",
                   "min_eval_accuracy=0"],  # two steps rank pairs near chance: not what this test checks
        "ppo": [f"data.path={data['prompts']}", f"data.eval_path={data['eval_prompts']}", "ppo.num_updates=2",
                "checks.min_eos_rate=0",
                "rollout.batch_size=8", "ppo.micro_batch_size=4", "eval.num_prompts=8", "samples_every=1"],
        "evaluate": [f"data.path={data['eval_prompts']}", "num_prompts=8", "samples=4"],
    }
    if dpo:
        evaluate = stages.pop("evaluate")
        stages["dpo"] = [f"data.path={data['preferences']}", "train.max_steps=2", "data.eval_fraction=0.1"]
        stages["evaluate"] = [*evaluate, "policies=[ppo, dpo]"]
    lines = [f"name: {name}", f"run_dir: {root / 'run'}", f"overrides: ['logging.report_to={report_to}']", "stages:"]
    for stage, overrides in stages.items():
        lines += [f"  {stage}:", f"    config: {REPO_ROOT / 'configs' / stage / 'demo.yaml'}",
                  f"    accelerate_config: {REPO_ROOT / 'configs/accelerate/cpu.yaml'}",
                  f"    overrides: {json.dumps(overrides)}"]
    path = root / "pipeline.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Recorder:
    """An executor that runs the stages in this process and remembers which ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, spec, overrides) -> int:
        self.ran.append(spec.name)
        return run_stage_in_process(spec, overrides)


def run(path: Path, *overrides: str, **kwargs):
    recorder = Recorder()
    outcomes = run_pipeline(load_pipeline(path, overrides), executor=recorder, **kwargs)
    return recorder.ran, outcomes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One complete tiny run with W&B (offline) and TensorBoard on; tests work on copies of it."""
    root = tmp_path_factory.mktemp("pipeline")
    path = write_pipeline(root, report_to="[jsonl, wandb, tensorboard]")
    ran, outcomes = run(path)
    return root, path, ran, outcomes


@pytest.fixture
def copy(built, tmp_path):
    """A copy of the built run with its pipeline file pointing at the copy (jsonl tracking only)."""
    root, _, _, _ = built
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("wandb", "tensorboard"))
    for stem in ("sft", "preferences", "prompts", "eval_prompts"):
        shutil.copy(root / f"{stem}.jsonl", tmp_path / f"{stem}.jsonl")
    # The data files were copied with identical content, so the stages' fingerprints still match.
    return tmp_path, write_pipeline(tmp_path)


def test_a_dpo_branch_joins_a_complete_run_and_one_evaluation_compares_both(copy):
    """Both branches from one SFT output in one run directory: only DPO and the evaluation (its config changed) run;
    the evaluation compares SFT, PPO and DPO on the same prompts."""
    from rlhf.pipeline import run_status

    root, _ = copy
    ran, _ = run(write_pipeline(root, dpo=True))
    assert ran == ["dpo", "evaluate"]
    report = json.loads((root / "run" / "evaluate" / "eval.json").read_text())
    assert {"sft", "ppo", "dpo", "win_rate_gold", "win_rate_gold_dpo", "win_rate_gold_dpo_over_ppo"} <= set(report)
    states = {row["stage"]: row["state"] for row in run_status(root / "run")}
    assert states == {"sft": "complete", "reward": "complete", "ppo": "complete", "dpo": "complete",
                      "evaluate": "complete"}


def test_the_shipped_dpo_pipelines_chain_dpo_after_sft():
    order = {}
    for name in ("dpo", "ppo_and_dpo"):
        pipeline = load_pipeline(REPO_ROOT / "configs" / "pipeline" / f"{name}.yaml")
        order[name] = pipeline.graph.order()
        assert pipeline.graph.specs["dpo"].depends_on == ("sft",)
        assert "dpo" in pipeline.graph.specs["evaluate"].depends_on
    assert order["dpo"] == ["sft", "dpo", "evaluate"]
    assert order["ppo_and_dpo"] == ["sft", "reward", "ppo", "dpo", "evaluate"]


def created(run_dir: Path, stage: str) -> str:
    return json.loads(manifest_path(stage_output_dir(run_dir, stage)).read_text())["created_at"] + \
        str(manifest_path(stage_output_dir(run_dir, stage)).stat().st_mtime_ns)


def test_first_run_builds_every_stage_and_the_report(built):
    root, _, ran, outcomes = built
    assert ran == STAGES
    assert [(o.name, o.state, o.action) for o in outcomes] == [(s, StageState.MISSING, "ran") for s in STAGES]
    for stage in STAGES:
        assert read_manifest(root / "run" / stage)["status"] == "complete"
    report = json.loads((root / "run" / "evaluate" / "eval.json").read_text())
    assert report["num_prompts"] == 8 and 0 <= report["win_rate_reward_model"] <= 1
    assert report_plot_path(root / "run").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in report_html_path(root / "run").read_text()
    assert json.loads((root / "run" / "pipeline.json").read_text())["pipeline"] == "tiny"


def test_second_run_skips_every_stage_in_seconds(copy):
    root, path = copy
    before = {stage: created(root / "run", stage) for stage in STAGES}
    report_mtime = report_html_path(root / "run").stat().st_mtime_ns
    start = time.perf_counter()
    ran, outcomes = run(path)
    seconds = time.perf_counter() - start
    assert ran == [] and [o.action for o in outcomes] == ["skipped"] * 4
    assert seconds < 5, seconds
    assert {stage: created(root / "run", stage) for stage in STAGES} == before
    assert report_html_path(root / "run").stat().st_mtime_ns == report_mtime  # nothing changed, nothing rewritten


def test_a_reward_config_change_reruns_reward_ppo_and_evaluate_only(copy):
    root, path = copy
    sft_before = created(root / "run", "sft")
    ran, _ = run(path, "reward.optim.learning_rate=1e-3")
    assert ran == ["reward", "ppo", "evaluate"]
    assert created(root / "run", "sft") == sft_before
    assert read_manifest(root / "run" / "reward")["config"]["optim"]["learning_rate"] == 1e-3
    # The new outputs are what the changed config expects: a second run with the same change does nothing.
    assert run(path, "reward.optim.learning_rate=1e-3")[0] == []
    # A change that does not alter the result (logging) reruns nothing.
    assert run(path, "reward.optim.learning_rate=1e-3", "reward.logging.log_every=3")[0] == []


def test_from_only_force_and_dry_run(copy):
    root, path = copy
    assert run(path, from_stage="ppo")[0] == ["ppo", "evaluate"]
    assert run(path, only="reward")[0] == ["reward"]
    # The reward model was rebuilt from the same config: same fingerprint, so nothing downstream is stale.
    assert run(path)[0] == []
    before = {stage: created(root / "run", stage) for stage in STAGES}
    ran, outcomes = run(path, force=True, dry_run=True)
    assert ran == [] and [o.action for o in outcomes] == ["planned"] * 4
    assert {stage: created(root / "run", stage) for stage in STAGES} == before


def test_an_incomplete_stage_is_rebuilt_and_resume_continues_it(copy):
    root, path = copy
    manifest_path(root / "run" / "ppo").unlink()  # as a run killed before it finished leaves it
    pipeline = load_pipeline(path)
    ran, outcomes = run(path)
    assert ran == ["ppo", "evaluate"]
    assert outcomes[2].state is StageState.INCOMPLETE
    assert read_manifest(root / "run" / "ppo")["status"] == "complete"
    assert pipeline.graph.states({s: pipeline.stage_config(s) for s in STAGES}) == {
        s: StageState.COMPLETE for s in STAGES}

    # With --resume, an incomplete stage with a checkpoint continues from it.
    overrides = []
    record = lambda spec, o: overrides.append(list(o)) or run_stage_in_process(spec, o)  # noqa: E731
    manifest_path(root / "run" / "ppo").unlink()
    assert run_pipeline(load_pipeline(path, ["ppo.checkpoint.save_every=1"]), executor=record, resume=False)
    manifest_path(root / "run" / "ppo").unlink()
    overrides.clear()
    run_pipeline(load_pipeline(path, ["ppo.checkpoint.save_every=1"]), executor=record, resume=True)
    assert "checkpoint.resume=true" in overrides[0]


def test_a_stage_run_alone_writes_what_the_pipeline_expects(copy, capsys):
    """``accelerate launch launch/evaluate.py`` with the same config and overrides gives the pipeline's output."""
    from stages import evaluate

    root, path = copy
    pipeline = load_pipeline(path)
    shutil.rmtree(root / "run" / "evaluate")
    argv = ["--config", pipeline.graph.specs["evaluate"].config, f"run_dir={root / 'run'}",
            *pipeline.graph.specs["evaluate"].overrides]
    assert launch(evaluate.run, evaluate.Config, default_config=None, prog="launch/evaluate.py", argv=argv) == 0
    assert run(path)[0] == []


def test_a_failing_stage_stops_the_pipeline_with_its_status(copy):
    root, path = copy
    ran = []

    def failing(spec, overrides):
        ran.append(spec.name)
        return 2

    with pytest.raises(StageFailed, match=r"stage 'ppo' stopped with exit status 2") as stop:
        run_pipeline(load_pipeline(path), from_stage="ppo", executor=failing)
    assert stop.value.exit_status == 2 and ran == ["ppo"]
    with pytest.raises(StageFailed, match="--resume") as stop:
        run_pipeline(load_pipeline(path), only="ppo", executor=lambda spec, o: 75)
    assert stop.value.exit_status == 75


def test_a_run_directory_of_another_pipeline_is_refused(copy):
    root, _ = copy
    other = write_pipeline(root, name="other")
    with pytest.raises(CheckpointError, match=r"belongs to pipeline 'tiny'.*not 'other'"):
        run(other, force=True)


def test_pipeline_config_errors(tmp_path):
    good = "run_dir: runs/x\nstages:\n  sft:\n    config: configs/sft/demo.yaml\n"
    cases = {
        "run_dir: runs/x\nstage: {}\n": r"unknown key 'stage'.*did you mean 'stages'",
        "run_dir: runs/x\nstages:\n  sft:\n    confg: a.yaml\n": r"unknown key 'confg' in stages.sft.*did you mean 'config'",
        "run_dir: runs/x\nstages:\n  sft:\n    config: nowhere.yaml\n": r"stages.sft.config.*nowhere.yaml does not exist",
        "run_dir: runs/x\nstages:\n  kto: {}\n": r"stages.kto.target is required",
        "run_dir: runs/x\nstages:\n  sft: {}\n  reward: {depends_on: [sfx]}\n": r"depends on 'sfx'",
        "stages:\n  sft: {}\n": r"'run_dir' must name the run directory",
        "run_dir: runs/x\nstages:\n  sft: {num_processes: 0}\n": r"num_processes.*positive integer",
    }
    for text, message in cases.items():
        path = tmp_path / "p.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_pipeline(path)
    path = tmp_path / "good.yaml"
    path.write_text(good)
    with pytest.raises(ConfigError, match=r"must start with a stage name.*stages: sft"):
        load_pipeline(path, ["optim.learning_rate=1"])
    # A bad key inside a stage's own config is found before anything runs.
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learnig_rate'"):
        run_pipeline(load_pipeline(path, ["sft.optim.learnig_rate=1"]), executor=Recorder())
    assert not (tmp_path / "runs").exists()


def test_shipped_demo_pipeline_resolves_every_stage():
    pipeline = load_pipeline(REPO_ROOT / "configs/pipeline/demo.yaml")
    assert pipeline.graph.order() == STAGES
    for stage in STAGES:
        cfg = pipeline.stage_config(stage)
        assert cfg.stage == stage and cfg.run_dir == "runs/demo" and cfg.logging.group == "demo"
        assert pipeline.graph.specs[stage].accelerate_config == "configs/accelerate/cpu.yaml"


def test_wandb_runs_share_the_group_and_tensorboard_holds_the_scalars(built):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _, _ = built
    runs = {}
    for run_dir in sorted((root / "run" / "wandb").glob("offline-run-*")):
        contents = wandb_run_contents(run_dir)
        runs[contents["run"].job_type] = contents
    assert sorted(runs) == sorted(STAGES)
    for stage, contents in runs.items():
        assert contents["run"].run_group == "run"
        manifest_config = read_manifest(root / "run" / stage)["config"]
        assert contents["config"]["seed"] == manifest_config["seed"]
        assert contents["config"]["logging"]["group"] == "run"
    ppo = runs["ppo"]
    rows = [row for row in ppo["history"] if "rollout/score_mean" in row]
    assert [row["train/episode"] for row in rows] == [8, 16]  # x axis: episodes = updates x rollout batch
    assert ppo["summary"]["final/kl"] == read_manifest(root / "run" / "ppo")["metrics"]["final/kl"]
    sft_losses = [row["train/loss"] for row in runs["sft"]["history"] if "train/loss" in row]
    assert sft_losses == [r["train/loss"] for r in read_metrics(root / "run" / "sft") if "train/loss" in r]

    events = EventAccumulator(str(root / "run" / "ppo" / "tensorboard"))
    events.Reload()
    scores = [(e.step, e.value) for e in events.Scalars("rollout/score_mean")]
    logged = [(r["step"], r["rollout/score_mean"]) for r in read_metrics(root / "run" / "ppo")
              if "rollout/score_mean" in r]
    assert [s for s, _ in scores] == [1, 2] and [v for _, v in scores] == pytest.approx([v for _, v in logged])
    assert "eval/accuracy" in EventAccumulator(str(root / "run" / "reward" / "tensorboard")).Reload().Tags()["scalars"]


@pytest.mark.slow  # 40 s: four `accelerate launch` processes; the default suite runs the stages in process
def test_rlhf_run_launches_each_stage_as_its_own_process(tmp_path):
    """The command line end to end: ``rlhf run`` starts one ``accelerate launch`` per stage; the second call skips
    them all and exits 0; a bad override exits 2 with one line and no traceback."""
    path = write_pipeline(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "rlhf.cli", "run", str(path)]
    first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("accelerate.commands.launch --config_file") == 4
    for stage in STAGES:
        assert read_manifest(tmp_path / "run" / stage)["status"] == "complete"
    assert "pipeline tiny: sft" in first.stdout and "evaluate  complete" in first.stdout

    start = time.perf_counter()
    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "nothing to run" in second.stdout
    assert second.stderr.count("skipped") == 4 and "accelerate.commands.launch" not in second.stderr
    assert time.perf_counter() - start < 30

    bad = subprocess.run(command + ["ppo.ppo.kl_coef=-1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "error: ppo.kl_coef" in bad.stderr and "Traceback" not in bad.stderr


def test_pipeline_main_refuses_to_run_under_a_distributed_launcher(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pipeline_main([str(REPO_ROOT / "configs/pipeline/demo.yaml")]) == 2
    assert "run it with python" in capsys.readouterr().err


@pytest.mark.parametrize("terminated", [True, False])
def test_a_launcher_that_reports_the_sigterm_it_passed_on_counts_as_interrupted(tmp_path, monkeypatch, terminated):
    """accelerate 1.16 passes SIGTERM on to the stage, waits for it and exits with 128 + SIGTERM: after a SIGTERM
    the pipeline passed on, that is an interrupted stage (75, resumable); the same status without one is not."""
    import signal
    import threading

    from rlhf import pipeline
    from rlhf.pipeline import StageSpec
    from rlhf.signals import EXIT_INTERRUPTED

    launcher = tmp_path / "launcher.py"
    launcher.write_text("import signal, sys, time\n"
                        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))\n"
                        "print('ready', flush=True)\n"
                        f"time.sleep(30) if {terminated} else sys.exit(128 + signal.SIGTERM)\n")
    monkeypatch.setattr(pipeline, "stage_command", lambda spec, overrides: [sys.executable, str(launcher)])
    before = signal.getsignal(signal.SIGTERM)
    if terminated:
        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    status = pipeline.launch_stage_process(StageSpec("sft", target="stages.sft:run"), [])
    assert status == (EXIT_INTERRUPTED if terminated else 128 + signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before  # the pipeline's own handler is back


ADOPTION = r"""
import subprocess, sys, time
from rlhf.pipeline import _children, _wait_for_adopted
from rlhf.signals import adopt_orphans

assert adopt_orphans()
earlier = _children()
# The launcher starts the stage and exits at once; the stage starts a helper that outlives it (as W&B's service
# outlives the process it serves, and named as it is) and exits 75 (interrupted); the helper exits 0.
helper = "import ctypes, time; ctypes.CDLL(None).prctl(15, b'wandb-core', 0, 0, 0); time.sleep(1.0)"
stage = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {helper!r}]); time.sleep(0.5); sys.exit(75)"
launcher = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {stage!r}])"
status = subprocess.run([sys.executable, "-c", launcher]).returncode
print(_wait_for_adopted(status, earlier), sorted(_children() - earlier))
"""


def test_an_adopted_stage_reports_its_own_exit_status_not_its_helpers():
    """When the launcher dies first, the pipeline adopts the stage, and then the stage's helpers when it exits: the
    status is the stage's (75, interrupted), and every adopted process has been waited for."""
    done = subprocess.run([sys.executable, "-c", ADOPTION], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["75", "[]"]
