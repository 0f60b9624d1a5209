"""The one place where our stage configs become TRL/transformers training arguments.

An upstream rename breaks here and nowhere else. Everything the Trainer would log goes through our tracker
(``report_to=[]`` plus :class:`rlhf.tracking.TrackerCallback`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.checkpoint import checkpoints_dir
from rlhf.errors import is_storage_failure, storage_error
from rlhf.runtime import distributed_state, fused_adamw, onednn_linears
from rlhf.signals import FAULT_ENV, StageInterrupted, fault_point

logger = logging.getLogger(__name__)


def trainer_kwargs(cfg: Any, *, output_dir: Path, num_processes: int, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments shared by TRL's ``SFTConfig`` and ``RewardConfig`` for a stage config with ``train``,
    ``optim``, ``model``, ``logging`` and ``checkpoint`` sections."""
    train, optim = cfg.train, cfg.optim
    state = distributed_state()
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
        # Lengths come from a "length" column when the stage adds one, else from input_ids.
        "train_sampling_strategy": "group_by_length" if train.group_by_length else "random",
        # Without an accelerator the Trainer must be told, or it refuses bf16 instead of using the CPU's.
        "use_cpu": torch.accelerator.current_accelerator() is None,
        "save_only_model": False,
        "optim": "adamw_torch_fused" if fused_adamw(state, state.device.type) else "adamw_torch",
    }


#: TRL preference-trainer arguments for rows that are token ids already, validated up front: no length cut (rows
#: longer than data.max_length were rejected with their file and row; TRL would drop or truncate them silently), no
#: dropout, no dataset workers, and every column kept (the collator reads the ids, train.group_by_length "length").
TOKENIZED_PAIRS = {"max_length": None, "disable_dropout": True, "dataset_num_proc": None,
                   "remove_unused_columns": False}


class StepSortedSampler(torch.utils.data.Sampler[int]):
    """The Trainer's random order with the examples of each optimiser step sorted by length, longest first.

    The order is accelerate's seedable random order (a permutation seeded with ``seed + epoch``, the same on every
    process), so each step trains on exactly the examples it would without sorting; only how that set is cut into
    equal-sized micro-batches changes. A loss averaged over the step therefore has the same gradient up to rounding,
    while each micro-batch pads to similar lengths. ``step_size`` is what one optimiser step consumes from the sampler:
    micro-batch x accumulation steps x processes (accelerate deals consecutive micro-batches to the processes in turn).
    Longest first, so a step's peak memory shows in its first micro-batch.
    """

    def __init__(self, lengths: Sequence[int], step_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.step_size = step_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.step_size):
            yield from sorted(order[start : start + self.step_size], key=lambda i: -self.lengths[i])
        self.epoch += 1


def step_sort_size(args: Any) -> int | None:
    """How many examples one optimiser step draws from the sampler (micro-batch x accumulation steps x processes)
    when the Trainer arguments ``args`` leave :class:`StepSortedSampler` something to do: random sampling in
    accelerate's seeded order, and more than one micro-batch per step. None otherwise."""
    step_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    if args.train_sampling_strategy != "random" or step_size == args.per_device_train_batch_size:
        return None
    if not args.accelerator_config.use_seedable_sampler:
        return None  # the unsorted order would not be the seeded one this sampler reproduces
    return step_size


def example_lengths(dataset: Any) -> list[int]:
    """Each example's length: the dataset's "length" column, else the length of its ``input_ids``."""
    if "length" in dataset.column_names:
        return list(dataset["length"])
    return [len(ids) for ids in dataset["input_ids"]]


