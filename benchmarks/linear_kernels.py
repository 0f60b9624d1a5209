"""torch's default float32 linear kernel against oneDNN with a packed weight (`rlhf.onednn`), on the CPU, for the
matrix shapes of the PPO throughput workload. Prints one JSON line per shape and a summary line.

    python benchmarks/linear_kernels.py [--threads 2] [--repeats 15]

Each shape is timed in alternation (default, packed, default, ...) on the same input and weight; the figure is the
median of ``--repeats`` calls after three warm-up calls each. The packed weight is made once, as the stages do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf import onednn  # noqa: E402

#: (rows, in, out, where the workload runs it) for GPT-2 4x256 with a vocabulary of 8192, 64 rollouts of 16 + 48.
SHAPES = (
    (64, 256, 768, "generation: attention input"),
    (64, 256, 1024, "generation: MLP up"),
    (64, 1024, 256, "generation: MLP down"),
    (64, 256, 8192, "generation: output head"),
    (4096, 256, 1024, "scoring passes: MLP up"),
    (4096, 1024, 256, "scoring passes: MLP down"),
    (3072, 256, 8192, "reference pass: output head"),
    (768, 256, 8192, "training: output head"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if not onednn.available():
        print(json.dumps({"error": "this torch has no oneDNN linear kernels"}))
        return 1
    torch.set_num_threads(args.threads)
    ratios = []
    with torch.inference_mode():
        for rows, n_in, n_out, where in SHAPES:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(rows, n_in, generator=generator)
            weight = torch.randn(n_out, n_in, generator=generator) / n_in ** 0.5
            packed = onednn.pack(weight)
            calls = {"default": lambda: F.linear(x, weight), "onednn": lambda: onednn._linear(x, packed, None)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for name, call in calls.items():
                for _ in range(3):
                    call()
            for _ in range(args.repeats):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
            gflop = 2 * rows * n_in * n_out / 1e9
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            diff = (calls["onednn"]() - calls["default"]()).abs().max().item()
            ratios.append(ms["default"] / ms["onednn"])
            print(json.dumps({"shape": [rows, n_in, n_out], "where": where,
                              **{f"{name}_ms": round(v, 3) for name, v in ms.items()},
                              **{f"{name}_gflop_per_s": round(gflop / (v / 1e3), 1) for name, v in ms.items()},
                              "speedup": round(ratios[-1], 2), "max_abs_diff": diff}))
    print(json.dumps({"summary": True, "threads": args.threads, "speedup_median": round(statistics.median(ratios), 2),
                      "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)],
                      "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
