"""The GPU check, printing one JSON line. Two parts (``--part``, default both):

- ``throughput``: both PPO throughput benchmarks at a larger size, GPT-2 12 x 768 (vocabulary 8192) in bfloat16, on
  the workload's 64 rollouts of 16 + 48 tokens: ours (``benchmarks/ppo_throughput.py``) and TRL 0.28's PPOTrainer
  (``benchmarks/trl_baseline.py``, run with the TRL 0.28 stack that ``gpu_check.sh`` installs into ``$TRL_SITE``).
- ``zero``: SFT, reward and PPO training under ZeRO-2 and ZeRO-3 on one GPU, on a randomly initialised GPT-2
  (12 x 768) built here: per run the exit status, the wall time and the final figures. The reward run starts from
  the SFT output of the same ZeRO stage; PPO uses both, saves a DeepSpeed checkpoint, and a second launch resumes
  from it for two more updates. PPO's last update reports its utilisation of the GPU's dense bf16 peak and, under
  ZeRO-3, how many times each phase gathered its models' weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "base-model")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    out = root / "gpt2-12x768"
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


STAGE_ARGS = {
    "sft": ["train.max_steps=20", "train.batch_size=32", "train.micro_batch_size=16"],
    "reward": ["train.max_steps=20", "train.batch_size=32", "train.micro_batch_size=16"],
    "ppo": ["model.name_or_path=", "reward_model.name_or_path=", "reward_model.dtype=bfloat16", "upstream_configs={}",
            "rollout.batch_size=32", "rollout.max_new_tokens=32", "rollout.micro_batch_size=32",
            "ppo.num_minibatches=2", "ppo.micro_batch_size=8", "eval.num_prompts=64", "eval.gold_judge=false",
            "checkpoint.save_every=2",
            # Twenty SFT and reward steps: a check of their fitness is not what this run measures.
            "checks.reward_gate=false", "checks.min_score_std=0", "checks.min_eos_rate=0"],
}
REPORTED = ("train/loss", "eval/loss", "eval/accuracy", "final/score_mean", "final/kl", "rollout/kl",
            "ppo/policy_loss", "ppo/value_loss", "time/rollout_s", "time/train_s", "perf/tokens_per_s",
            "perf/utilisation")
#: Of PPO's last update (metrics.jsonl): the utilisation of the GPU's dense bf16 peak per phase, and under ZeRO-3
#: how many times each phase gathered its models' weights (counted at DeepSpeed's communication backend).
LAST_UPDATE = ("perf/utilisation", "perf/utilisation_generate", "perf/utilisation_train",
               "perf/weight_gathers_generate", "perf/weight_gathers_score", "perf/weight_gathers_train",
               "perf/train_passes")


def launch(stage: str, zero: str, run_dir: Path, model: str, *extra: str) -> dict:
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{zero}.yaml"),
           "--num_processes", "1", str(REPO / "launch" / f"{stage}.py"), f"run_dir={run_dir}",
           f"model.name_or_path={model}", "model.dtype=bfloat16", "logging.log_every=5", *STAGE_ARGS[stage], *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    result = {"rc": done.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    manifest = run_dir / stage / "manifest.json"
    if manifest.is_file():
        metrics = json.loads(manifest.read_text())["metrics"]
        result.update({k: metrics[k] for k in REPORTED if k in metrics})
    updates = run_dir / stage / "metrics.jsonl"
    if stage == "ppo" and updates.is_file():
        rows = [json.loads(line) for line in updates.read_text().splitlines() if '"perf/utilisation"' in line]
        if rows:
            result["last_update"] = {k: rows[-1][k] for k in LAST_UPDATE if k in rows[-1]}
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-1500:]
    return result


def size_options(size: str) -> list[str]:
    """``LAYERSxWIDTHxHEADS`` as the throughput benchmarks' options, in bfloat16, three timed updates."""
    layers, width, heads = size.split("x")
    return ["--layers", layers, "--width", width, "--heads", heads, "--dtype", "bfloat16", "--updates", "3"]


