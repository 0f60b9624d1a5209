"""The stage graph: stages known by import path, their dependencies, up-to-date checks and what a rerun invalidates.

A stage is ``module:function`` (``stages.sft:run``, or a user's ``mypkg.dpo:run``); its module also exposes
``Config``, the config dataclass the function takes. The graph never imports ``stages/`` directly, so ``rlhf``
stays below it and a user's own stage fits in the same way.

Expected fingerprints are computed from configs alone, upstream first: a stage's input that is the output directory
of another stage in the graph contributes that stage's *expected* fingerprint. So the plan knows before running
anything that changing the reward config makes reward, ppo and evaluate stale, and nothing upstream.

A pipeline config (``configs/pipeline/demo.yaml``) names the run directory and, per stage, its config, its
overrides and its accelerate config. `run_pipeline` skips the stages that are up to date and launches each of the
others as its own ``accelerate launch`` process, so a ZeRO-3 PPO does not impose ZeRO-3 on SFT; the report is its
last step. ``rlhf run`` and ``launch/pipeline.py`` are its command line (`pipeline_main`).
"""

from __future__ import annotations

import argparse
import difflib
import enum
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from rlhf.checkpoint import (compute_fingerprint, ensure_run_dir, fingerprint_path, latest_checkpoint, output_dir_of,
                             read_manifest, stage_output_dir)
from rlhf.config import REPO_ROOT, load_config, parse_override, read_yaml, semantic_dict
from rlhf.errors import CheckpointError, ConfigError, RLHFError, StageFailed
from rlhf.signals import adopt_orphans

logger = logging.getLogger(__name__)

#: The stages of the standard pipeline and what each depends on.
STANDARD_STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pretrain": ("stages.pretrain:run", ()),
    "sft": ("stages.sft:run", ()),
    "reward": ("stages.reward:run", ("sft",)),
    "ppo": ("stages.ppo:run", ("sft", "reward")),
    "dpo": ("stages.dpo:run", ("sft",)),
    "evaluate": ("stages.evaluate:run", ("sft", "reward", "ppo", "dpo")),
}

#: Standard stages that `run_status` lists only when the run directory has their output.
OPTIONAL_STAGES = ("pretrain", "dpo")


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
    num_processes: int | None = None

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
    "reward": ("eval/accuracy", "eval/margin", "eval/length_correlation", "eval/expected_calibration_error",
               "eval/gold_agreement"),
    "ppo": ("final/score_mean", "final/kl", "final/gold_combined", "final/gold_positive"),
    "dpo": ("eval/accuracy", "eval/margin", "eval/logratio_chosen", "eval/logp_chosen"),
    "evaluate": ("eval/win_rate_reward_model", "eval/win_rate_gold", "eval/kl_ppo_to_reference",
                 "eval/win_rate_gold_dpo", "eval/kl_dpo_to_reference"),
}


def run_status(run_dir: str | Path) -> list[dict[str, Any]]:
    """State, fingerprint, date and key metrics of each standard stage of a run directory.

    A stage's expected fingerprint comes from the config it last ran with (its ``config.yaml``) and the current
    fingerprints of its inputs, upstream outputs first: so a stage whose upstream was rerun since, or whose data file
    changed, is stale. Stages without an output directory are missing.
    """
    from rlhf.checkpoint import config_path

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a run directory (it does not exist)")
    names = [n for n in STANDARD_STAGES if n not in OPTIONAL_STAGES or stage_output_dir(run, n).exists()]
    graph = standard_graph(names)
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


# --------------------------------------------------------------------------------------------------------------------
# Pipeline configs and runs
# --------------------------------------------------------------------------------------------------------------------

