from __future__ import annotations

import json
import os

import pytest

from rlhf import checkpoint as ck
from rlhf.errors import CheckpointError, StorageError


def _complete(out, fingerprint="f" * 16, stage="sft"):
    ck.begin_output(out)
    (out / "model.safetensors").write_bytes(b"weights")
    return ck.write_manifest(out, stage=stage, fingerprint=fingerprint, config={"a": 1}, inputs={}, seed=0,
                             metrics={"loss": 0.5})


def test_manifest_written_and_read(tmp_path):
    out = tmp_path / "sft"
    manifest = _complete(out)
    assert ck.read_manifest(out) == manifest
    assert manifest["status"] == "complete"
    assert {"torch", "transformers", "python"} <= set(manifest["versions"])
    # Results depend on the arithmetic's platform too: the CPU, its instruction set as torch uses it, the threads.
    assert {"cpu", "torch_cpu_capability", "torch_threads"} <= set(manifest["platform"])
    assert manifest["platform"]["torch_threads"] >= 1
    assert ck.require_complete(out, stage="sft", how_to_build="x")["fingerprint"] == "f" * 16


def test_incomplete_directory_refused_with_stage_to_rerun(tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half")
    with pytest.raises(CheckpointError, match=r"is incomplete .* the sft stage did not finish\. Rerun it: run sft"):
        ck.require_complete(out, stage="sft", how_to_build="run sft")
    with pytest.raises(CheckpointError, match="does not exist: the reward stage has not been run"):
        ck.require_complete(tmp_path / "reward", stage="reward", how_to_build="run reward")


def test_manifest_with_wrong_status_or_damaged_is_incomplete(tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    (out / ck.MANIFEST).write_text(json.dumps({"status": "running", "fingerprint": "x"}))
    assert ck.read_manifest(out) is None
    (out / ck.MANIFEST).write_text('{"status": "compl')
    assert ck.read_manifest(out) is None


def test_wrong_stage_refused(tmp_path):
    out = tmp_path / "x"
    _complete(out, stage="reward")
    with pytest.raises(CheckpointError, match="holds the output of the 'reward' stage, not 'sft'"):
        ck.require_complete(out, stage="sft", how_to_build="x")


def test_rerun_marks_output_incomplete_before_writing(tmp_path):
    out = tmp_path / "sft"
    _complete(out)
    ck.begin_output(out)
    assert ck.read_manifest(out) is None
    assert (out / "model.safetensors").exists()  # files stay until the rerun replaces them


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    ck.write_json_atomic(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match=f"cannot write {path}: No space left on device; free space"):
        ck.write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_fingerprints_of_inputs(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    fp1 = ck.fingerprint_path(data)
    data.write_text('{"text": "b"}\n')
    assert ck.fingerprint_path(data) != fp1
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    fp_dir = ck.fingerprint_path(model)
    (model / "checkpoints").mkdir()
    (model / "checkpoints" / "junk").write_text("x")
    assert ck.fingerprint_path(model) == fp_dir  # intermediate checkpoints do not change the model
    (model / "config.json").write_text('{"n": 1}')
    assert ck.fingerprint_path(model) != fp_dir
    out = tmp_path / "sft"
    _complete(out, fingerprint="abc")
    assert ck.fingerprint_path(out) == "abc"
    assert ck.fingerprint_path("org/model", revision="v1") == "hub:org/model@v1"


def test_run_dir_identity(tmp_path):
    info = ck.ensure_run_dir(tmp_path / "run", pipeline="demo")
    assert ck.ensure_run_dir(tmp_path / "run", pipeline="demo")["run_id"] == info["run_id"]
    with pytest.raises(CheckpointError, match="belongs to pipeline 'demo'.*not 'other'"):
        ck.ensure_run_dir(tmp_path / "run", pipeline="other")


def test_checkpoints_listing_and_pruning(tmp_path):
    out = tmp_path / "ppo"
    for step in (10, 20, 30):
        d = ck.checkpoint_dir(out, step)
        d.mkdir(parents=True)
        ck.write_json_atomic(d / ck.CHECKPOINT_STATE, {"step": step})
    partial = ck.checkpoint_dir(out, 25)
    partial.mkdir()
    ck.checkpoint_dir(out, 40).mkdir()  # being written
    assert ck.list_checkpoints(out) == [10, 20, 30]
    assert ck.latest_checkpoint(out) == ck.checkpoint_dir(out, 30)
    assert ck.prune_checkpoints(out, keep_last=2) == [10]
    assert ck.list_checkpoints(out) == [20, 30]
    assert not partial.exists()
    assert ck.checkpoint_dir(out, 40).exists()  # newer than the newest complete: may still be in progress


def test_fresh_run_starts_logs_afresh_and_resume_appends(tmp_path):
    out = tmp_path / "sft"
    _complete(out)
    ck.metrics_path(out).write_text('{"step": 1}\n')
    ck.begin_output(out, resume=True)
    assert ck.metrics_path(out).read_text() == '{"step": 1}\n'
    ck.begin_output(out)
    assert not ck.metrics_path(out).exists()


def test_atomic_writes_are_readable_by_others(tmp_path):
    path = tmp_path / "manifest.json"
    ck.write_json_atomic(path, {})
    assert path.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044
