"""Bad input through the real launchers (launch/sft.py, launch/reward.py, launch/ppo.py): every case ends with exit
status 2 and one ``error:`` line that names the place (file:row, config key or path) and the fix, without a
traceback and without an output directory that looks complete. With ``data.on_bad_row=drop`` the row-content cases
complete instead, and the dropped rows are counted.

The cases run ``rlhf.launcher.launch`` in-process with the launchers' own arguments; one subprocess per launcher
checks the real exit status and stderr."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, train_tokenizer, write_jsonl

from rlhf.checkpoint import read_manifest, write_json_atomic
from rlhf.launcher import EXIT_USER_ERROR, REPO_ROOT, default_config_path, launch
from rlhf.pipeline import run_with_upstream
from stages import dpo, ppo, reward, sft

LAUNCHERS = {
    "sft": (sft.run, sft.Config),
    "reward": (reward.run, reward.Config),
    "dpo": (dpo.run, dpo.Config),
    "ppo": (functools.partial(run_with_upstream, run_ppo=ppo.run), ppo.Config),
}
#: The demo data file each launcher reads (its first rows are the good rows of every case).
DATA = {"sft": "sft.jsonl", "reward": "preferences.jsonl", "dpo": "preferences.jsonl", "ppo": "prompts.jsonl"}
#: The text column a broken row breaks, per launcher.
TEXT_COLUMN = {"sft": "completion", "reward": "chosen", "dpo": "rejected", "ppo": "prompt"}
NUM_ROWS = 8
STAGES = ["sft", "reward", "dpo", "ppo"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny causal LM (the SFT policy and every stage's base) and a reward model on it, sharing one tokenizer."""
    root = tmp_path_factory.mktemp("bad_input_models")
    tokenizer = plain_tokenizer()
    base = save_tiny_causal_lm(root / "base", tokenizer)
    rm = save_reward_model(root / "reward", base, tokenizer)
    return {"base": base, "reward": rm, "tokenizer": tokenizer}


def overrides(stage: str, tmp_path: Path, models: dict, data: Path, *extra: str) -> list[str]:
    """A small run of ``stage`` in ``tmp_path/run`` on ``data``; ``extra`` comes last and wins."""
    common = [f"run_dir={tmp_path / 'run'}", f"data.path={data}", "data.eval_fraction=0", "logging.log_every=1",
              "threads=1"]
    if stage in ("sft", "reward", "dpo"):
        return [*common, f"model.name_or_path={models['base']}", "data.max_length=null", "train.max_steps=1",
                "train.batch_size=4", "train.micro_batch_size=4", *extra]
    return [*common, f"model.name_or_path={models['base']}", f"reward_model.name_or_path={models['reward']}",
            "data.eval_path=null",
            "checks.min_eos_rate=0", "rollout.batch_size=4", "rollout.max_new_tokens=4", "rollout.micro_batch_size=4",
            "rollout.score_norm=none", "ppo.num_updates=1", "ppo.ppo_epochs=1", "ppo.num_minibatches=1",
            "ppo.micro_batch_size=4", "eval.gold_judge=false", "upstream_configs={}", *extra]


def run_launcher(stage: str, argv: list[str], capsys) -> tuple[int, str]:
    """``launch/<stage>.py ARGV`` in this process: (exit status, stderr)."""
    run, config_cls = LAUNCHERS[stage]
    status = launch(run, config_cls, default_config=default_config_path(stage), prog=f"launch/{stage}.py",
                    argv=argv)
    return status, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The launcher's message: everything from its ``error:`` line on."""
    assert "error: " in stderr, stderr[-3000:]
    return stderr[stderr.index("error: "):]


def assert_fails(stage: str, tmp_path: Path, argv: list[str], capsys, *words: str, output: bool = False) -> str:
    """The launcher exits 2 with a message holding every one of ``words``, no traceback, and no complete output.
    ``output`` False: the stage stopped before creating its output directory at all, so before it loaded any
    weights (stages load them inside their ``StageRun``)."""
    status, stderr = run_launcher(stage, argv, capsys)
    message = error_line(stderr)
    assert status == EXIT_USER_ERROR, stderr[-3000:]
    assert "Traceback" not in stderr
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    out = tmp_path / "run" / stage
    assert read_manifest(out) is None
    if not output:
        assert not out.exists(), f"{out} was created before the input was checked"
    return message