_PIPELINE_KEYS = {
    "name": "Name of the pipeline, recorded in <run_dir>/pipeline.json (default: the config file's name).",
    "run_dir": "Run directory every stage writes into (<run_dir>/<stage>).",
    "group": "W&B group shared by the stages' runs (default: the run directory's name).",
    "report": "Write <run_dir>/report/ after the last stage (default true).",
    "overrides": "key.sub=value overrides applied to every stage before its own.",
    "stages": "The stages, in order: name -> {target, depends_on, config, overrides, accelerate_config, "
              "num_processes}.",
}
_STAGE_KEYS = {
    "target": "module:function of the stage (default for the standard stages, e.g. stages.sft:run).",
    "depends_on": "Stages whose outputs this one reads (default for the standard stages).",
    "config": "The stage's YAML config.",
    "overrides": "key.sub=value overrides of the stage's config.",
    "accelerate_config": "accelerate config file the stage is launched with (configs/accelerate/*.yaml).",
    "num_processes": "Number of processes, overriding the accelerate config's.",
}


def _unknown(key: str, valid: Iterable[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown key {key!r} in {where}{suggestion} (valid keys: {', '.join(valid)})")


def _string_list(value: Any, key: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} in {source} must be a list of strings, got {value!r}")
    return tuple(value)


def _existing_file(value: Any, key: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} in {source} must be a file path, got {value!r}")
    if not Path(value).is_file():
        raise ConfigError(f"{key} in {source}: {value} does not exist (paths are relative to the directory the "
                          f"pipeline is run from, {Path.cwd()})")
    return value


@dataclass(frozen=True)
class Pipeline:
    """A pipeline config: the run directory, its stage graph and what applies to every stage."""

    name: str
    run_dir: str
    graph: StageGraph
    overrides: tuple[str, ...] = ()
    group: str | None = None
    report: bool = True

    @property
    def wandb_group(self) -> str:
        return self.group or Path(self.run_dir).name

    def stage_overrides(self, name: str) -> list[str]:
        """Everything the stage's own YAML is overridden with: the run directory and W&B group of the pipeline,
        then the pipeline-wide overrides, then the stage's own."""
        return [f"run_dir={self.run_dir}", f"logging.group={self.wandb_group}", *self.overrides,
                *self.graph.specs[name].overrides]

    def stage_config(self, name: str) -> Any:
        """The resolved config stage ``name`` runs with, as its process will build it."""
        spec = self.graph.specs[name]
        _, config_cls = resolve_target(spec.target)
        return load_config(config_cls, spec.config, self.stage_overrides(name))


def load_pipeline(path: str | Path, overrides: Sequence[str] = (), *, run_dir: str | None = None) -> Pipeline:
    """Read a pipeline YAML. ``overrides`` are ``<stage>.key.sub=value`` (``ppo.ppo.num_updates=2``): each goes to
    the stage it names, after the stage's own overrides; ``run_dir`` replaces the file's."""
    source = str(path)
    data = read_yaml(path)
    for key in data:
        if key not in _PIPELINE_KEYS:
            raise _unknown(str(key), _PIPELINE_KEYS, source)
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{source}: 'stages' must map stage names to their settings, e.g. 'sft: {{config: "
                          f"configs/sft/demo.yaml}}'")
    extra: dict[str, list[str]] = {name: [] for name in stages}
    for item in overrides:
        key, _ = parse_override(item)
        stage, _, rest = key.partition(".")
        if stage not in stages or not rest:
            raise ConfigError(f"override {item!r} must start with a stage name and a key, e.g. "
                              f"'{next(iter(stages))}.seed=1' (stages: {', '.join(stages)})")
        extra[stage].append(item[len(stage) + 1:])
    specs = []
    for name, entry in stages.items():
        where = f"stages.{name}"
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} in {source} must be a mapping of {', '.join(_STAGE_KEYS)}")
        for key in entry:
            if key not in _STAGE_KEYS:
                raise _unknown(str(key), _STAGE_KEYS, f"{where} of {source}")
        standard = STANDARD_STAGES.get(name)
        target = entry.get("target") or (standard[0] if standard else None)
        if not target:
            raise ConfigError(f"{where}.target is required in {source}: {name!r} is not a standard stage "
                              f"({', '.join(STANDARD_STAGES)}); give its 'module:function'")
        if "depends_on" in entry:
            depends_on = _string_list(entry["depends_on"], f"{where}.depends_on", source)
        else:
            depends_on = tuple(d for d in (standard[1] if standard else ()) if d in stages)
        num_processes = entry.get("num_processes")
        if num_processes is not None and (isinstance(num_processes, bool) or not isinstance(num_processes, int)
                                          or num_processes < 1):
            raise ConfigError(f"{where}.num_processes in {source} must be a positive integer, got {num_processes!r}")
        specs.append(StageSpec(
            name=name, target=str(target), depends_on=depends_on,
            config=_existing_file(entry.get("config"), f"{where}.config", source),
            overrides=_string_list(entry.get("overrides"), f"{where}.overrides", source) + tuple(extra[name]),
            accelerate_config=_existing_file(entry.get("accelerate_config"), f"{where}.accelerate_config", source),
            num_processes=num_processes,
        ))
    run_dir = run_dir or data.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"{source}: 'run_dir' must name the run directory, e.g. 'run_dir: runs/demo'")
    report = data.get("report", True)
    if not isinstance(report, bool):
        raise ConfigError(f"report in {source} must be true or false, got {report!r}")
    return Pipeline(name=str(data.get("name") or Path(path).stem), run_dir=run_dir,
                    graph=StageGraph.from_specs(specs),
                    overrides=_string_list(data.get("overrides"), "overrides", source),
                    group=data.get("group"), report=report)


