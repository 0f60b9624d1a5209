"""Quality against TRL 0.28.0's ``PPOTrainer``: both trainers from the same demo SFT and reward checkpoints with the
same hyperparameters and rollout budget, three seeds each, every trained policy measured by our held-out evaluation.

    bash benchmarks/setup_trl_baseline.sh              # once: .venv-trl with TRL 0.28.0 (transformers 4.57)
    python benchmarks/quality_vs_trl.py [--sft DIR --reward DIR] [--workdir DIR] [--seeds 0 1 2]
                                        [--eval-prompts 512] [--eval-seed 0]

Steps:

1. Inputs: ``--sft`` / ``--reward`` (complete stage outputs), else the demo's, built once into ``WORKDIR/run`` with
   ``launch/sft.py`` and ``launch/reward.py`` and reused while their ``manifest.json`` exists.
2. Ours: ``launch/ppo.py`` with ``configs/ppo/demo.yaml`` per seed (``WORKDIR/ours-<seed>``; the held-out evaluation
   inside the run is cut to 8 prompts, we evaluate afterwards).
3. TRL: ``benchmarks/trl_quality_run.py`` in ``.venv-trl`` per seed (``WORKDIR/trl-<seed>``), given TRL ``PPOConfig``
   arguments derived here from the same demo config, and the training prompts as our text contract encodes them.
   Our PPO optimises ``(score - mean) / std`` with the reward stage's ``reward_stats.json``; TRL optimises what its
   reward model outputs. So TRL scores with a copy of the reward model whose output is rescaled to exactly that
   (``WORKDIR/reward-normalised``: the score head's weight divided by ``std``, and the final layer norm's bias moved
   along the head's weight so the output drops by ``mean``; GPT-2's score head has no bias of its own). The value
   model starts from the reward model as trained, as our critic does. Before training, probe sequences are scored
   and their log-probs taken on both sides, to show that transformers 4.57 reads our checkpoints and the rescaled
   head as we do.
4. Evaluation, here, in-process: ``rlhf.evaluation.evaluate_policy`` as the PPO and evaluate stages call it (the SFT
   policy as the reference, the demo reward model as trained, the gold judge, the training temperature and response
   length, one evaluation seed for every policy) on the first ``--eval-prompts`` held-out prompts, for the SFT policy
   and the six trained ones.
5. Output: the shared hyperparameters side by side, the per-seed and mean +- standard error table, the verdict, one
   JSON line. Ours passes when its mean gold score >= TRL's mean - TRL's standard error and its mean KL <= 1.1 x
   TRL's. Exit status 0 on pass, 1 on fail. Wall time is printed with the CPU other processes took meanwhile
   (``benchmarks/workload.py``'s ``LoadMonitor``): on a shared machine the timings, not the scores, suffer. Progress
   goes to stderr, each training run's output to ``WORKDIR/logs/``, the JSON line also to ``WORKDIR/result.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rlhf.checkpoint import REWARD_STATS_FILE, read_json, read_manifest, require_complete
from rlhf.config import ModelConfig, PPOConfig, load_config
from rlhf.evaluation import evaluate_policy, summarise_records
from rlhf.models import frozen, is_encoder, load_causal_lm, load_sequence_scorer, load_tokenizer, score_sequences
from rlhf.ppo.rollout import GenerationSettings, policy_forward
from rlhf.scoring import RewardScorer
from rlhf.text import TextContract
from stages.ppo import load_prompts

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workload import LoadMonitor  # noqa: E402

REPO = HERE.parent
DEMO_CONFIG = REPO / "configs" / "ppo" / "demo.yaml"
logger = logging.getLogger("quality_vs_trl")

#: The measures compared, as ``summarise_records`` names them (prefix ""), with their labels.
MEASURES = {"gold_combined": "gold combined", "gold_positive": "positive share", "kl": "KL to SFT",
            "score_mean": "RM score (raw)", "eos_rate": "EOS rate", "response_len": "length"}
#: Held-out prompts our PPO run evaluates itself on (before and after training); we evaluate on more afterwards.
IN_RUN_EVAL_PROMPTS = 8
#: Sequences (prompt, completion) of the SFT data scored on both sides before training.
NUM_PROBES = 4
PROBE_TOLERANCE = 1e-4
#: The brief's budget for the whole comparison on the 2-core CPU machine.
BUDGET_S = 30 * 60
KL_FACTOR = 1.1

#: Hyperparameters both trainers have: (our config key, TRL PPOConfig attribute). TRL's value is read back from the
#: trainer it built, so derived batch sizes are checked too.
SHARED = [
    ("seed", "seed"),
    ("optim.learning_rate", "learning_rate"),
    ("optim.lr_scheduler", "lr_scheduler_type"),
    ("optim.warmup_ratio", "warmup_ratio"),
    ("optim.weight_decay", "weight_decay"),
    ("optim.adam_beta1", "adam_beta1"),
    ("optim.adam_beta2", "adam_beta2"),
    ("optim.adam_epsilon", "adam_epsilon"),
    ("optim.max_grad_norm", "max_grad_norm"),
    ("rollout.batch_size", "batch_size"),
    ("rollout.micro_batch_size", "local_rollout_forward_batch_size"),
    ("ppo.num_updates", "num_total_batches"),
    ("ppo.ppo_epochs", "num_ppo_epochs"),
    ("ppo.num_minibatches", "num_mini_batches"),
    ("rollout.max_new_tokens", "response_length"),
    ("rollout.temperature", "temperature"),
    ("rollout.missing_stop_penalty", "missing_eos_penalty"),
    ("ppo.kl_coef", "kl_coef"),
    ("ppo.kl_estimator", "kl_estimator"),
    ("ppo.clip_range", "cliprange"),
    ("ppo.value_clip_range", "cliprange_value"),
    ("ppo.vf_coef", "vf_coef"),
    ("ppo.gamma", "gamma"),
    ("ppo.lam", "lam"),
    ("ppo.whiten_rewards", "whiten_rewards"),
    ("model.gradient_checkpointing", "gradient_checkpointing"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", type=Path, default=None, help="a complete SFT output (default: build the demo's)")
    parser.add_argument("--reward", type=Path, default=None, help="a complete reward output (default: the demo's)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "quality",
                        help="where inputs are built and trained policies, logs and results go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-prompts", type=int, default=512, help="held-out prompts each policy is measured on")
    parser.add_argument("--eval-seed", type=int, default=0, help="the evaluation's sampling seed, the same for all")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change one key of the demo PPO config for both trainers (e.g. ppo.num_updates=2 for a "
                             "smoke test); keys TRL cannot follow are refused")
    parser.add_argument("--trl-python", type=Path, default=REPO / ".venv-trl" / "bin" / "python",
                        help="the interpreter of the TRL 0.28 virtualenv (bash benchmarks/setup_trl_baseline.sh)")
    args = parser.parse_args(argv)
    if (args.sft is None) != (args.reward is None):
        parser.error("give both --sft and --reward, or neither (then the demo's are built)")
    if len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least two different seeds for a standard error")
    if args.eval_prompts < 1:
        parser.error("--eval-prompts must be at least 1")
    if not args.trl_python.is_file():
        parser.error(f"--trl-python {args.trl_python} does not exist; run `bash benchmarks/setup_trl_baseline.sh`")
    return args


def run_logged(command: list[str], log: Path, *, capture_stdout: bool = False) -> str:
    """Run ``command`` from the repository root, its output into ``log`` (stdout returned instead when
    ``capture_stdout``); a failure names the log and shows its end."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE if capture_stdout else f, stderr=f, text=True)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"`{' '.join(command)}` failed with status {done.returncode}; its log is {log}:\n{tail}")
    return done.stdout if capture_stdout else ""


