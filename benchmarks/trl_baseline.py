"""TRL 0.28.0 ``PPOTrainer`` on the fixed PPO throughput workload (``benchmarks/ppo_workload.json``): the baseline
that ``benchmarks/ppo_throughput.py`` is compared with. Prints one JSON line on stdout; everything else goes to stderr.

    bash benchmarks/setup_trl_baseline.sh      # once: .venv-trl with TRL 0.28.0 and the library versions of its day
    .venv-trl/bin/python benchmarks/trl_baseline.py [--updates N] [--threads T] [--workdir DIR]
                                                   [--layers L --width W --heads H] [--dtype float32|bfloat16]
                                                   [--variable-length]

Models: the workload's (``benchmarks/workload.py``, built in a child process so that tokenizer training does not
count in this process's peak RSS): the policy and a separately loaded reference from ``policy/``, the reward and the
value model as two separate loads of ``reward/``. TRL runs unmodified, with its defaults except where the workload
fixes a value.

Batches: in TRL 0.28 ``per_device_train_batch_size x gradient_accumulation_steps`` is the rollout batch of an update
(not the minibatch), a minibatch is that divided by ``num_mini_batches``, and each minibatch is cut into slices of
``per_device_train_batch_size`` rows with one ``optimizer.step`` each. 64 rollouts in 4 minibatches of 16, one
optimiser step per minibatch, is therefore ``per_device_train_batch_size=64, gradient_accumulation_steps=1,
num_mini_batches=4``. The batch sizes TRL derives are asserted, and the run counts what it did (``proof``).

Timing: an update runs from the moment TRL asks its dataloader for the update's batch to the moment it asks for the
next one (the last update ends at ``on_train_end``); ``s_per_update`` is the median over the timed updates, after
``warmup_updates``. Phases come from wrappers installed for the run in TRL's ``ppo_trainer`` module namespace and on
the trainer's accelerator (TRL's code is not edited); each times a call and returns the original's result:

* ``generation``: ``batch_generation`` (sampling every response, with its logits);
* ``reference``: ``forward`` called with the reference model;
* ``reward`` / ``value``: ``get_reward`` called with the reward model / with the value model;
* ``training``: every ``accelerator.accumulate`` block of the PPO epochs (the joint policy + value forward, the
  losses, backward, ``optimizer.step``, ``zero_grad`` and TRL's per-minibatch statistics);
* ``gc``: TRL's ``gc.collect()`` and ``empty_cache()`` calls;
* ``other``: the rest (log-softmax of the sampling and reference logits, rewards, GAE and whitening, logging, the
  scheduler step, slicing minibatches).

Each phase is the median over the timed updates and ``other`` the median of each update's remainder, so the phases
need not add up to ``s_per_update`` exactly. ``proof`` counts per timed update: rollouts and sampled tokens (from
the shape of what generation returned), optimiser steps (a step hook on the torch optimiser, so only steps that
really update the weights count), the reference, reward and value forwards of the rollout, and the joint policy +
value forwards of training.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import trl.experimental.ppo.ppo_trainer as ppo_module
from datasets import Dataset
from torch import nn
from transformers import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
    set_seed,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workload as wl  # noqa: E402

IMPL = "trl-0.28.0"
PHASES = ("generation", "reference", "reward", "value", "training", "gc")
# What the proof reports per timed update, and the counter behind it.
PROOF = {
    "rollouts_per_update": "rollouts",
    "sampled_tokens_per_update": "sampled_tokens",
    "optimizer_steps_per_update": "optimizer_steps",
    "reference_forwards": "reference_forwards",
    "reward_forwards": "reward_forwards",
    "value_forwards": "value_forwards",
    "training_forwards": "training_forwards",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=None, help="timed updates (default: the workload's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the workload's)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the built workload (models, tokenizer, prompts) is cached (default: "
                             "benchmarks/.cache/workload, or workload-LxWxH for another size)")
    wl.size_arguments(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: TRL's bf16=True (bf16 autocast over fp32 weights)")
    parser.add_argument("--variable-length", action="store_true",
                        help="the variable-length variant: the policy samples EOS often (workload.boost_eos) and "
                             "responses end at their first EOS (TRL's stop_token='eos')")
    args = parser.parse_args(argv)
    for name in ("updates", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def build_workload(workdir: Path, workload: dict[str, Any]) -> Path:
    """``workload.build(workdir, workload)`` in a child process: identical files, but tokenizer training stays out of
    this process's peak RSS. Its output goes to stderr."""
    code = "import json, sys, workload; workload.build(sys.argv[1], json.loads(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", code, str(workdir), json.dumps(workload)], cwd=HERE, check=True,
                   stdout=sys.stderr)
    return workdir


