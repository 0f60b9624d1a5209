"""The one place where our stage configs become TRL/transformers training arguments.

An upstream rename breaks here and nowhere else. Everything the Trainer would log goes through our tracker
(``report_to=[]`` plus :class:`rlhf.tracking.TrackerCallback`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from rlhf.checkpoint import checkpoints_dir
from rlhf.signals import StageInterrupted

logger = logging.getLogger(__name__)


def trainer_kwargs(cfg: Any, *, output_dir: Path, num_processes: int, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by TRL's ``SFTConfig`` and ``RewardConfig`` for a stage config with ``train``,
    ``optim``, ``model``, ``logging`` and ``checkpoint`` sections."""
    train, optim = cfg.train, cfg.optim
    return {
        "output_dir": str(checkpoints_dir(output_dir)),
        "per_device_train_batch_size": train.micro_batch_size,
        "per_device_eval_batch_size": train.micro_batch_size,
        "gradient_accumulation_steps": train.accumulation_steps(num_processes),
        "num_train_epochs": train.num_epochs,
        "max_steps": train.max_steps or -1,
        "learning_rate": optim.learning_rate,
        "weight_decay": optim.weight_decay,
        "adam_beta1": optim.adam_beta1,
        "adam_beta2": optim.adam_beta2,
        "adam_epsilon": optim.adam_epsilon,
        "lr_scheduler_type": optim.lr_scheduler,
        # A float below 1 is a fraction of the total steps for transformers 5.
        "warmup_steps": float(optim.warmup_ratio) if optim.warmup_ratio < 1 else 0,
        "max_grad_norm": optim.max_grad_norm,  # 0 disables clipping in the Trainer too
        "logging_steps": cfg.logging.log_every,
        "logging_first_step": True,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": train.eval_every,
        "save_strategy": "steps" if cfg.checkpoint.save_every else "no",
        "save_steps": cfg.checkpoint.save_every or 500,
        "save_total_limit": cfg.checkpoint.keep_last,
        "report_to": [],
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "full_determinism": cfg.full_determinism,
        "bf16": cfg.model.dtype == "bfloat16",
        "fp16": cfg.model.dtype == "float16",
        "activation_checkpointing": cfg.model.gradient_checkpointing,
        "dataloader_num_workers": 0,
        # Without an accelerator the Trainer must be told, or it refuses bf16 instead of using the CPU's.
        "use_cpu": torch.accelerator.current_accelerator() is None,
        "save_only_model": False,
    }


def last_trainer_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoints/checkpoint-N`` the Trainer wrote, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    root = checkpoints_dir(output_dir)
    return get_last_checkpoint(str(root)) if root.is_dir() else None


def train_resumable(trainer: Any, *, stage: str, output_dir: Path, resume: bool, stop: Any) -> tuple[Any, float]:
    """Run ``trainer.train`` (from the newest checkpoint when ``resume``), and turn a stop request into
    :class:`rlhf.signals.StageInterrupted` once the Trainer has saved its checkpoint. Returns the train output and
    the training time in seconds."""
    checkpoint = last_trainer_checkpoint(output_dir) if resume else None
    if checkpoint:
        logger.info("%s: resuming from %s", stage, checkpoint)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stop.requested:
        raise StageInterrupted(
            f"{stage} stopped by a signal at step {trainer.state.global_step}; the checkpoint is in "
            f"{last_trainer_checkpoint(output_dir)}. Rerun with checkpoint.resume=true to continue"
        )
    return result, time.perf_counter() - started
