"""Our PPO against TRL 0.28's PPOTrainer on the fixed workload, or on its variable-length variant, side by side:
A B A B ... in alternation.

    bash benchmarks/setup_trl_baseline.sh        # once: TRL 0.28.0 in its own virtualenv (.venv-trl)
    python benchmarks/compare.py [--pairs 3] [--updates 5] [--variable-length] [--set KEY=VALUE ...]

Each run is a fresh process (``benchmarks/ppo_throughput.py`` and ``benchmarks/trl_baseline.py``), so neither
inherits the other's memory or caches. Prints every run's JSON line, then one summary line: the median ratio of
rollouts/s (ours / TRL), the peak-RSS ratio, and whether the comparison is void. It is void when TRL's s/update
strays more than 15% from the reference (4.58 s on the fixed workload, 4.89 s on the variable-length one: the machine
is not the one the reference was measured on, or it is busy) or when any run reports ``contended``; a void comparison is printed but exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: TRL 0.28's s/update on the reference 2-core machine, on the fixed workload and on its variable-length variant
#: (each measured once and frozen), and how far a run may stray from it.
TRL_REFERENCE_S_PER_UPDATE = {"fixed": 4.58, "variable": 4.89}
TOLERANCE = 0.15


def run(command: list[str]) -> dict[str, Any]:
    """One benchmark process; its result is the last line of its stdout."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{' '.join(command)} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs (at least 3)")
    parser.add_argument("--updates", type=int, default=None, help="timed updates per run (default: the workload's)")
    parser.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    parser.add_argument("--variable-length", action="store_true",
                        help="the workload's variable-length variant on both sides (responses end at their EOS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a key of our PPO config for our side, e.g. ppo.micro_batch_tokens=512")
    args = parser.parse_args(argv)
    if args.pairs < 3:
        parser.error("--pairs must be at least 3")
    if not Path(args.trl_python).exists():
        parser.error(f"{args.trl_python} does not exist: run `bash benchmarks/setup_trl_baseline.sh` first")
    extra = ["--updates", str(args.updates)] if args.updates else []
    extra += ["--variable-length"] if args.variable_length else []
    reference = TRL_REFERENCE_S_PER_UPDATE["variable" if args.variable_length else "fixed"]
    ours_cmd = [sys.executable, str(HERE / "ppo_throughput.py"), *extra,
                *(f"--set={override}" for override in args.overrides)]
    trl_cmd = [args.trl_python, str(HERE / "trl_baseline.py"), *extra]

    ours, trl = [], []
    for pair in range(args.pairs):
        for name, command, results in (("ours", ours_cmd, ours), ("trl", trl_cmd, trl)):
            result = run(command)
            results.append(result)
            print(json.dumps({"pair": pair, "side": name, **result}), flush=True)

    void = []
    for result in trl:
        if reference is None:
            void.append("no frozen TRL reference for this workload yet: this run measures it")
        elif abs(result["s_per_update"] / reference - 1) > TOLERANCE:
            void.append(f"TRL ran at {result['s_per_update']:.2f} s/update, outside {reference} s +-{TOLERANCE:.0%}")
    for result in ours + trl:
        if result.get("contended"):
            void.append(f"{result['impl']} run was contended by {', '.join(result.get('busy', []))}")
    ratios = [o["rollouts_per_s"] / t["rollouts_per_s"] for o, t in zip(ours, trl)]
    summary = {
        "summary": True,
        "pairs": args.pairs,
        "ratio_rollouts_per_s_median": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "ours_s_per_update_median": round(statistics.median(o["s_per_update"] for o in ours), 3),
        "trl_s_per_update_median": round(statistics.median(t["s_per_update"] for t in trl), 3),
        "ours_peak_rss_mib_median": statistics.median(o["peak_rss_mib"] for o in ours),
        "trl_peak_rss_mib_median": statistics.median(t["peak_rss_mib"] for t in trl),
        "void": bool(void),
        "void_reasons": void,
    }
    print(json.dumps(summary))
    return 1 if void else 0


if __name__ == "__main__":
    sys.exit(main())
