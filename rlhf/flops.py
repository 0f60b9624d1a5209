"""Model FLOPs and utilisation: what a transformer's passes must compute, against what the device can.

Model FLOPs count the arithmetic a pass needs, not what an implementation happens to run: every position of every
sequence (no padding), attention over the keys each position may see, generation with a KV cache (as much as one
causal pass over the sequence), the backward pass without recomputation (gradient checkpointing is not counted).
Utilisation is model FLOPs per second over the peak: on a GPU its dense bf16 peak from the vendor's table, on a CPU
(or an unknown GPU) the matmul rate measured here, in the model's dtype. Both are in one place, `model_flops` and
`peak_flops`, so every figure uses the same formula.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Dense bf16 peaks (FLOP/s, no sparsity) by a substring of ``torch.cuda.get_device_name()``, most specific first.
GPU_BF16_PEAKS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A6000", 155e12),
)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What a transformer's FLOPs depend on: the multiply-adds of its linear layers per token (every one, LoRA's
    included; those whose weights train apart), its layers, its attention width (heads x head size, of the
    queries) and whether a position attends to the earlier ones only."""

    linear_macs: int
    trainable_linear_macs: int
    layers: int
    attention_width: int
    causal: bool = True

    @classmethod
    def of(cls, model: torch.nn.Module, *, causal: bool = True, adapters: bool = True) -> "ModelShape":
        """The shape of a transformers model (any architecture: the linear layers are read off its modules, the
        layers and heads off its config). A weight partitioned by ZeRO-3 counts whole. ``adapters=False``: without
        its LoRA layers (the model with its adapters disabled)."""
        from transformers.pytorch_utils import Conv1D

        linear = trainable = 0
        for name, module in model.named_modules():
            if not adapters and "lora_" in name:
                continue
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                size = int(getattr(module.weight, "ds_numel", module.weight.numel()))
                linear += size
                trainable += size if module.weight.requires_grad else 0
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(linear, trainable, config.num_hidden_layers, heads * head_dim, causal)


def model_flops(shape: ModelShape, lengths: Sequence[int], *, backward: bool = False) -> float:
    """FLOPs of passes over sequences of ``lengths`` tokens (each position once; a generated sequence counts as one
    causal pass over its prompt and response but the last token, as a KV cache computes it).

    Forward: 2 x the linear multiply-adds per token, plus per layer two matmuls over the attended keys (scores and
    the weighted values), 2 x keys x attention width each. ``backward`` adds the backward pass: the input gradients
    of every linear layer (as much as its forward), the weight gradients of the trainable ones (as much again) and
    four attention matmuls; full tuning is then 3 x the forward, as usually stated."""
    tokens = sum(lengths)
    keys = sum(n * (n + 1) // 2 if shape.causal else n * n for n in lengths)
    linear = 2.0 * shape.linear_macs * tokens
    attention = 2.0 * 2.0 * shape.layers * shape.attention_width * keys
    if not backward:
        return linear + attention
    return 2.0 * linear + 2.0 * shape.trainable_linear_macs * tokens + 3.0 * attention


@functools.cache
def peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = None,
               ) -> tuple[float, str]:
    """(FLOP/s, where it comes from) of one process's device: a GPU's dense bf16 peak from `GPU_BF16_PEAKS`;
    otherwise the fastest square matmul of each size (n = 4096 on a GPU; 512 and 1024 on a CPU, with the current
    threads) in ``dtype``, at least five of each and for at least a quarter of a second (a few products can all land
    on a slow stretch: five gave 102 against 169 GFLOP/s on the same idle machine), measured once per process.
    ``threads`` only keys the cache."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        for key, peak in GPU_BF16_PEAKS:
            if key in name:
                return peak, f"{name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s (vendor table)"
    sizes = (4096,) if device.startswith("cuda") else (512, 1024)
    peak, best_n = 0.0, sizes[0]
    for n in sizes:
        # No random numbers: the run's random streams stay untouched.
        a = torch.full((n, n), 0.5, dtype=dtype, device=device)
        b = torch.full((n, n), 0.25, dtype=dtype, device=device)
        began, count = time.perf_counter(), 0
        while count < 5 or time.perf_counter() - began < 0.25:
            count += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            rate = 2.0 * n ** 3 / max(time.perf_counter() - start, 1e-9)
            peak, best_n = (rate, n) if rate > peak else (peak, best_n)
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else device
    return peak, (f"measured: best {best_n}x{best_n} {str(dtype).removeprefix('torch.')} matmul on {where}, "
                  f"{peak / 1e9:.1f} GFLOP/s")


def utilisation(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs per second over ``peak`` (0 when no time passed)."""
    return flops / (seconds * peak) if seconds > 0 and peak > 0 else 0.0


def device_kind(model: Any) -> str:
    """``"cuda:0"``-like or ``"cpu"``: where ``model``'s first parameter lives."""
    parameter = next(iter(model.parameters()), None)
    return str(parameter.device) if parameter is not None else "cpu"
