from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import yaml

from rlhf.checkpoint import read_manifest
from rlhf.config import StageConfig, load_config, option
from rlhf.runtime import StageRun, rank_seed, seed_everything


@dataclasses.dataclass
class ToyConfig(StageConfig):
    """A toy stage."""

    stage: ClassVar[str] = "toy"
    data: str = option("", doc="input", semantic=False)
    lr: float = option(0.1, doc="lr")

    def input_paths(self):
        return {"data": self.data}


def test_rank_seeds_differ_per_rank_and_are_stable():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, r) for r in range(8)}
    assert len(seeds) == 8
    assert rank_seed(7, 3) == rank_seed(7, 3)
    seed_everything(7, rank=1)
    a = torch.rand(3)
    seed_everything(7, rank=1)
    assert torch.equal(a, torch.rand(3))


def test_stage_run_writes_config_then_manifest_last(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    cfg = load_config(ToyConfig, None, [f"run_dir={tmp_path}", f"data={data}", "seed=3"])
    with StageRun(cfg) as run:
        assert yaml.safe_load((run.output_dir / "config.yaml").read_text())["lr"] == 0.1
        assert read_manifest(run.output_dir) is None
        run.tracker.log({"train/loss": 1.0}, step=1)
        run.complete({"train/loss": 1.0})
    manifest = read_manifest(tmp_path / "toy")
    assert manifest["seed"] == 3 and manifest["metrics"] == {"train/loss": 1.0}
    assert manifest["inputs"]["data"]["path"] == str(data)
    assert manifest["fingerprint"] == run.fingerprint


def test_failed_stage_run_leaves_no_manifest(tmp_path):
    cfg = load_config(ToyConfig, None, [f"run_dir={tmp_path}"])
    with StageRun(cfg) as run:
        run.complete({})
    assert read_manifest(tmp_path / "toy") is not None
    with pytest.raises(RuntimeError):
        with StageRun(cfg):
            raise RuntimeError("killed half-way")
    assert read_manifest(tmp_path / "toy") is None  # the rerun's failure does not leave the old manifest standing


def test_default_threads_share_the_cores_among_local_processes():
    from rlhf.runtime import default_threads

    assert default_threads(2, 1) == 2  # accelerate launch on a laptop: one process, every core
    assert default_threads(16, 4) == 4
    assert default_threads(2, 4) == 1


def test_configure_threads_uses_every_core_of_a_single_cpu_process(monkeypatch):
    import os

    import torch

    from rlhf.runtime import configure_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` exports without a config
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        configure_threads(None)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert torch.get_num_threads() == cores
        configure_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fused_adamw_on_cpu_and_cuda_but_not_under_deepspeed():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhf.runtime import fused_adamw

    plain, deepspeed = (SimpleNamespace(distributed_type=t) for t in (DistributedType.NO, DistributedType.DEEPSPEED))
    assert fused_adamw(plain, "cpu") and fused_adamw(plain, "cuda")
    assert not fused_adamw(plain, "mps") and not fused_adamw(deepspeed, "cuda")


def test_zero3_sizes_fill_what_the_config_leaves_to_deepspeed_and_keep_what_it_sets():
    from rlhf.runtime import zero3_memory_settings

    filled = zero3_memory_settings({"stage": 3, "reduce_bucket_size": 12345, "stage3_prefetch_bucket_size": "auto"},
                                   hidden_size=768)
    assert "reduce_bucket_size" not in filled  # the user's value stays
    assert filled == {"stage3_prefetch_bucket_size": int(0.9 * 768 * 768),
                      "stage3_param_persistence_threshold": 7680,
                      "stage3_max_live_parameters": 36 * 768 * 768, "stage3_max_reuse_distance": 36 * 768 * 768}
    # Below DeepSpeed's defaults at the 100M class (5e8, 1e9), which gather a whole model and keep it gathered.
    assert filled["stage3_max_live_parameters"] < 1e9 and filled["stage3_prefetch_bucket_size"] < 5e7