def build_inputs(workdir: Path) -> tuple[Path, Path]:
    """The demo's SFT and reward outputs in ``workdir/run``, built with the demo configs unless complete already."""
    run_dir = workdir / "run"
    for stage in ("sft", "reward"):
        if read_manifest(run_dir / stage) is not None:
            logger.info("%s: reusing %s", stage, run_dir / stage)
            continue
        logger.info("%s: building %s with configs/%s/demo.yaml", stage, run_dir / stage, stage)
        start = time.perf_counter()
        run_logged([sys.executable, f"launch/{stage}.py", f"run_dir={run_dir}", "logging.report_to=[jsonl]"],
                   workdir / "logs" / f"{stage}.log")
        logger.info("%s: built in %.0f s", stage, time.perf_counter() - start)
    return run_dir / "sft", run_dir / "reward"


def demo_config(sft: Path, reward: Path, eval_prompts: int, overrides: list[str]) -> PPOConfig:
    fixed = [f"model.name_or_path={sft}", f"reward_model.name_or_path={reward}", f"eval.num_prompts={eval_prompts}"]
    return load_config(PPOConfig, DEMO_CONFIG, [*overrides, *fixed])


def check_alignable(cfg: PPOConfig, contract: TextContract) -> None:
    """Settings of ours that TRL 0.28 has no argument for must sit at the value TRL hard-codes."""
    fixed = {
        "rollout.top_k": (cfg.rollout.top_k, 0), "rollout.top_p": (cfg.rollout.top_p, 1.0),
        "rollout.stop_at_stop_token": (cfg.rollout.stop_at_stop_token, True),
        "ppo.whiten_advantages": (cfg.ppo.whiten_advantages, True), "ppo.entropy_coef": (cfg.ppo.entropy_coef, 0.0),
        "ppo.kl_target": (cfg.ppo.kl_target, None), "ppo.target_kl": (cfg.ppo.target_kl, None),
        "ppo.critic_learning_rate": (cfg.ppo.critic_learning_rate, None),
        "ppo.critic_init": (cfg.ppo.critic_init, "auto"),
        "peft.method": (cfg.peft.method, "full"), "critic_peft.method": (cfg.critic_peft.method, "full"),
        "model.dtype": (cfg.model.dtype, "float32"), "rollout.score_norm": (cfg.rollout.score_norm, "reward_stats"),
        "rollout.score_clip": (cfg.rollout.score_clip, None),
        "stop tokens": (contract.stop_token_ids, (contract.tokenizer.eos_token_id,)),
    }
    wrong = [f"{key}={ours!r} (TRL: {trl!r})" for key, (ours, trl) in fixed.items() if ours != trl]
    if wrong:
        raise SystemExit(f"{DEMO_CONFIG}: TRL 0.28's PPOTrainer cannot be set to match {', '.join(wrong)}")


