from __future__ import annotations

import sys
import textwrap

import pytest

from rlhf.checkpoint import output_dir_of, write_manifest
from rlhf.errors import ConfigError
from rlhf.pipeline import StageGraph, StageSpec, StageState, load_stage_config, resolve_target, standard_graph


def test_standard_graph_order_and_invalidation():
    graph = standard_graph()
    assert graph.order() == ["sft", "reward", "ppo", "evaluate"]
    assert graph.downstream("reward") == {"reward", "ppo", "evaluate"}
    assert graph.downstream("sft") == {"sft", "reward", "ppo", "evaluate"}
    assert graph.downstream("evaluate") == {"evaluate"}
    assert graph.upstream("ppo") == {"sft", "reward"}


def test_plan_reruns_stale_stage_and_downstream_only():
    graph = standard_graph()
    states = {"sft": StageState.COMPLETE, "reward": StageState.STALE, "ppo": StageState.COMPLETE,
              "evaluate": StageState.COMPLETE}
    assert graph.plan(states) == ["reward", "ppo", "evaluate"]
    all_done = dict.fromkeys(states, StageState.COMPLETE)
    assert graph.plan(all_done) == []
    assert graph.plan(all_done, from_stage="ppo") == ["ppo", "evaluate"]
    assert graph.plan(all_done, only="reward") == ["reward"]
    assert graph.plan(all_done, force=True) == ["sft", "reward", "ppo", "evaluate"]
    incomplete = dict(all_done, ppo=StageState.INCOMPLETE)
    assert graph.plan(incomplete) == ["ppo", "evaluate"]
    with pytest.raises(ConfigError, match="no stage named 'dpo'"):
        graph.plan(all_done, only="dpo")


def test_graph_errors():
    with pytest.raises(ConfigError, match="depends on 'sft', which is not a stage of this pipeline"):
        StageGraph.from_specs([StageSpec("reward", "stages.reward:run", ("sft",))])
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        StageGraph.from_specs([StageSpec("a", "m:a", ("b",)), StageSpec("b", "m:b", ("a",))])
    with pytest.raises(ConfigError, match="must be 'module:function'"):
        StageSpec("a", "stages.sft")
    with pytest.raises(ConfigError, match="defined twice"):
        StageGraph.from_specs([StageSpec("a", "m:a"), StageSpec("a", "m:a")])


@pytest.fixture()
def user_stages(tmp_path, monkeypatch):
    """Two stages of a user's own package, known to the graph by import path only."""
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stages.py").write_text(textwrap.dedent('''
        import dataclasses
        from typing import ClassVar
        from rlhf.config import StageConfig, option

        @dataclasses.dataclass
        class Config(StageConfig):
            stage: ClassVar[str] = "first"
            data: str = option("", doc="input file", semantic=False)
            lr: float = option(0.1, doc="lr")
            def input_paths(self):
                return {"data": self.data}

        @dataclasses.dataclass
        class SecondConfig(StageConfig):
            stage: ClassVar[str] = "second"
            lr: float = option(0.1, doc="lr")
            def input_paths(self):
                return {"first": f"{self.run_dir}/first"}

        def run(cfg):
            return cfg
    '''))
    (pkg / "second.py").write_text("from mypkg.stages import SecondConfig as Config, run\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("mypkg")]:
        del sys.modules[name]


def test_expected_fingerprints_and_states(user_stages, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("{}\n")
    run_dir = tmp_path / "run"
    specs = [StageSpec("first", "mypkg.stages:run", overrides=(f"data={data}",)),
             StageSpec("second", "mypkg.second:run", ("first",))]
    graph = StageGraph.from_specs(specs)
    configs = {s.name: load_stage_config(s, str(run_dir)) for s in specs}
    expected = graph.expected_fingerprints(configs)
    assert graph.states(configs) == {"first": StageState.MISSING, "second": StageState.MISSING}

    for name in ("first", "second"):
        out = output_dir_of(configs[name])
        out.mkdir(parents=True)
        write_manifest(out, stage=name, fingerprint=expected[name], config={}, inputs={}, seed=0)
    assert set(graph.states(configs).values()) == {StageState.COMPLETE}

    # Changing the upstream stage's semantic config makes both stale; the downstream's expected fingerprint follows
    # its input's expected fingerprint, before anything has been rerun.
    changed = dict(configs, first=load_stage_config(
        StageSpec("first", "mypkg.stages:run", overrides=(f"data={data}", "lr=0.2")), str(run_dir)))
    assert graph.states(changed) == {"first": StageState.STALE, "second": StageState.STALE}
    # Changing the data file content does the same.
    data.write_text('{"x": 1}\n')
    assert graph.states(configs)["first"] is StageState.STALE
    # A non-semantic change does not.
    data.write_text("{}\n")
    cosmetic = dict(configs, second=load_stage_config(
        StageSpec("second", "mypkg.second:run", overrides=("threads=1",)), str(run_dir)))
    assert set(graph.states(cosmetic).values()) == {StageState.COMPLETE}
    (output_dir_of(configs["second"]) / "manifest.json").unlink()
    assert graph.states(configs)["second"] is StageState.INCOMPLETE


def test_resolve_target_errors(user_stages):
    run, cfg_cls = resolve_target("mypkg.stages:run")
    assert cfg_cls.stage == "first"
    with pytest.raises(ConfigError, match=r"cannot import 'nopkg.x' \(No module named 'nopkg'\)"):
        resolve_target("nopkg.x:run")
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        resolve_target("mypkg.stages:missing")
