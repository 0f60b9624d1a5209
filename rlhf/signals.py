"""Graceful stops: SIGTERM (sent by schedulers, ``accelerate launch`` and ``torchrun`` before they kill) asks the
running stage to save a checkpoint at the next step boundary and exit with :data:`EXIT_INTERRUPTED`.

``accelerate launch`` with one process exits on SIGTERM without passing it on; :func:`stop_with_launcher` asks the
kernel to send the stage SIGTERM when its launcher dies, so the stage still saves its checkpoint and stops.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from rlhf.errors import RLHFError

logger = logging.getLogger(__name__)

#: Exit status of a stage stopped by SIGTERM after saving a checkpoint (sysexits' EX_TEMPFAIL: retry later, with
#: ``checkpoint.resume=true``).
EXIT_INTERRUPTED = 75


class StageInterrupted(RLHFError):
    """The stage stopped on request after saving a resumable checkpoint."""


class StopRequest:
    """A flag set by SIGTERM (and SIGINT) while installed; the training loop polls it between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()

    def agreed(self, device: Any = "cpu") -> bool:
        """Whether any process was asked to stop. Every process must call this at the same step: they all stop
        there together, so no process waits forever in a collective another one has left."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self._event.set()
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("received %s: saving a checkpoint at the next step, then stopping",
                       signal.Signals(signum).name)
        self._event.set()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def trainer_stop_callback(stop: StopRequest) -> Any:
    """A ``TrainerCallback`` that turns a stop request into "save a checkpoint now and end training"."""
    from transformers import TrainerCallback

    class _StopOnRequest(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if stop.agreed(args.device):
                control.should_save = True
                control.should_training_stop = True
            return control

    return _StopOnRequest()


#: Fault injection for tests: ``RLHF_FAULT=<point>:<step>`` stops the run at that point of that step by raising
#: :class:`InjectedFault`, as a kill would (nothing after it runs); ``<point>:<step>:kill`` sends the process a real
#: SIGKILL there instead. Points: ``checkpoint_write`` (part-way through writing the checkpoint of that step: weights
#: written, the rest not) and ``after_checkpoint`` (once it is complete).
#: Numerical faults (`fault_injected`): ``nan_scores`` (a NaN reward-model score), ``nan_loss`` (a NaN loss) and
#: ``inf_grad`` (a finite loss whose gradient a hook makes infinite) at update ``<step>``, or at every update from it
#: on with ``<step>+``.
FAULT_ENV = "RLHF_FAULT"


class InjectedFault(BaseException):
    """Raised by :func:`fault_point`; a BaseException so that no ``except Exception`` in the stack absorbs it."""


def fault_point(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    at, _, action = rest.partition(":")
    if name == point and at.isdigit() and int(at) == step:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"{FAULT_ENV}={spec}: stopped at {point} of step {step}")


def fault_injected(point: str, step: int) -> bool:
    """Whether ``RLHF_FAULT`` asks for the numerical fault ``point`` at ``step`` (``point:K``, or ``point:K+`` for K
    and every later step); the caller then corrupts its own value."""
    name, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    if name != point or not at.rstrip("+").isdigit():
        return False
    first = int(at.rstrip("+"))
    return step >= first if at.endswith("+") else step == first


#: Programs that start stage processes and are meant to outlive them.
LAUNCHERS = frozenset({"accelerate", "accelerate.commands.launch", "torchrun", "torch.distributed.run"})
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def started_by_launcher(pid: int | None = None) -> bool:
    """Whether the parent of this process (or the process ``pid``) is ``accelerate launch`` or ``torchrun``."""
    try:
        argv = Path(f"/proc/{pid or os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name in LAUNCHERS for arg in argv[:3])


def stop_with_launcher() -> bool:
    """Ask for SIGTERM when the launcher that started this process dies (Linux): the stage then saves a checkpoint
    and stops instead of running on unsupervised. Returns whether the request was made."""
    if not started_by_launcher():
        return False
    parent = os.getppid()
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM):
        return False
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def adopt_orphans() -> bool:
    """Make this process the one that inherits its grandchildren when their parent dies (Linux), so it can wait
    for a stage whose launcher exited first and read the stage's own exit status."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)
