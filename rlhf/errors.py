"""Errors the user is meant to read.

Every error raised on bad input derives from ``RLHFError`` and says what was wrong, where (file:row, config key or
path) and what to change. Launchers catch ``RLHFError`` and print its message without a traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path


#: Exit status of a run stopped by a problem in its input, config or environment.
EXIT_USER_ERROR = 2


class RLHFError(Exception):
    """Base class of the errors a user can fix by changing their input, config or environment."""


class ConfigError(RLHFError):
    """A config file or override is invalid (unknown key, wrong type, out-of-range value)."""


class DataError(RLHFError):
    """A dataset cannot be used: unreadable file, wrong schema, or too many bad rows."""


class CheckpointError(RLHFError):
    """A stage output or checkpoint directory is missing, incomplete or does not match what is expected."""


class StageFailed(RLHFError):
    """A stage the pipeline launched stopped without a complete output; ``exit_status`` is what it exited with."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class CheckFailed(RLHFError):
    """A check between stages found an upstream output unfit for this stage (a reward model that failed its gate,
    scores that do not spread, a policy that does not stop); the message names what to change and the key that
    proceeds anyway."""


class AlarmStop(RLHFError):
    """A reward-hacking alarm fired under ``alarms.stop=true``; a checkpoint of the weights at that update was
    saved."""


class TrainingDiverged(RLHFError):
    """Training produced non-finite numbers for too many updates in a row; a checkpoint of the last good weights
    was saved."""


class StorageError(RLHFError):
    """An output could not be written: the disk, a quota or a file-size limit is full, or the directory is not
    writable."""


_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST})


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write because of the disk or the directory (not a bug): an ``OSError`` with such
    an errno, or torch's own "file write failed" when saving a checkpoint."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL | _NOT_WRITABLE
    return isinstance(exc, RuntimeError) and "file write failed" in str(exc)


def storage_error(path: str | Path | None, exc: BaseException) -> StorageError:
    """The error to raise for a failed write of ``path``: what happened and what to do."""
    code = getattr(exc, "errno", None)
    if code in _NOT_WRITABLE:
        fix = "the directory cannot be written; fix its permissions or set run_dir to a writable directory"
    else:
        fix = ("free space on that disk (or raise the quota or file-size limit), or set run_dir to another disk; "
               "earlier checkpoints are intact, so rerun with checkpoint.resume=true to continue")
    reason = getattr(exc, "strerror", None) or str(exc)
    return StorageError(f"cannot write {path or 'the output'}: {reason}; {fix}")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA and other accelerators), Python's ``MemoryError``, or the CPU allocator's
    "can't allocate memory"."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)))


def out_of_memory_advice(exc: BaseException, config_keys: list[str]) -> str:
    """What to change when a stage ran out of memory, naming the micro-batch keys of its config."""
    micro = [key for key in config_keys if key.endswith("micro_batch_size")]
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"out of memory ({first_line[:200]}). Lower {' / '.join(micro) or 'the micro-batch size'} (the global "
            "batch and the results stay the same; more steps are accumulated), turn on "
            "model.gradient_checkpointing=true, use model.dtype=bfloat16, train an adapter (peft.method=lora), or "
            "shard the model and optimiser with DeepSpeed (accelerate launch --config_file "
            "configs/accelerate/zero3.yaml)")
