"""Tests of rlhf.tracking: JSONL records, W&B offline files, TensorBoard events, secrets, the Trainer bridge."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest

from rlhf import tracking
from rlhf.errors import ConfigError
from rlhf.tracking import (Tracker, dashboard_lines, read_metrics, read_samples, read_summary, redact,
                           wandb_credentials, wandb_mode)
from support import finished_wandb_records, wandb_records, wandb_run_contents

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the W&B server or write into the real home directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # not the user's `wandb login`
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def strict_json(line: str) -> dict:
    """Parse one line as standard JSON: NaN/Infinity literals are not JSON and fail here."""

    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def test_jsonl_records_read_back_exactly(tmp_path: Path) -> None:
    import numpy as np

    with Tracker(tmp_path, stage="sft") as tracker:
        tracker.log({"train/loss": 2.5, "train/lr": 1e-4, "train/tokens": 1234}, step=1)
        tracker.log({"train/loss": np.float32(0.125), "train/done": True}, step=2)
        # Flushed on every call: a reader sees the record before the tracker is finished.
        assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
        tracker.summary({"eval/gold_score": 0.75, "best_step": 2, "note": "ok"})
        tracker.summary({"eval/gold_score": 0.8})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    records = read_metrics(tmp_path)
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
        {"step": 1, "train/loss": 2.5, "train/lr": 1e-4, "train/tokens": 1234},
        {"step": 2, "train/loss": 0.125, "train/done": 1},
    ]
    assert isinstance(records[0]["train/tokens"], int)
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in records)
    assert strict_json(lines[2]) == {"summary": {"eval/gold_score": 0.75, "best_step": 2, "note": "ok"},
                                     "time": pytest.approx(records[0]["time"], abs=60)}
    assert read_summary(tmp_path / "metrics.jsonl") == {"eval/gold_score": 0.8, "best_step": 2, "note": "ok"}
    assert not (tmp_path / "samples.jsonl").exists()


def test_non_finite_values_stay_valid_json(tmp_path: Path) -> None:
    with Tracker(tmp_path, stage="ppo") as tracker:
        tracker.log({"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.0}, step=3)
        tracker.summary({"final": math.nan})
        tracker.log_table("samples", ["text", "score"], [["x", math.inf]], step=3)

    for name in ("metrics.jsonl", "samples.jsonl"):
        for line in (tmp_path / name).read_text().splitlines():
            strict_json(line)
    raw = strict_json((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert (raw["a"], raw["b"], raw["c"], raw["d"]) == ("nan", "inf", "-inf", 1.0)
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf
    assert math.isnan(read_summary(tmp_path)["final"])
    assert read_samples(tmp_path)[0]["score"] == "inf"


def test_tables_go_to_samples_jsonl(tmp_path: Path) -> None:
    with Tracker(tmp_path, stage="ppo") as tracker:
        rows = [["Great food", " and friendly staff.", 0.9], ["Bad | very", "bad\nservice", -1]]
        tracker.log_table("samples", ["prompt", "response", "score"], rows, step=5)
        with pytest.raises(ValueError, match="row 0 has 2 values for 3 columns"):
            tracker.log_table("samples", ["prompt", "response", "score"], [["a", "b"]], step=6)
    assert read_samples(tmp_path / "samples.jsonl") == [
        {"step": 5, "table": "samples", "prompt": "Great food", "response": " and friendly staff.", "score": 0.9},
        {"step": 5, "table": "samples", "prompt": "Bad | very", "response": "bad\nservice", "score": -1},
    ]


def test_finish_is_idempotent_and_logging_after_it_fails(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, stage="sft")
    tracker.log({"x": 1}, step=0)
    tracker.finish()
    tracker.finish()
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"x": 2}, step=1)
    with pytest.raises(ValueError, match="non-negative int"):
        Tracker(tmp_path / "other", stage="sft").log({"x": 1}, step=-1)
    with pytest.raises(TypeError, match="metric 'x'"):
        Tracker(tmp_path / "third", stage="sft").log({"x": "text"}, step=1)


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Tracker(out, stage="sft", report_to=["wandb", "tensorboard"], is_main_process=False,
                 config={"a": 1}) as tracker:
        tracker.log({"train/loss": 1.0}, step=1)
        tracker.log_table("samples", ["a"], [["b"]], step=1)
        tracker.summary({"x": 1})
    tracker.finish()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_invalid_report_to_names_value_and_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        Tracker(tmp_path, stage="sft", report_to=["jsonl", "mlflow"])
    message = str(err.value)
    assert "'mlflow'" in message and "logging.report_to" in message
    assert all(name in message for name in ("jsonl", "wandb", "tensorboard"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_is_online_after_wandb_login_and_offline_without_it(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path, caplog) -> None:
    """`wandb login` leaves the key in a netrc file, not the environment: a logged-in user's runs go online."""
    monkeypatch.delenv("WANDB_MODE")
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_credentials() is None and wandb_mode() == "offline"
    netrc_file.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_WANDB_KEY}\n")
    assert wandb_credentials() == str(netrc_file) and wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another server does not count
    assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_BASE_URL")
    netrc_file.write_text("machine api.wandb.ai login user password\n")  # an entry without a key
    assert wandb_mode() == "offline"
    netrc_file.write_text("machine api.wandb.ai login user passwrd x\n")  # not a netrc file: a warning, offline
    assert wandb_mode() == "offline" and "not a readable netrc file" in caplog.text
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    assert wandb_credentials() == "WANDB_API_KEY" and wandb_mode() == "online"


