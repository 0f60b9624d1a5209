"""Training state (optimiser, scheduler, RNG, counters) as safetensors + JSON, never pickle.

:func:`flatten` turns a nested structure of dicts, lists, tuples, numbers, strings, numpy arrays and tensors into a
JSON skeleton plus a flat ``{name: tensor}`` dict for safetensors; :func:`unflatten` rebuilds it exactly (dict keys
keep their type, so an optimiser's integer parameter ids survive).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.checkpoint import (CHECKPOINT_STATE, checkpoint_dir, prune_checkpoints, write_bytes_atomic, write_json_atomic,
                             write_text_atomic)
from rlhf.signals import fault_point


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, f"{prefix}.k{i}"), flatten(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint's training state")


def unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [unflatten(v, tensors) for v in node]
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__ndarray__" in node:
            return np.asarray(node["__ndarray__"], dtype=node["dtype"])
        if "__tuple__" in node:
            return tuple(unflatten(v, tensors) for v in node["__tuple__"])
        if "__dict__" in node:
            return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in node["__dict__"]}
    return node


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_state(directory: str | Path, name: str, state: Any) -> None:
    """Write ``state`` as ``<name>.json`` + ``<name>.safetensors`` in ``directory`` (each atomically)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    directory = Path(directory)
    write_bytes_atomic(directory / f"{name}.safetensors", save(tensors))
    write_text_atomic(directory / f"{name}.json", json.dumps(skeleton))


def load_state(directory: str | Path, name: str) -> Any:
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(directory / f"{name}.safetensors")
    return unflatten(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)


def rng_state() -> dict[str, Any]:
    """The random states of python, numpy and torch (and CUDA when present) of this process."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(output_dir: str | Path, step: int, parts: dict[str, Any], *, keep_last: int) -> Path:
    """``checkpoints/step_<step>/``: each of ``parts`` (name -> state) through :func:`save_state`, then
    ``checkpoint.json`` last, so a checkpoint cut short is never taken for a complete one; then all but the newest
    ``keep_last`` are removed. ``RLHF_FAULT=checkpoint_write:<step>`` stops it before its last part is written."""
    directory = checkpoint_dir(output_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CHECKPOINT_STATE).unlink(missing_ok=True)
    names = list(parts)
    for i, name in enumerate(names):
        if i == len(names) - 1:
            fault_point("checkpoint_write", step)
        save_state(directory, name, parts[name])
    write_json_atomic(directory / CHECKPOINT_STATE, {"step": step, "complete": True})
    prune_checkpoints(output_dir, keep_last)
    return directory
