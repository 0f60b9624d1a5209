"""Reward-model training on preference pairs (TRL ``RewardTrainer``, Bradley-Terry loss).

The backbone is this run's SFT model (a causal LM, scored at the last real token of prompt + response, tokenised by
the shared text contract) or an encoder (BERT-style, scored at its first token). Full, LoRA (the score head trains
too) or partial tuning. The output records the reward's mean and std on chosen responses, so PPO can normalise
scores.

    accelerate launch launch/reward.py [--config configs/reward/demo.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from rlhf.checkpoint import REWARD_STATS_FILE, require_upstream, write_json_atomic
from rlhf.config import ModelConfig, RewardConfig
from rlhf.data import prepare_stage_data, to_hf_dataset
from rlhf.models import (
    apply_peft,
    check_model_source,
    count_parameters,
    is_encoder,
    load_sequence_scorer,
    load_tokenizer,
    save_model,
    score_sequences,
)
from rlhf.runtime import StageRun, distributed_state
from rlhf.signals import StopRequest, trainer_stop_callback
from rlhf.text import RewardText
from rlhf.trl_bridge import TOKENIZED_PAIRS, pack_linears, train_resumable, trainer_class, trainer_kwargs

Config = RewardConfig
logger = logging.getLogger(__name__)



def backbone_model_config(cfg: RewardConfig) -> ModelConfig:
    return dataclasses.replace(cfg.model, name_or_path=cfg.backbone_path)


def encode_pair(text: RewardText, row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"chosen_ids": text.ids(row["prompt"], row["chosen"]),
                           "rejected_ids": text.ids(row["prompt"], row["rejected"])}
    out["length"] = max(len(out["chosen_ids"]), len(out["rejected_ids"]))  # for train.group_by_length
    if "margin" in row:
        out["margin"] = float(row["margin"])
    return out


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    margin = chosen - rejected
    both = torch.cat([chosen, rejected])
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
            "reward_mean": both.mean().item(), "reward_std": both.std().item()}


#: The reward-model report's numbers that are also final metrics (``eval/<name>``).
REPORT_METRICS = ("length_correlation", "expected_calibration_error", "gold_agreement")


def held_out_report(cfg: RewardConfig, text: RewardText, rows: list[dict[str, Any]], chosen: torch.Tensor,
                    rejected: torch.Tensor) -> dict[str, Any]:
    """`rlhf.reward_report.reward_model_report` of the held-out pairs: their scores, their responses' lengths in
    tokens and, with ``gold_judge`` on plain-text pairs, the demo judge's verdicts."""
    from rlhf.reward_report import reward_model_report

    lengths = {side: [text.response_length(row["prompt"], row[side]) for row in rows] for side in ("chosen", "rejected")}
    gold = None
    if cfg.gold_judge and all(isinstance(row["chosen"], str) for row in rows):
        from rlhf.demo.judge import judge

        gold = [tuple(judge(str(row["prompt"]), row[side].strip(), True).combined for side in ("chosen", "rejected"))
                for row in rows]
    return reward_model_report(chosen.tolist(), rejected.tolist(), lengths["chosen"], lengths["rejected"], gold)


def gate(accuracy: float | None, minimum: float) -> dict[str, Any]:
    """What the manifest records for PPO's check (``checks.reward_gate``): whether the held-out pair accuracy
    reached ``reward.min_eval_accuracy`` (``passed`` None without held-out pairs: not measured)."""
    passed = None if accuracy is None else accuracy >= minimum
    if passed is False:
        logger.warning("reward: held-out accuracy %.3f is below reward.min_eval_accuracy=%g; PPO will refuse this "
                       "reward model unless its checks.reward_gate=false", accuracy, minimum)
    return {"min_eval_accuracy": minimum, "eval_accuracy": accuracy, "passed": passed}


def trl_args(cfg: RewardConfig, output_dir: Path, num_processes: int, has_eval: bool) -> Any:
    """Our config as TRL's ``RewardConfig``."""
    from trl import RewardConfig as TRLRewardConfig

    return TRLRewardConfig(
        **trainer_kwargs(cfg, output_dir=output_dir, num_processes=num_processes, has_eval=has_eval),
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        **TOKENIZED_PAIRS,
    )