def test_dashboard_lines_give_the_upload_command_the_pages_and_the_logdir(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "demo"
    offline = [{"wandb": {"mode": "offline", "group": "demo", "dir": str(run / "wandb" / name)},
                "tensorboard": {"dir": str(run / stage / "tensorboard")}}
               for name, stage in (("offline-run-1", "sft"), ("offline run-2", "ppo"))]
    assert dashboard_lines(offline) == [
        "W&B: 2 offline runs (group demo); upload with",
        "  wandb sync runs/demo/wandb/offline-run-1 'runs/demo/wandb/offline run-2'",
        "TensorBoard: tensorboard --logdir runs/demo",
    ]
    online = {"wandb": {"mode": "online", "group": "demo", "name": "demo-ppo", "url": "https://wandb.ai/u/rlhf/runs/x"}}
    assert dashboard_lines([online]) == ["W&B: demo-ppo (group demo): https://wandb.ai/u/rlhf/runs/x"]
    disabled = {"wandb": {"mode": "disabled", "group": "demo", "dir": None, "url": None}}
    assert dashboard_lines([disabled, {}]) == []


def test_wandb_mode_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "Offline")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'.*online, offline, disabled"):
        wandb_mode()
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        Tracker(tmp_path / "out", stage="sft", report_to=["wandb"])
    assert not (tmp_path / "out").exists()


