"""How much memory one process of a PPO run needs, by component: a model in one function (`predict`), its three
constants fitted on measured runs (`fit`, on ``benchmarks/scale.py``'s runs; `FITTED` holds the fit).

Per process, in bytes, with P processes, s3 = P under ZeRO-3 (else 1), s2 = P under ZeRO-2 or 3, s1 = P under any
ZeRO stage, and b the bytes of a weight:

- **trained weights**: (policy + critic) x b / s3;
- **frozen weights**: (reference + reward model) x b / s3 (no reference with LoRA: it is the policy with its
  adapters off);
- **optimiser**: Adam's two moments, in fp32 under DeepSpeed (8 bytes per trainable parameter / s1) and in the
  weights' dtype under torch's AdamW (2b), and DeepSpeed's fp32 master partition, 4 bytes per trainable parameter /
  P, which ZeRO-2 always keeps and ZeRO-3 keeps when b < 4;
- **gradients**: b per trainable parameter / s2, and under DDP on more than one process as much again for its
  gradient buckets;
- **gathered** (ZeRO-3): the whole policy, gathered once for the rollout's generation (`gathered_for_generation`),
  and the weights a training pass holds live (``stage3_max_live_parameters``);
- **activations**: what a training pass keeps for its backward, per token position: a fitted number of bytes per
  layer and unit of width (in float32; in proportion for 16-bit weights), and the output head's float32 logits
  (4 bytes per vocabulary row);
- **ZeRO-3 overhead**: a fitted number of bytes per parameter of every model the process shards, beyond the shards;
- **runtime**: the process before any model (interpreter, libraries, allocator), fitted.

Generation and training do not overlap, so the peak is the static part (weights, optimiser, runtime) plus the larger
of the two transient parts: generation's gathered policy, or training's gradients, buckets, live weights and
activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Shape:
    """What decides a run's memory. ``pass_tokens``: token positions of one training pass on a process (its rows x
    their padded length); ``trainable``: parameters that train (None: every parameter of policy and critic)."""

    policy: int
    critic: int
    reward: int
    layers: int
    width: int
    vocab: int
    pass_tokens: int
    weight_bytes: int = 4
    trainable: int | None = None
    max_live_parameters: int = 0


@dataclasses.dataclass(frozen=True)
class Setting:
    processes: int
    zero_stage: int  # 0 (one process or DDP), 2 or 3
    lora: bool = False


@dataclasses.dataclass(frozen=True)
class Constants:
    runtime_mib: float  # a process before any model
    activation_bytes: float  # per token position, layer and unit of width, in a training pass
    zero3_bytes: float = 0.0  # per parameter of every model a ZeRO-3 process shards, beyond the shards themselves


def predict(shape: Shape, setting: Setting, constants: Constants) -> dict[str, float]:
    """MiB per process by component, the transient parts of generation and training, and ``peak``."""
    p, zero, b = setting.processes, setting.zero_stage, shape.weight_bytes
    s3 = p if zero == 3 else 1
    s2 = p if zero >= 2 else 1
    s1 = p if zero >= 1 else 1
    trained = shape.policy + shape.critic
    trainable = trained if shape.trainable is None else shape.trainable
    master = 4 * trainable / p if zero == 2 or (zero == 3 and b < 4) else 0.0
    # Adam's moments: fp32 under DeepSpeed, the weights' own dtype under torch's AdamW.
    moments = 8 if zero >= 1 else 2 * b
    parts = {
        "trained_weights": trained * b / s3,
        "frozen_weights": ((0 if setting.lora else shape.policy) + shape.reward) * b / s3,
        "optimizer": moments * trainable / s1 + master,
        "gradients": trainable * b / s2 * (2 if zero == 0 and p > 1 else 1),
        "generation_gathered": shape.policy * b if zero == 3 else 0.0,
        "training_gathered": min(shape.max_live_parameters, trained) * b if zero == 3 else 0.0,
        # Fitted in float32; activations are in the weights' dtype, the logits in float32.
        "activations": shape.pass_tokens * (constants.activation_bytes * b / 4 * shape.layers * shape.width
                                            + 4 * shape.vocab),
        "zero3_overhead": constants.zero3_bytes * (trained + (0 if setting.lora else shape.policy) + shape.reward)
        if zero == 3 else 0.0,
    }
    out = {name: value / MIB for name, value in parts.items()}
    out["runtime"] = constants.runtime_mib
    out["static"] = (out["trained_weights"] + out["frozen_weights"] + out["optimizer"] + out["runtime"]
                     + out["zero3_overhead"])
    out["training"] = out["gradients"] + out["training_gathered"] + out["activations"]
    out["peak"] = out["static"] + max(out["generation_gathered"], out["training"])
    return out


def fit(runs: Iterable[tuple[Shape, Setting, float]]) -> Constants:
    """The constants that fit measured peaks (MiB) best in least squares, bytes kept non-negative: the peak is
    linear in the three (the runtime, the activation bytes, ZeRO-3's bytes per parameter) as long as the larger
    transient part stays the one it is without them, which holds for the runs they are fitted on."""
    import numpy as np

    rows, targets = [], []
    for shape, setting, measured in runs:
        known = predict(shape, setting, Constants(0.0, 0.0))
        unit = [predict(shape, setting, c) for c in (Constants(0.0, 1.0), Constants(0.0, 0.0, 1.0))]
        # Where generation's gathered policy is the larger transient part, the activations do not set the peak.
        training_sets_peak = known["training"] >= known["generation_gathered"]
        rows.append([1.0, (unit[0]["activations"] - known["activations"]) * training_sets_peak,
                     unit[1]["zero3_overhead"] - known["zero3_overhead"]])
        targets.append(measured - known["static"] - max(known["training"], known["generation_gathered"]))
    a, b = np.array(rows), np.array(targets)
    used = a.any(axis=0)  # a constant no run measures (no ZeRO-3 run: its bytes) stays 0
    while True:
        solution = np.zeros(3)
        solution[used] = np.linalg.lstsq(a[:, used], b, rcond=None)[0]
        negative = (solution < 0) & used
        negative[0] = False  # the runtime may be anything
        if not negative.any():
            return Constants(*(float(x) for x in solution))
        used &= ~negative  # bytes are not negative: a constant the runs pull below 0 is 0


#: Fitted by `fit` on the GPT-2 runs of ``benchmarks/scale.py`` (one process at two pass sizes, DDP, ZeRO-2, ZeRO-3,
#: LoRA under DDP and ZeRO-3; 2-core CPU, float32, torch 2.13, deepspeed 0.19.8): ``python benchmarks/scale.py
#: --fit``. The runtime holds what the components do not: the interpreter and libraries, and the optimiser step's
#: temporaries, at which the peak falls (four times the tokens per pass raised it by 145 MiB, 72 of them the
#: logits); ZeRO-3's bytes per parameter are not traced to a component.
FITTED = Constants(runtime_mib=1567.4, activation_bytes=10.86, zero3_bytes=4.480)


def scale_run_shape(run: dict[str, Any]) -> tuple[Shape, Setting]:
    """The shape and setting of one row of ``benchmarks/scale.py``'s results."""
    return Shape(**run["shape"]), Setting(run["processes"], run["zero_stage"], lora=run["peft"] == "lora")