def good_rows(stage: str, n: int = NUM_ROWS) -> list[dict]:
    return demo_rows(DATA[stage], n)


def data_file(tmp_path: Path, stage: str, rows: list[dict]) -> Path:
    return write_jsonl(tmp_path / DATA[stage], rows)


def with_bad_row(stage: str, tmp_path: Path, change, row: int = 3, n: int = NUM_ROWS) -> Path:
    """Good rows with row ``row`` (0-based; line ``row + 1``) replaced by ``change(row dict)``."""
    rows = good_rows(stage, n)
    rows[row] = change(dict(rows[row]))
    return data_file(tmp_path, stage, rows)



@pytest.mark.parametrize("stage", STAGES)
def test_malformed_json_line(stage, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].rstrip("\n")[:-3] + "\n"  # cut off the closing quote and brace
    path.write_text("".join(lines))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path), capsys,
                 f"{path}:3", "malformed JSON", "one JSON object per line")


@pytest.mark.parametrize("stage", STAGES)
def test_missing_column_in_one_row(stage, tmp_path, models, capsys):
    column = TEXT_COLUMN[stage]
    path = with_bad_row(stage, tmp_path, lambda row: {k: v for k, v in row.items() if k != column})
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path), capsys, f"{path}:4", column)


@pytest.mark.parametrize(("stage", "wrong", "right"),
                         [("sft", "completon", "completion"), ("reward", "rejectd", "rejected"),
                          ("ppo", "promt", "prompt")])
def test_misspelled_column_suggests_the_right_name(stage, wrong, right, tmp_path, models, capsys):
    rows = [{(wrong if k == right else k): v for k, v in row.items()} for row in good_rows(stage)]
    path = data_file(tmp_path, stage, rows)
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path), capsys,
                 str(path), f"did you mean '{right}'", "Rename the columns")


@pytest.mark.parametrize("stage", STAGES)
def test_number_where_text_is_expected(stage, tmp_path, models, capsys):
    column = TEXT_COLUMN[stage]
    path = with_bad_row(stage, tmp_path, lambda row: {**row, column: 42})
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path), capsys, f"{path}:4", column, "number")


@pytest.mark.parametrize("stage", STAGES)
def test_empty_text(stage, tmp_path, models, capsys):
    column = TEXT_COLUMN[stage]
    path = with_bad_row(stage, tmp_path, lambda row: {**row, column: "   "})
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, "data.on_bad_row=error"), capsys,
                 f"{path}:4", f"{column} is empty", "data.on_bad_row=drop")


def test_reward_chosen_equal_to_rejected(tmp_path, models, capsys):
    path = with_bad_row("reward", tmp_path, lambda row: {**row, "rejected": row["chosen"]})
    assert_fails("reward", tmp_path, overrides("reward", tmp_path, models, path, "data.on_bad_row=error"), capsys,
                 f"{path}:4", "chosen and rejected are identical", "remove the row")


@pytest.mark.parametrize("stage", STAGES)
def test_non_utf8_bytes(stage, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'": "', b'": "\xff\xfe', 1)
    path.write_bytes(b"".join(lines))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path), capsys,
                 f"{path}:5", "not valid UTF-8", "re-encode the file as UTF-8")


@pytest.mark.parametrize("stage", STAGES)
def test_empty_file(stage, tmp_path, models, capsys):
    path = tmp_path / DATA[stage]
    path.write_text("")
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path), capsys,
                 str(path), "no rows", "give at least one row")


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_row_over_max_length(stage, tmp_path, models, capsys):
    long_text = " the lamp is great ." * 40
    path = with_bad_row(stage, tmp_path, lambda row: {**row, TEXT_COLUMN[stage]: long_text})
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, "data.on_bad_row=error",
                                            "data.max_length=100"), capsys,
                 f"{path}:4", "over data.max_length=100", "raise data.max_length")


def test_ppo_rejects_data_max_length(tmp_path, models, capsys):
    path = data_file(tmp_path, "ppo", good_rows("ppo"))
    assert_fails("ppo", tmp_path, overrides("ppo", tmp_path, models, path, "data.max_length=100"), capsys,
                 "data.max_length", "rollout.max_prompt_len")