def run(cfg: RewardConfig) -> Path:
    from trl import RewardTrainer

    from rlhf.tracking import TrackerCallback

    state = distributed_state()
    # 1. Inputs, checked before any weights load.
    model_cfg = backbone_model_config(cfg)
    if not cfg.model.name_or_path:
        # The default backbone is this run's SFT output: it must be complete, and the error says how to build it.
        require_upstream(cfg.backbone_path, stage="sft", run_dir=cfg.run_dir)
    check_model_source(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    encoder = is_encoder(model_cfg.name_or_path)
    text = RewardText.for_model(tokenizer, is_encoder=encoder)
    data = prepare_stage_data(cfg, "preference", token_length=lambda row: max(
        len(text.ids(row["prompt"], row["chosen"])), len(text.ids(row["prompt"], row["rejected"]))))
    train_pairs = [encode_pair(text, row) for row in data.train]
    eval_pairs = [encode_pair(text, row) for row in data.eval]

    with StageRun(cfg, rank=state.process_index, is_main_process=state.is_main_process) as stage, \
            StopRequest() as stop:
        # 2. Backbone with a one-output score head, and the tuning method.
        model = load_sequence_scorer(model_cfg, pad_token_id=tokenizer.pad_token_id)
        if not encoder and tokenizer.pad_token_id in (text.contract.stop_token_ids if text.contract else ()):
            # The head finds the last real token by looking for padding; a pad equal to the stop token would move
            # the score one token to the left. A dedicated pad token keeps it on the stop token.
            tokenizer.add_special_tokens({"pad_token": "<|rlhf_pad|>"})
            model.resize_token_embeddings(len(tokenizer))
            model.config.pad_token_id = tokenizer.pad_token_id
        model = apply_peft(model, cfg.peft, task="score")
        trainable, total = count_parameters(model)
        logger.info("reward: %s backbone, %s tuning, %d of %d parameters train",
                    "encoder" if encoder else "decoder", cfg.peft.method, trainable, total)

        # 3. Train.
        trainer = trainer_class(RewardTrainer)(
            model=model,
            args=trl_args(cfg, stage.output_dir, state.num_processes, bool(eval_pairs)),
            train_dataset=to_hf_dataset(train_pairs),
            eval_dataset=to_hf_dataset(eval_pairs) if eval_pairs else None,
            processing_class=tokenizer,
            callbacks=[TrackerCallback(stage.tracker), trainer_stop_callback(stop)],
            sort_micro_batches=cfg.train.sort_micro_batches,
        )
        pack_linears(trainer, cfg.model)
        result, train_s = train_resumable(trainer, stage="reward", output_dir=stage.output_dir,
                                          resume=cfg.checkpoint.resume, stop=stop)

        # 4. Held-out pair metrics and the normalisation statistics, then the model and the manifest.
        scorer = trainer.model
        pad = tokenizer.pad_token_id
        metrics: dict[str, Any] = {"train/loss": result.training_loss, "train/steps": trainer.state.global_step,
                                   "time/train_s": train_s, "trainable_parameters": trainable}
        report: dict[str, Any] = {}
        if eval_pairs:
            chosen = score_sequences(scorer, [p["chosen_ids"] for p in eval_pairs], pad_token_id=pad)
            rejected = score_sequences(scorer, [p["rejected_ids"] for p in eval_pairs], pad_token_id=pad)
            held_out = pair_metrics(chosen, rejected)
            report = held_out_report(cfg, text, data.eval, chosen, rejected)
            held_out.update({k: report[k] for k in REPORT_METRICS if report.get(k) is not None})
            metrics.update({f"eval/{k}": v for k, v in held_out.items()})
            stage.tracker.log({f"eval/{k}": v for k, v in held_out.items()}, step=trainer.state.global_step)
        reference = [p["chosen_ids"] for p in train_pairs[:2048]]
        chosen_scores = score_sequences(scorer, reference, pad_token_id=pad)
        stats = {"mean": chosen_scores.mean().item(), "std": chosen_scores.std().item(), "num_samples": len(reference),
                 "measured_on": "chosen responses of the training pairs", "backbone": "encoder" if encoder else
                 "decoder"}
        saved = None
        if state.is_main_process:
            saved = save_model(scorer, tokenizer, stage.output_dir, cfg.peft)
            write_json_atomic(stage.output_dir / REWARD_STATS_FILE, stats)
        state.wait_for_everyone()
        return stage.complete(metrics, extra={"data": data.stats, "reward_stats": stats, "saved_as": saved,
                                              "num_processes": state.num_processes, "peft_method": cfg.peft.method,
                                              "gate": gate(metrics.get("eval/accuracy"), cfg.min_eval_accuracy),
                                              "report": report})