def trl_arguments(cfg: PPOConfig) -> dict[str, Any]:
    """TRL ``PPOConfig`` arguments carrying our values. In TRL 0.28, per_device_train_batch_size x
    gradient_accumulation_steps is the rollout batch, a minibatch is that / num_mini_batches, cut into slices of
    per_device_train_batch_size rows with one optimiser step each: one slice per minibatch, one step per minibatch,
    as ours (whose micro-batches only split the forward passes)."""
    o, r, p = cfg.optim, cfg.rollout, cfg.ppo
    return {
        "learning_rate": o.learning_rate, "lr_scheduler_type": o.lr_scheduler, "warmup_ratio": o.warmup_ratio,
        "weight_decay": o.weight_decay, "adam_beta1": o.adam_beta1, "adam_beta2": o.adam_beta2,
        "adam_epsilon": o.adam_epsilon, "max_grad_norm": o.max_grad_norm,
        "per_device_train_batch_size": r.batch_size, "gradient_accumulation_steps": 1,
        "num_mini_batches": p.num_minibatches, "num_ppo_epochs": p.ppo_epochs,
        "total_episodes": p.num_updates * r.batch_size, "local_rollout_forward_batch_size": r.micro_batch_size,
        "response_length": r.max_new_tokens, "temperature": r.temperature, "stop_token": "eos",
        "missing_eos_penalty": r.missing_stop_penalty, "kl_coef": p.kl_coef, "kl_estimator": p.kl_estimator,
        "cliprange": p.clip_range, "cliprange_value": p.value_clip_range, "vf_coef": p.vf_coef,
        "gamma": p.gamma, "lam": p.lam, "whiten_rewards": p.whiten_rewards,
        # TRL's PPOConfig turns bf16 on unless told otherwise; ours computes in model.dtype (float32 here).
        "bf16": False, "fp16": False, "gradient_checkpointing": cfg.model.gradient_checkpointing,
    }