@pytest.mark.parametrize("stage", STAGES)
def test_bad_rows_are_dropped_and_counted_with_on_bad_row_drop(stage, tmp_path, models, capsys, caplog):
    column = TEXT_COLUMN[stage]
    n = 24
    path = with_bad_row(stage, tmp_path, lambda row: {**row, column: ""}, n=n)
    argv = overrides(stage, tmp_path, models, path, "data.on_bad_row=drop", "data.max_bad_fraction=0.1")
    with caplog.at_level(logging.WARNING):
        status, stderr = run_launcher(stage, argv, capsys)
    assert status == 0, stderr[-3000:]
    manifest = read_manifest(tmp_path / "run" / stage)
    assert manifest is not None
    data = manifest["data"]
    assert data["num_dropped"] == 1
    assert data["num_train"] + data["num_eval"] + data.get("num_duplicates_removed", 0) == n - 1
    assert f"dropped 1 of {n} rows with problems ({path}:4)" in caplog.text


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_config_key_names_the_closest_valid_key(stage, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, "optim.learnig_rate=1e-3"), capsys,
                 "unknown config key 'optim.learnig_rate'", "did you mean 'optim.learning_rate'")


@pytest.mark.parametrize("stage", STAGES)
def test_negative_learning_rate(stage, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, "optim.learning_rate=-1e-3"), capsys,
                 "optim.learning_rate", "must be > 0")


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_batch_size_not_a_multiple_of_micro_batch_size(stage, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, "train.batch_size=6",
                                            "train.micro_batch_size=4"), capsys,
                 "train.batch_size=6", "train.micro_batch_size=4", "change train.batch_size or train.micro_batch_size")


def test_ppo_rollout_batch_not_divided_by_minibatches(tmp_path, models, capsys):
    path = data_file(tmp_path, "ppo", good_rows("ppo"))
    assert_fails("ppo", tmp_path, overrides("ppo", tmp_path, models, path, "rollout.batch_size=6",
                                            "ppo.num_minibatches=4"), capsys,
                 "rollout.batch_size=6", "ppo.num_minibatches=4", "change one of them")


def test_ppo_negative_kl_coef(tmp_path, models, capsys):
    path = data_file(tmp_path, "ppo", good_rows("ppo"))
    assert_fails("ppo", tmp_path, overrides("ppo", tmp_path, models, path, "ppo.kl_coef=-0.1"), capsys,
                 "ppo.kl_coef", "must be >= 0")


#: (launcher, the model key) pairs every model case runs through.
MODEL_KEYS = [("sft", "model"), ("reward", "model"), ("ppo", "model"), ("ppo", "reward_model")]


@pytest.mark.parametrize(("stage", "key"), MODEL_KEYS)
def test_model_path_does_not_exist(stage, key, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    missing = tmp_path / "no-such-model"
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, f"{key}.name_or_path={missing}"), capsys,
                 f"{key}.name_or_path", str(missing), "does not exist", "point it at a model directory")


@pytest.mark.parametrize(("stage", "key"), MODEL_KEYS)
def test_directory_that_is_not_a_model(stage, key, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model\n")
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, f"{key}.name_or_path={notes}"), capsys,
                 f"{key}.name_or_path", str(notes), "not a model directory", "point it at the output of a stage")


@pytest.mark.parametrize(("stage", "key"), MODEL_KEYS)
def test_truncated_safetensors(stage, key, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    source = models["reward" if key == "reward_model" else "base"]
    broken = Path(shutil.copytree(source, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, f"{key}.name_or_path={broken}"), capsys,
                 f"{key}.name_or_path", str(weights), "truncated", "download the model again")


def test_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, models, capsys, caplog):
    tokenizer = train_tokenizer(["<|endoftext|>"], eos="<|endoftext|>", pad=None, bos="<|endoftext|>")
    model = save_tiny_causal_lm(tmp_path / "no-pad", tokenizer)
    path = data_file(tmp_path, "sft", good_rows("sft"))
    with caplog.at_level(logging.WARNING):
        status, stderr = run_launcher("sft", overrides("sft", tmp_path, models, path,
                                                       f"model.name_or_path={model}"), capsys)
    assert status == 0, stderr[-3000:]
    assert read_manifest(tmp_path / "run" / "sft") is not None
    assert f"tokenizer of {model} has no pad token; padding with EOS" in caplog.text


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_tokenizer_without_pad_or_eos_token(stage, tmp_path, models, capsys):
    model = Path(shutil.copytree(models["base"], tmp_path / "no-eos"))
    tokenizer = train_tokenizer(["<|endoftext|>", "<pad>"], eos="<|endoftext|>", pad=None)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(model)
    path = data_file(tmp_path, stage, good_rows(stage))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, f"model.name_or_path={model}"), capsys,
                 str(model), "neither a pad nor an EOS token", "set eos_token")