def sized_workload(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The workload at the size the options ask for, and where its models are cached."""
    default = wl.load_workload()
    workload = wl.with_size(default, layers=args.layers, width=args.width, heads=args.heads)
    arch = workload["policy_and_reference"]
    suffix = "" if workload == default else f"-{arch['n_layer']}x{arch['n_embd']}x{arch['n_head']}"
    if args.variable_length:
        workload["eos_logit"] = wl.VARIABLE_LENGTH_EOS_LOGIT
        suffix += "-variable"
    return workload, args.workdir or HERE / ".cache" / f"workload{suffix}"


class UpdateClock:
    """Wall time of each PPO update and of the phases and counts inside it.

    ``batch_requested`` / ``batch_delivered`` are driven by :class:`UpdateMarkingLoader`; phases and counts are
    charged to the update in progress. Phases do not nest: a phase entered inside another is charged to the outer one.
    """

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end: float | None = None
        self.phases: list[defaultdict[str, float]] = []
        self.counts: list[Counter[str]] = []
        self._requested_at: float | None = None
        self._open_phase: str | None = None

    def batch_requested(self) -> None:
        # A restart of the dataloader (a new epoch over the prompts) asks twice for one batch: keep the first ask.
        if self._requested_at is None:
            self._requested_at = time.perf_counter()

    def batch_delivered(self) -> None:
        assert self._requested_at is not None
        self.starts.append(self._requested_at)
        self._requested_at = None
        self.phases.append(defaultdict(float))
        self.counts.append(Counter())

    def finish(self) -> None:
        self.end = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._open_phase is not None or not self.phases:
            yield
            return
        self._open_phase, start = name, time.perf_counter()
        try:
            yield
        finally:
            self.phases[-1][name] += time.perf_counter() - start
            self._open_phase = None

    def count(self, name: str, n: int = 1) -> None:
        if self.counts:
            self.counts[-1][name] += n

    def update_times(self) -> list[float]:
        assert self.end is not None, "training did not finish"
        bounds = [*self.starts, self.end]
        return [b - a for a, b in itertools.pairwise(bounds)]


class UpdateMarkingLoader:
    """Stands in for ``PPOTrainer.dataloader``. TRL draws exactly one batch per update, first thing in the update, so
    asking for a batch marks where one update ends and the next begins."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], clock: UpdateClock) -> None:
        self._loader = loader
        self._clock = clock

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        iterator = iter(self._loader)
        while True:
            self._clock.batch_requested()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._clock.batch_delivered()
            yield batch

    def __len__(self) -> int:
        return len(self._loader)


class _TimedGc:
    """``gc`` as TRL's ``ppo_trainer`` module sees it: ``collect`` is timed, everything else is the real module."""

    def __init__(self, collect: Callable[..., int]) -> None:
        self.collect = collect

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)


