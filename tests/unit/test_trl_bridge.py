"""The stages' Trainer subclass (`rlhf.trl_bridge.trainer_class`) overrides two methods the transformers Trainer calls
on itself without making them public API: ``_get_train_sampler`` and ``save_model(..., _internal_call=True)`` inside
``_save_checkpoint``. These tests fail with the name of the internal that moved."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from rlhf.signals import FAULT_ENV, InjectedFault
from rlhf.trl_bridge import StepSortedSampler, train_resumable, trainer_class

LENGTHS = [3, 9, 1, 7, 4, 12, 2, 8, 5, 11, 6, 10]


def _trainer(tmp_path, *, sort_micro_batches=False, **overrides):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    rows = Dataset.from_dict({"idx": list(range(len(LENGTHS))), "length": LENGTHS})
    args = dict(output_dir=str(tmp_path / "checkpoints"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=3, seed=3, data_seed=3, report_to=[], use_cpu=True, disable_tqdm=True,
                remove_unused_columns=False, save_strategy="no") | overrides

    def collate(batch):  # the row numbers themselves: the order shows in the batches
        return {"idx": torch.tensor([row["idx"] for row in batch])}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(len(LENGTHS)))

        def forward(self, idx):
            return {"loss": self.weight[idx].square().mean()}

    return trainer_class(Trainer)(model=Model(), args=TrainingArguments(**args), train_dataset=rows,
                                  data_collator=collate, sort_micro_batches=sort_micro_batches)


def test_the_trainer_methods_we_override_are_still_there():
    from transformers import Trainer

    sampler = inspect.signature(Trainer._get_train_sampler).parameters
    assert list(sampler) == ["self", "train_dataset"], (
        f"transformers Trainer._get_train_sampler changed its signature to {list(sampler)}: "
        "update rlhf.trl_bridge.trainer_class")
    save = inspect.signature(Trainer.save_model).parameters
    assert list(save) == ["self", "output_dir", "_internal_call"], (
        f"transformers Trainer.save_model changed its signature to {list(save)}: update rlhf.trl_bridge.trainer_class")


def test_the_dpo_trainer_method_we_override_is_still_there():
    from trl import DPOTrainer

    prepare = inspect.signature(DPOTrainer._prepare_dataset).parameters
    assert list(prepare) == ["self", "dataset", "processing_class", "args", "dataset_name"], (
        f"trl DPOTrainer._prepare_dataset changed its signature to {list(prepare)}: update "
        "rlhf.trl_bridge.tokenized_preference_trainer")


def test_the_trainer_draws_its_examples_through_the_step_sorted_sampler(tmp_path):
    trainer = _trainer(tmp_path, sort_micro_batches=True)
    order = [i for batch in trainer.get_train_dataloader() for i in batch["idx"].tolist()]
    expected = list(StepSortedSampler(LENGTHS, 4, seed=3))
    assert order == expected, (
        "the Trainer's dataloader no longer takes its sampler from Trainer._get_train_sampler: "
        "update rlhf.trl_bridge.trainer_class")
    assert all(LENGTHS[a] >= LENGTHS[b] for s in range(0, 12, 4) for a, b in zip(order[s:s + 4], order[s + 1:s + 4]))
    unsorted = [i for batch in _trainer(tmp_path).get_train_dataloader() for i in batch["idx"].tolist()]
    assert unsorted != order
    assert [sorted(unsorted[s:s + 4]) for s in range(0, 12, 4)] == [sorted(order[s:s + 4]) for s in range(0, 12, 4)], (
        "each step no longer trains on the examples the Trainer's own (accelerate's seeded) order gives it")


def test_without_sorting_the_trainer_keeps_its_own_sampler(tmp_path):
    for trainer in (_trainer(tmp_path), _trainer(tmp_path, sort_micro_batches=True, gradient_accumulation_steps=1),
                    _trainer(tmp_path, sort_micro_batches=True, train_sampling_strategy="group_by_length")):
        assert not isinstance(trainer._get_train_sampler(), StepSortedSampler)


@pytest.mark.parametrize("point", ["checkpoint_write", "after_checkpoint"])
def test_fault_points_fire_inside_the_trainers_checkpointing(tmp_path, monkeypatch, point):
    monkeypatch.setenv(FAULT_ENV, f"{point}:2")
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2, max_steps=4)
    try:
        train_resumable(trainer, stage="sft", output_dir=tmp_path, resume=False, stop=SimpleNamespace(requested=False))
    except InjectedFault:
        pass
    else:
        pytest.fail(f"{point} never fired: transformers Trainer._save_checkpoint no longer calls "
                    "save_model(output_dir, _internal_call=True), or the on_save callback moved; update "
                    "rlhf.trl_bridge.trainer_class")
    written = {path.name for path in (tmp_path / "checkpoints" / "checkpoint-2").iterdir()}
    assert "model.safetensors" in written, written
    if point == "checkpoint_write":
        assert not written & {"optimizer.pt", "scheduler.pt", "trainer_state.json"}, (
            f"transformers Trainer._save_checkpoint wrote {sorted(written)} before the fault point: it no longer "
            "writes the weights first, through save_model; move the checkpoint_write fault point in "
            "rlhf.trl_bridge.trainer_class")
    else:
        assert {"optimizer.pt", "trainer_state.json"} <= written, written
