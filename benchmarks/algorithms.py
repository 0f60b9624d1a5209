"""The algorithm table on the gold-judged demo: PPO (``gae``), GRPO, RLOO and REINFORCE++ trained by
``launch/ppo.py`` from the same demo SFT and reward outputs, at the same number of sampled responses per update
(``rollout.batch_size`` 64) and the same number of updates (the demo config's 60), each tuned on the same grid; and
DPO (``launch/dpo.py``, ``configs/dpo/demo.yaml``) from the same SFT output on the preference pairs the reward model
was trained on, with a grid of the same size, evaluated by ``launch/evaluate.py`` on the same prompts with the same
sampling settings and random streams.

    python benchmarks/algorithms.py [--sft DIR --reward DIR] [--workdir DIR] [--methods gae grpo rloo reinforce_pp dpo]
                                    [--seeds 1 2 3 4 5] [--grid full|small] [--updates N]
                                    [--eval-prompts 512] [--tuning-prompts 288]

    # smoke test
    python benchmarks/algorithms.py --workdir benchmarks/.cache/algorithms-smoke --grid small --seeds 1 --updates 2 \\
        --methods gae grpo --eval-prompts 16 --tuning-prompts 16

Methods: everything from ``configs/ppo/demo.yaml`` except ``ppo.advantage_estimator`` and the responses per prompt:
gae and reinforce_pp sample one response per prompt (64 prompts per update), grpo and rloo four (16 prompts x 4).

Inputs: ``--sft`` / ``--reward``, else ``runs/demo/sft`` and ``runs/demo/reward`` when both are complete, else the
demo's built into ``WORKDIR/run`` (``quality_vs_trl.build_inputs``).

Tuning (the same budget for every method): the grid ``GRIDS["full"]``, ``optim.learning_rate`` in {1.5e-4, 3e-4} x
``ppo.kl_coef`` in {0.05, 0.15, 0.3}, six configs (``--grid small``: 1.5e-4 x 0.15 only, for smoke tests); for DPO
``DPO_GRIDS["full"]``, ``beta`` (its KL control) in {0.1, 0.3, 1.0} x ``sft_loss_weight`` in {0, 1}, six configs at
the demo config's learning rate (``--grid small``: beta 0.1 only). Tuning
runs use seed 0 and are evaluated only on held-out prompts that are never reported: rows 512..799 of
``data/demo/eval_prompts.jsonl``, copied to ``WORKDIR/tuning_prompts.jsonl`` (the first ``--tuning-prompts`` of them).

Selection rule: per method, the config with the highest tuning gold_combined among those with tuning KL to the SFT
policy <= 5 nats; if none qualifies, the one with the lowest KL (ties: the first in grid order).

Final runs: the chosen config with each of ``--seeds`` (default 1..5, disjoint from the tuning seed), evaluated on
the first ``--eval-prompts`` (<= 512) rows of ``data/demo/eval_prompts.jsonl``. The run's seed also seeds its
held-out sampling, so every method sees the same sampling uniforms at a given seed; the SFT row is the runs'
``initial/*`` evaluation, averaged over the methods per seed.

Output (stdout, ``WORKDIR/table.md``, ``WORKDIR/result.json``): the tuning table (every config of every method, its
tuning gold_combined, positive share and KL, the chosen one marked); the final table, mean ± standard error over
seeds of held-out gold combined, positive, grammatical, repetition, concise, reward-model score, KL to the SFT
policy, wall time of the whole ``launch/ppo.py`` process (s) and its peak RSS (MiB, ``ru_maxrss`` from
``os.wait4``; for DPO the sum of the wall times of its ``launch/dpo.py`` and ``launch/evaluate.py`` processes, which
also evaluates the SFT policy, and the larger peak RSS), with a column flagging reward hacking (mean RM score above the SFT policy's while mean gold_combined
is below it); and per method its distance to the target: gold positive >= 0.95 with KL <= 5 nats and a grammatical
share not below the SFT policy's.

Runs go to ``WORKDIR/<method>/<tag>``, their output to ``WORKDIR/logs/<method>-<tag>.log``, and their wall time and
RSS to ``bench.json`` beside the stage output. A run whose manifest is complete and whose ``bench.json`` records the
same command is skipped, so an interrupted benchmark resumes; any other existing output is removed and rerun.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quality_vs_trl import build_inputs, markdown, mean_se
from rlhf.checkpoint import read_manifest, require_complete

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO_CONFIG = Path("configs/ppo/demo.yaml")
EVAL_PATH = Path("data/demo/eval_prompts.jsonl")
logger = logging.getLogger("algorithms")

#: Method -> overrides of the demo config (besides the tuned keys).
METHODS: dict[str, list[str]] = {
    "gae": ["ppo.advantage_estimator=gae"],
    "grpo": ["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4"],
    "rloo": ["ppo.advantage_estimator=rloo", "rollout.samples_per_prompt=4"],
    "reinforce_pp": ["ppo.advantage_estimator=reinforce_pp"],
}
#: The tuning grid, (optim.learning_rate, ppo.kl_coef), the same for every method.
GRIDS: dict[str, list[tuple[float, float]]] = {
    "full": [(lr, kl) for lr in (1.5e-4, 3e-4) for kl in (0.05, 0.15, 0.3)],
    "small": [(1.5e-4, 0.15)],
}
#: DPO's tuning grid, (beta, sft_loss_weight), at configs/dpo/demo.yaml's learning rate.
DPO_GRIDS: dict[str, list[tuple[float, float]]] = {
    "full": [(beta, sft) for beta in (0.1, 0.3, 1.0) for sft in (0.0, 1.0)],
    "small": [(0.1, 0.0)],
}
DPO_CONFIG = Path("configs/dpo/demo.yaml")
DPO_EVAL_CONFIG = Path("configs/evaluate/dpo.yaml")
#: Timed runs write metrics.jsonl only: the figures were measured so, and the dashboards would share the cores.
QUIET = "logging.report_to=[jsonl]"
TUNING_SEED = 0
#: Held-out rows 0..REPORTED_ROWS-1 may be reported; tuning evaluates on the rows after them.
REPORTED_ROWS = 512
MAX_TUNING_KL = 5.0
TARGET_POSITIVE = 0.95
TARGET_KL = 5.0
SELECTION_RULE = (f"highest tuning gold_combined among the configs with tuning KL <= {MAX_TUNING_KL:g} nats; "
                  "if none qualifies, the lowest tuning KL (ties: first in grid order)")
#: Final measures: manifest metric (after "final/" or "initial/") -> column label.
MEASURES = {"gold_combined": "gold combined", "gold_positive": "positive", "gold_grammatical": "grammatical",
            "gold_repetition": "repetition", "gold_concise": "concise", "score_mean": "RM score",
            "kl": "KL to SFT (nats)"}
COSTS = {"wall_s": "wall time (s)", "max_rss_mib": "peak RSS (MiB)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, default=None, help="a complete SFT output (default: the demo's)")
    parser.add_argument("--reward", type=Path, default=None, help="a complete reward output (default: the demo's)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "algorithms")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "dpo"], default=[*METHODS, "dpo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="seeds of the final runs")
    parser.add_argument("--grid", choices=list(GRIDS), default="full")
    parser.add_argument("--updates", type=int, default=None, help="ppo.num_updates (default: the demo config's)")
    parser.add_argument("--eval-prompts", type=int, default=REPORTED_ROWS, help="reported held-out prompts")
    parser.add_argument("--tuning-prompts", type=int, default=None,
                        help="held-out prompts of the tuning evaluation (default: all rows after the reported 512)")
    args = parser.parse_args(argv)
    if (args.sft is None) != (args.reward is None):
        parser.error("give both --sft and --reward, or neither")
    if TUNING_SEED in args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct and must not include the tuning seed {TUNING_SEED}")
    if not 1 <= args.eval_prompts <= REPORTED_ROWS:
        parser.error(f"--eval-prompts must be in 1..{REPORTED_ROWS}")
    available = len(read_rows(REPO / EVAL_PATH)) - REPORTED_ROWS
    args.tuning_prompts = available if args.tuning_prompts is None else args.tuning_prompts
    if not 1 <= args.tuning_prompts <= available:
        parser.error(f"--tuning-prompts must be in 1..{available}")
    if args.updates is not None and args.updates < 1:
        parser.error("--updates must be at least 1")
    return args


def read_rows(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_tuning_prompts(workdir: Path) -> Path:
    """Rows ``REPORTED_ROWS``.. of the held-out prompts, which no reported evaluation uses."""
    path = workdir / "tuning_prompts.jsonl"
    text = "\n".join(read_rows(REPO / EVAL_PATH)[REPORTED_ROWS:]) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.sft is not None:
        sft, reward = args.sft.resolve(), args.reward.resolve()
        require_complete(sft, stage="sft", how_to_build="python launch/sft.py run_dir=...")
        require_complete(reward, stage="reward", how_to_build="python launch/reward.py run_dir=...")
        return sft, reward
    demo = REPO / "runs" / "demo"
    if read_manifest(demo / "sft") is not None and read_manifest(demo / "reward") is not None:
        logger.info("inputs: reusing %s and %s", demo / "sft", demo / "reward")
        return demo / "sft", demo / "reward"
    return build_inputs(args.workdir)


def run_measured(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` from the repository root, its output into ``log``; its wall time and peak RSS (the child's
    own rusage, from ``os.wait4``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"`{' '.join(command)}` failed with status {proc.returncode}; its log is {log}:\n{tail}")
    return {"wall_s": round(wall, 2), "max_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def train(method: str, tag: str, overrides: list[str], ctx: dict[str, Any]) -> dict[str, Any]:
    """One ``launch/ppo.py`` run into ``WORKDIR/<method>/<tag>`` (skipped when done with the same command): its
    final and initial metrics, timings and costs."""
    out = ctx["workdir"] / method / tag
    args = [f"--config={DEMO_CONFIG}", f"run_dir={ctx['workdir'] / 'run'}", f"model.name_or_path={ctx['sft']}",
            f"reward_model.name_or_path={ctx['reward']}", f"output_dir={out}", "upstream_configs={}", QUIET,
            *METHODS[method], *ctx["common"], *overrides]
    bench_path = out / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    manifest = read_manifest(out)
    if manifest is not None and bench is not None and bench.get("args") == args:
        logger.info("%s %s: complete, skipped", method, tag)
    else:
        shutil.rmtree(out, ignore_errors=True)
        logger.info("%s %s: training", method, tag)
        bench = {"args": args, **run_measured([sys.executable, "launch/ppo.py", *args],
                                              ctx["workdir"] / "logs" / f"{method}-{tag}.log")}
        manifest = require_complete(out, stage="ppo", how_to_build=" ".join(["python launch/ppo.py", *args]))
        bench_path.write_text(json.dumps(bench, indent=1) + "\n")
    metrics = manifest.get("metrics", {})
    result = {"final": {k: metrics[f"final/{k}"] for k in MEASURES},
              "initial": {k: metrics[f"initial/{k}"] for k in MEASURES},
              "time": {k: metrics.get(f"time/{k}") for k in ("rollout_s", "train_s")},
              "wall_s": bench["wall_s"], "max_rss_mib": bench["max_rss_mib"], "output": str(out)}
    logger.info("%s %s: gold %.4f, positive %.4f, KL %.3f, %.0f s, %.0f MiB", method, tag,
                result["final"]["gold_combined"], result["final"]["gold_positive"], result["final"]["kl"],
                result["wall_s"], result["max_rss_mib"])
    return result


def train_dpo(tag: str, overrides: list[str], eval_args: list[str], seed: int,
              ctx: dict[str, Any]) -> dict[str, Any]:
    """One ``launch/dpo.py`` run into ``WORKDIR/dpo/<tag>/dpo`` and its ``launch/evaluate.py`` (SFT and DPO policies,
    the demo's PPO sampling settings, the reward model and the gold judge, seed ``seed``) into ``.../evaluate``;
    skipped when done with the same commands. The metrics in the shape `train` returns."""
    out = ctx["workdir"] / "dpo" / tag
    train_args = [f"--config={DPO_CONFIG}", f"run_dir={ctx['workdir'] / 'run'}", f"model.name_or_path={ctx['sft']}",
                  f"output_dir={out / 'dpo'}", f"seed={seed}", QUIET, *overrides]
    eval_cmd = [f"--config={DPO_EVAL_CONFIG}", f"run_dir={ctx['workdir'] / 'run'}",
                f"sft_model.name_or_path={ctx['sft']}", f"dpo_model.name_or_path={out / 'dpo'}",
                f"reward_model.name_or_path={ctx['reward']}", "reward_scores=true", f"output_dir={out / 'evaluate'}",
                f"seed={seed}", QUIET, *eval_args]
    bench_path = out / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    manifest = read_manifest(out / "evaluate")
    if manifest is not None and bench is not None and bench.get("args") == [train_args, eval_cmd]:
        logger.info("dpo %s: complete, skipped", tag)
    else:
        shutil.rmtree(out, ignore_errors=True)
        logger.info("dpo %s: training", tag)
        costs = [run_measured([sys.executable, script, *args], ctx["workdir"] / "logs" / f"dpo-{tag}-{name}.log")
                 for name, script, args in (("train", "launch/dpo.py", train_args),
                                            ("evaluate", "launch/evaluate.py", eval_cmd))]
        bench = {"args": [train_args, eval_cmd], "wall_s": round(sum(c["wall_s"] for c in costs), 2),
                 "max_rss_mib": max(c["max_rss_mib"] for c in costs)}
        manifest = require_complete(out / "evaluate", stage="evaluate", how_to_build="python launch/evaluate.py ...")
        bench_path.write_text(json.dumps(bench, indent=1) + "\n")
    report = manifest["eval"]
    result = {"final": {k: report["dpo"][k] for k in MEASURES} | {"kl": report["kl_dpo_to_reference"]},
              "initial": {k: report["sft"][k] for k in MEASURES},
              "time": {"train_s": (read_manifest(out / "dpo") or {}).get("metrics", {}).get("time/train_s")},
              "wall_s": bench["wall_s"], "max_rss_mib": bench["max_rss_mib"], "output": str(out)}
    logger.info("dpo %s: gold %.4f, positive %.4f, KL %.3f, %.0f s, %.0f MiB", tag, result["final"]["gold_combined"],
                result["final"]["gold_positive"], result["final"]["kl"], result["wall_s"], result["max_rss_mib"])
    return result


def dpo_tag(beta: float, sft: float) -> str:
    return f"beta{beta:g}-sft{sft:g}"


def dpo_overrides(beta: float, sft: float) -> list[str]:
    return [f"beta={beta!r}", f"sft_loss_weight={sft!r}"]


def tune_dpo(grid: list[tuple[float, float]], ctx: dict[str, Any]) -> dict[str, Any]:
    eval_args = [f"data.path={ctx['tuning_path']}", f"num_prompts={ctx['tuning_prompts']}"]
    runs = [{"config": dpo_tag(beta, sft), "beta": beta, "sft_loss_weight": sft,
             **train_dpo(f"tune-{dpo_tag(beta, sft)}", dpo_overrides(beta, sft), eval_args, TUNING_SEED, ctx)}
            for beta, sft in grid]
    chosen = select(runs)
    logger.info("dpo: chose %s", runs[chosen]["config"])
    return {"runs": runs, "chosen": chosen}


def final_dpo_runs(beta: float, sft: float, seeds: list[int], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    eval_args = [f"data.path={EVAL_PATH}", f"num_prompts={ctx['eval_prompts']}"]
    return [{"seed": seed, **train_dpo(f"final-{dpo_tag(beta, sft)}-seed{seed}", dpo_overrides(beta, sft), eval_args,
                                       seed, ctx)} for seed in seeds]


def config_tag(lr: float, kl: float) -> str:
    return f"lr{lr:g}-kl{kl:g}"


def config_overrides(lr: float, kl: float) -> list[str]:
    return [f"optim.learning_rate={lr!r}", f"ppo.kl_coef={kl!r}"]


def select(tuning: list[dict[str, Any]]) -> int:
    """Index of the chosen config (``SELECTION_RULE``)."""
    qualified = [i for i, t in enumerate(tuning) if t["final"]["kl"] <= MAX_TUNING_KL]
    if qualified:
        return max(qualified, key=lambda i: (tuning[i]["final"]["gold_combined"], -i))
    return min(range(len(tuning)), key=lambda i: (tuning[i]["final"]["kl"], i))


def tune(method: str, grid: list[tuple[float, float]], ctx: dict[str, Any]) -> dict[str, Any]:
    eval_args = [f"data.eval_path={ctx['tuning_path']}", f"eval.num_prompts={ctx['tuning_prompts']}"]
    runs = []
    for lr, kl in grid:
        run = train(method, f"tune-{config_tag(lr, kl)}", [*config_overrides(lr, kl), f"seed={TUNING_SEED}",
                                                            *eval_args], ctx)
        runs.append({"config": config_tag(lr, kl), "learning_rate": lr, "kl_coef": kl, **run})
    chosen = select(runs)
    logger.info("%s: chose lr %g, kl_coef %g", method, runs[chosen]["learning_rate"], runs[chosen]["kl_coef"])
    return {"runs": runs, "chosen": chosen}


def final_runs(method: str, lr: float, kl: float, seeds: list[int], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    eval_args = [f"data.eval_path={EVAL_PATH}", f"eval.num_prompts={ctx['eval_prompts']}"]
    return [{"seed": seed, **train(method, f"final-{config_tag(lr, kl)}-seed{seed}",
                                   [*config_overrides(lr, kl), f"seed={seed}", *eval_args], ctx)}
            for seed in seeds]


def mean_and_se(values: list[float]) -> dict[str, float]:
    """Mean and standard error; the error is None for a single value."""
    mean, se = mean_se(values) if len(values) > 1 else (values[0], None)
    return {"mean": mean, "se": se}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary = {k: mean_and_se([r["final"][k] for r in runs]) for k in MEASURES}
    summary.update({k: mean_and_se([r[k] for r in runs]) for k in COSTS})
    return summary


def summarise_sft(finals: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """The SFT policy's ``initial/*`` evaluation: per seed averaged over methods (they agree up to float rounding:
    the same policy, prompts and sampling seed), then mean and standard error over seeds."""
    by_seed: dict[int, list[dict[str, float]]] = {}
    for runs in finals.values():
        for run in runs:
            by_seed.setdefault(run["seed"], []).append(run["initial"])
    per_seed = [{k: sum(m[k] for m in ms) / len(ms) for k in MEASURES} for ms in by_seed.values()]
    return {k: mean_and_se([m[k] for m in per_seed]) for k in MEASURES}


def pm(stat: dict[str, Any], digits: int = 4) -> str:
    if stat["se"] is None:
        return f"{stat['mean']:.{digits}f} ± n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def hacking(summary: dict[str, dict[str, float]], sft: dict[str, dict[str, float]]) -> bool:
    """Reward-model score above the SFT policy's while the gold judge's combined score is below it."""
    return (summary["score_mean"]["mean"] > sft["score_mean"]["mean"]
            and summary["gold_combined"]["mean"] < sft["gold_combined"]["mean"])


def target_line(summary: dict[str, dict[str, float]], sft: dict[str, dict[str, float]]) -> tuple[str, bool]:
    """How far the means are from the target, and whether it is met."""
    pos, kl = summary["gold_positive"]["mean"], summary["kl"]["mean"]
    gram, gram_sft = summary["gold_grammatical"]["mean"], sft["gold_grammatical"]["mean"]
    checks = [(f"positive {pos:.3f}", pos >= TARGET_POSITIVE, f"{pos - TARGET_POSITIVE:+.3f}"),
              (f"KL {kl:.2f}", kl <= TARGET_KL, f"{kl - TARGET_KL:+.2f} over {TARGET_KL:g}"),
              (f"grammatical {gram:.3f} vs SFT {gram_sft:.3f}", gram >= gram_sft, f"{gram - gram_sft:+.3f}")]
    met = all(ok for _, ok, _ in checks)
    text = ", ".join(f"{label} ({'ok' if ok else gap})" for label, ok, gap in checks)
    return text + (": target met" if met else ": target missed"), met


def tuning_table(tuning: dict[str, dict[str, Any]]) -> str:
    header = ["method", "config", "tuning gold combined", "tuning positive", "tuning KL", f"KL <= {MAX_TUNING_KL:g}",
              "chosen"]
    rows = []
    for method, result in tuning.items():
        for i, run in enumerate(result["runs"]):
            f = run["final"]
            rows.append([method, run["config"], f"{f['gold_combined']:.4f}",
                         f"{f['gold_positive']:.4f}", f"{f['kl']:.3f}", "yes" if f["kl"] <= MAX_TUNING_KL else "no",
                         "**chosen**" if i == result["chosen"] else ""])
    return markdown(header, rows)


def final_table(summaries: dict[str, dict[str, Any]], sft: dict[str, dict[str, float]],
                chosen: dict[str, str]) -> str:
    header = ["policy", "config", *MEASURES.values(), *COSTS.values(), "RM score up, gold down?"]
    rows = [["SFT (start)", "", *(pm(sft[k]) for k in MEASURES), *("" for _ in COSTS), ""]]
    for method, summary in summaries.items():
        rows.append([method, chosen[method], *(pm(summary[k]) for k in MEASURES),
                     *(pm(summary[k], 1) for k in COSTS), "**yes**" if hacking(summary, sft) else "no"])
    return markdown(header, rows)


def report(args: argparse.Namespace, ctx: dict[str, Any], tuning: dict[str, dict[str, Any]],
           finals: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Print the tables and target lines, write them to ``table.md``; the result for ``result.json``."""
    sft = summarise_sft(finals)
    summaries = {m: summarise(runs) for m, runs in finals.items()}
    chosen = {m: t["runs"][t["chosen"]]["config"] for m, t in tuning.items()}
    targets = {m: target_line(s, sft) for m, s in summaries.items()}
    grid = ", ".join(f"({lr:g}, {kl:g})" for lr, kl in GRIDS[args.grid])
    dpo_grid = ", ".join(f"({beta:g}, {sft:g})" for beta, sft in DPO_GRIDS[args.grid])
    text = "\n".join([
        f"## Tuning (seed {TUNING_SEED}, held-out rows {REPORTED_ROWS}..{REPORTED_ROWS + ctx['tuning_prompts'] - 1} "
        f"of {EVAL_PATH}, never reported)", "",
        f"Grid ({args.grid}), (optim.learning_rate, ppo.kl_coef), the same for every method: {grid}.",
        *([f"DPO grid ({args.grid}), (beta, sft_loss_weight), at {DPO_CONFIG}'s learning rate: {dpo_grid}."]
          if "dpo" in tuning else []),
        f"Selection rule: {SELECTION_RULE}.", "", tuning_table(tuning), "",
        f"## Final (chosen config, seeds {' '.join(map(str, args.seeds))}, held-out rows 0..{args.eval_prompts - 1} "
        f"of {EVAL_PATH}; mean ± standard error over seeds)", "",
        final_table(summaries, sft, chosen), "",
        f"Target: gold positive >= {TARGET_POSITIVE} with KL <= {TARGET_KL:g} nats and grammatical share not below "
        "the SFT policy's.", "",
        *(f"- {m}: {line}" for m, (line, _) in targets.items()), ""])
    print("\n" + text, flush=True)
    (args.workdir / "table.md").write_text(text)
    return {"grid": args.grid, "grid_configs": GRIDS[args.grid], "selection_rule": SELECTION_RULE,
            "tuning_seed": TUNING_SEED, "tuning_prompts": ctx["tuning_prompts"], "seeds": args.seeds,
            "eval_prompts": args.eval_prompts, "updates": args.updates, "sft_path": str(ctx["sft"]),
            "reward_path": str(ctx["reward"]), "tuning": tuning, "chosen": chosen, "final_runs": finals,
            "summary": summaries, "sft": sft, "hacking": {m: hacking(s, sft) for m, s in summaries.items()},
            "target": {m: {"line": line, "met": met} for m, (line, met) in targets.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sft, reward = resolve_inputs(args)
    ctx = {"workdir": args.workdir, "sft": sft.resolve(), "reward": reward.resolve(),
           "tuning_path": write_tuning_prompts(args.workdir), "tuning_prompts": args.tuning_prompts,
           "eval_prompts": args.eval_prompts,
           "common": [] if args.updates is None else [f"ppo.num_updates={args.updates}"]}
    start = time.perf_counter()
    tuning = {m: tune_dpo(DPO_GRIDS[args.grid], ctx) if m == "dpo" else tune(m, GRIDS[args.grid], ctx)
              for m in args.methods}
    finals = {}
    for method, result in tuning.items():
        best = result["runs"][result["chosen"]]
        if method == "dpo":
            finals[method] = final_dpo_runs(best["beta"], best["sft_loss_weight"], args.seeds, ctx)
        else:
            finals[method] = final_runs(method, best["learning_rate"], best["kl_coef"], args.seeds, ctx)
    result = report(args, ctx, tuning, finals)
    result["benchmark_wall_s"] = round(time.perf_counter() - start, 1)
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.info("wrote %s and %s", args.workdir / "table.md", args.workdir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