@functools.cache
def trainer_class(base: type) -> type:
    """``base`` (a TRL/transformers Trainer class) with the stages' two hooks, as overrides in a subclass.

    - ``sort_micro_batches=True`` (a constructor keyword) draws the training examples through
      :class:`StepSortedSampler` where `step_sort_size` allows it, instead of the Trainer's random sampler.
    - The ``RLHF_FAULT`` point ``checkpoint_write`` (`rlhf.signals.fault_point`) fires once the weights of a
      checkpoint are written and before its optimiser and state are.

    Both override methods the Trainer calls on itself: ``_get_train_sampler(train_dataset)`` and
    ``save_model(output_dir, _internal_call=True)`` from ``_save_checkpoint``. They are not public API;
    ``tests/unit/test_trl_bridge.py`` fails with the name of the one that moved.
    """

    class StageTrainer(base):
        def __init__(self, *args: Any, sort_micro_batches: bool = False, **kwargs: Any) -> None:
            self.sort_micro_batches = sort_micro_batches
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            step_size = step_sort_size(self.args) if self.sort_micro_batches else None
            if step_size is None:
                return super()._get_train_sampler(train_dataset)
            dataset = self.train_dataset if train_dataset is None else train_dataset
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return StepSortedSampler(example_lengths(dataset), step_size, seed)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call=_internal_call)
            if _internal_call:  # a checkpoint's weights, written by the Trainer itself
                fault_point("checkpoint_write", self.state.global_step)

    StageTrainer.__name__ = StageTrainer.__qualname__ = f"Stage{base.__name__}"
    return StageTrainer


#: The columns of a preference example already in token ids (`tokenized_preference_trainer`).
PREFERENCE_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@functools.cache
def tokenized_preference_trainer() -> type:
    """TRL's ``DPOTrainer`` with the stages' hooks (`trainer_class`) that trains on the token ids it is given.

    DPOTrainer tokenises text rows itself (prompt + response as one string, an EOS appended when missing, the prompt
    cut where the two tokenisations diverge). Our rows are token ids already, made by the text contract as for SFT,
    the reward model and PPO (``prompt_ids``, and ``chosen_ids`` / ``rejected_ids`` each through its stop token), so
    the override of ``_prepare_dataset(dataset, processing_class, args, dataset_name)`` checks the columns and
    returns them as they are. Not public API; ``tests/unit/test_trl_bridge.py`` fails if it changes signature."""
    from trl import DPOTrainer

    class StageDPOTrainer(trainer_class(DPOTrainer)):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            _require_pair_columns(dataset.column_names, dataset_name)
            return dataset

    return StageDPOTrainer


def _require_pair_columns(columns: Sequence[str], dataset_name: str) -> None:
    missing = [c for c in PREFERENCE_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"the {dataset_name} preference rows lack {', '.join(missing)}: they must be token ids by "
                         "the text contract (stages.dpo.encode_pair)")


