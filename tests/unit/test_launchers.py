"""Every shipped stage config loads, every launcher's --help works, and user errors exit with status 2."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.launcher import EXIT_USER_ERROR, REPO_ROOT, launch
from rlhf.pipeline import STANDARD_STAGES, resolve_target

LAUNCHERS = sorted((REPO_ROOT / "launch").glob("*.py"))
STAGE_CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*/*.yaml") if p.parent.name in STANDARD_STAGES)


def test_there_is_something_to_check():
    assert LAUNCHERS and STAGE_CONFIGS


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_stage_config_loads(path: Path):
    _, config_cls = resolve_target(STANDARD_STAGES[path.parent.name][0])
    cfg = load_config(config_cls, path)
    assert cfg.stage == path.parent.name


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_help(path: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(path), run_name="__main__")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: launch/{path.name}")
    if path.name == "pipeline.py":  # the pipeline's options, not a stage's config keys
        assert "--from STAGE" in out and "--resume" in out and "STAGE.key=value" in out
    else:
        assert "seed: int" in out


def test_user_error_exits_2_with_message_and_no_traceback(capsys):
    from stages import pretrain

    code = launch(pretrain.run, pretrain.Config, default_config=None, prog="launch/pretrain.py",
                  argv=["optim.learnig_rate=0.1"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "error: unknown config key 'optim.learnig_rate'" in err
    assert "Traceback" not in err


def test_missing_data_file_exits_2(tmp_path, capsys):
    from stages import pretrain

    code = launch(pretrain.run, pretrain.Config, default_config=None, prog="launch/pretrain.py",
                  argv=[f"data.path={tmp_path}/missing.jsonl", f"output_dir={tmp_path}/out"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "missing.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_validate_data(tmp_path, capsys):
    from rlhf.cli import main

    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "x", "rejected": "x"}\n')
    assert main(["validate-data", str(bad), "--format", "preference"]) == 1
    assert f"{bad}:1: chosen and rejected are identical" in capsys.readouterr().out
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n')
    assert main(["validate-data", str(good), "--format", "preference"]) == 0
    assert main(["frobnicate"]) == 2


ACCELERATE_CONFIGS = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = {"cpu.yaml": "NO", "ddp.yaml": "MULTI_GPU"}.get(path.name, "DEEPSPEED")
    assert config.distributed_type.value == expected
    if expected == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == (2 if "zero2" in path.name else 3)


def test_every_accelerate_config_is_shipped():
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"cpu.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml",
                                                     "zero3_offload.yaml"}


def test_reward_without_sft_output_names_the_command(tmp_path, capsys):
    from stages import reward

    code = launch(reward.run, reward.Config, default_config=None, prog="launch/reward.py",
                  argv=[f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert f"{tmp_path}/sft does not exist: the sft stage has not been run" in err
    assert f"accelerate launch launch/sft.py run_dir={tmp_path}" in err


def test_the_scale_recipe_loads_and_splits_on_one_and_two_processes():
    """benchmarks/scale.py runs configs/recipes/scale-100m/ppo.yaml under one and two processes."""
    from rlhf.config import PPOConfig, load_config

    cfg = load_config(PPOConfig, REPO_ROOT / "configs" / "recipes" / "scale-100m" / "ppo.yaml", [])
    cfg.validate()
    assert cfg.batch_layout(1) == (8, 8, 2) and cfg.batch_layout(2) == (4, 4, 1)
    assert cfg.rollout.max_new_tokens == 16 and cfg.logging.report_to == ["jsonl"]