@contextlib.contextmanager
def instrumented(trainer: PPOTrainer, clock: UpdateClock) -> Iterator[None]:
    """Wrap TRL's rollout helpers, the accelerator's ``accumulate`` and the optimiser for the duration of training;
    every wrapper times or counts a call and returns what the original returned."""
    ref_model = trainer.ref_model
    scorers = {id(trainer.reward_model): "reward", id(trainer.value_model): "value"}  # the two models TRL scores with
    originals = {name: getattr(ppo_module, name) for name in ("batch_generation", "forward", "get_reward",
                                                                "empty_cache")}

    @functools.wraps(originals["batch_generation"])
    def batch_generation(model: nn.Module, queries: torch.Tensor, *args: Any,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with clock.phase("generation"):
            query_responses, logits = originals["batch_generation"](model, queries, *args, **kwargs)
        rows, width = query_responses.shape
        clock.count("rollouts", rows)
        clock.count("sampled_tokens", rows * (width - queries.shape[1]))
        return query_responses, logits

    @functools.wraps(originals["forward"])
    def forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:  # a ModelOutput, or (ModelOutput, values)
        if model is ref_model:
            with clock.phase("reference"):
                output = originals["forward"](model, *args, **kwargs)
            clock.count("reference_forwards")
            return output
        output = originals["forward"](model, *args, **kwargs)  # the policy + value pass of a training step
        clock.count("training_forwards")
        return output

    @functools.wraps(originals["get_reward"])
    def get_reward(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        role = scorers[id(model)]
        with clock.phase(role):
            output = originals["get_reward"](model, *args, **kwargs)
        clock.count(f"{role}_forwards")
        return output

    @functools.wraps(originals["empty_cache"])
    def empty_cache() -> None:
        with clock.phase("gc"):
            originals["empty_cache"]()

    def collect(*args: Any, **kwargs: Any) -> int:
        with clock.phase("gc"):
            return gc.collect(*args, **kwargs)

    accumulate = trainer.accelerator.accumulate

    @contextlib.contextmanager
    def timed_accumulate(*models: nn.Module) -> Iterator[None]:
        with clock.phase("training"), accumulate(*models):
            yield

    class _EndOfTraining(TrainerCallback):
        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            clock.finish()

    # The torch optimiser under accelerate's wrapper: its hook fires only for steps that really update the weights.
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    end_of_training = _EndOfTraining()
    with contextlib.ExitStack() as stack:
        stack.callback(optimizer.register_step_post_hook(lambda *_: clock.count("optimizer_steps")).remove)
        trainer.add_callback(end_of_training)
        stack.callback(trainer.remove_callback, end_of_training)
        stack.enter_context(mock.patch.object(trainer, "dataloader", UpdateMarkingLoader(trainer.dataloader, clock)))
        for name, wrapper in (("batch_generation", batch_generation), ("forward", forward),
                              ("get_reward", get_reward), ("empty_cache", empty_cache),
                              ("gc", _TimedGc(collect))):
            stack.enter_context(mock.patch.object(ppo_module, name, wrapper))
        stack.enter_context(mock.patch.object(trainer.accelerator, "accumulate", timed_accumulate))
        yield


def make_trainer(workload: dict[str, Any], models: Path, workdir: Path, updates: int,
                 dtype: str = "float32") -> PPOTrainer:
    """TRL's PPOTrainer on the workload: TRL defaults except for what the workload fixes."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(models / "policy")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.padding_side == "left"
    prompt_tokens = workload["prompt_tokens"]
    prompts = [json.loads(line)["prompt"] for line in (models / "prompts.jsonl").read_text().splitlines()]
    input_ids = [tokenizer(text, add_special_tokens=False)["input_ids"][-prompt_tokens:] for text in prompts]
    assert len(input_ids) == workload["num_prompts"] and {len(ids) for ids in input_ids} == {prompt_tokens}

    def load_policy() -> GPT2LMHeadModel:
        return GPT2LMHeadModel.from_pretrained(models / "policy", dtype=torch.float32)

    def load_scorer() -> GPT2ForSequenceClassification:
        return GPT2ForSequenceClassification.from_pretrained(models / "reward", num_labels=1, dtype=torch.float32)

    rollouts, minibatches = workload["rollouts_per_update"], workload["num_mini_batches"]
    accumulation = workload["gradient_accumulation_steps"]
    total_updates = workload["warmup_updates"] + updates
    config = PPOConfig(
        output_dir=str(workdir / "trl-output"),
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=workload["seed"],
        # One rollout batch of 64 = per_device_train_batch_size x gradient_accumulation_steps; 4 minibatches of 16.
        per_device_train_batch_size=rollouts // accumulation,
        gradient_accumulation_steps=accumulation,
        num_mini_batches=minibatches,
        num_ppo_epochs=workload["ppo_epochs"],
        total_episodes=rollouts * total_updates,
        local_rollout_forward_batch_size=rollouts,
        learning_rate=wl.VARIABLE_LENGTH_LEARNING_RATE if workload.get("eos_logit") else workload["learning_rate"],
        kl_coef=workload["kl_coef"],
        temperature=workload["temperature"],  # TRL samples with top_k=0, top_p=1.0: the workload's values
        response_length=workload["response_tokens"],
        stop_token="eos" if workload.get("eos_logit") else None,
        missing_eos_penalty=None,
        bf16=dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=workload["gradient_checkpointing"],
        num_sample_generations=0,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=load_policy(),
        ref_model=load_policy(),
        reward_model=load_scorer(),
        value_model=load_scorer(),
        train_dataset=Dataset.from_dict({"input_ids": input_ids}),
        # TRL builds an eval dataloader whether or not it samples; num_sample_generations=0 never uses it.
        eval_dataset=Dataset.from_dict({"input_ids": input_ids[:config.per_device_eval_batch_size]}),
    )
    derived = (config.batch_size, config.mini_batch_size, config.num_total_batches)
    assert derived == (rollouts, rollouts // minibatches, total_updates), f"TRL batch arithmetic: {derived}"
    return trainer


def single(values: list[int]) -> int | list[int]:
    """One count per update: the value when every timed update agrees, else all of them."""
    return values[0] if len(set(values)) == 1 else values


def run(args: argparse.Namespace) -> dict[str, Any]:
    workload, workdir = sized_workload(args)
    updates = args.updates or workload["timed_updates"]
    models = build_workload(workdir, workload)
    monitor = wl.LoadMonitor().start()
    threads = args.threads or workload["torch_threads"]
    torch.set_num_threads(threads)
    set_seed(workload["seed"])
    peak = wl.matmul_peak_gflops(threads, args.dtype)

    trainer = make_trainer(workload, models, workdir, updates, args.dtype)
    assert torch.get_num_threads() == threads, "something changed torch's thread count"
    clock = UpdateClock()
    with instrumented(trainer, clock):
        trainer.train()
    load = monitor.stop()

    warmup = workload["warmup_updates"]
    times = clock.update_times()[warmup:]
    phases = clock.phases[warmup:]
    counts = clock.counts[warmup:]
    assert len(times) == updates, f"{len(times)} updates timed, {updates} expected"
    s_per_update = statistics.median(times)
    split = {name: statistics.median(p[name] for p in phases) for name in PHASES}
    split["other"] = statistics.median(t - sum(p.values()) for t, p in zip(times, phases, strict=True))
    rollouts = statistics.median(c["rollouts"] for c in counts)
    sampled_tokens = statistics.median(c["sampled_tokens"] for c in counts)
    gflop = wl.nominal_flops_per_update(workload) / 1e9
    return {
        "impl": IMPL,
        "s_per_update": round(s_per_update, 4),
        "rollouts_per_s": round(rollouts / s_per_update, 3),
        "generated_tokens_per_s": round(sampled_tokens / s_per_update, 1),
        "peak_rss_mib": round(wl.peak_rss_mib(), 1),
        "phases": {name: round(seconds, 4) for name, seconds in split.items()},
        "nominal_gflop_per_update": round(gflop, 3),
        "model_gflop_per_s": round(gflop / s_per_update, 3),
        "matmul_peak_gflop_per_s": round(peak, 1),
        "fraction_of_peak": round(gflop / s_per_update / peak, 4),
        "threads": threads,
        "dtype": args.dtype,
        "variable_length": args.variable_length,
        **wl.device_report(),
        "workload": {k: workload["policy_and_reference"][k] for k in ("n_layer", "n_head", "n_embd")},
        "updates_timed": len(times),
        "update_times": [round(t, 4) for t in times],
        "proof": {reported: single([c[counted] for c in counts]) for reported, counted in PROOF.items()},
        **load,
        "versions": {name: version(name) for name in ("trl", "transformers", "accelerate", "torch")},
    }


def print_result(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> None:
    """Run, with everything TRL and transformers print (progress, logs) sent to stderr, and print the result as one
    JSON line on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    print_result(run, parse_args(argv))


if __name__ == "__main__":
    main()
