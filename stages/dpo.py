"""Direct preference optimisation (TRL ``DPOTrainer``) of the SFT policy on the preference pairs, no reward model.

The pairs are read and validated as the reward stage reads them (every layout it accepts) and tokenised by the
shared text contract: the prompt as PPO samples from it, each response through its stop token, so the policy learns
on exactly the sequences it generates. The reference is the starting policy: with LoRA the policy with its adapters
disabled (no copy loaded), otherwise one frozen copy loaded from the same directory. ``loss_type`` picks the
preference loss (`rlhf.config.DPO_LOSSES`). The output is a causal LM like the SFT output, so the evaluation stage
(and PPO, as its starting policy) can read it.

    accelerate launch launch/dpo.py [--config configs/dpo/demo.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from rlhf.checkpoint import require_upstream
from rlhf.config import DPOConfig, ModelConfig
from rlhf.data import prepare_stage_data, to_hf_dataset
from rlhf.models import (apply_peft, check_model_source, count_parameters, frozen, load_causal_lm, load_tokenizer,
                         save_model)
from rlhf.runtime import StageRun, distributed_state
from rlhf.signals import StopRequest, trainer_stop_callback
from rlhf.text import TextContract
from rlhf.trl_bridge import (TOKENIZED_PAIRS, pack_linears, tokenized_preference_trainer, train_resumable,
                             trainer_kwargs)

Config = DPOConfig
logger = logging.getLogger(__name__)

#: TRL's held-out pair metrics (``eval_<name>``) that the manifest keeps, by our name.
HELD_OUT = {"loss": "loss", "accuracy": "rewards/accuracies", "margin": "rewards/margins",
            "reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected"}


def policy_model_config(cfg: DPOConfig) -> ModelConfig:
    return dataclasses.replace(cfg.model, name_or_path=cfg.policy_path)


def encode_pair(contract: TextContract, row: dict[str, Any]) -> dict[str, Any]:
    """A preference row (normalised by `rlhf.data`) as token ids by the text contract: ``prompt_ids``, and
    ``chosen_ids`` / ``rejected_ids`` ending with their stop token; ``length`` (the longer sequence) for
    ``train.group_by_length``."""
    if isinstance(row["prompt"], list):
        contract.ensure_chat_template()
    prompt = contract.prompt_ids(row["prompt"])
    chosen = contract.response_ids(row["prompt"], row["chosen"])
    rejected = contract.response_ids(row["prompt"], row["rejected"])
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "length": len(prompt) + max(len(chosen), len(rejected))}


def trl_args(cfg: DPOConfig, output_dir: Path, num_processes: int, has_eval: bool) -> Any:
    """Our config as TRL's ``DPOConfig``."""
    from trl import DPOConfig as TRLDPOConfig

    return TRLDPOConfig(
        **trainer_kwargs(cfg, output_dir=output_dir, num_processes=num_processes, has_eval=has_eval),
        loss_type=[cfg.loss_type, "sft"] if cfg.sft_loss_weight else [cfg.loss_type],
        loss_weights=[1.0, cfg.sft_loss_weight] if cfg.sft_loss_weight else None,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        **TOKENIZED_PAIRS,
    )


def run(cfg: DPOConfig) -> Path:
    from rlhf.tracking import TrackerCallback

    state = distributed_state()
    # 1. Inputs, checked before any weights load.
    model_cfg = policy_model_config(cfg)
    if not cfg.model.name_or_path:
        require_upstream(cfg.policy_path, stage="sft", run_dir=cfg.run_dir)
    check_model_source(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    contract = TextContract.from_tokenizer(tokenizer)
    data = prepare_stage_data(cfg, "preference", token_length=lambda row: encode_pair(contract, row)["length"])
    train_pairs = [encode_pair(contract, row) for row in data.train]
    eval_pairs = [encode_pair(contract, row) for row in data.eval]

    with StageRun(cfg, rank=state.process_index, is_main_process=state.is_main_process) as stage, \
            StopRequest() as stop:
        # 2. The policy with its tuning method, and the reference (none to load with LoRA).
        policy = apply_peft(load_causal_lm(model_cfg), cfg.peft, task="causal_lm")
        reference = None if cfg.peft.method == "lora" else frozen_copy(model_cfg)
        trainable, total = count_parameters(policy)
        logger.info("dpo: %s loss, beta %g, %s tuning, %d of %d parameters train; reference: %s", cfg.loss_type,
                    cfg.beta, cfg.peft.method, trainable, total,
                    "policy with adapters disabled" if reference is None else "frozen copy")

        # 3. Train.
        trainer = tokenized_preference_trainer()(
            model=policy,
            ref_model=reference,
            args=trl_args(cfg, stage.output_dir, state.num_processes, bool(eval_pairs)),
            train_dataset=to_hf_dataset(train_pairs),
            eval_dataset=to_hf_dataset(eval_pairs) if eval_pairs else None,
            processing_class=tokenizer,
            callbacks=[TrackerCallback(stage.tracker), trainer_stop_callback(stop)],
            sort_micro_batches=cfg.train.sort_micro_batches,
        )
        pack_linears(trainer, cfg.model)
        result, train_s = train_resumable(trainer, stage="dpo", output_dir=stage.output_dir,
                                          resume=cfg.checkpoint.resume, stop=stop)

        # 4. Held-out pair metrics, then the policy and the manifest.
        metrics: dict[str, Any] = {"train/loss": result.training_loss, "train/steps": trainer.state.global_step,
                                   "time/train_s": train_s, "trainable_parameters": trainable,
                                   "total_parameters": total}
        if eval_pairs:
            metrics.update(held_out_metrics(trainer.evaluate(), cfg.beta))
        saved = None
        if state.is_main_process:
            saved = save_model(trainer.model, tokenizer, stage.output_dir, cfg.peft)
        state.wait_for_everyone()
        return stage.complete(metrics, extra={
            "data": data.stats, "saved_as": saved, "num_processes": state.num_processes,
            "peft_method": cfg.peft.method, "loss_type": cfg.loss_type, "beta": cfg.beta,
            "sft_loss_weight": cfg.sft_loss_weight,
            "reference": "adapters disabled" if reference is None else "copy",
        })


def frozen_copy(model_cfg: ModelConfig) -> Any:
    """The reference for full or partial tuning: the starting policy loaded once more, in eval mode, with no
    parameter that trains."""
    return frozen(load_causal_lm(model_cfg))


def held_out_metrics(evaluation: dict[str, float], beta: float) -> dict[str, float]:
    """The held-out pairs' DPO loss, preference accuracy and margin of the implicit reward (beta x log-ratio to the
    reference), its chosen and rejected means, and the chosen responses' mean log-ratio (nats): how far the policy
    moved on the data, the implicit KL term."""
    out = {f"eval/{ours}": float(evaluation[f"eval_{theirs}"]) for ours, theirs in HELD_OUT.items()
           if f"eval_{theirs}" in evaluation}
    if "eval/reward_chosen" in out:
        out["eval/logratio_chosen"] = out["eval/reward_chosen"] / beta
    return out