def our_value(cfg: PPOConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_shared(cfg: PPOConfig, seed: int, trl_config: dict[str, Any]) -> None:
    """Every shared hyperparameter as TRL built it equals ours (the seed: this run's)."""
    wrong = []
    for ours_key, trl_key in SHARED:
        ours = seed if ours_key == "seed" else our_value(cfg, ours_key)
        if trl_config[trl_key] != ours:
            wrong.append(f"{ours_key}={ours!r} but TRL's {trl_key}={trl_config[trl_key]!r}")
    if cfg.rollout.batch_size // cfg.ppo.num_minibatches != trl_config["mini_batch_size"]:
        wrong.append(f"minibatch {cfg.rollout.batch_size // cfg.ppo.num_minibatches} but TRL's mini_batch_size="
                     f"{trl_config['mini_batch_size']}")
    if wrong:
        raise SystemExit("TRL did not take our hyperparameters: " + "; ".join(wrong))


def normalised_reward(reward: Path, out: Path) -> dict[str, float]:
    """Save ``reward`` to ``out`` with its output rescaled to ``(score - mean) / std`` (``reward_stats.json``).

    The score reads the final layer norm's output h = g * x_hat + b through a bias-free head, s = w . h. With
    w' = w / std and b' = b - mean * w / |w|^2: w' . (g * x_hat + b') = (s - mean) / std exactly (rounding aside).
    Only the score head reads h in a sequence-classification model, so nothing else changes."""
    stats = read_json(reward / REWARD_STATS_FILE)
    mean, std = float(stats["mean"]), float(stats["std"])
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(reward)))
    model = load_sequence_scorer(ModelConfig(name_or_path=str(reward)), pad_token_id=tokenizer.pad_token_id)
    head, norm = model.score, getattr(getattr(model, "transformer", None), "ln_f", None)
    if norm is None or head.bias is not None or head.weight.shape[0] != 1:
        raise SystemExit(f"{reward}: expected a GPT-2 reward model (transformer.ln_f, bias-free one-output score head) "
                         f"to rescale, got {type(model).__name__}")
    with torch.no_grad():
        w = head.weight[0].double()
        norm.bias.copy_((norm.bias.double() - mean * w / w.dot(w)).float())
        head.weight.copy_((head.weight.double() / std).float())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "normalisation.json").write_text(json.dumps({"source": str(reward), "mean": mean, "std": std}) + "\n")
    return {"mean": mean, "std": std}


def make_probes(contract: TextContract) -> list[dict[str, list[int]]]:
    rows = [json.loads(line) for line in (REPO / "data" / "demo" / "sft.jsonl").read_text().splitlines()[:NUM_PROBES]]
    probes = []
    for row in rows:
        ids, mask = contract.sequence(row["prompt"], row["completion"])
        cut = mask.index(1)
        probes.append({"prompt_ids": ids[:cut], "response_ids": ids[cut:]})
    return probes


