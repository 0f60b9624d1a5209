"""Held-out evaluation of a run: the SFT policy and the trained policies (PPO, DPO: ``policies``) sampled on the same
held-out prompts with the same random streams, scored by the reward model (unless ``reward_scores=false``) and, on the
demo, the gold judge, each compared pairwise with the SFT policy (and DPO with PPO), with each policy's KL to the SFT
policy (the reference). Writes ``<run_dir>/evaluate/eval.json`` and a sample table.

    accelerate launch launch/evaluate.py [--config configs/evaluate/demo.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.checkpoint import EVAL_RESULTS_FILE, read_manifest, require_upstream, write_json_atomic
from rlhf.config import EvaluateConfig, RolloutConfig
from rlhf.data import prepare_dataset
from rlhf.evaluation import EvalPrompts, encode_prompts, evaluate_policy, summarise_records
from rlhf.models import check_model_source, is_encoder, load_causal_lm, load_sequence_scorer, load_tokenizer
from rlhf.ppo.rollout import GenerationSettings, policy_forward
from rlhf.onednn import packed_linears
from rlhf.runtime import StageRun, distributed_state, onednn_linears
from rlhf.scoring import RewardScorer
from rlhf.signals import StopRequest
from rlhf.text import TextContract

Config = EvaluateConfig
logger = logging.getLogger(__name__)

EVAL_FILE = EVAL_RESULTS_FILE


def training_settings(cfg: EvaluateConfig) -> dict[str, Any]:
    """The PPO stage's rollout settings (when PPO is evaluated; else the rollout defaults), which the evaluation
    uses for every field the config leaves at None."""
    manifest = read_manifest(cfg.ppo_run_path) if "ppo" in cfg.policies and not cfg.ppo_model.name_or_path else None
    rollout = (manifest or {}).get("config", {}).get("rollout", {})
    defaults = RolloutConfig()
    keys = ("max_prompt_len", "max_new_tokens", "temperature", "top_k", "top_p")
    return {key: getattr(cfg, key) if getattr(cfg, key) is not None else rollout.get(key, getattr(defaults, key))
            for key in keys}


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of pairs where ``a`` beats ``b``, ties counting one half."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / max(len(a), 1)


def run(cfg: EvaluateConfig) -> Path:
    from accelerate.utils import gather_object

    state = distributed_state()
    # 1. Inputs: the run's SFT, reward (when scoring with it) and trained outputs unless paths are given.
    model_cfgs = {"sft": dataclasses.replace(cfg.sft_model, name_or_path=cfg.sft_path)}
    for name in cfg.policies:
        model_cfgs[name] = dataclasses.replace(getattr(cfg, f"{name}_model"), name_or_path=cfg.policy_path(name))
    if cfg.reward_scores:
        model_cfgs["reward"] = dataclasses.replace(cfg.reward_model, name_or_path=cfg.reward_path)
    for name, model_cfg in model_cfgs.items():
        if not getattr(cfg, f"{name}_model").name_or_path:
            path = cfg.ppo_run_path if name == "ppo" else model_cfg.name_or_path
            require_upstream(path, stage=name, run_dir=cfg.run_dir)
        check_model_source(model_cfg, key=f"{name}_model.name_or_path")
    sft_cfg = model_cfgs["sft"]
    settings_cfg = training_settings(cfg)
    tokenizer = load_tokenizer(sft_cfg)
    contract = TextContract.from_tokenizer(tokenizer)
    data = prepare_dataset(cfg.data.path, "prompt", split=cfg.data.split, eval_fraction=0.0, seed=cfg.seed,
                           prompt_marker=cfg.data.prompt_marker, on_bad_row=cfg.data.on_bad_row,
                           max_bad_fraction=cfg.data.max_bad_fraction)
    texts = [row["prompt"] for row in data.train][: cfg.num_prompts]
    prompts = EvalPrompts(texts, encode_prompts(contract, texts, settings_cfg["max_prompt_len"]))
    settings = GenerationSettings(max_new_tokens=settings_cfg["max_new_tokens"],
                                  temperature=settings_cfg["temperature"], top_k=settings_cfg["top_k"],
                                  top_p=settings_cfg["top_p"], stop_token_ids=contract.stop_token_ids,
                                  pad_token_id=tokenizer.pad_token_id)
    temperature = settings.temperature or 1.0
    use_gold = cfg.gold_judge and all(isinstance(p, str) for p in texts)

    with StageRun(cfg, rank=state.process_index, is_main_process=state.is_main_process) as stage, \
            StopRequest() as stop:
        # 2. Models, frozen: the SFT policy doubles as the reference.
        device = state.device
        models = {name: load_causal_lm(model_cfgs[name]).to(device).eval() for name in ("sft", *cfg.policies)}
        sft = models["sft"]
        scorer = None
        if cfg.reward_scores:
            reward_tokenizer = load_tokenizer(model_cfgs["reward"])
            reward = load_sequence_scorer(model_cfgs["reward"], pad_token_id=reward_tokenizer.pad_token_id)
            scorer = RewardScorer(reward.to(device).eval(), reward_tokenizer, policy_contract=contract,
                                  is_encoder=is_encoder(cfg.reward_path), batch_size=cfg.batch_size)

        def reference(ids: torch.Tensor, mask: torch.Tensor, r: int) -> torch.Tensor:
            return policy_forward(sft, ids, mask, r, temperature=temperature)[0]

        # 3. The same prompts and random streams for every policy.
        indices = list(range(state.process_index, len(texts), state.num_processes))
        results = {}
        # oneDNN's packed linears (CPU, float32): the weights stay frozen for the whole evaluation.
        with contextlib.ExitStack() as packing:
            for name, model in (*models.items(), *((("reward", scorer.model),) if scorer is not None else ())):
                packing.enter_context(packed_linears(model, enabled=onednn_linears(state,
                                                                                   getattr(cfg, f"{name}_model"))))
            for name, policy in models.items():
                records = evaluate_policy(policy, reference, scorer, prompts, indices, settings, contract=contract,
                                          seed=cfg.seed, device=device, batch_size=cfg.batch_size,
                                          gold_judge=use_gold,
                                          progress=f"evaluate {name}" if state.is_main_process else None,
                                          stop=stop)
                results[name] = sorted(gather_object(records), key=lambda r: r["index"])

        # 4. Summaries, pairwise win rates, the sample table, eval.json.
        report = comparison(results, num_prompts=len(texts), settings=settings_cfg, use_gold=use_gold)
        metrics = record_comparison(cfg, stage, report, results, is_main_process=state.is_main_process)
        state.wait_for_everyone()
        return stage.complete(metrics, extra={"eval": report})


def comparison(results: dict[str, list[dict[str, Any]]], *, num_prompts: int, settings: dict[str, Any],
               use_gold: bool) -> dict[str, Any]:
    """What eval.json holds: each policy's summary; for each trained policy its win rates over the SFT policy under
    the reward model (when scored) and the gold judge, and its KL to the reference (PPO's keys unsuffixed, the
    others' suffixed with their name: ``win_rate_gold_dpo``); with PPO and DPO both, DPO's gold win rate over PPO."""
    report: dict[str, Any] = {"num_prompts": num_prompts, "settings": settings,
                              **{name: summarise_records(records, prefix="") for name, records in results.items()}}
    trained = [name for name in results if name != "sft"]
    for name in trained:
        suffix = "" if name == "ppo" else f"_{name}"
        for judge, key in (("reward_model", "score"), ("gold", "gold_combined")):
            if key in results["sft"][0] and (judge == "reward_model" or use_gold):
                report[f"win_rate_{judge}{suffix}"] = win_rate([r[key] for r in results[name]],
                                                               [r[key] for r in results["sft"]])
        report[f"kl_{name}_to_reference"] = report[name]["kl"]
    if use_gold and {"ppo", "dpo"} <= set(trained):
        report["win_rate_gold_dpo_over_ppo"] = win_rate([r["gold_combined"] for r in results["dpo"]],
                                                        [r["gold_combined"] for r in results["ppo"]])
    return report


def record_comparison(cfg: EvaluateConfig, stage: Any, report: dict[str, Any], results: dict[str, list[dict[str, Any]]],
                      *, is_main_process: bool) -> dict[str, float]:
    """Log the comparison's metrics and sample table, write eval.json (main process); returns the metrics."""
    metrics = {f"eval/{policy}/{k}": v for policy in results for k, v in report[policy].items()}
    metrics.update({f"eval/{k}": v for k, v in report.items() if isinstance(v, float)})
    stage.tracker.log(metrics, step=0)
    if cfg.samples:
        scored = "score" in results["sft"][0]
        columns = ["prompt"] + [f"{name}_{part}" for name in results
                                for part in ("response", *(("score",) if scored else ()))]
        rows = [[str(group[0]["prompt"])] + [value for r in group
                                             for value in (r["response"], *((r["score"],) if scored else ()))]
                for group in zip(*(records[: cfg.samples] for records in results.values()))]
        stage.tracker.log_table("eval_samples", columns, rows, step=0)
    if is_main_process:
        write_json_atomic(stage.output_dir / EVAL_FILE, report)
        for name in (n for n in results if n != "sft"):
            suffix = "" if name == "ppo" else f"_{name}"
            wins = [f"{report[k]:.3f} of prompts under the {judge}" for k, judge in
                    ((f"win_rate_reward_model{suffix}", "reward model"), (f"win_rate_gold{suffix}", "gold judge"))
                    if k in report]
            logger.info("evaluate: %s wins %s; KL to the reference %.3f", name.upper(),
                        " and ".join(wins) or "(no judge)", report[f"kl_{name}_to_reference"])
    return metrics
