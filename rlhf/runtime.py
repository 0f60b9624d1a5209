"""What every stage does around its training loop: seeds, threads, the output directory, tracking, the manifest.

A stage's ``run(cfg)`` opens a :class:`StageRun`, trains, saves its files into ``run.output_dir`` and calls
:meth:`StageRun.complete` last; that writes the manifest, which is what makes the directory a usable input.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rlhf.checkpoint import begin_output, config_path, output_dir_of, stage_fingerprint, write_manifest, write_text_atomic
from rlhf.config import to_dict, to_yaml

logger = logging.getLogger(__name__)


def rank_seed(seed: int, rank: int) -> int:
    """A per-process seed derived from the stage seed; rank 0 keeps the stage seed itself."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int, *, rank: int = 0, full_determinism: bool = False) -> int:
    """Seed python, numpy and torch for this process; returns the seed used."""
    used = rank_seed(seed, rank)
    random.seed(used)
    np.random.seed(used)
    torch.manual_seed(used)
    if full_determinism:
        # cuBLAS needs this workspace setting for deterministic matmuls (CUDA docs, "Reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
    return used


def distributed_state() -> Any:
    """accelerate's process state, initialised the way ``Accelerator()`` does it: on a machine without an
    accelerator (or with ACCELERATE_USE_CPU set) the processes that torchrun or accelerate started join one CPU
    (gloo) group; a bare ``PartialState()`` would leave each of them alone."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or torch.accelerator.current_accelerator() is None
    return PartialState(cpu=cpu)


def is_deepspeed(state: Any) -> bool:
    """Whether an ``Accelerator`` or an accelerate process state runs under DeepSpeed."""
    from accelerate.utils import DistributedType

    return state.distributed_type == DistributedType.DEEPSPEED


#: ZeRO-3's settings that decide how much of a model each process holds at once, sized by the model's hidden size h
#: (what accelerate and the Trainer put in for ``"auto"``, and for the last two our own: a few layers' weights). Left
#: to DeepSpeed's defaults (5e8 elements for the buckets, 1e5 for persistence, 1e9 live parameters and reuse
#: distance), a model of 100M parameters is gathered whole and stays gathered: sharding then saves no memory.
ZERO3_SIZED_BY_HIDDEN = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
    "stage3_max_live_parameters": lambda h: 3 * 12 * h * h,
    "stage3_max_reuse_distance": lambda h: 3 * 12 * h * h,
}


def zero3_memory_settings(zero_config: Mapping[str, Any], hidden_size: int) -> dict[str, int]:
    """The `ZERO3_SIZED_BY_HIDDEN` settings that ``zero_config`` (a DeepSpeed ``zero_optimization`` section) leaves
    out or sets to ``"auto"``, for a model of ``hidden_size``; what a user set stays."""
    return {key: size(hidden_size) for key, size in ZERO3_SIZED_BY_HIDDEN.items()
            if zero_config.get(key, "auto") == "auto"}


def fused_adamw(state: Any, device_type: str) -> bool:
    """Whether training uses torch's fused AdamW (one kernel per parameter group instead of a loop over tensors;
    the same update up to rounding): on CPU and CUDA, and not under DeepSpeed, whose ZeRO optimisers and CPU offload
    expect the plain one."""
    return device_type in ("cpu", "cuda") and not is_deepspeed(state)


def onednn_linears(accelerator: Any, model: Any) -> bool:
    """Whether a stage packs its linear layers for oneDNN (`rlhf.onednn.packed_linears`): the model config
    (``model.onednn_linears``) asks for it, and neither DeepSpeed (whose ZeRO-3 gathers a layer's weight only inside
    its forward) nor ``torch.compile`` (accelerate's dynamo backend, which traces the forwards itself) runs the
    modules. ``accelerator``: the stage's ``Accelerator`` (a Trainer's ``trainer.accelerator``) or process state."""
    if not model.onednn_linears or is_deepspeed(accelerator):
        return False
    plugin = getattr(getattr(accelerator, "state", accelerator), "dynamo_plugin", None)
    backend = getattr(plugin, "backend", None)
    return str(getattr(backend, "value", "no") or "no").lower() == "no"


def default_threads(cpu_count: int, local_processes: int) -> int:
    """torch threads per process when the config leaves them open: the cores shared by this machine's processes."""
    return max(1, cpu_count // max(1, local_processes))


def configure_threads(threads: int | None) -> None:
    """Set torch's intra-op threads. ``None`` on a CPU run means the available cores divided by the processes on
    this machine: `accelerate launch` without a config exports OMP_NUM_THREADS=1, which would leave a single-process
    CPU run (the demo) on one core."""
    if threads is None:
        if torch.cuda.is_available():
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = default_threads(cores, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)


def wandb_dir_of(cfg: Any, output_dir: Path) -> Path:
    """Where a stage keeps its W&B files (``<dir>/wandb/``): the run directory, beside the other stages' runs; an
    output written outside its run directory keeps them inside itself, so the run directory is never created."""
    run_dir = Path(cfg.run_dir)
    return run_dir if output_dir.resolve().is_relative_to(run_dir.resolve()) else output_dir


class StageRun:
    """The frame of one stage run on one process.

    On entry: threads and seeds set, the output directory marked incomplete (main process), the resolved config
    written, the tracker opened. ``complete(metrics)`` writes the manifest last (main process). On an exception the
    tracker is closed and no manifest is written, so the directory stays incomplete.
    """

    def __init__(self, cfg: Any, *, rank: int = 0, is_main_process: bool = True, x_axis: str | None = None):
        self.cfg = cfg
        self.x_axis = x_axis
        self.rank = rank
        self.is_main_process = is_main_process
        self.output_dir = output_dir_of(cfg)
        self.fingerprint, self.inputs = stage_fingerprint(cfg)
        self.seed = rank_seed(cfg.seed, rank)
        self.tracker: Any = None

    def __enter__(self) -> "StageRun":
        from rlhf.tracking import Tracker

        configure_threads(self.cfg.threads)
        seed_everything(self.cfg.seed, rank=self.rank, full_determinism=self.cfg.full_determinism)
        if self.is_main_process:
            begin_output(self.output_dir, resume=self.cfg.checkpoint.resume)
            write_text_atomic(config_path(self.output_dir), to_yaml(self.cfg))
        log_cfg = self.cfg.logging
        self.tracker = Tracker(
            self.output_dir,
            stage=self.cfg.stage,
            report_to=log_cfg.report_to,
            run_name=log_cfg.run_name or f"{Path(self.cfg.run_dir).name}-{self.cfg.stage}",
            project=log_cfg.project,
            group=log_cfg.group or Path(self.cfg.run_dir).name,
            entity=log_cfg.entity,
            config=to_dict(self.cfg),
            is_main_process=self.is_main_process,
            wandb_dir=wandb_dir_of(self.cfg, self.output_dir),
            x_axis=self.x_axis,
        )
        # Objects built during start-up (modules, tokenizers, datasets) live for the whole run; freezing them keeps
        # the cyclic collector from re-scanning them on every collection.
        gc.collect()
        gc.freeze()
        logger.info("%s: writing %s (fingerprint %s)", self.cfg.stage, self.output_dir, self.fingerprint)
        return self

    def complete(self, metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
        """Record final metrics and write the manifest; the last thing a stage does."""
        if self.tracker is not None and metrics:
            self.tracker.summary(dict(metrics))
        if self.is_main_process:
            write_manifest(
                self.output_dir,
                stage=self.cfg.stage,
                fingerprint=self.fingerprint,
                config=to_dict(self.cfg),
                inputs=self.inputs,
                seed=self.cfg.seed,
                metrics=metrics,
                extra={**(extra or {}), "trackers": self.tracker.locations} if self.tracker is not None else extra,
            )
            logger.info("%s: complete -> %s", self.cfg.stage, self.output_dir)
        return self.output_dir

    def __exit__(self, *exc: Any) -> None:
        if self.tracker is not None:
            self.tracker.finish()
        gc.unfreeze()