def benchmark(script: str, size: str, env: dict[str, str], workdir: Path) -> dict:
    """One throughput benchmark: its JSON line, or the exit status and the end of its stderr."""
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *size_options(size), "--workdir", str(workdir)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = {"rc": done.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    if done.returncode == 0 and lines:
        keep = ("impl", "s_per_update", "rollouts_per_s", "generated_tokens_per_s", "phases", "peak_gpu_mib",
                "peak_rss_mib", "model_gflop_per_s", "matmul_peak_gflop_per_s", "fraction_of_peak", "dtype",
                "device", "gpu", "proof", "versions")
        result.update({k: v for k, v in json.loads(lines[-1]).items() if k in keep})
    else:
        result["stderr_tail"] = done.stderr[-1500:]
    return result


def throughput(root: Path, report: dict, size: str) -> None:
    """Ours, then TRL 0.28 (its own library stack from $TRL_SITE), on the same models."""
    workdir = root / f"workload-{size}"
    report["throughput_ours"] = benchmark("ppo_throughput.py", size, dict(os.environ), workdir)
    print(json.dumps({"progress": "throughput_ours", **report["throughput_ours"]}), flush=True)
    trl_site = os.environ.get("TRL_SITE")
    if not trl_site:
        report["throughput_trl"] = {"rc": -1, "stderr_tail": "TRL_SITE is not set: no TRL 0.28 stack to run with"}
    else:
        # The TRL 0.28 stack first, so that its transformers (4.57) shadows the project's.
        env = dict(os.environ, PYTHONPATH=f"{trl_site}:{REPO}")
        report["throughput_trl"] = benchmark("trl_baseline.py", size, env, workdir)
    print(json.dumps({"progress": "throughput_trl", **report["throughput_trl"]}), flush=True)
    ours, trl = report["throughput_ours"], report["throughput_trl"]
    if ours.get("rollouts_per_s") and trl.get("rollouts_per_s"):
        report["throughput_ratio"] = round(ours["rollouts_per_s"] / trl["rollouts_per_s"], 3)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "throughput", "zero"], default="all")
    parser.add_argument("--size", default="12x768x12", help="throughput models: LAYERSxWIDTHxHEADS (GPT-2 12x768)")
    args = parser.parse_args(argv)
    part = args.part
    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                    "torch": torch.__version__, "part": part}
    expected = 0
    # Each launch costs ~35 s of start-up on a GPU machine (imports, process group, DeepSpeed engine); a progress
    # line after every run keeps what finished when a time limit cuts the check short.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if part in ("all", "throughput"):
            report["throughput_size"] = args.size
            throughput(root, report, args.size)
            expected += 2
        if part in ("all", "zero"):
            zero_stages(root, report)
            expected += 8
    finish(report, expected)


def zero_stages(root: Path, report: dict) -> None:
    """SFT -> reward -> PPO -> PPO resumed, under ZeRO-3 and then ZeRO-2; a stage that fails ends its ZeRO chain."""
    model = build_model(root)
    for zero in ("zero3", "zero2"):
        run_dir = root / zero
        runs = [("sft", ("sft", zero, run_dir, str(model))),
                ("reward", ("reward", zero, run_dir, str(run_dir / "sft"))),
                ("ppo", ("ppo", zero, run_dir, "", "ppo.num_updates=4")),
                ("ppo_resume", ("ppo", zero, run_dir, "", "ppo.num_updates=6", "checkpoint.resume=true"))]
        for name, args in runs:
            report[f"{name}_{zero}"] = launch(*args)
            print(json.dumps({"progress": f"{name}_{zero}", **report[f"{name}_{zero}"]}), flush=True)
            if report[f"{name}_{zero}"]["rc"] != 0:
                break


def finish(report: dict, expected: int) -> None:
    runs = [v for v in report.values() if isinstance(v, dict)]
    report["ok"] = len(runs) == expected and all(v.get("rc") == 0 for v in runs)
    print(json.dumps(report, sort_keys=True))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
