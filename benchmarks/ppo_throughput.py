"""Our PPO on the fixed throughput workload (``benchmarks/ppo_workload.json``): one JSON line on stdout.

    python benchmarks/ppo_throughput.py [--updates 5] [--threads 2] [--dtype float32|bfloat16]
                                        [--response-tokens 48] [--rollouts 64] [--layers 4] [--width 256] [--heads 4]
                                        [--variable-length]
                                        [--compile] [--autocast] [--profile FILE] [--set key.sub=value ...]

It runs the real PPO stage (``stages.ppo.run``, default settings except what the workload fixes) on randomly
initialised models built from the workload by ``benchmarks/workload.py``: a GPT-2 4x256 policy with a separate
reference, and a reward model of the same size from which the critic starts (the TRL baseline uses the same four
models). The first ``warmup_updates`` are not timed.

Printed: ``s_per_update`` (median wall time of the timed updates, hook to hook), ``rollouts_per_s``,
``generated_tokens_per_s``, ``peak_rss_mib``, the median phase split, the nominal model GFLOP per update (from the
workload, not from what ran) and GFLOP/s, the fp32 matmul peak measured in the same process and the ratio, ``proof``
that the whole workload ran (tokens sampled, forward calls of the reference, reward model and critic, optimiser steps,
per update) and ``contended`` when other processes used more than a tenth of a core while it ran.

``--response-tokens``, ``--rollouts``, ``--layers``, ``--width`` and ``--heads`` change the workload (the scaling
table in ``benchmarks/README.md``, the larger size of ``benchmarks/gpu_check.sh``); on a GPU the models run there and
the matmul peak is the GPU's in ``--dtype``. ``--variable-length`` uses a policy that samples EOS often and lets
responses stop there (the fixed workload never stops), to show what the padding-aware paths save; ``--compile`` runs
the training pass through torch.compile; ``--autocast`` runs it under bf16 autocast (accelerate's
``mixed_precision=bf16``, as `accelerate launch --mixed_precision bf16` does; rollouts keep the weights' dtype).
``--profile FILE`` runs one more update after the timed ones under
``torch.profiler`` (not timed), writes its operator table to FILE and adds ``profile`` to the JSON line: operator
seconds by kind (matrix products, attention, the rest) and the update's wall time under the profiler.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as wl  # noqa: E402

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=None, help="timed updates (default: the workload's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the workload's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--response-tokens", type=int, default=None)
    parser.add_argument("--rollouts", type=int, default=None, help="rollouts per update")
    wl.size_arguments(parser)
    parser.add_argument("--variable-length", action="store_true",
                        help="a policy that samples EOS often (about half the responses end before the limit), and "
                             "responses end at their first EOS; the fixed workload always samples them all")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training forward and backward with torch.compile (accelerate's "
                             "dynamo_backend=inductor); the compile time falls in the warm-up update")
    parser.add_argument("--autocast", action="store_true",
                        help="bf16 autocast in the training pass (accelerate's mixed_precision=bf16); generation "
                             "and the scoring passes keep the weights' dtype")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="profile one extra, untimed update with torch.profiler; its operator table goes to FILE")
    parser.add_argument("--workdir", default=None, help="where the built workload is cached")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key of our PPO config (ablations), e.g. rollout.generation_logprobs=false")
    return parser.parse_args(argv)


def make_workload(args: argparse.Namespace) -> dict[str, Any]:
    workload = wl.load_workload()
    if args.response_tokens:
        workload["response_tokens"] = args.response_tokens
    if args.rollouts:
        workload["rollouts_per_update"] = args.rollouts
    workload = wl.with_size(workload, layers=args.layers, width=args.width, heads=args.heads)
    if args.updates:
        workload["timed_updates"] = args.updates
    if args.variable_length:
        workload["eos_logit"] = wl.VARIABLE_LENGTH_EOS_LOGIT
    return workload


def models_dir(workload: dict[str, Any], workdir: str | None) -> Path:
    """The built models and prompts, cached by the parts of the workload they depend on; built in a child process
    so that tokenizer training does not count in this process's peak RSS."""
    key = {k: workload[k] for k in ("seed", "policy_and_reference", "num_prompts", "prompt_tokens")}
    if workload.get("eos_logit"):
        key["eos_logit"] = workload["eos_logit"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(workdir or Path(__file__).resolve().parent / ".cache" / f"workload-{digest}")
    if not (out / "prompts.jsonl").is_file():
        subprocess.run([sys.executable, "-c", "import json, sys, workload; workload.build(sys.argv[1], "
                        "json.loads(sys.argv[2]))", str(out), json.dumps(workload)],
                       cwd=Path(__file__).resolve().parent, check=True, stdout=subprocess.DEVNULL)
    return out


def ppo_overrides(workload: dict[str, Any], models: Path, run_dir: Path, args: argparse.Namespace,
                  threads: int) -> list[str]:
    """Our PPO config for the workload: the workload's values, our defaults for everything else."""
    rollouts = workload["rollouts_per_update"]
    minibatch = rollouts // workload["num_mini_batches"]
    return [
        f"run_dir={run_dir}", f"threads={threads}", f"seed={workload['seed']}",
        f"model.name_or_path={models / 'policy'}", f"model.dtype={args.dtype}",
        f"reward_model.name_or_path={models / 'reward'}", f"reward_model.dtype={args.dtype}",
        f"data.path={models / 'prompts.jsonl'}", "data.eval_path=null", "data.eval_fraction=0.01",
        # The variable-length variant keeps its length distribution: PPO would otherwise soon learn to avoid EOS.
        f"optim.learning_rate={wl.VARIABLE_LENGTH_LEARNING_RATE if args.variable_length else workload['learning_rate']}",
        f"rollout.batch_size={rollouts}", f"rollout.max_prompt_len={workload['prompt_tokens']}",
        f"rollout.max_new_tokens={workload['response_tokens']}", f"rollout.temperature={workload['temperature']}",
        f"rollout.top_k={workload['top_k']}", f"rollout.top_p={workload['top_p']}",
        f"rollout.stop_at_stop_token={str(args.variable_length or workload['stop_on_eos']).lower()}",
        "rollout.missing_stop_penalty=0", "rollout.score_norm=none", f"rollout.micro_batch_size={rollouts}",
        f"ppo.num_updates={workload['warmup_updates'] + workload['timed_updates']}",
        f"ppo.ppo_epochs={workload['ppo_epochs']}", f"ppo.num_minibatches={workload['num_mini_batches']}",
        f"ppo.micro_batch_size={minibatch // workload['gradient_accumulation_steps']}",
        f"ppo.kl_coef={workload['kl_coef']}",
        f"model.gradient_checkpointing={str(workload['gradient_checkpointing']).lower()}",
        # One held-out prompt before and after training (outside the timed updates), no gold judge, no tables.
        "eval.num_prompts=1", "eval.gold_judge=false", "eval.samples=0",
        # Untrained models on a fixed workload: the checks of a real reward model and SFT policy do not apply.
        "checks.min_score_std=0", "checks.min_eos_rate=0",
        f"samples_every={workload['warmup_updates'] + workload['timed_updates']}",
        # metrics.jsonl only, as TRL's side logs nowhere (report_to="none"); the dashboards' cost is measured on
        # the main command.
        "logging.report_to=[jsonl]",
    ]


#: How the profile groups operators (by name) into kinds; the first pattern that matches wins.
PROFILE_KINDS = (
    ("matrix products", ("_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                         "aten::_addmm_activation")),
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
)


def profile_kinds(events: Any) -> dict[str, float]:
    """Self CPU seconds of a profile's operators, by kind (`PROFILE_KINDS`, else "other operators")."""
    kinds = {name: 0.0 for name, _ in PROFILE_KINDS} | {"other operators": 0.0}
    for event in events:
        kind = next((name for name, patterns in PROFILE_KINDS if any(p in event.key for p in patterns)),
                    "other operators")
        kinds[kind] += event.self_cpu_time_total / 1e6
    return kinds


class Probe:
    """The update hook: a timestamp per update, forward-call counters on the four models, and optionally a
    torch.profiler over the update that starts at ``profile_update``."""

    def __init__(self, profile_update: int | None = None) -> None:
        self.stamps: list[float] = []
        self.calls = {"reference": 0, "reward": 0, "critic": 0, "policy": 0}
        self.calls_at: list[dict[str, int]] = []
        self.profile_update = profile_update
        self.profiler: Any = None
        self.profile_wall = 0.0

    def _count(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.calls[name] += 1
        return hook

    def __call__(self, update: int, models: Any) -> None:
        if not self.stamps:
            # The policy's own forward runs inside generation (once per sampled position) and in training.
            if models.reference is not None:
                models.reference.register_forward_hook(self._count("reference"))
            models.reward_model.register_forward_hook(self._count("reward"))
            if models.trained.critic is not None:  # the critic-free estimators build none
                models.trained.critic.register_forward_hook(self._count("critic"))
            models.trained.policy.register_forward_hook(self._count("policy"))
        if self.profiler is not None:  # the profiled update has ended
            self.profiler.stop()
            self.profile_wall = time.perf_counter() - self.stamps[-1]
        self.stamps.append(time.perf_counter())
        self.calls_at.append(dict(self.calls))
        if update == self.profile_update:
            import torch.profiler
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()
            self.stamps[-1] = time.perf_counter()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workload = make_workload(args)
    threads = args.threads or workload["torch_threads"]
    models = models_dir(workload, args.workdir)
    monitor = wl.LoadMonitor().start()

    import torch

    from rlhf.config import PPOConfig, load_config
    from rlhf.tracking import read_metrics
    from stages import ppo

    torch.set_num_threads(threads)
    if args.autocast:
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # read by the stage's Accelerator()
    if args.compile:
        os.environ["ACCELERATE_DYNAMO_BACKEND"] = "inductor"  # read by the stage's Accelerator()
    peak = wl.matmul_peak_gflops(threads, args.dtype)
    warmup, timed_updates = workload["warmup_updates"], workload["timed_updates"]
    probe = Probe(warmup + timed_updates if args.profile else None)
    with tempfile.TemporaryDirectory(prefix="ppo-throughput-") as tmp:
        overrides = ppo_overrides(workload, models, Path(tmp), args, threads) + args.overrides
        if args.profile:
            overrides.append(f"ppo.num_updates={warmup + timed_updates + 1}")
        cfg = load_config(PPOConfig, None, overrides)
        out = ppo.run(cfg, on_update=probe)
        rows = [r for r in read_metrics(out) if "time/rollout_s" in r]
    load = monitor.stop()

    durations = [b - a for a, b in zip(probe.stamps, probe.stamps[1:])][warmup:warmup + timed_updates]
    timed = rows[warmup:warmup + timed_updates]
    s_per_update = statistics.median(durations)
    rollouts = workload["rollouts_per_update"]
    median = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    phases = {"generation": median("time/generate_s"), "policy_value": median("time/policy_value_s"),
              "reference": median("time/reference_s"), "reward": median("time/reward_s"),
              "training": median("time/train_s")}
    phases["other"] = max(s_per_update - sum(phases.values()), 0.0)
    calls = [{k: b[k] - a[k] for k in a}
             for a, b in zip(probe.calls_at, probe.calls_at[1:])][warmup:warmup + timed_updates]
    flops = wl.nominal_flops_per_update(workload)
    result = {
        "impl": "rlhf",
        "s_per_update": round(s_per_update, 4),
        "rollouts_per_s": round(rollouts / s_per_update, 3),
        "generated_tokens_per_s": round(statistics.median(r["perf/sampled_tokens"] for r in timed) / s_per_update, 1),
        "peak_rss_mib": round(wl.peak_rss_mib(), 1),
        "phases": {k: round(v, 4) for k, v in phases.items()},
        "nominal_gflop_per_update": round(flops / 1e9, 2),
        "model_gflop_per_s": round(flops / 1e9 / s_per_update, 2),
        "matmul_peak_gflop_per_s": round(peak, 1),
        "fraction_of_peak": round(flops / 1e9 / s_per_update / peak, 3),
        "threads": threads,
        "dtype": args.dtype,
        **wl.device_report(),
        "compile": args.compile,
        "autocast": "bf16" if args.autocast else None,
        "updates_timed": len(durations),
        "overrides": args.overrides,
        "update_times": [round(d, 4) for d in durations],
        "workload": {k: workload[k] for k in ("rollouts_per_update", "prompt_tokens", "response_tokens")}
                    | {k: workload["policy_and_reference"][k] for k in ("n_layer", "n_head", "n_embd")}
                    | {"variable_length": args.variable_length},
        "proof": {
            "rollouts_per_update": rollouts,
            "sampled_tokens_per_update": statistics.median(r["perf/sampled_tokens"] for r in timed),
            "mean_response_tokens": round(statistics.median(r["rollout/response_len"] for r in timed), 2),
            "optimizer_steps_per_update": statistics.median(r["ppo/optimizer_steps"] for r in timed),
            "training_passes_per_update": statistics.median(r["perf/train_passes"] for r in timed),
            "training_padding_share": round(statistics.median(r["perf/train_padding"] for r in timed), 3),
            "reference_forwards": statistics.median(c["reference"] for c in calls),
            "reward_forwards": statistics.median(c["reward"] for c in calls),
            "critic_forwards": statistics.median(c["critic"] for c in calls),
            "policy_forwards": statistics.median(c["policy"] for c in calls),
        },
        **load,
    }
    if probe.profiler is not None:
        events = probe.profiler.key_averages()
        Path(args.profile).write_text(events.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
        kinds = profile_kinds(events)
        result["profile"] = {"file": args.profile, "wall_s": round(probe.profile_wall, 4),
                             "operators_s": round(sum(kinds.values()), 4)} | {k: round(v, 4) for k, v in kinds.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