def test_wandb_offline_runs_hold_logged_keys(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    config = {"model": {"name": "tiny"}, "optim": {"lr": 0.001}, "hf_token": "hf_abcdefghijklmnop"}
    for stage in ("sft", "reward"):
        with Tracker(run_root / stage, stage=stage, report_to=["wandb"], group="demo-1", run_name=f"demo-1-{stage}",
                     config=config, wandb_dir=run_root) as tracker:
            tracker.log({f"{stage}/loss": 1.5, "perf/tokens_per_s": 100}, step=1)
            tracker.log({f"{stage}/loss": 1.25}, step=2)
            tracker.log_table("samples", ["prompt", "response"], [["Good", " food."]], step=2)
            tracker.summary({"final/score": 0.5})

    run_dirs = sorted((run_root / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    runs = {}
    for run_dir in run_dirs:
        contents = wandb_run_contents(run_dir)
        runs[contents["run"].job_type] = (run_dir, contents)
    assert set(runs) == {"sft", "reward"}
    for stage, (run_dir, contents) in runs.items():
        assert contents["run"].run_group == "demo-1"
        assert contents["run"].display_name == f"demo-1-{stage}"
        assert contents["config"]["model"] == {"name": "tiny"}
        assert contents["config"]["hf_token"] == "***"
        losses = [(row["_step"], row[f"{stage}/loss"]) for row in contents["history"] if f"{stage}/loss" in row]
        assert losses == [(1, 1.5), (2, 1.25)]
        # W&B stores the table as a file reference, its fields flattened under the table's key.
        (table_row,) = [row for row in contents["history"] if "samples/_type" in row]
        assert (table_row["_step"], table_row["samples/_type"], table_row["samples/nrows"]) == (2, "table-file", 1)
        assert contents["summary"]["final/score"] == 0.5
        (table,) = run_dir.glob("files/media/table/samples_2_*.table.json")
        assert json.loads(table.read_text())["data"] == [["Good", " food."]]
    # JSONL is on even when only W&B was asked for.
    assert [r["step"] for r in read_metrics(run_root / "sft")] == [1, 2]

    # W&B's service may still be appending when the reader looks: a file cut anywhere reads as a prefix of its records.
    (log_file,) = runs["sft"][0].glob("run-*.wandb")
    data, whole = log_file.read_bytes(), [record.SerializeToString() for record in wandb_records(log_file)]
    cut_file = tmp_path / "cut.wandb"
    for cut in range(7, len(data), 13):
        cut_file.write_bytes(data[:cut])
        records = [record.SerializeToString() for record in wandb_records(cut_file)]
        assert records == whole[: len(records)], cut


def test_tensorboard_events_hold_scalars(tmp_path: Path) -> None:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(tmp_path, stage="ppo", report_to=["tensorboard"], config={"seed": 1}) as tracker:
        for step in range(1, 4):
            tracker.log({"ppo/policy_loss": torch.tensor(0.5 * step), "rollout/kl": step / 10}, step=step)
        tracker.log_table("samples", ["prompt", "response"], [["a", "b|c"]], step=3)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("ppo/policy_loss")] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("rollout/kl")] == [
        (1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert {"samples/text_summary", "config/text_summary"} <= set(events.Tags()["tensors"])
    (text_event,) = events.Tensors("samples/text_summary")
    assert text_event.tensor_proto.string_val[0].decode() == "| prompt | response |\n| --- | --- |\n| a | b\\|c |"


@pytest.mark.parametrize(
    ("name", "secret"),
    [("token", True), ("hf_token", True), ("HF_TOKEN", True), ("auth_token", True), ("access_token", True),
     ("hubToken", True), ("wandb_api_key", True), ("apiKey", True), ("secret", True), ("client_secret", True),
     ("password", True), ("db_password", True),
     ("max_new_tokens", False), ("pad_token", False), ("eos_token", False), ("bos_token", False),
     ("tokens_per_s", False), ("pad_token_id", False), ("tokenizer", False), ("token_type_ids", False),
     ("stop_token", False), ("lr", False), ("dataset_key", False)],
)
def test_is_secret_name(name: str, secret: bool) -> None:
    assert tracking.is_secret_name(name) is secret


def test_redact_masks_secret_keys_and_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # under 8 characters: too short to hunt for
    config = {
        "hf_token": "hf_real_looking_token",
        "model": {"name": "gpt2", "auth_token": None, "generation": {"max_new_tokens": 32, "pad_token": "<pad>"}},
        "logging": {"note": FAKE_WANDB_KEY, "url": f"https://user:{FAKE_WANDB_KEY}@example.org", "tags": ["abc"]},
        "eos_token": "</s>",
        "tokens_per_s": 10.5,
    }
    assert redact(config) == {
        "hf_token": "***",
        "model": {"name": "gpt2", "auth_token": None, "generation": {"max_new_tokens": 32, "pad_token": "<pad>"}},
        "logging": {"note": "***", "url": "https://user:***@example.org", "tags": ["abc"]},
        "eos_token": "</s>",
        "tokens_per_s": 10.5,
    }
    assert config["hf_token"] == "hf_real_looking_token"  # the input is not modified


def test_environment_secret_never_reaches_any_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = "s3cr3t-Value-that-must-not-leak"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setattr(sys, "argv", [sys.argv[0], f"hub.token={secret}"])
    config = {"hub": {"token": secret}, "note": f"Bearer {secret}", "data": {"path": "data/demo"}}
    out = tmp_path / "out"
    with Tracker(out, stage="sft", report_to=["wandb", "tensorboard"], config=config,
                 run_name=f"run-{secret}") as tracker:
        tracker.log({"train/loss": 1.0}, step=1)
        tracker.log_table("samples", ["prompt", "response"], [["p", f"the key is {secret}"]], step=1)
        tracker.summary({"note": secret, "api_key": FAKE_WANDB_KEY})

    (log_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert len(finished_wandb_records(log_file)) > 5
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any("tfevents" in path.name for path in files) and any(path.suffix == ".json" for path in files)
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data, path
        assert FAKE_WANDB_KEY.encode() not in data, path


def test_trainer_metric_names() -> None:
    assert tracking.trainer_metric_name("loss") == "train/loss"
    assert tracking.trainer_metric_name("eval_loss") == "eval/loss"
    assert tracking.trainer_metric_name("eval_accuracy") == "eval/accuracy"
    assert tracking.trainer_metric_name("grad_norm") == "train/grad_norm"
    assert tracking.trainer_metric_name("learning_rate", prefix="sft/") == "sft/learning_rate"


def test_tracker_callback_bridges_a_real_trainer(tmp_path: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from rlhf.tracking import TrackerCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    ids = torch.randint(0, 50, (8, 12))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, learning_rate=1e-3,
    )
    out = tmp_path / "sft"
    with Tracker(out, stage="sft") as tracker:
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4],
                          callbacks=[TrackerCallback(tracker)])
        trainer.train()

    records = read_metrics(out)
    assert sorted(r["step"] for r in records if "train/loss" in r) == [1, 2, 3, 4]
    assert sorted(r["step"] for r in records if "eval/loss" in r) == [2, 4]
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert any("train/learning_rate" in r for r in records) and any("train/grad_norm" in r for r in records)
    assert not any(key.startswith("eval_") or key == "loss" for r in records for key in r)


def test_setup_logging_once_with_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    monkeypatch.setattr(tracking, "_log_handler", None)
    try:
        tracking.setup_logging("INFO", rank=0, world_size=1)
        tracking.setup_logging("DEBUG", rank=0, world_size=1)
        assert len(root.handlers) == len(handlers) + 1 and root.level == logging.DEBUG
        tracking.setup_logging("INFO", rank=1, world_size=2)
        assert len(root.handlers) == len(handlers) + 1 and root.level == logging.WARNING
        assert "[rank 1]" in tracking._log_handler.formatter._fmt
        with pytest.raises(ConfigError, match="'LOUD'"):
            tracking.setup_logging("LOUD")
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def test_import_stays_light() -> None:
    import subprocess

    code = ("import sys, rlhf.tracking; "
            "print(sorted(m for m in ('torch', 'wandb', 'transformers', 'tensorboard') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_wandb_failure_stops_wandb_logging_and_never_the_stage(tmp_path: Path, monkeypatch, caplog) -> None:
    """W&B's service can die under the run (a SIGTERM to the whole job reaches it too): one warning, then the run
    goes on with metrics.jsonl (and TensorBoard), and finishing it does not raise."""
    from wandb.sdk.wandb_run import Run

    def lost(self, *args, **kwargs):
        raise ConnectionResetError("Connection lost")

    with Tracker(tmp_path, stage="ppo", report_to=["wandb"]) as tracker:
        tracker.log({"rollout/kl": 0.5}, step=1)
        monkeypatch.setattr(Run, "log", lost)
        monkeypatch.setattr(Run, "finish", lost)
        tracker.log({"rollout/kl": 0.25}, step=2)
        tracker.log({"rollout/kl": 0.125}, step=3)
        tracker.log_table("samples", ["prompt"], [["a"]], step=3)
        tracker.summary({"final/kl": 0.125})
    assert [r["rollout/kl"] for r in read_metrics(tmp_path)] == [0.5, 0.25, 0.125]
    assert read_summary(tmp_path) == {"final/kl": 0.125}
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("W&B: ")]
    assert warnings == ["W&B: log failed (ConnectionResetError: Connection lost); W&B logging stops for this run, "
                        "metrics.jsonl and TensorBoard go on"]


def test_a_wandb_run_that_cannot_start_leaves_the_stage_on_jsonl(tmp_path: Path, monkeypatch, caplog) -> None:
    import wandb

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("Connect call failed ('127.0.0.1', 9)")

    monkeypatch.setattr(wandb, "init", refused)
    with Tracker(tmp_path, stage="sft", report_to=["wandb"]) as tracker:
        tracker.log({"train/loss": 1.0}, step=1)
    assert tracker.locations == {} and [r["train/loss"] for r in read_metrics(tmp_path)] == [1.0]
    assert "W&B: could not start this stage's run (ConnectionRefusedError" in caplog.text
