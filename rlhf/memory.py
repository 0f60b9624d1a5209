"""What a process holds in memory, measured: its peak resident set, and the bytes of model state it keeps (the
weights of each model as stored on this process, sharded or not, and the optimiser's state with any master copies
of the weights it steps). Gradients are transient (set to None after each step) and not counted here."""

from __future__ import annotations

import resource
from collections.abc import Iterable
from typing import Any

import torch

MIB = 2 ** 20


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process stores: its ZeRO-3 shard when partitioned, else the tensor."""
    return getattr(parameter, "ds_tensor", parameter)


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            continue
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def weight_bytes(model: torch.nn.Module | None) -> int:
    """Bytes of ``model``'s parameters and buffers as this process stores them (a shared storage once)."""
    if model is None:
        return 0
    module = getattr(model, "module", model)  # a DeepSpeed engine's or DDP's module
    return _unique_bytes([*(_local(p) for p in module.parameters()), *module.buffers()], set())


def optimizer_bytes(optimizer: Any, model: torch.nn.Module) -> int:
    """Bytes of the optimiser's state on this process: the innermost torch optimiser's state tensors (Adam's two
    moments) and the tensors it steps when they are not ``model``'s own weights (DeepSpeed's fp32 partitions)."""
    inner = optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:
        inner = inner.optimizer
    module = getattr(model, "module", model)
    seen = {_local(p).untyped_storage().data_ptr() for p in module.parameters() if _local(p).numel()}
    stepped = [p for group in getattr(inner, "param_groups", []) for p in group["params"]]
    states = [value for state in getattr(inner, "state", {}).values() for value in state.values()]
    return _unique_bytes([*stepped, *states], seen)


def process_memory(trained: torch.nn.Module, optimizer: Any, **frozen: torch.nn.Module | None) -> dict[str, float]:
    """This process's memory in MiB: ``peak_rss``, ``trained_weights`` (policy and critic), ``optimizer`` and
    ``<name>_weights`` for each frozen model given (None: not loaded)."""
    out = {"peak_rss": peak_rss_mib(), "trained_weights": weight_bytes(trained) / MIB,
           "optimizer": optimizer_bytes(optimizer, trained) / MIB}
    out.update({f"{name}_weights": weight_bytes(model) / MIB for name, model in frozen.items()})
    return out


class WeightGathers:
    """Weight elements that ZeRO-3 all-gathers on this process, per phase. Every gather of a parameter's shards ends
    in one of DeepSpeed's communication backend's all-gathers, so counting there misses none; the phase's count
    divided by the elements of the models it runs (``elements``, by phase) is how many times their weights were
    gathered (generation with the whole-rollout gather: once, whatever the number of tokens; a training pass:
    forward and backward)."""

    #: The backend's all-gathers, and how to read the elements one call gathers from its arguments.
    CALLS = {
        "all_gather_into_tensor": lambda args, kwargs: kwargs.get("output_tensor", args[0] if args else None).numel(),
        "all_gather_base": lambda args, kwargs: kwargs.get("output_tensor", args[0] if args else None).numel(),
        "all_gather": lambda args, kwargs: sum(t.numel() for t in kwargs.get("tensor_list", args[0] if args else [])),
        "all_gather_coalesced": lambda args, kwargs: sum(
            t.numel() for t in kwargs.get("output_tensors", args[0] if args else [])),
    }

    def __init__(self, elements: dict[str, int]) -> None:
        self.model_elements = elements
        self.elements: dict[str, int] = {}
        self._phase: str | None = None

    def install(self) -> "WeightGathers":
        """Count from now on, instead of any counter installed before in this process (the process's DeepSpeed
        backend must exist: after the engine is built)."""
        from deepspeed import comm

        backend = comm.comm.cdb
        if getattr(backend, "weight_gathers", None) is None:
            for name, size in self.CALLS.items():
                original = getattr(backend, name)

                def counted(*args: Any, _original: Any = original, _size: Any = size, **kwargs: Any) -> Any:
                    backend.weight_gathers.add(_size(args, kwargs))
                    return _original(*args, **kwargs)

                setattr(backend, name, counted)
        backend.weight_gathers = self
        return self

    def add(self, elements: int) -> None:
        if self._phase is not None:
            self.elements[self._phase] = self.elements.get(self._phase, 0) + elements

    def phase(self, name: str | None) -> None:
        """Charge the gathers from now on to phase ``name`` (None: to none)."""
        self._phase = name

    def take(self) -> dict[str, float]:
        """How many times each phase gathered its models' weights since the last take (nothing when none was)."""
        gathered, self.elements = self.elements, {}
        if not gathered:
            return {}
        return {phase: gathered.get(phase, 0) / size for phase, size in self.model_elements.items()}