#: The columns of one pair that TRL's ``CPOTrainer`` pads (``DPODataCollatorWithPadding``) and its forward reads.
CPO_COLUMNS = ("prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask",
               "chosen_labels", "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
#: The label of a position outside the loss (the prompt's, and padding), as TRL's preference trainers read it.
IGNORED_LABEL = -100


def cpo_columns(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> dict[str, list]:
    """A pair in token ids as `CPO_COLUMNS`: each side is prompt + response with a full attention mask, and labels
    that are the sequence's ids with the prompt's positions set to `IGNORED_LABEL`, so that only (and every one of)
    the response's tokens, its stop token included, enters the log-probs. The ids are used as given."""
    prompt = list(prompt_ids)
    out: dict[str, list] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side, response in (("chosen", list(chosen_ids)), ("rejected", list(rejected_ids))):
        out[f"{side}_input_ids"] = prompt + response
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(response))
        out[f"{side}_labels"] = [IGNORED_LABEL] * len(prompt) + response
    return out


def _column_collator(pad_token_id: int) -> Any:
    """TRL's ``DPODataCollatorWithPadding`` on `CPO_COLUMNS` alone (our source columns and ``length`` stay out of
    the batch)."""
    from trl.experimental.utils import DPODataCollatorWithPadding

    pad = DPODataCollatorWithPadding(pad_token_id=pad_token_id)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        return pad([{k: feature[k] for k in CPO_COLUMNS} for feature in features])

    return collate


def experimental_cpo() -> Any:
    """TRL's ``trl.experimental.cpo`` module (``CPOTrainer``, ``CPOConfig``), imported without the warning that the
    API is experimental: we know, and pin what we use in ``tests/stages/test_dpo.py``."""
    import importlib
    import warnings

    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        return importlib.import_module("trl.experimental.cpo")


@functools.cache
def tokenized_cpo_trainer() -> type:
    """TRL's experimental ``CPOTrainer`` (here for ``loss_type="simpo"``: no reference model) with the stages' hooks
    (`trainer_class`) that trains on the token ids it is given, as `tokenized_preference_trainer` does for DPO.

    CPOTrainer maps every row through ``tokenize_row(feature, model=None)`` in its constructor (text re-tokenised
    as prompt + answer, a BOS and an EOS added when missing, cut at ``max_length``). The override builds the
    columns from our ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` instead (`cpo_columns`), with no second
    tokenisation; the default collator pads just those columns. Not public API; ``tests/stages/test_dpo.py``
    fails if the method or the columns its forward reads change."""
    CPOTrainer = experimental_cpo().CPOTrainer

    class StageCPOTrainer(trainer_class(CPOTrainer)):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            tokenizer = kwargs.get("processing_class")
            if kwargs.get("data_collator") is None and tokenizer is not None:
                kwargs["data_collator"] = _column_collator(tokenizer.pad_token_id)
            super().__init__(*args, **kwargs)

        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, list]:
            _require_pair_columns(list(feature), "training or evaluation")
            return cpo_columns(feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"])

    return StageCPOTrainer


def pack_linears(trainer: Any, model: Any) -> bool:
    """Have a TRL/transformers ``trainer`` run its model's linear layers through oneDNN, packed once per optimiser
    step (`rlhf.onednn.packed_linears_callback`), when the stage's model config ``model`` asks for it and the
    trainer's accelerator allows it (`rlhf.runtime.onednn_linears`). Returns whether it did."""
    from rlhf.onednn import packed_linears_callback

    if not onednn_linears(trainer.accelerator, model):
        return False
    trainer.add_callback(packed_linears_callback(trainer.model))
    return True


def last_trainer_checkpoint(output_dir: Path) -> str | None:
    """The newest complete ``checkpoints/checkpoint-N`` the Trainer wrote, or None. The Trainer writes a checkpoint
    in place, ``trainer_state.json`` last; one without a readable state was cut short and does not count."""
    complete = [step for step, path in _trainer_checkpoints(output_dir) if _trainer_state_step(path) == step]
    return str(checkpoints_dir(output_dir) / f"{TRAINER_PREFIX}-{max(complete)}") if complete else None


TRAINER_PREFIX = "checkpoint"


def _trainer_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        prefix, _, step = path.name.partition("-")
        if prefix == TRAINER_PREFIX and step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return sorted(found)


def _trainer_state_step(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def drop_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Remove the Trainer checkpoints newer than the last complete one (a run killed while writing leaves one
    behind; the Trainer would take it for the newest and fail to load it, or rotate the good one away)."""
    newest = last_trainer_checkpoint(output_dir)
    newest_step = int(Path(newest).name.partition("-")[2]) if newest else -1
    dropped = [path for step, path in _trainer_checkpoints(output_dir) if step > newest_step]
    for path in dropped:
        logger.warning("removing %s: it was cut short while being written", path)
        shutil.rmtree(path, ignore_errors=True)
    return dropped


def _after_checkpoint_fault() -> Any:
    """A callback for the ``RLHF_FAULT`` point ``after_checkpoint``: once a checkpoint is complete."""
    from transformers import TrainerCallback

    class AfterCheckpoint(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            fault_point("after_checkpoint", state.global_step)

    return AfterCheckpoint()


def train_resumable(trainer: Any, *, stage: str, output_dir: Path, resume: bool, stop: Any) -> tuple[Any, float]:
    """Run ``trainer.train`` (from the newest checkpoint when ``resume``), and turn a stop request into
    :class:`rlhf.signals.StageInterrupted` once the Trainer has saved its checkpoint. Returns the train output and
    the training time in seconds."""
    if os.environ.get(FAULT_ENV):
        trainer.add_callback(_after_checkpoint_fault())
    checkpoint = None
    if resume:
        drop_incomplete_checkpoints(output_dir)
        checkpoint = last_trainer_checkpoint(output_dir)
    if checkpoint:
        logger.info("%s: resuming from %s", stage, checkpoint)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except (OSError, RuntimeError) as exc:
        if is_storage_failure(exc):
            raise storage_error(getattr(exc, "filename", None) or checkpoints_dir(output_dir), exc) from exc
        raise
    if stop.requested:
        raise StageInterrupted(
            f"{stage} stopped by a signal at step {trainer.state.global_step}; the checkpoint is in "
            f"{last_trainer_checkpoint(output_dir)}. Rerun with checkpoint.resume=true to continue"
        )
    return result, time.perf_counter() - started
