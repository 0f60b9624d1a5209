"""The stage graph: stages known by import path, their dependencies, up-to-date checks and what a rerun invalidates.

A stage is ``module:function`` (``stages.sft:run``, or a user's ``mypkg.dpo:run``); its module also exposes
``Config``, the config dataclass the function takes. The graph never imports ``stages/`` directly, so ``rlhf``
stays below it and a user's own stage fits in the same way.

Expected fingerprints are computed from configs alone, upstream first: a stage's input that is the output directory
of another stage in the graph contributes that stage's *expected* fingerprint. So the plan knows before running
anything that changing the reward config makes reward, ppo and evaluate stale, and nothing upstream.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from rlhf.checkpoint import compute_fingerprint, fingerprint_path, output_dir_of, read_manifest
from rlhf.config import load_config, semantic_dict
from rlhf.errors import ConfigError

#: The stages of the standard pipeline and what each depends on.
STANDARD_STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pretrain": ("stages.pretrain:run", ()),
    "sft": ("stages.sft:run", ()),
    "reward": ("stages.reward:run", ("sft",)),
    "ppo": ("stages.ppo:run", ("sft", "reward")),
    "evaluate": ("stages.evaluate:run", ("sft", "reward", "ppo")),
}


class StageState(str, enum.Enum):
    COMPLETE = "complete"  # a complete manifest with the fingerprint the current config produces
    STALE = "stale"  # complete, but made from another config or other inputs
    MISSING = "missing"  # no output directory
    INCOMPLETE = "incomplete"  # a directory without a complete manifest (interrupted or failed)


@dataclass(frozen=True)
class StageSpec:
    """One node of the graph."""

    name: str
    target: str
    depends_on: tuple[str, ...] = ()
    config: str | None = None
    overrides: tuple[str, ...] = ()
    accelerate_config: str | None = None

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ConfigError(
                f"stages.{self.name}.target {self.target!r} must be 'module:function', e.g. 'stages.sft:run'"
            )


def resolve_target(target: str) -> tuple[Callable[[Any], Path], type]:
    """Import ``module:function`` and return the function and its module's ``Config`` class."""
    module_name, func_name = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"stage target {target!r}: cannot import {module_name!r} ({exc})") from None
    func = getattr(module, func_name, None)
    config_cls = getattr(module, "Config", None)
    if not callable(func):
        raise ConfigError(f"stage target {target!r}: {module_name} has no function {func_name!r}")
    if config_cls is None:
        raise ConfigError(f"stage target {target!r}: {module_name} must expose its config class as 'Config'")
    return func, config_cls


@dataclass
class StageGraph:
    """Stages in declaration order; dependencies must name stages of the graph and form no cycle."""

    specs: dict[str, StageSpec] = field(default_factory=dict)

    @classmethod
    def from_specs(cls, specs: Iterable[StageSpec]) -> "StageGraph":
        graph = cls({})
        for spec in specs:
            if spec.name in graph.specs:
                raise ConfigError(f"stage {spec.name!r} is defined twice")
            graph.specs[spec.name] = spec
        for spec in graph.specs.values():
            for dep in spec.depends_on:
                if dep not in graph.specs:
                    raise ConfigError(
                        f"stage {spec.name!r} depends on {dep!r}, which is not a stage of this pipeline "
                        f"(stages: {', '.join(graph.specs)})"
                    )
        graph.order()  # raises on a cycle
        return graph

    def order(self) -> list[str]:
        """Topological order, keeping declaration order among independent stages."""
        done: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                cycle = visiting[visiting.index(name):] + [name]
                raise ConfigError(f"the stages depend on each other in a cycle: {' -> '.join(cycle)}")
            visiting.append(name)
            for dep in self.specs[name].depends_on:
                visit(dep)
            visiting.pop()
            done.append(name)

        for name in self.specs:
            visit(name)
        return done

    def downstream(self, name: str) -> set[str]:
        """``name`` and every stage that depends on it, directly or not."""
        self._check(name)
        out = {name}
        changed = True
        while changed:
            changed = False
            for spec in self.specs.values():
                if spec.name not in out and out.intersection(spec.depends_on):
                    out.add(spec.name)
                    changed = True
        return out

    def upstream(self, name: str) -> set[str]:
        """Every stage ``name`` depends on, directly or not (not ``name`` itself)."""
        self._check(name)
        out: set[str] = set()
        stack = list(self.specs[name].depends_on)
        while stack:
            dep = stack.pop()
            if dep not in out:
                out.add(dep)
                stack.extend(self.specs[dep].depends_on)
        return out

    def _check(self, name: str) -> None:
        if name not in self.specs:
            raise ConfigError(f"no stage named {name!r}; the stages are: {', '.join(self.specs)}")

    def expected_fingerprints(self, configs: Mapping[str, Any]) -> dict[str, str]:
        """The fingerprint each stage's output would have if built now from ``configs`` (stage name -> config)."""
        expected: dict[str, str] = {}
        outputs = {name: output_dir_of(configs[name]).resolve() for name in self.specs}
        for name in self.order():
            cfg = configs[name]
            revision = getattr(getattr(cfg, "model", None), "revision", None)
            inputs = {}
            for label, path in cfg.input_paths().items():
                if not path:
                    continue
                producer = next((s for s, out in outputs.items() if out == Path(path).resolve()), None)
                if producer is not None and producer != name:
                    inputs[label] = expected[producer]
                else:
                    inputs[label] = fingerprint_path(path, revision=revision)
            expected[name] = compute_fingerprint(cfg.stage, semantic_dict(cfg), inputs)
        return expected

    def states(self, configs: Mapping[str, Any], expected: Mapping[str, str] | None = None) -> dict[str, StageState]:
        expected = dict(expected or self.expected_fingerprints(configs))
        states = {}
        for name in self.order():
            out = output_dir_of(configs[name])
            manifest = read_manifest(out)
            if manifest is not None:
                states[name] = StageState.COMPLETE if manifest["fingerprint"] == expected[name] else StageState.STALE
            elif out.exists():
                states[name] = StageState.INCOMPLETE
            else:
                states[name] = StageState.MISSING
        return states

    def plan(
        self,
        states: Mapping[str, StageState],
        *,
        from_stage: str | None = None,
        only: str | None = None,
        force: bool = False,
    ) -> list[str]:
        """Which stages to run, in order.

        - default: every stage that is not complete, and everything downstream of it;
        - ``from_stage``: that stage and everything downstream, whatever their state;
        - ``only``: that stage alone (its upstream outputs must exist; the stage itself checks them);
        - ``force``: every stage.
        """
        if from_stage is not None and only is not None:
            raise ConfigError("use either --from or --only, not both")
        order = self.order()
        if force:
            return order
        if only is not None:
            self._check(only)
            return [only]
        selected: set[str] = set()
        if from_stage is not None:
            selected |= self.downstream(from_stage)
        for name in order:
            if states[name] is not StageState.COMPLETE:
                selected |= self.downstream(name)
        return [name for name in order if name in selected]


