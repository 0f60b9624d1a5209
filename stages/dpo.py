"""Direct preference optimisation (TRL ``DPOTrainer``) of the SFT policy on the preference pairs, no reward model.

The pairs are read and validated as the reward stage reads them (every layout it accepts) and tokenised by the
shared text contract: the prompt as PPO samples from it, each response through its stop token, so the policy learns
on exactly the sequences it generates. The reference is the starting policy: with LoRA the policy with its adapters
disabled (no copy loaded), otherwise one frozen copy loaded from the same directory. ``loss_type`` picks the
preference loss (`rlhf.config.DPO_LOSSES`); ``simpo`` is reference-free and trains through TRL's experimental
``CPOTrainer`` on the same token ids, with no reference at all. The output is a causal LM like the SFT output, so the
evaluation stage (and PPO, as its starting policy) can read it.

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
from rlhf.trl_bridge import (TOKENIZED_PAIRS, experimental_cpo, pack_linears, tokenized_cpo_trainer,
                             tokenized_preference_trainer, train_resumable, trainer_kwargs)

Config = DPOConfig
logger = logging.getLogger(__name__)

#: TRL's held-out pair metrics (``eval_<name>``) that the manifest keeps, by our name.
HELD_OUT = {"loss": "loss", "accuracy": "rewards/accuracies", "margin": "rewards/margins",
            "reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected"}
#: The preference losses that compare the policy with no reference (TRL ``CPOTrainer``); none is loaded for them.
REFERENCE_FREE = ("simpo",)
#: How the log line names each kind of reference (`reference_model`).
REFERENCE_LOG = {"none": "none (reference-free loss)", "adapters disabled": "policy with adapters disabled",
                 "copy": "frozen copy"}


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
    """Our config as TRL's ``DPOConfig``, or for a reference-free loss as its ``CPOConfig`` (`cpo_args`)."""
    from trl import DPOConfig as TRLDPOConfig

    if cfg.loss_type in REFERENCE_FREE:
        return cpo_args(cfg, output_dir, num_processes, has_eval)

    return TRLDPOConfig(
        **trainer_kwargs(cfg, output_dir=output_dir, num_processes=num_processes, has_eval=has_eval),
        loss_type=[cfg.loss_type, "sft"] if cfg.sft_loss_weight else [cfg.loss_type],
        loss_weights=[1.0, cfg.sft_loss_weight] if cfg.sft_loss_weight else None,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        **TOKENIZED_PAIRS,
    )


def cpo_args(cfg: DPOConfig, output_dir: Path, num_processes: int, has_eval: bool) -> Any:
    """Our simpo config as TRL's ``CPOConfig``: SimPO's loss (length-normalised log-probs, margin ``simpo_gamma``)
    with ``sft_loss_weight`` as CPO's behaviour-cloning weight ``cpo_alpha`` (the chosen responses' token-mean NLL;
    0, the default, is pure SimPO). ``max_length`` is only what CPOTrainer would cut text at: our rows are ids, never
    cut (rows longer than data.max_length were rejected)."""
    return experimental_cpo().CPOConfig(
        **trainer_kwargs(cfg, output_dir=output_dir, num_processes=num_processes, has_eval=has_eval),
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        simpo_gamma=cfg.simpo_gamma,
        cpo_alpha=cfg.sft_loss_weight,
        label_smoothing=cfg.label_smoothing,
        **{**TOKENIZED_PAIRS, "max_length": cfg.data.max_length},
    )


def reference_model(cfg: DPOConfig, model_cfg: ModelConfig) -> tuple[Any, str]:
    """The reference and how the manifest names it: none for a reference-free loss; with LoRA none to load (the
    policy with its adapters disabled); otherwise a frozen copy of the starting policy."""
    if cfg.loss_type in REFERENCE_FREE:
        return None, "none"
    if cfg.peft.method == "lora":
        return None, "adapters disabled"
    return frozen_copy(model_cfg), "copy"


def preference_trainer(cfg: DPOConfig, policy: Any, reference: Any, **kwargs: Any) -> Any:
    """The trainer on our token ids: TRL's ``DPOTrainer`` with ``reference`` (None: the policy with its adapters
    disabled), or for a reference-free loss its ``CPOTrainer``, which takes none. ``kwargs`` go to either."""
    if cfg.loss_type in REFERENCE_FREE:
        return tokenized_cpo_trainer()(model=policy, **kwargs)
    return tokenized_preference_trainer()(model=policy, ref_model=reference, **kwargs)


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
        # 2. The policy with its tuning method, and the reference (none to load with LoRA or a reference-free loss).
        policy = apply_peft(load_causal_lm(model_cfg), cfg.peft, task="causal_lm")
        reference, reference_kind = reference_model(cfg, model_cfg)
        trainable, total = count_parameters(policy)
        logger.info("dpo: %s loss, beta %g, %s tuning, %d of %d parameters train; reference: %s", cfg.loss_type,
                    cfg.beta, cfg.peft.method, trainable, total, REFERENCE_LOG[reference_kind])

        # 3. Train.
        trainer = preference_trainer(
            cfg, policy, reference,
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
            metrics.update(held_out_metrics(trainer.evaluate(), cfg.beta,
                                            reference_free=cfg.loss_type in REFERENCE_FREE))
        saved = None
        if state.is_main_process:
            saved = save_model(trainer.model, tokenizer, stage.output_dir, cfg.peft)
        state.wait_for_everyone()
        return stage.complete(metrics, extra={
            "data": data.stats, "saved_as": saved, "num_processes": state.num_processes,
            "peft_method": cfg.peft.method, "loss_type": cfg.loss_type, "beta": cfg.beta,
            "sft_loss_weight": cfg.sft_loss_weight, "reference": reference_kind,
            **({"simpo_gamma": cfg.simpo_gamma} if cfg.loss_type == "simpo" else {}),
        })


def frozen_copy(model_cfg: ModelConfig) -> Any:
    """The reference for full or partial tuning: the starting policy loaded once more, in eval mode, with no
    parameter that trains."""
    return frozen(load_causal_lm(model_cfg))


def held_out_metrics(evaluation: dict[str, float], beta: float, *, reference_free: bool = False) -> dict[str, float]:
    """The held-out pairs' DPO loss, preference accuracy and margin of the implicit reward (beta x log-ratio to the
    reference), its chosen and rejected means, and the chosen responses' mean log-ratio (nats): how far the policy
    moved on the data, the implicit KL term.

    ``reference_free`` (simpo): the reward is beta x the mean token log-prob (SimPO's), so there is no log-ratio
    and no implicit KL; ``eval/logp_chosen`` is the chosen responses' mean token log-prob (nats) instead."""
    out = {f"eval/{ours}": float(evaluation[f"eval_{theirs}"]) for ours, theirs in HELD_OUT.items()
           if f"eval_{theirs}" in evaluation}
    if reference_free:
        if "eval_logps/chosen" in evaluation:
            out["eval/logp_chosen"] = float(evaluation["eval_logps/chosen"])
    elif "eval/reward_chosen" in out:
        out["eval/logratio_chosen"] = out["eval/reward_chosen"] / beta
    return out
