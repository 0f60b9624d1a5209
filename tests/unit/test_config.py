from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import pytest

from rlhf.checkpoint import compute_fingerprint
from rlhf.config import (
    DataConfig,
    OptimConfig,
    PretrainConfig,
    StageConfig,
    format_help,
    load_config,
    option,
    parse_cli,
    section,
    semantic_dict,
    to_dict,
)
from rlhf.errors import ConfigError


@dataclasses.dataclass
class ToyConfig(StageConfig):
    """A toy stage."""

    stage: ClassVar[str] = "toy"
    mode: Literal["a", "b"] = option("a", doc="Mode.")
    steps: int = option(10, doc="Steps.", ge=1)
    tags: list[str] = option(default_factory=list, doc="Tags.", semantic=False)
    optim: OptimConfig = section(lambda: OptimConfig(learning_rate=1e-3), "Optimiser.")
    data: DataConfig = section(DataConfig, "Data.")

    @property
    def total(self) -> int:
        return self.steps * 2


def test_defaults_and_section_factory_defaults():
    cfg = load_config(ToyConfig)
    assert cfg.optim.learning_rate == 1e-3
    assert cfg.optim.adam_beta1 == 0.9
    assert cfg.total == 20


def test_partial_section_override_keeps_stage_section_defaults():
    cfg = load_config(ToyConfig, None, ["optim.max_grad_norm=0"])
    assert cfg.optim.max_grad_norm == 0
    assert cfg.optim.learning_rate == 1e-3  # the stage's default for its section, not OptimConfig's


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\noptim:\n  learning_rate: 2.0e-4\n  lr_scheduler: linear\ntags: [x]\n")
    cfg = load_config(ToyConfig, path, ["optim.learning_rate=1e-5", "mode=b", "tags=p,q"])
    assert cfg.steps == 5
    assert cfg.optim.learning_rate == pytest.approx(1e-5)  # YAML 1.1 reads 1e-5 as a string; the field takes it
    assert cfg.optim.lr_scheduler == "linear"
    assert cfg.mode == "b"
    assert cfg.tags == ["p", "q"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learnig_rate=1", "unknown config key 'optim.learnig_rate' in the overrides; did you mean "
                                 "'optim.learning_rate'?"),
        ("learning_rate=1", "did you mean 'optim.learning_rate'?"),
        ("stpes=3", "did you mean 'steps'?"),
        ("mode=c", "mode: 'c' is not one of 'a', 'b'"),
        ("steps=0", "steps: 0 is out of range; it must be >= 1"),
        ("optim.learning_rate=-1", "optim.learning_rate: -1.0 is out of range; it must be > 0"),
        ("steps=many", "steps: expected an integer, got 'many'"),
        ("data.on_bad_row=skip", "data.on_bad_row: 'skip' is not one of 'error', 'drop'"),
        ("optim=3", "optim in the overrides: expected a mapping of keys"),
        ("nokey", "is not of the form key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, None, [override])
    assert message in str(err.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lr' in .*bad.yaml"):
        load_config(ToyConfig, path)


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: 3\noptim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(ToyConfig, path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file nope.yaml does not exist"):
        load_config(ToyConfig, "nope.yaml")


def test_semantic_flags_select_fingerprint_fields():
    sem = semantic_dict(load_config(ToyConfig))
    assert "steps" in sem and "seed" in sem
    assert "run_dir" not in sem and "tags" not in sem and "threads" not in sem
    assert "report_to" not in sem["logging"]
    assert "learning_rate" in sem["optim"]
    assert "save_every" not in sem["checkpoint"]


def test_semantic_change_changes_fingerprint_and_other_does_not():
    base = load_config(ToyConfig)
    fp = compute_fingerprint("toy", semantic_dict(base), {"data": "abc"})
    changed = load_config(ToyConfig, None, ["optim.learning_rate=0.01"])
    assert compute_fingerprint("toy", semantic_dict(changed), {"data": "abc"}) != fp
    cosmetic = load_config(ToyConfig, None, ["logging.log_every=1", "run_dir=elsewhere", "threads=1",
                                             "checkpoint.save_every=5", "tags=[x]"])
    assert compute_fingerprint("toy", semantic_dict(cosmetic), {"data": "abc"}) == fp
    assert compute_fingerprint("toy", semantic_dict(base), {"data": "abd"}) != fp


def test_help_lists_every_field_with_doc_and_flag():
    text = format_help(ToyConfig, "launch/toy.py")
    assert "usage: launch/toy.py" in text
    assert "optim.learning_rate: float = 0.001  (semantic)" in text
    assert "logging.report_to: list[str] = ['jsonl', 'wandb', 'tensorboard']  (not semantic)" in text
    for f in dataclasses.fields(OptimConfig):
        assert f"optim.{f.name}:" in text


def test_parse_cli_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_cli(ToyConfig, ["--help"], default_config=None, prog="launch/toy.py")
    assert stop.value.code == 0
    assert "steps: int = 10" in capsys.readouterr().out


def test_parse_cli_config_and_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\n")
    cfg = parse_cli(ToyConfig, ["--config", str(path), "mode=b"], default_config=None, prog="x")
    assert (cfg.steps, cfg.mode) == (7, "b")
    with pytest.raises(SystemExit):
        parse_cli(ToyConfig, ["--print-config", "steps=3"], default_config=path, prog="x")
    assert "steps: 3" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown option '--stpes'"):
        parse_cli(ToyConfig, ["--stpes"], default_config=None, prog="x")


def test_to_dict_roundtrip():
    cfg = load_config(ToyConfig, None, ["steps=4"])
    again = load_config(ToyConfig, data=to_dict(cfg))
    assert again == cfg


def test_pretrain_cross_field_checks():
    with pytest.raises(ConfigError, match="arch.n_head=3 must divide arch.n_embd=128"):
        load_config(PretrainConfig, None, ["arch.n_head=3"])
    with pytest.raises(ConfigError, match="seq_len=256 exceeds arch.n_positions=128"):
        load_config(PretrainConfig, None, ["seq_len=256"])
    cfg = load_config(PretrainConfig, None, ["batch_size=32", "micro_batch_size=8"])
    assert cfg.accumulation_steps(2) == 2
    with pytest.raises(ConfigError, match="batch_size=32 is not a multiple of micro_batch_size=8 x 3 processes"):
        cfg.accumulation_steps(3)
