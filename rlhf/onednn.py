"""Linear layers through oneDNN with packed weights, on the CPU in float32.

torch sends a float32 matrix product on the CPU to MKL, which repacks the weight on every call. On the 2-core AMD
EPYC of ``benchmarks/`` that runs the shapes of a small model's passes at 40-130 GFLOP/s, where oneDNN, given the
weight packed once into its own blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), runs them 1.2-2.5x
faster (``_linear_pointwise``: the kernel torch's own compiler uses for frozen CPU linears). The function is the same;
the sums run in another order, so results differ in rounding (about 1e-6 relative in float32).

:func:`packed_linears` packs the weights of every ``nn.Linear`` and transformers ``Conv1D`` of some models on entry
and routes those modules' forwards through oneDNN until it exits. The backward uses torch's own products on the
original weights, so gradients reach the parameters (and DDP's hooks) as usual. The weights must not change inside
the block, so a block never holds an optimiser step: PPO packs once per rollout and once per training step, SFT and
reward training once per optimiser step (:func:`packed_linears_callback`). Nothing changes on a GPU, for other dtypes,
under autocast, or where torch has no oneDNN.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MIN_PACKED_WEIGHTS = 1 << 17
"""Layers with fewer weights keep torch's kernel. Packing costs a pass over the weight (about 0.2 ms for a small
one) each time a block is entered, and on small products oneDNN gains little (a 128-wide GPT-2, the demo's, ran its
PPO training 20% slower packed); from 256 x 512 up it is 1.2-3x faster on the benchmark CPU."""


@functools.cache
def available() -> bool:
    """Whether this torch has the oneDNN linear kernels and they compute ``F.linear`` (checked once, on a small
    product)."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")):
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((5, 24), (40, 24), (40,)))
    try:
        with torch.no_grad():
            got = _linear(x, pack(weight), bias)
    except (RuntimeError, NotImplementedError) as exc:  # a build whose oneDNN lacks the primitive
        logger.info("oneDNN linears unavailable (%s); using torch's default kernels", exc)
        return False
    return bool(torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight [out, in] (float32, CPU) reordered into oneDNN's layout; an opaque tensor for `_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b with a packed W. x: [..., in] -> [..., out]."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


class _PackedLinear(torch.autograd.Function):
    """Forward through the packed weight; backward with torch's products on the parameter itself.

    ``weight`` is the module's parameter as stored: [out, in] for ``nn.Linear``, [in, out] (``transposed``) for
    ``Conv1D``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor,
                transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.has_bias = transposed, bias is not None
        return _linear(x, packed, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.t() if ctx.transposed else g @ weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = flat.t() @ g if ctx.transposed else g.t() @ flat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, grad_weight, grad_bias, None, None


def _packable(module: torch.nn.Module) -> bool | None:
    """True for a ``Conv1D`` (weight stored [in, out]), False for an ``nn.Linear``, None for anything else; exact
    types only, so subclasses with forwards of their own (quantised linears, for one) are left alone."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is Conv1D:
        return True
    if type(module) is torch.nn.Linear:
        return False
    return None


def _packed_forward(module: torch.nn.Module, packed: torch.Tensor, transposed: bool) -> Any:
    original = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return original(module, x)
        if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad
                                        or (module.bias is not None and module.bias.requires_grad)):
            return _PackedLinear.apply(x, module.weight, module.bias, packed, transposed)
        return _linear(x, packed, module.bias)

    return forward


@contextlib.contextmanager
def packed_linears(*models: torch.nn.Module | None, enabled: bool = True) -> Iterator[int]:
    """Within the block, the float32 CPU ``nn.Linear`` / ``Conv1D`` layers of ``models`` (None entries skipped)
    with at least `MIN_PACKED_WEIGHTS` weights compute their forwards through oneDNN with weights packed on entry;
    yields how many layers were packed. The
    weights must stay as they are until the block ends. A layer already packed by an enclosing block keeps that
    block's packing. With ``enabled=False`` or without oneDNN the block changes nothing."""
    swapped: list[torch.nn.Module] = []
    try:
        if enabled and available():
            seen: set[int] = set()
            for model in models:
                for module in model.modules() if model is not None else ():
                    transposed = _packable(module)
                    if transposed is None or id(module) in seen or "forward" in module.__dict__:
                        continue
                    seen.add(id(module))
                    weight, bias = module.weight, module.bias
                    if (weight.dtype != torch.float32 or weight.device.type != "cpu"
                            or weight.numel() < MIN_PACKED_WEIGHTS
                            or (bias is not None and bias.dtype != torch.float32)):
                        continue
                    packed = pack(weight.t() if transposed else weight)
                    module.forward = _packed_forward(module, packed, transposed)
                    swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward


def packed_linears_callback(model: torch.nn.Module) -> Any:
    """A transformers ``TrainerCallback`` that packs ``model`` from the start of each optimiser step
    (``on_step_begin``) to just before the optimiser changes the weights (``on_pre_optimizer_step``), so every
    micro-batch's forward of the step runs through oneDNN."""
    from transformers import TrainerCallback

    class PackedLinearsCallback(TrainerCallback):
        def __init__(self) -> None:
            self.block: contextlib.ExitStack | None = None

        def close(self) -> None:
            if self.block is not None:
                self.block.close()
                self.block = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()
            self.block = contextlib.ExitStack()
            self.block.enter_context(packed_linears(model))

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

    return PackedLinearsCallback()