def standard_graph(names: Sequence[str] = ("sft", "reward", "ppo", "evaluate")) -> StageGraph:
    """The standard pipeline restricted to ``names`` (dependencies outside ``names`` are dropped)."""
    specs = []
    for name in names:
        target, deps = STANDARD_STAGES[name]
        specs.append(StageSpec(name, target, tuple(d for d in deps if d in names)))
    return StageGraph.from_specs(specs)


def load_stage_config(spec: StageSpec, run_dir: str | None = None) -> Any:
    """The config a stage of the graph runs with: its YAML, its overrides, and the pipeline's run directory."""
    _, config_cls = resolve_target(spec.target)
    overrides = list(spec.overrides)
    if run_dir is not None:
        overrides.insert(0, f"run_dir={run_dir}")
    return load_config(config_cls, spec.config, overrides)


#: Final metrics shown by ``rlhf status``, per stage.
STATUS_METRICS = {
    "pretrain": ("eval/loss",),
    "sft": ("eval/loss", "eval/perplexity"),
    "reward": ("eval/accuracy", "eval/margin"),
    "ppo": ("final/score_mean", "final/kl", "final/gold_combined", "final/gold_positive"),
    "evaluate": ("eval/win_rate_reward_model", "eval/win_rate_gold", "eval/kl_ppo_to_reference"),
}


def run_status(run_dir: str | Path) -> list[dict[str, Any]]:
    """State, fingerprint, date and key metrics of each standard stage of a run directory.

    A stage's expected fingerprint comes from the config it last ran with (its ``config.yaml``) and the current
    fingerprints of its inputs, upstream outputs first: so a stage whose upstream was rerun since, or whose data file
    changed, is stale. Stages without an output directory are missing.
    """
    from rlhf.checkpoint import config_path, stage_output_dir

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a run directory (it does not exist)")
    names = [n for n in STANDARD_STAGES if n != "pretrain" or stage_output_dir(run, n).exists()]
    graph = standard_graph(names) if "pretrain" not in names else StageGraph.from_specs(
        [StageSpec(n, STANDARD_STAGES[n][0], tuple(d for d in STANDARD_STAGES[n][1] if d in names)) for n in names])
    configs = {}
    for name in names:
        _, config_cls = resolve_target(STANDARD_STAGES[name][0])
        saved = config_path(stage_output_dir(run, name))
        # The run directory may have moved since (its config says where it was): read it where it is now.
        configs[name] = load_config(config_cls, saved if saved.is_file() else None,
                                    [f"run_dir={run}", "output_dir=null"])
    try:
        states = {k: v.value for k, v in graph.states(configs).items()}
    except (OSError, ConfigError) as exc:  # an input that cannot be read from here: report, do not guess
        states = {name: f"unknown ({exc})" for name in names}
    rows = []
    for name in names:
        manifest = read_manifest(stage_output_dir(run, name)) or {}
        metrics = manifest.get("metrics", {})
        rows.append({"stage": name, "state": states[name], "fingerprint": manifest.get("fingerprint", ""),
                     "created_at": manifest.get("created_at", ""),
                     "metrics": {k: metrics[k] for k in STATUS_METRICS[name] if k in metrics}})
    return rows


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'stage':<10}{'state':<12}{'fingerprint':<18}{'finished':<22}metrics"]
    for row in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["metrics"].items())
        lines.append(f"{row['stage']:<10}{row['state']:<12}{row['fingerprint'][:16]:<18}{row['created_at']:<22}"
                     f"{metrics}")
    return "\n".join(lines)
