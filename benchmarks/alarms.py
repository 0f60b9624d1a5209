"""The reward-hacking alarms on the demo: do they fire before the gold judge sees the damage, and stay quiet on the
shipped demo?

    python benchmarks/alarms.py [--sft DIR --reward DIR] [--workdir DIR] [--seeds 0 1 2]

For each seed, two runs of ``launch/ppo.py`` from the demo's SFT and reward outputs, with a held-out evaluation
(gold judge) every 10 updates:

- the no-KL negative control: ``ppo.kl_coef=0`` for 180 updates (three times the demo's), with the alarms that
  read the KL or the gold judge switched off (``alarms.max_kl=null alarms.gold_drop=null``), so only the alarms that
  need neither can fire. Measured: the update each alarm first fires at, and the first evaluation at which the
  held-out gold combined score is 0.1 or more below its best so far. The alarms pass when one fires before that.
- the shipped demo config (60 updates, all alarms on): no alarm may fire.

The thresholds are the config defaults (``rlhf.config.AlarmsConfig``), fixed before these runs. Output: a table on
stdout and ``WORKDIR/alarms.md`` / ``alarms.json``. Runs go to ``WORKDIR/<name>-seed<N>``; a complete one is reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rlhf.checkpoint import read_manifest
from rlhf.tracking import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOLD_FALL = 0.1
RUNS = {
    "no-kl": ["ppo.kl_coef=0", "ppo.num_updates=180", "alarms.max_kl=null", "alarms.gold_drop=null"],
    "demo": [],
}


def run(name: str, seed: int, args: argparse.Namespace) -> Path:
    out = args.workdir / f"{name}-seed{seed}"
    if read_manifest(out) is None:
        command = [sys.executable, "launch/ppo.py", "--config=configs/ppo/demo.yaml", f"run_dir={args.workdir / 'run'}",
                   f"model.name_or_path={args.sft}", f"reward_model.name_or_path={args.reward}", f"output_dir={out}",
                   "upstream_configs={}", f"seed={seed}", "eval.every=10", "logging.report_to=[jsonl]", *RUNS[name]]
        log = args.workdir / f"{name}-seed{seed}.log"
        print(f"{name} seed {seed}: training (log {log})", file=sys.stderr, flush=True)
        with log.open("w") as f:
            subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    return out


def measure(out: Path) -> dict:
    """The update each alarm first fired at, and the first evaluation with gold 0.1 or more below its best."""
    rows = read_metrics(out)
    fired = read_manifest(out)["alarms"]
    evals = [(r["step"], r["eval/gold_combined"]) for r in rows if "eval/gold_combined" in r and "step" in r]
    best, fell_at = -1.0, None
    for step, gold in evals:
        best = max(best, gold)
        if fell_at is None and gold <= best - GOLD_FALL:
            fell_at = step
    first = min(fired.values()) if fired else None
    return {"fired": fired, "first_alarm": first, "gold_fell_at": fell_at, "best_gold": best,
            "final_gold": evals[-1][1], "ahead": first is not None and (fell_at is None or first < fell_at)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, default=REPO / "runs" / "demo" / "sft")
    parser.add_argument("--reward", type=Path, default=REPO / "runs" / "demo" / "reward")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "alarms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.sft, args.reward = args.sft.resolve(), args.reward.resolve()
    results = {f"{name}-seed{seed}": measure(run(name, seed, args)) for name in RUNS for seed in args.seeds}
    lines = ["| run | alarms fired (first update) | first alarm | gold 0.1 below its best at | best gold | final gold "
             "| alarm first? |", "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        fired = ", ".join(f"{k} ({v})" for k, v in sorted(r["fired"].items(), key=lambda kv: kv[1])) or "none"
        lines.append(f"| {key} | {fired} | {r['first_alarm'] or '-'} | {r['gold_fell_at'] or 'never'} | "
                     f"{r['best_gold']:.3f} | {r['final_gold']:.3f} | "
                     f"{'-' if r['gold_fell_at'] is None else 'yes' if r['ahead'] else 'no'} |")
    text = "\n".join(lines)
    print(text)
    (args.workdir / "alarms.md").write_text(text + "\n")
    (args.workdir / "alarms.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