#: How a stage is run: (its spec, the overrides of its YAML) -> exit status.
Executor = Callable[[StageSpec, Sequence[str]], int]


def stage_command(spec: StageSpec, overrides: Sequence[str]) -> list[str]:
    """The ``accelerate launch`` command line of one stage, run through the generic stage entry point."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.accelerate_config:
        command += ["--config_file", spec.accelerate_config]
    if spec.num_processes:
        command += ["--num_processes", str(spec.num_processes)]
    command += ["-m", "rlhf.launcher", spec.target]
    if spec.config:
        command += ["--config", spec.config]
    return command + list(overrides)


def launch_stage_process(spec: StageSpec, overrides: Sequence[str]) -> int:
    """Run a stage as its own ``accelerate launch`` process; SIGTERM sent to the pipeline is passed on to it, so it
    saves a checkpoint and stops as it would when launched alone. Returns the stage's exit status:

    - accelerate before 1.16 exits at once on SIGTERM; the stage process then gets its own SIGTERM
      (`rlhf.signals.stop_with_launcher`) and this process, which adopts it, waits for it and returns its status;
    - accelerate 1.16 passes SIGTERM on to the stage, waits for it (and kills it after 5 s) and then exits with
      128 + SIGTERM itself. After a SIGTERM this process passed on, that status means the stage was interrupted.
    """
    from rlhf.signals import EXIT_INTERRUPTED

    command = stage_command(spec, overrides)
    logger.info("%s: %s", spec.name, " ".join(command[1:]))
    adopted = adopt_orphans()
    earlier = _children() if adopted else set()
    process = subprocess.Popen(command)
    terminated = []

    def forward(signum: int, frame: Any) -> None:
        terminated.append(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward) if _main_thread() else None
    try:
        while True:
            try:
                status = process.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the stage too: let it save its checkpoint and stop
                continue
        if adopted:
            status = _wait_for_adopted(status, earlier)
        if terminated and status in (128 + signal.SIGTERM, -signal.SIGTERM):
            return EXIT_INTERRUPTED
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _children() -> set[int]:
    """The pids of this process's children, from /proc (Linux)."""
    own, found = str(os.getpid()), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == own:
            found.add(int(stat.parent.name))
    return found


