"""Security: no code from a model directory or a data file runs unless asked, weights load as safetensors only, our
own state is never unpickled, and secrets never reach a file the run writes."""

from __future__ import annotations

import json
import re

import pytest
from support import demo_rows, plain_tokenizer, save_tiny_causal_lm, write_jsonl

from rlhf.config import ModelConfig, SFTConfig, load_config
from rlhf.launcher import EXIT_USER_ERROR, REPO_ROOT, launch
from stages import sft

MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('code ran')\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    return root, save_tiny_causal_lm(root / "base", plain_tokenizer()), \
        write_jsonl(root / "sft.jsonl", demo_rows("sft.jsonl", 16))


def run_sft(argv, capsys):
    status = launch(sft.run, SFTConfig, default_config=None, prog="launch/sft.py", argv=argv)
    return status, capsys.readouterr().err


def test_trust_remote_code_is_off_unless_set():
    assert ModelConfig().trust_remote_code is False
    assert load_config(SFTConfig, REPO_ROOT / "configs" / "sft" / "demo.yaml").model.trust_remote_code is False


def test_code_shipped_with_a_model_does_not_run(base, tmp_path, capsys):
    _, model, data = base
    marker = tmp_path / "remote-code-ran"
    custom = tmp_path / "custom"
    custom.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (custom / name).write_bytes((model / name).read_bytes())
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    config["model_type"] = "custom-remote"
    (custom / "config.json").write_text(json.dumps(config))
    for module in ("configuration_custom.py", "modeling_custom.py"):
        (custom / module).write_text(MARKER_CODE.format(marker=str(marker)))
    (custom / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())

    status, err = run_sft([f"run_dir={tmp_path / 'run'}", f"model.name_or_path={custom}", f"data.path={data}",
                           "data.max_length=256", "train.max_steps=1"], capsys)
    assert status == EXIT_USER_ERROR and "Traceback" not in err
    assert "model.trust_remote_code" in err and str(custom) in err, err
    assert not marker.exists()


def test_pickled_weights_are_refused(base, tmp_path, capsys):
    _, model, data = base
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for path in model.iterdir():
        if path.name != "model.safetensors":
            (pickled / path.name).write_bytes(path.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    status, err = run_sft([f"run_dir={tmp_path / 'run'}", f"model.name_or_path={pickled}", f"data.path={data}",
                           "data.max_length=256", "train.max_steps=1"], capsys)
    assert status == EXIT_USER_ERROR and "Traceback" not in err
    assert "safetensors" in err and str(pickled) in err, err


@pytest.mark.parametrize("name", ["data.py", "loader"])
def test_a_data_file_is_never_executed(base, tmp_path, capsys, name):
    _, model, _ = base
    marker = tmp_path / "data-code-ran"
    if name == "loader":  # a folder with a dataset loading script, as old hub datasets had
        (tmp_path / name).mkdir()
        (tmp_path / name / "loader.py").write_text(MARKER_CODE.format(marker=str(marker)))
    else:
        (tmp_path / name).write_text(MARKER_CODE.format(marker=str(marker)))
    status, err = run_sft([f"run_dir={tmp_path / 'run'}", f"model.name_or_path={model}",
                           f"data.path={tmp_path / name}", "train.max_steps=1"], capsys)
    assert status == EXIT_USER_ERROR and "Traceback" not in err
    assert str(tmp_path / name) in err, err
    assert not marker.exists()


def test_our_code_never_unpickles():
    """``torch.load`` without ``weights_only=True`` and ``pickle`` loads would run code from a file; DeepSpeed's and
    accelerate's own checkpoint loaders do, and the README says such checkpoint directories must be trusted."""
    calls = []
    for folder in ("rlhf", "stages", "launch", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                unsafe_torch = "torch.load(" in line and "weights_only=True" not in line
                if unsafe_torch or re.search(r"\b(pickle|dill|cloudpickle|joblib)\.loads?\(", line):
                    calls.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert calls == []
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert "only resume from checkpoint directories you trust" in readme


def test_secrets_never_reach_the_files_a_run_writes(base, tmp_path, monkeypatch):
    _, model, data = base
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
               "HF_TOKEN": "hf_secretTOKENabcdefghijklmnopqrstuvwxyz",
               "HUGGING_FACE_HUB_TOKEN": "hf_otherSECRETabcdefghijklmnopqrstuvwx"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    sft.run(load_config(SFTConfig, None, [
        f"run_dir={run_dir}", f"model.name_or_path={model}", f"data.path={data}", "data.max_length=256",
        "data.eval_fraction=0.25", "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4",
        "train.eval_every=1", "checkpoint.save_every=1", "logging.report_to=[jsonl,wandb,tensorboard]",
        "logging.log_every=1"]))

    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in written) and any("tfevents" in p.name for p in written)
    leaks = [str(p.relative_to(run_dir)) for p in written
             if any(value.encode() in p.read_bytes() for value in secrets.values())]
    assert leaks == []