@torch.inference_mode()
def our_probe_values(sft: Path, reward: Path, normalised: Path, probes: list[dict[str, list[int]]],
                     temperature: float, stats: dict[str, float]) -> dict[str, list[float]]:
    """What our code reads for the probes: response log-prob sums under the SFT policy, and the rescaled reward
    model's scores, after checking those equal (raw - mean) / std of the reward model as trained."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(sft)))
    policy = frozen(load_causal_lm(ModelConfig(name_or_path=str(sft))))
    sequences = [p["prompt_ids"] + p["response_ids"] for p in probes]
    logprob_sums = []
    for probe, seq in zip(probes, sequences):
        ids = torch.tensor([seq])
        lp, _ = policy_forward(policy, ids, torch.ones_like(ids), len(probe["response_ids"]), temperature=temperature)
        logprob_sums.append(lp.sum().item())
    scores = {}
    for name, path in (("raw", reward), ("normalised", normalised)):
        model = frozen(load_sequence_scorer(ModelConfig(name_or_path=str(path)), pad_token_id=tokenizer.pad_token_id))
        scores[name] = score_sequences(model, sequences, pad_token_id=tokenizer.pad_token_id).tolist()
    expected = [(s - stats["mean"]) / stats["std"] for s in scores["raw"]]
    gap = max(abs(a - b) for a, b in zip(expected, scores["normalised"]))
    if gap > PROBE_TOLERANCE:
        raise SystemExit(f"{normalised}: the rescaled reward model is off (raw - mean) / std by {gap:.2e}")
    return {"logprob_sums": logprob_sums, "scores": scores["normalised"]}


def train_ours(cfg: PPOConfig, sft: Path, reward: Path, seed: int, workdir: Path,
               overrides: list[str]) -> dict[str, Any]:
    run_dir = workdir / f"ours-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed or reused one
    command = [sys.executable, "launch/ppo.py", f"--config={DEMO_CONFIG}", *overrides, f"run_dir={run_dir}",
               f"model.name_or_path={sft}", f"reward_model.name_or_path={reward}", f"seed={seed}", "eval.every=0",
               f"eval.num_prompts={IN_RUN_EVAL_PROMPTS}", "logging.report_to=[jsonl]"]
    start, monitor = time.perf_counter(), LoadMonitor().start()
    run_logged(command, workdir / "logs" / f"ours-{seed}.log")
    wall, load = time.perf_counter() - start, monitor.stop()
    manifest = require_complete(run_dir / "ppo", stage="ppo", how_to_build=" ".join(command))
    policy = run_dir / "ppo" / "policy"
    if not (policy / "config.json").is_file():
        raise SystemExit(f"our PPO run finished but saved no policy in {policy}")
    metrics = manifest.get("metrics", {})
    logger.info("ours seed %d: %.0f s (rollout %.0f s, train %.0f s; other processes took %.2f cores)", seed, wall,
                metrics.get("time/rollout_s", 0), metrics.get("time/train_s", 0), load["other_cpu_load"])
    return {"seed": seed, "wall_s": round(wall, 1), "other_cpu_load": load["other_cpu_load"], "policy": str(policy),
            "last_update": {k: metrics.get(k) for k in ("rollout/score_mean", "rollout/reward_mean", "rollout/kl",
                                                        "rollout/eos_rate")}}


def train_trl(python: Path, job: Path, seed: int, workdir: Path) -> dict[str, Any]:
    output = workdir / f"trl-{seed}"
    shutil.rmtree(output, ignore_errors=True)
    command = [str(python), str(HERE / "trl_quality_run.py"), "--job", str(job), "--seed", str(seed),
               "--output", str(output)]
    start, monitor = time.perf_counter(), LoadMonitor().start()
    stdout = run_logged(command, workdir / "logs" / f"trl-{seed}.log", capture_stdout=True)
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["other_cpu_load"] = monitor.stop()["other_cpu_load"]
    logger.info("TRL seed %d: %.0f s (train %.0f s, %d optimiser steps; other processes took %.2f cores)", seed,
                result["wall_s"], result["train_s"], result["optimizer_steps"], result["other_cpu_load"])
    return result


@torch.inference_mode()
def evaluate_all(cfg: PPOConfig, sft: Path, reward: Path, policies: dict[str, Path],
                 seed: int) -> dict[str, dict[str, float]]:
    """Each policy on the held-out prompts, as the PPO stage's evaluation runs: the SFT policy as the reference, the
    reward model as trained, the training sampling settings, the gold judge; the same uniforms for every policy."""
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.padding_side = "left"
    contract = TextContract.from_tokenizer(tokenizer)
    _, held_out, _ = load_prompts(cfg, contract)
    reward_tokenizer = load_tokenizer(cfg.reward_model)
    scorer = RewardScorer(frozen(load_sequence_scorer(cfg.reward_model, pad_token_id=reward_tokenizer.pad_token_id)),
                          reward_tokenizer, policy_contract=contract, is_encoder=is_encoder(str(reward)),
                          batch_size=cfg.rollout.micro_batch_size)
    reference_model = frozen(load_causal_lm(cfg.model))
    temperature = cfg.rollout.temperature or 1.0
    settings = GenerationSettings(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                  top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                                  pad_token_id=tokenizer.pad_token_id, stop_token_ids=contract.stop_token_ids)

    def reference(ids: torch.Tensor, mask: torch.Tensor, r: int) -> torch.Tensor:
        return policy_forward(reference_model, ids, mask, r, temperature=temperature)[0]

    use_gold = cfg.eval.gold_judge and all(isinstance(p, str) for p in held_out.prompts)
    if not use_gold:
        raise SystemExit("the comparison needs the gold judge: plain-text demo prompts and eval.gold_judge=true")
    results = {}
    for name, path in policies.items():
        policy = reference_model if path == sft else frozen(load_causal_lm(ModelConfig(name_or_path=str(path))))
        start = time.perf_counter()
        records = evaluate_policy(policy, reference, scorer, held_out, range(len(held_out.prompts)), settings,
                                  seed=seed, device="cpu", batch_size=cfg.rollout.micro_batch_size, gold_judge=True)
        results[name] = summarise_records(records, prefix="")
        logger.info("evaluated %s in %.0f s: gold %.4f, KL %.3f", name, time.perf_counter() - start,
                    results[name]["gold_combined"], results[name]["kl"])
    return results


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def hyperparameter_table(cfg: PPOConfig, stop_ids: tuple[int, ...], trl_config: dict[str, Any],
                         stats: dict[str, float]) -> list[list[str]]:
    rows = [[ours_key, fmt("per seed" if ours_key == "seed" else our_value(cfg, ours_key)), trl_key,
             fmt("per seed" if trl_key == "seed" else trl_config[trl_key])] for ours_key, trl_key in SHARED]
    minibatch = cfg.rollout.batch_size // cfg.ppo.num_minibatches
    rows += [
        ["rollout.batch_size / ppo.num_minibatches", str(minibatch), "mini_batch_size",
         str(trl_config["mini_batch_size"])],
        ["rollout.top_k / top_p", f"{cfg.rollout.top_k} / {fmt(cfg.rollout.top_p)}", "(fixed in TRL)", "0 / 1.0"],
        ["stop tokens (text contract)", str(list(stop_ids)), "stop_token / stop_token_id",
         f"{trl_config['stop_token']} / {trl_config['stop_token_id']}"],
        ["rollout.score_norm", f"reward_stats (mean {stats['mean']:.4g}, std {stats['std']:.4g})",
         "reward_model", "head rescaled to (s - mean) / std"],
        ["ppo.whiten_advantages", str(cfg.ppo.whiten_advantages), "(always in TRL)", "True"],
        ["ppo.critic_init", f"{cfg.ppo.critic_init} -> reward", "value_model", "reward checkpoint"],
        ["critic output read as", "(v - mean) / std, the scores' units", "(as it is)", "raw reward-model units"],
        ["model.dtype", cfg.model.dtype, "bf16 / fp16", f"{trl_config['bf16']} / {trl_config['fp16']}"],
        ["rollout.max_prompt_len", str(cfg.rollout.max_prompt_len), "(prompt ids given)", "the same ids"],
    ]
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(sft: dict[str, float], per_seed: dict[str, list[dict[str, float]]],
                  seeds: list[int]) -> str:
    header = ["policy", *MEASURES.values()]
    rows = [["SFT (start)", *(f"{sft[k]:.4f}" for k in MEASURES)]]
    for impl, label in (("ours", "ours"), ("trl", "TRL 0.28")):
        for seed, metrics in zip(seeds, per_seed[impl]):
            rows.append([f"{label} seed {seed}", *(f"{metrics[k]:.4f}" for k in MEASURES)])
        rows.append([f"**{label} mean ± se**", *("{:.4f} ± {:.4f}".format(*mean_se([m[k] for m in per_seed[impl]]))
                                                 for k in MEASURES)])
    return markdown(header, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start, monitor = time.perf_counter(), LoadMonitor().start()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. Inputs.
    if args.sft is None:
        sft, reward = build_inputs(args.workdir)
    else:
        sft, reward = args.sft.resolve(), args.reward.resolve()
        require_complete(sft, stage="sft", how_to_build="python launch/sft.py run_dir=...")
        require_complete(reward, stage="reward", how_to_build="python launch/reward.py run_dir=...")
    timings["inputs_s"] = time.perf_counter() - start
    cfg = demo_config(sft, reward, args.eval_prompts, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    contract = TextContract.from_tokenizer(tokenizer)
    check_alignable(cfg, contract)

    # 2. The TRL job: arguments, prompt ids, the rescaled reward model, probes checked on our side.
    normalised = args.workdir / "reward-normalised"
    stats = normalised_reward(reward, normalised)
    train_prompts, _, _ = load_prompts(cfg, contract)
    probes = make_probes(contract)
    ours_probe = our_probe_values(sft, reward, normalised, probes, cfg.rollout.temperature, stats)
    job = args.workdir / "trl_job.json"
    job.write_text(json.dumps({"sft": str(sft), "reward": str(reward), "reward_normalised": str(normalised),
                               "train_prompt_ids": train_prompts.prompt_ids, "config": trl_arguments(cfg),
                               "probes": probes}))
    logger.info("%d training prompts; reward normalisation mean %.4f, std %.4f", len(train_prompts.prompt_ids),
                stats["mean"], stats["std"])

    # 3. Training, one process at a time: ours, then TRL, per seed.
    ours_runs, trl_runs = [], []
    for seed in args.seeds:
        ours_runs.append(train_ours(cfg, sft, reward, seed, args.workdir, args.overrides))
        trl = train_trl(args.trl_python, job, seed, args.workdir)
        check_shared(cfg, seed, trl["config"] | {"stop_token_id": trl["stop_token_id"]})
        gap = max(abs(a - b) for key in ("logprob_sums", "scores")
                  for a, b in zip(ours_probe[key], trl["probes"][key]))
        if gap > PROBE_TOLERANCE:
            raise SystemExit(f"TRL reads the checkpoints differently from us: probe values differ by {gap:.2e} "
                             f"(ours {ours_probe}, TRL {trl['probes']})")
        trl["probe_max_abs_diff"] = gap
        trl_runs.append(trl)
    timings["ours_train_s"] = sum(r["wall_s"] for r in ours_runs)
    timings["trl_train_s"] = sum(r["wall_s"] for r in trl_runs)

    # 4. Evaluation.
    eval_start = time.perf_counter()
    policies = {"sft": sft, **{f"ours-{r['seed']}": Path(r["policy"]) for r in ours_runs},
                **{f"trl-{r['seed']}": Path(r["policy"]) for r in trl_runs}}
    results = evaluate_all(cfg, sft, reward, policies, args.eval_seed)
    timings["eval_s"] = time.perf_counter() - eval_start

    # 5. Report.
    per_seed = {impl: [results[f"{impl}-{seed}"] for seed in args.seeds] for impl in ("ours", "trl")}
    summary = {impl: {k: dict(zip(("mean", "se"), mean_se([m[k] for m in per_seed[impl]]))) for k in MEASURES}
               for impl in ("ours", "trl")}
    gold_bar = summary["trl"]["gold_combined"]["mean"] - summary["trl"]["gold_combined"]["se"]
    kl_bar = KL_FACTOR * summary["trl"]["kl"]["mean"]
    gold_ok = summary["ours"]["gold_combined"]["mean"] >= gold_bar
    kl_ok = summary["ours"]["kl"]["mean"] <= kl_bar
    passed = gold_ok and kl_ok
    wall, load = time.perf_counter() - start, monitor.stop()
    trl_config = trl_runs[0]["config"] | {"stop_token_id": trl_runs[0]["stop_token_id"]}

    print("\nShared hyperparameters (TRL's as its trainer holds them; checked equal for every seed)\n")
    table = hyperparameter_table(cfg, contract.stop_token_ids, trl_config, stats)
    print(markdown(["ours", "value", "TRL 0.28", "value"], table))
    print(f"\nHeld-out evaluation: {int(results['sft']['num_prompts'])} prompts of "
          f"{cfg.data.eval_path}, temperature {cfg.rollout.temperature}, {cfg.rollout.max_new_tokens} new tokens, "
          f"eval seed {args.eval_seed}; KL to the SFT policy in nats per response\n")
    print(results_table(results["sft"], per_seed, args.seeds))
    print(f"\ngold: ours {summary['ours']['gold_combined']['mean']:.4f} >= TRL mean - se {gold_bar:.4f}: "
          f"{'yes' if gold_ok else 'NO'}")
    print(f"KL:   ours {summary['ours']['kl']['mean']:.4f} <= {KL_FACTOR} x TRL {kl_bar:.4f}: "
          f"{'yes' if kl_ok else 'NO'}")
    print(f"verdict: {'PASS' if passed else 'FAIL'}")
    print(f"wall time {wall / 60:.1f} min (inputs {timings['inputs_s']:.0f} s, ours {timings['ours_train_s']:.0f} s, "
          f"TRL {timings['trl_train_s']:.0f} s, evaluation {timings['eval_s']:.0f} s)"
          + ("" if wall <= BUDGET_S else f"; over the {BUDGET_S // 60}-minute budget"))
    print(f"other processes used {load['other_cpu_load']:.2f} cores on average while this ran"
          + (f" (contended: {', '.join(load['busy']) or 'short-lived processes'})" if load["contended"] else ""))
    result = {
        "verdict": "pass" if passed else "fail", "gold_ok": gold_ok, "kl_ok": kl_ok,
        "gold_threshold": gold_bar, "kl_threshold": kl_bar, "seeds": args.seeds, "eval_prompts": args.eval_prompts,
        "eval_seed": args.eval_seed, "sft": results["sft"], "per_seed": per_seed, "summary": summary,
        "wall_s": round(wall, 1), "contended": load["contended"], "other_cpu_load": load["other_cpu_load"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "ours_runs": ours_runs, "trl_runs": [{k: v for k, v in r.items() if k != "config"} for r in trl_runs],
        "trl_config": trl_config, "reward_stats": stats, "sft_path": str(sft), "reward_path": str(reward),
    }
    (args.workdir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
