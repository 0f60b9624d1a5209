"""Supervised fine-tuning (TRL ``SFTTrainer``) on prompt/completion or conversational data.

Sequences are built by the text contract (``rlhf.text``), so SFT, the reward model and PPO tokenise prompts and
responses the same way; the loss covers completions / assistant turns only by default, their stop token included
(so the model learns to stop). Full fine-tuning, LoRA (saved merged by default), prefix tuning (saved as an
adapter) or partial tuning of the top blocks.

    accelerate launch launch/sft.py [--config configs/sft/demo.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from rlhf.config import SFTConfig
from rlhf.data import prepare_stage_data, to_hf_dataset
from rlhf.models import apply_peft, check_model_source, count_parameters, load_causal_lm, load_tokenizer, save_model
from rlhf.runtime import StageRun, distributed_state
from rlhf.signals import StopRequest, trainer_stop_callback
from rlhf.text import TextContract
from rlhf.trl_bridge import pack_linears, train_resumable, trainer_class, trainer_kwargs

Config = SFTConfig
logger = logging.getLogger(__name__)


def encode_example(contract: TextContract, row: dict[str, Any]) -> dict[str, list[int]]:
    """``input_ids`` and ``completion_mask`` (1 on the tokens the loss covers) of one normalised SFT row.
    Conversational rows give a tokenizer without a chat template the default one."""
    if "messages" in row or isinstance(row.get("prompt"), list):
        contract.ensure_chat_template()
    if "messages" in row:
        ids, mask = contract.conversation(row["messages"])
    else:
        ids, mask = contract.sequence(row["prompt"], row["completion"])
    return {"input_ids": ids, "completion_mask": mask}


def trl_args(cfg: SFTConfig, output_dir: Path, num_processes: int, has_eval: bool) -> Any:
    """Our config as TRL's ``SFTConfig``."""
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(
        **trainer_kwargs(cfg, output_dir=output_dir, num_processes=num_processes, has_eval=has_eval),
        completion_only_loss=cfg.completion_only_loss,
        packing=cfg.packing,
        # Rows are validated against data.max_length before training and never truncated; packing needs the length.
        max_length=cfg.data.max_length if cfg.packing else None,
        dataset_num_proc=None,
    )


def run(cfg: SFTConfig) -> Path:
    from trl import SFTTrainer

    from rlhf.tracking import TrackerCallback

    state = distributed_state()
    # 1. Inputs: the model path, the tokenizer and every data row, checked before any weights load.
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    contract = TextContract.from_tokenizer(tokenizer)
    had_template = bool(getattr(tokenizer, "chat_template", None))
    data = prepare_stage_data(cfg, "sft", token_length=lambda row: len(encode_example(contract, row)["input_ids"]))
    train_set = to_hf_dataset([encode_example(contract, row) for row in data.train])
    eval_set = to_hf_dataset([encode_example(contract, row) for row in data.eval]) if data.eval else None
    added_template = not had_template and bool(tokenizer.chat_template)

    with StageRun(cfg, rank=state.process_index, is_main_process=state.is_main_process) as stage, \
            StopRequest() as stop:
        # 2. Model and tuning method.
        model = apply_peft(load_causal_lm(cfg.model), cfg.peft, task="causal_lm")
        trainable, total = count_parameters(model)
        logger.info("sft: %s tuning, %d of %d parameters train", cfg.peft.method, trainable, total)

        # 3. Train with TRL, logging through our tracker, stopping cleanly on SIGTERM.
        trainer = trainer_class(SFTTrainer)(
            model=model,
            args=trl_args(cfg, stage.output_dir, state.num_processes, eval_set is not None),
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            callbacks=[TrackerCallback(stage.tracker), trainer_stop_callback(stop)],
            sort_micro_batches=cfg.train.sort_micro_batches,
        )
        pack_linears(trainer, cfg.model)
        result, train_s = train_resumable(trainer, stage="sft", output_dir=stage.output_dir,
                                          resume=cfg.checkpoint.resume, stop=stop)

        # 4. Held-out evaluation, then the model, the tokenizer (with its template) and the manifest.
        metrics: dict[str, Any] = {"train/loss": result.training_loss, "train/steps": trainer.state.global_step,
                                   "time/train_s": train_s, "trainable_parameters": trainable,
                                   "total_parameters": total}
        if eval_set is not None:
            eval_loss = trainer.evaluate()["eval_loss"]
            metrics.update({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50.0))})
            stage.tracker.log({"eval/loss": eval_loss}, step=trainer.state.global_step)
        saved = None
        if state.is_main_process:
            saved = save_model(trainer.model, tokenizer, stage.output_dir, cfg.peft)
        state.wait_for_everyone()
        return stage.complete(metrics, extra={
            "data": data.stats, "saved_as": saved, "chat_template_added": added_template,
            "num_processes": state.num_processes, "peft_method": cfg.peft.method,
        })