def is_helper_process(pid: int) -> bool:
    """Whether a process is one of W&B's helpers (``wandb-core``, ``wandb-symon``, ...) rather than a stage: its
    name, which a process keeps until it is waited for."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("wandb")
    except OSError:
        return False


def reap_adopted(earlier: set[int]) -> list[int]:
    """Wait for every process this one adopted since it had the children ``earlier`` (a stage whose launcher died
    first, and then the helpers a stage leaves behind, W&B's service, adopted when the stage exits); the exit
    statuses of the stage processes among them, in the order they were waited for."""
    statuses = []
    while adopted := sorted(_children() - earlier):
        for pid in adopted:
            helper = is_helper_process(pid)
            try:
                _, raw = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            if not helper:
                statuses.append(os.waitstatus_to_exitcode(raw))
    return statuses


def _wait_for_adopted(status: int, earlier: set[int]) -> int:
    """After the launcher exited with ``status``: the exit status of the last stage process this one adopted
    (Ctrl-C or SIGTERM stops accelerate's launcher before the stage has saved; `reap_adopted`), else ``status``."""
    statuses = reap_adopted(earlier)
    return statuses[-1] if statuses else status


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_stage_in_process(spec: StageSpec, overrides: Sequence[str]) -> int:
    """Run a stage in this process (notebooks, tests): the same config and output as `launch_stage_process`."""
    func, config_cls = resolve_target(spec.target)
    func(load_config(config_cls, spec.config, overrides))
    return 0


@dataclass
class StageOutcome:
    name: str
    state: StageState  # before the run
    action: str  # "ran", "skipped", "planned" (dry run)
    seconds: float = 0.0


def run_pipeline(
    pipeline: Pipeline,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    executor: Executor | None = None,
) -> list[StageOutcome]:
    """Bring the run directory up to date: every stage config is resolved and checked first, then each stage that
    is not complete (or selected by ``from_stage``/``only``/``force``) runs, upstream first. With ``resume`` an
    incomplete stage continues from its newest checkpoint instead of starting again. Raises `StageFailed` when a
    stage stops without a complete output; the stages after it do not run."""
    executor = executor or launch_stage_process
    graph = pipeline.graph
    configs = {name: pipeline.stage_config(name) for name in graph.order()}
    for name, cfg in configs.items():
        if Path(cfg.run_dir).resolve() != Path(pipeline.run_dir).resolve() or cfg.output_dir is not None:
            raise ConfigError(f"stage {name!r} writes to {output_dir_of(cfg)}, outside the pipeline's run directory "
                              f"{pipeline.run_dir}; remove its output_dir override")
    expected = graph.expected_fingerprints(configs)
    states = graph.states(configs, expected)
    selected = graph.plan(states, from_stage=from_stage, only=only, force=force)
    if not dry_run:
        ensure_run_dir(pipeline.run_dir, pipeline=pipeline.name)
    outcomes = []
    for name in graph.order():
        state = states[name]
        if name not in selected:
            logger.info("%s: up to date (fingerprint %s), skipped", name, expected[name][:16])
            outcomes.append(StageOutcome(name, state, "skipped"))
            continue
        if dry_run:
            logger.info("%s: %s, would run", name, state.value)
            outcomes.append(StageOutcome(name, state, "planned"))
            continue
        overrides = pipeline.stage_overrides(name)
        out = output_dir_of(configs[name])
        if resume and state is StageState.INCOMPLETE and latest_checkpoint(out) is not None:
            overrides.append("checkpoint.resume=true")
            logger.info("%s: incomplete, resuming from %s", name, latest_checkpoint(out))
        else:
            logger.info("%s: %s, running", name, state.value)
        start = time.perf_counter()
        status = executor(graph.specs[name], overrides)
        seconds = time.perf_counter() - start
        manifest = read_manifest(out)
        if status != 0 or manifest is None:
            from rlhf.signals import EXIT_INTERRUPTED

            if status == EXIT_INTERRUPTED:
                raise StageFailed(f"stage {name!r} was interrupted and saved a checkpoint in {out}; run the same "
                                  f"command with --resume to continue it", status)
            raise StageFailed(f"stage {name!r} stopped with exit status {status} after {seconds:.0f} s, without a "
                              f"complete output in {out} (its message is above); fix the cause and run the same "
                              f"command again", status or 1)
        if manifest["fingerprint"] != expected[name]:
            logger.warning("%s: wrote fingerprint %s, expected %s: its inputs changed while the pipeline ran, or "
                           "its run function does not fingerprint its config as the graph does", name,
                           manifest["fingerprint"][:16], expected[name][:16])
        logger.info("%s: complete in %.1f s -> %s", name, seconds, out)
        outcomes.append(StageOutcome(name, state, "ran", seconds))
    from rlhf.checkpoint import report_html_path

    up_to_date = all(o.action == "skipped" for o in outcomes) and report_html_path(pipeline.run_dir).is_file()
    if pipeline.report and not dry_run and not up_to_date:
        from rlhf.report import write_report

        plot, page = write_report(pipeline.run_dir)
        logger.info("report: %s (curves: %s)", page, plot)
    return outcomes


PIPELINE_USAGE = """Run a pipeline: every stage whose output is not up to date, each as its own accelerate process.

Stages whose output directory holds a complete manifest with the fingerprint their current config and inputs produce
are skipped; a stage whose config changed reruns, and everything downstream of it. The report is the last step.
Overrides address one stage: ppo.ppo.num_updates=2 sets ppo.num_updates in the ppo stage's config.
"""


def pipeline_main(argv: Sequence[str] | None = None, *, default_config: str | Path | None = None,
                  prog: str = "rlhf run") -> int:
    """The command line of ``rlhf run`` and ``launch/pipeline.py``; returns the exit status."""
    from rlhf.errors import EXIT_USER_ERROR
    from rlhf.tracking import setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=PIPELINE_USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if default_config is None:
        parser.add_argument("config", help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    else:
        parser.add_argument("--config", default=str(default_config), help="pipeline YAML (default: %(default)s)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and everything downstream")
    order.add_argument("--only", metavar="STAGE", help="run STAGE alone (its inputs must exist)")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--resume", action="store_true",
                        help="continue incomplete stages from their newest checkpoint instead of starting them again")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--run-dir", help="run directory (default: the pipeline config's run_dir)")
    parser.add_argument("overrides", nargs="*", metavar="STAGE.key=value", help="override one stage's config")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stderr.write(f"error: {prog} starts one accelerate process group per stage itself; run it with python, "
                         f"not accelerate launch or torchrun\n")
        return EXIT_USER_ERROR
    setup_logging("INFO")
    try:
        pipeline = load_pipeline(args.config, args.overrides, run_dir=args.run_dir)
        start = time.perf_counter()
        outcomes = run_pipeline(pipeline, from_stage=args.from_stage, only=args.only, force=args.force,
                                resume=args.resume, dry_run=args.dry_run)
    except StageFailed as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_status
    except RLHFError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    ran = [o for o in outcomes if o.action == "ran"]
    summary = ", ".join(f"{o.name} {o.seconds:.0f} s" for o in ran) or "nothing to run"
    sys.stdout.write(f"pipeline {pipeline.name}: {summary} (total {time.perf_counter() - start:.0f} s)\n")
    if not args.dry_run:
        from rlhf.tracking import dashboard_lines

        sys.stdout.write(format_status(run_status(pipeline.run_dir)) + "\n")
        manifests = [read_manifest(stage_output_dir(pipeline.run_dir, o.name)) or {} for o in ran]
        sys.stdout.writelines(line + "\n" for line in dashboard_lines([m.get("trackers", {}) for m in manifests]))
    return 0


def build_missing_upstream(cfg: Any) -> list[str]:
    """Build the SFT and reward outputs that PPO config ``cfg`` needs when they are missing or incomplete, with the
    configs of its ``upstream_configs`` (run_dir set to this run's), in this process. Several processes cannot
    safely run them in one launch; then the error names the command to run first. Returns the stages built."""
    from rlhf.runtime import distributed_state

    upstream = [("sft", cfg.model.name_or_path)]
    if cfg.uses_reward_model:  # a run on reward functions alone needs no reward stage
        upstream.append(("reward", cfg.reward_model.name_or_path))
    needed = [name for name, path in upstream if not path]
    built = []
    for name in needed:
        manifest = read_manifest(stage_output_dir(cfg.run_dir, name))
        if manifest is not None:
            continue
        config_file = cfg.upstream_configs.get(name)
        command = f"accelerate launch launch/{name}.py run_dir={cfg.run_dir}"
        if not config_file:
            raise CheckpointError(f"{stage_output_dir(cfg.run_dir, name)} is not a complete {name} output; run "
                                  f"`{command}` first")
        if distributed_state().num_processes > 1:
            raise CheckpointError(
                f"{stage_output_dir(cfg.run_dir, name)} is missing; with several processes PPO does not build it in "
                f"the same launch. Run `{command}` first (or launch PPO as one process)"
            )
        path = Path(config_file)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        function, config_cls = resolve_target(STANDARD_STAGES[name][0])
        upstream_cfg = load_config(config_cls, path, [f"run_dir={cfg.run_dir}"])
        upstream_cfg.validate()
        logger.info("ppo: %s output missing; building it first with %s", name, path)
        function(upstream_cfg)
        built.append(name)
    return built


def run_with_upstream(cfg: Any, run_ppo: Callable[[Any], Path]) -> Path:
    """The main command (``launch/ppo.py``): the missing upstream stages, then ``run_ppo(cfg)`` (PPO with its
    held-out evaluation), then a summary table and, for the run directory's own PPO output, the report."""
    from rlhf.runtime import distributed_state

    built = build_missing_upstream(cfg)
    output_dir = run_ppo(cfg)
    if distributed_state().is_main_process:
        from rlhf.report import write_report

        metrics = (read_manifest(output_dir) or {}).get("metrics", {})
        print(summary_table(metrics, built))
        # The report draws a run directory's stages; a PPO output written elsewhere (output_dir) is not one of them.
        if output_dir.resolve() == stage_output_dir(cfg.run_dir, "ppo").resolve():
            plot, page = write_report(cfg.run_dir)
            print(f"report: {page} (curves: {plot})")
        else:
            logger.info("ppo: no report: the output %s is not the run directory's ppo/ (%s); `rlhf report RUN_DIR` "
                        "draws a run directory's stages", output_dir, stage_output_dir(cfg.run_dir, "ppo"))
    return output_dir


def summary_table(metrics: dict[str, Any], built: list[str]) -> str:
    """Held-out figures before (the SFT policy) and after PPO, one line each."""
    lines = [f"built first: {', '.join(built)}"] if built else []
    functions = sorted({k.split("/", 1)[1] for k in metrics if k.startswith(("initial/reward/", "final/reward/"))})
    width = max([22] + [len(name) + 2 for name in functions])
    lines.append(f"{'held-out':<{width}}{'before':>10}{'after':>10}")
    for key in ("score_mean", *functions, "kl", "eos_rate", "response_len", "gold_combined", "gold_positive",
                "gold_grammatical", "gold_repetition", "gold_concise"):
        before, after = metrics.get(f"initial/{key}"), metrics.get(f"final/{key}")
        if before is None and after is None:
            continue
        fmt = lambda v: f"{v:10.3f}" if isinstance(v, (int, float)) else f"{'-':>10}"  # noqa: E731
        lines.append(f"{key:<{width}}{fmt(before)}{fmt(after)}")
    lines.append(f"time: rollout {metrics.get('time/rollout_s', 0):.1f} s, train {metrics.get('time/train_s', 0):.1f} s, "
                 f"{metrics.get('perf/tokens_per_s', 0):.0f} tokens/s")
    return "\n".join(lines)