def test_ppo_reward_model_vocabulary_smaller_than_the_policy_token_ids(tmp_path, models, capsys):
    """The reward model shares the policy's tokenizer, so PPO feeds it the sampled ids as they are; its embedding
    table is too small for them."""
    import transformers

    tokenizer = models["tokenizer"]
    small = transformers.GPT2Config(vocab_size=len(tokenizer) - 50, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    base = tmp_path / "small-base"
    transformers.GPT2LMHeadModel(small).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rm = save_reward_model(tmp_path / "small-reward", base, tokenizer)
    path = data_file(tmp_path, "ppo", good_rows("ppo"))
    assert_fails("ppo", tmp_path, overrides("ppo", tmp_path, models, path, f"reward_model.name_or_path={rm}"),
                 capsys, "reward_model.name_or_path", str(rm), "embeddings", "resize its embeddings", output=True)


def save_prefix_adapter(models: dict, path: Path) -> Path:
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models["base"]),
                           PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    model.save_pretrained(path)
    models["tokenizer"].save_pretrained(path)
    return path


@pytest.mark.parametrize(("stage", "key"), MODEL_KEYS)
def test_prefix_tuned_adapter_given_to_a_stage_that_cannot_use_it(stage, key, tmp_path, models, capsys):
    adapter = save_prefix_adapter(models, tmp_path / "prefix")
    path = data_file(tmp_path, stage, good_rows(stage))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, f"{key}.name_or_path={adapter}"), capsys,
                 f"{key}.name_or_path", str(adapter), "prefix-tuning adapter", "peft.method=full, lora or partial")


@pytest.mark.parametrize(("stage", "key"), [("reward", "peft"), ("ppo", "peft"), ("ppo", "critic_peft")])
def test_prefix_tuning_asked_of_a_stage_that_cannot_do_it(stage, key, tmp_path, models, capsys):
    path = data_file(tmp_path, stage, good_rows(stage))
    assert_fails(stage, tmp_path, overrides(stage, tmp_path, models, path, f"{key}.method=prefix"), capsys,
                 f"{key}.method=prefix", "lora")


def test_run_dir_of_another_pipeline(tmp_path, models, capsys):
    """The pipeline launcher refuses a run directory another pipeline created (its pipeline.json)."""
    from rlhf.pipeline import pipeline_main

    run_dir = tmp_path / "run"
    write_json_atomic(run_dir / "pipeline.json", {"run_id": "x", "pipeline": "other"})
    path = data_file(tmp_path, "sft", good_rows("sft"))
    config = tmp_path / "mine.yaml"
    config.write_text(
        "name: mine\n"
        f"run_dir: {run_dir}\n"
        "stages:\n"
        "  sft:\n"
        f"    config: {default_config_path('sft')}\n"
        f"    overrides: ['model.name_or_path={models['base']}', 'data.path={path}']\n"
    )
    status = pipeline_main([str(config)], prog="launch/pipeline.py")
    stderr = capsys.readouterr().err
    message = error_line(stderr)
    assert status == EXIT_USER_ERROR and "Traceback" not in stderr
    for word in (str(run_dir), "belongs to pipeline 'other'", "pipeline.json", "choose another run_dir"):
        assert word in message
    assert not (run_dir / "sft").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_launcher_process_exits_2_with_the_message_and_no_traceback(stage, tmp_path, models):
    path = data_file(tmp_path, stage, good_rows(stage))
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "{not json\n"
    path.write_text("".join(lines))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / f"{stage}.py"),
                           *overrides(stage, tmp_path, models, path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"error: {path}: " in proc.stderr and f"{path}:2: malformed JSON" in proc.stderr
    assert "write one JSON object per line" in proc.stderr
    assert read_manifest(tmp_path / "run" / stage) is None
