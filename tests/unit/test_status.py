"""``rlhf status``: each stage of a run directory is complete, stale, incomplete or missing."""

from __future__ import annotations

from support import demo_rows, write_jsonl

from rlhf.checkpoint import config_path, stage_fingerprint, stage_output_dir, write_manifest, write_text_atomic
from rlhf.cli import main
from rlhf.config import SFTConfig, load_config, to_dict, to_yaml
from rlhf.pipeline import run_status


def _fake_sft_output(run, data, base):
    """An SFT output directory as the stage leaves it: its config and a manifest with the right fingerprint."""
    cfg = load_config(SFTConfig, None, [f"run_dir={run}", f"data.path={data}", f"model.name_or_path={base}"])
    out = stage_output_dir(run, "sft")
    out.mkdir(parents=True)
    write_text_atomic(config_path(out), to_yaml(cfg))
    fingerprint, inputs = stage_fingerprint(cfg)
    write_manifest(out, stage="sft", fingerprint=fingerprint, config=to_dict(cfg), inputs=inputs, seed=0,
                   metrics={"eval/loss": 1.5})
    return out


def test_states_follow_the_manifest_and_the_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows("sft.jsonl", 4))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    out = _fake_sft_output(run, data, base)
    (stage_output_dir(run, "reward")).mkdir()  # started, never finished

    states = {row["stage"]: row for row in run_status(run)}
    assert states["sft"]["state"] == "complete" and states["sft"]["metrics"] == {"eval/loss": 1.5}
    assert states["reward"]["state"] == "incomplete"
    assert states["ppo"]["state"] == "missing" and states["evaluate"]["state"] == "missing"

    write_jsonl(data, demo_rows("sft.jsonl", 5))  # the SFT data changed since
    assert {r["stage"]: r["state"] for r in run_status(run)}["sft"] == "stale"

    assert main(["status", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "sft" in printed and "stale" in printed and "incomplete" in printed
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert out.is_dir()
