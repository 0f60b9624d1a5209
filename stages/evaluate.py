"""Held-out evaluation of a run: the SFT policy and the PPO policy sampled on the same held-out prompts with the same
random streams, scored by the reward model (and, on the demo, the gold judge), compared pairwise, with the PPO
policy's KL to the SFT policy (the reference). Writes ``<run_dir>/evaluate/eval.json`` and a sample table.

    accelerate launch launch/evaluate.py [--config configs/evaluate/demo.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.checkpoint import EVAL_RESULTS_FILE, read_manifest, require_complete, write_json_atomic
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
    """The PPO stage's rollout settings, which the evaluation uses for every field the config leaves at None."""
    manifest = read_manifest(cfg.ppo_run_path) if not cfg.ppo_model.name_or_path else None
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
    # 1. Inputs: the run's SFT, reward and PPO outputs unless paths are given.
    for name, given, path in (("sft", cfg.sft_model.name_or_path, cfg.sft_path),
                              ("reward", cfg.reward_model.name_or_path, cfg.reward_path),
                              ("ppo", cfg.ppo_model.name_or_path, cfg.ppo_run_path)):
        if not given:
            require_complete(path, stage=name, how_to_build=f"accelerate launch launch/{name}.py run_dir={cfg.run_dir}")
    sft_cfg = dataclasses.replace(cfg.sft_model, name_or_path=cfg.sft_path)
    ppo_cfg = dataclasses.replace(cfg.ppo_model, name_or_path=cfg.ppo_path)
    reward_cfg = dataclasses.replace(cfg.reward_model, name_or_path=cfg.reward_path)
    for key, model_cfg in (("sft_model", sft_cfg), ("ppo_model", ppo_cfg), ("reward_model", reward_cfg)):
        check_model_source(model_cfg, key=f"{key}.name_or_path")
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
        sft = load_causal_lm(sft_cfg).to(device).eval()
        ppo = load_causal_lm(ppo_cfg).to(device).eval()
        reward_tokenizer = load_tokenizer(reward_cfg)
        reward = load_sequence_scorer(reward_cfg, pad_token_id=reward_tokenizer.pad_token_id).to(device).eval()
        scorer = RewardScorer(reward, reward_tokenizer, policy_contract=contract,
                              is_encoder=is_encoder(cfg.reward_path), batch_size=cfg.batch_size)

        def reference(ids: torch.Tensor, mask: torch.Tensor, r: int) -> torch.Tensor:
            return policy_forward(sft, ids, mask, r, temperature=temperature)[0]

        # 3. The same prompts and random streams for both policies.
        indices = list(range(state.process_index, len(texts), state.num_processes))
        results = {}
        # oneDNN's packed linears (CPU, float32): the weights stay frozen for the whole evaluation.
        with contextlib.ExitStack() as packing:
            for model, model_cfg in ((sft, cfg.sft_model), (ppo, cfg.ppo_model), (reward, cfg.reward_model)):
                packing.enter_context(packed_linears(model, enabled=onednn_linears(state, model_cfg)))
            for name, policy in (("sft", sft), ("ppo", ppo)):
                records = evaluate_policy(policy, reference, scorer, prompts, indices, settings, seed=cfg.seed,
                                          device=device, batch_size=cfg.batch_size, gold_judge=use_gold,
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
    """What eval.json holds: each policy's summary, PPO's win rates over the SFT policy under the reward model (and
    the gold judge), and PPO's KL to the reference."""
    report: dict[str, Any] = {"num_prompts": num_prompts, "settings": settings,
                              "sft": summarise_records(results["sft"], prefix=""),
                              "ppo": summarise_records(results["ppo"], prefix="")}
    report["win_rate_reward_model"] = win_rate([r["score"] for r in results["ppo"]],
                                               [r["score"] for r in results["sft"]])
    if use_gold:
        report["win_rate_gold"] = win_rate([r["gold_combined"] for r in results["ppo"]],
                                           [r["gold_combined"] for r in results["sft"]])
    report["kl_ppo_to_reference"] = report["ppo"]["kl"]
    return report


def record_comparison(cfg: EvaluateConfig, stage: Any, report: dict[str, Any], results: dict[str, list[dict[str, Any]]],
                      *, is_main_process: bool) -> dict[str, float]:
    """Log the comparison's metrics and sample table, write eval.json (main process); returns the metrics."""
    metrics = {f"eval/{policy}/{k}": v for policy in ("sft", "ppo") for k, v in report[policy].items()}
    metrics.update({f"eval/{k}": v for k, v in report.items() if isinstance(v, float)})
    stage.tracker.log(metrics, step=0)
    if cfg.samples:
        columns = ["prompt", "sft_response", "sft_score", "ppo_response", "ppo_score"]
        rows = [[str(s["prompt"]), s["response"], s["score"], p["response"], p["score"]]
                for s, p in zip(results["sft"][: cfg.samples], results["ppo"][: cfg.samples])]
        stage.tracker.log_table("eval_samples", columns, rows, step=0)
    if is_main_process:
        write_json_atomic(stage.output_dir / EVAL_FILE, report)
        logger.info("evaluate: PPO wins %.3f of prompts under the reward model%s; KL to the reference %.3f",
                    report["win_rate_reward_model"],
                    f" and {report['win_rate_gold']:.3f} under the gold judge" if "win_rate_gold" in report else "",
                    report["kl_ppo_to_reference"])
    return metrics
