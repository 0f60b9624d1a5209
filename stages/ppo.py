"""PPO against a learned reward model: our own loop on accelerate + transformers + peft.

Models: the policy (from the SFT output), the reference (a frozen copy, or the policy with its LoRA adapters
disabled), the frozen reward model, and the critic (from the reward model when it is causal and reads the policy's
tokens, else from the policy with a zero-initialised head). Policy and critic train together as one module with one
optimiser, so DDP and DeepSpeed see a single model.

`run` reads the inputs, builds the models, then each update (`ppo_update`): take the next prompts and sample
responses (`generate_rollout`), score them: log-probs, reference log-probs, values, reward-model scores
(`score_rollout`), shape rewards with the KL penalty and estimate advantages (`rewards_and_advantages`), run PPO
epochs over minibatches (`optimise`); then log, evaluate and checkpoint. The math is in rlhf/ppo/; the speed paths
sit behind `rlhf.ppo.speed.SpeedPaths` (``speed_paths=false``: the plain path). docs/architecture.md has the map.

    accelerate launch launch/ppo.py [--config configs/ppo/demo.yaml] [key.sub=value ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rlhf.checkpoint import (
    CHECKPOINT_STATE,
    REWARD_STATS_FILE,
    checkpoint_dir,
    latest_checkpoint,
    output_dir_of,
    read_json,
    read_manifest,
    require_upstream,
    truncate_logs_to,
    write_json_atomic,
)
from rlhf.checks import check_initial_samples, check_reward_gate
from rlhf.ppo.alarms import Alarms, correlation, repeated_ngram
from rlhf.config import BatchLayout, PPOConfig
from rlhf.data import prepare_stage_data
from rlhf.errors import AlarmStop, ConfigError, TrainingDiverged
from rlhf.evaluation import EvalPrompts, encode_prompts, evaluate_policy, summarise_records
from rlhf.flops import utilisation
from rlhf.memory import WeightGathers, process_memory
from rlhf.models import (
    apply_peft,
    check_model_source,
    count_parameters,
    disable_dropout,
    frozen,
    hidden_size,
    is_encoder,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    save_model,
)
from rlhf.ppo.advantages import gae, shaped_rewards
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, kl_per_token
from rlhf.ppo.flops import PHASES as FLOP_PHASES, UpdateFlops, flops_metrics
from rlhf.ppo.estimators import aggregate, grpo_advantages, per_token, reinforce_pp_advantages, rloo_advantages
from rlhf.ppo.losses import entropy_bonus, explained_variance_from_moments, kl_loss, policy_loss, value_loss
from rlhf.ppo.masked import masked_sum, mean_var, moments, whiten
from rlhf.ppo.micro_batches import accumulating, micro_batches
from rlhf.ppo.rollout import GenerationSettings, Rollout, generate, left_pad, policy_forward, score_module, token_values
from rlhf.ppo import speed
from rlhf.ppo.sampling import sample_seed, sample_uniforms
from rlhf.ppo.speed import SpeedPaths
from rlhf.runtime import (ZERO3_SIZED_BY_HIDDEN, StageRun, distributed_state, fused_adamw, is_deepspeed,
                          onednn_linears, zero3_memory_settings)
from rlhf.rewards import WeightedReward, load_reward_functions, score_responses
from rlhf.scoring import RewardScorer
from rlhf.signals import StageInterrupted, StopRequest, fault_injected, fault_point
from rlhf.text import TextContract
from rlhf.tracking import read_metrics
from rlhf.train_state import load_state, rng_state, set_rng_state, write_checkpoint

Config = PPOConfig
logger = logging.getLogger(__name__)

#: Files of a PPO checkpoint (inside checkpoints/step_<N>/); checkpoint.json is written last.
MODEL_STATE = "model"  # policy + critic weights, safetensors
TRAINER_STATE = "trainer"  # optimiser, scheduler, RNG, KL controller, counters: safetensors + JSON


def zero_stage(accelerator: Any) -> int:
    """The DeepSpeed ZeRO stage, 0 when DeepSpeed is not in use."""
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else 0


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's wrapper (whose state_dict we store ourselves)."""
    return getattr(optimizer, "optimizer", optimizer)


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic as one module, so that one optimiser, one DDP wrapper or one DeepSpeed engine holds both.
    The critic-free estimators have no critic (None): the values are then None too."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module | None):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_response_tokens: int,
                temperature: float, with_entropy: bool,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        logprobs, entropy = policy_forward(self.policy, input_ids, attention_mask, num_response_tokens,
                                           temperature=temperature, with_entropy=with_entropy)
        if self.critic is None:
            return logprobs, entropy, None
        values = token_values(self.critic, input_ids, attention_mask, num_response_tokens,
                              head=score_module(self.critic))
        return logprobs, entropy, values


@dataclasses.dataclass
class Batch:
    """One process's rollout batch: token tensors [B, P + R] and per-token tensors [B, R] (float32)."""

    rollout: Rollout
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, rows: torch.Tensor) -> "Batch":
        """Rows ``rows``, with the columns that are padding in all of them dropped (prompt side and response side)."""
        sub = self.rollout.select(rows)
        length = sub.response_ids.shape[1]
        return Batch(sub, *(t[rows][:, :length] for t in (self.old_logprobs, self.ref_logprobs, self.old_values,
                                                            self.advantages, self.returns)))


def is_lora(cfg: PPOConfig) -> bool:
    return cfg.peft.method == "lora"


def prepare_frozen(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen model (reference, reward model) for inference: on the device, or under DeepSpeed ZeRO-3 as an
    inference engine whose weights are sharded like the trained model's."""
    if not is_deepspeed(accelerator):
        return model.to(accelerator.device)
    import deepspeed

    plugin_config = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = plugin_config.get("zero_optimization", {})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plugin_config["train_micro_batch_size_per_gpu"],
        # Sharded and gathered as the trained engine is (its sizes, `deepspeed_settings`).
        "zero_optimization": {"stage": 3, **{key: zero[key] for key in ZERO3_SIZED_BY_HIDDEN if key in zero}}
        if zero.get("stage", 0) == 3 else {"stage": 0},
    }
    for precision in ("bf16", "fp16"):
        if plugin_config.get(precision, {}).get("enabled") is True:
            config[precision] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine.module


@contextlib.contextmanager
def gathered_for_generation(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Under ZeRO-3, gather the policy's weights once for the whole rollout instead of once per generated token.
    The engine's own hooks would release each layer's weights after its forward, inside the gathered block too, and
    gather them again at the next token (counted: 9.8 times the policy per rollout of 8 tokens on the test model);
    a weight in use by a module is never released, so each is marked in use by the rollout until its end."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for param in params:
            param.ds_active_sub_modules.add(ROLLOUT_IN_USE)
        try:
            yield
        finally:
            for param in params:
                param.ds_active_sub_modules.discard(ROLLOUT_IN_USE)


#: The id that marks a ZeRO-3 weight in use by generation (DeepSpeed numbers modules from 0).
ROLLOUT_IN_USE = -1


def release_inference_gathers(accelerator: Any, engine: Any) -> None:
    """Under ZeRO-3, partition all of the trained engine's weights again before it trains: the training forward
    then gathers them afresh. A weight gathered inside ``torch.inference_mode`` (generation, scoring, the held-out
    evaluation) is an inference tensor, which autograd cannot save for backward; and once DeepSpeed's trace of the
    passes is complete it keeps its persistent parameters (those of at most ``stage3_param_persistence_threshold``
    elements: LoRA's adapters, biases, norms) and its prefetches gathered from one pass to the next. With LoRA the
    reference is the engine's own policy, and from the third update (the trace completes at the second update's
    training forward) the weights its scoring passes gathered reached the training forward. DeepSpeed's own
    optimiser step starts the same way."""
    if zero_stage(accelerator) == 3:
        engine.optimizer.parameter_offload.partition_all_parameters()


def load_prompts(cfg: PPOConfig, contract: TextContract) -> tuple[EvalPrompts, EvalPrompts, dict[str, Any]]:
    """The training and held-out prompts, encoded, and the dataset's statistics (rows dropped and why)."""
    data = prepare_stage_data(cfg, "prompt")
    if not data.train:
        raise ConfigError(f"data.path={cfg.data.path}: no usable prompts")
    train = [row["prompt"] for row in data.train]
    held_out = [row["prompt"] for row in data.eval][: cfg.eval.num_prompts]
    return (EvalPrompts(train, encode_prompts(contract, train, cfg.rollout.max_prompt_len)),
            EvalPrompts(held_out, encode_prompts(contract, held_out, cfg.rollout.max_prompt_len)), data.stats)


def prompt_order(seed: int, epoch: int, num_prompts: int) -> list[int]:
    """The prompts of one pass over the data, shuffled by a generator keyed by (seed, pass)."""
    generator = torch.Generator().manual_seed(sample_seed(seed, "prompt-order", epoch))
    return torch.randperm(num_prompts, generator=generator).tolist()


class PromptStream:
    """Prompt of global sample index g: passes over the data, each in its own seeded order. The position in the
    stream is the update index, so resuming needs no other data state."""

    def __init__(self, seed: int, num_prompts: int):
        self.seed = seed
        self.num_prompts = num_prompts
        self._orders: dict[int, list[int]] = {}

    def __getitem__(self, index: int) -> int:
        epoch, offset = divmod(index, self.num_prompts)
        if epoch not in self._orders:
            self._orders = {epoch: prompt_order(self.seed, epoch, self.num_prompts)}
        return self._orders[epoch][offset]


def load_score_stats(cfg: PPOConfig) -> dict[str, float] | None:
    path = Path(cfg.reward_path) / REWARD_STATS_FILE
    if cfg.rollout.score_norm != "reward_stats":
        return None
    if not path.is_file():
        raise ConfigError(
            f"rollout.score_norm=reward_stats needs {path} (written by the reward stage); set "
            "rollout.score_norm=first_rollout or none for a reward model from elsewhere"
        )
    stats = read_json(path)
    return {"mean": float(stats["mean"]), "std": float(stats["std"])}


def build_critic(cfg: PPOConfig, policy_tokenizer: Any, reward_tokenizer: Any, reward_is_encoder: bool,
                 scorer: RewardScorer | None) -> tuple[torch.nn.Module, str]:
    """The critic and where it came from ("reward" or "policy"; "policy" when the run loads no reward model)."""
    can_use_reward = scorer is not None and not reward_is_encoder and scorer.shares_tokens
    source = cfg.ppo.critic_init
    if source == "auto":
        source = "reward" if can_use_reward else "policy"
    if source == "reward" and not can_use_reward:
        raise ConfigError(
            "ppo.critic_init=reward needs a causal reward model that reads the policy's tokens; this one is an "
            "encoder or has another tokenizer. Use ppo.critic_init=policy (or auto)"
        )
    path = cfg.reward_path if source == "reward" else cfg.policy_path
    model_cfg = cfg.reward_model if source == "reward" else cfg.model
    critic = load_sequence_scorer(dataclasses.replace(model_cfg, name_or_path=path),
                                  pad_token_id=(reward_tokenizer if source == "reward" else policy_tokenizer).pad_token_id)
    if source == "policy":
        # A fresh head predicts 0 for every state, so the first advantages are the rewards themselves.
        with torch.no_grad():
            for param in score_module(critic).parameters():
                param.zero_()
    return critic, source


def optimiser_and_schedule(cfg: PPOConfig, model: PolicyAndCritic, total_steps: int, *,
                           fused: bool = False) -> tuple[Any, Any]:
    """AdamW over the policy's and the critic's trainable parameters (two groups, so the critic can have its own
    learning rate) and the learning-rate schedule. ``fused``: torch's one-kernel-per-tensor AdamW (CPU and CUDA),
    the same update as the default per-tensor loop of about ten operations."""
    from transformers import get_scheduler

    o = cfg.optim
    groups = [
        {"params": [p for p in model.policy.parameters() if p.requires_grad], "lr": o.learning_rate},
        {"params": [p for p in model.critic.parameters() if p.requires_grad] if model.critic is not None else [],
         "lr": cfg.ppo.critic_learning_rate or o.learning_rate},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.learning_rate, betas=(o.adam_beta1,
                                  o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.weight_decay, fused=fused or None)
    scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=math.ceil(o.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One batch from several generation chunks (their prompt and response widths differ)."""
    prompts = [p for part in parts for p in part.prompt_lists()]
    responses = [r for part in parts for r in part.response_lists()]
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, parts[0].prompt_ids.device)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for row, response in enumerate(responses):
        response_ids[row, :len(response)] = torch.as_tensor(response)
        response_mask[row, :len(response)] = True
    device = prompt_ids.device
    logprobs = None
    if all(part.logprobs is not None for part in parts):
        logprobs = torch.cat([torch.nn.functional.pad(part.logprobs, (0, width - part.logprobs.shape[1]))
                              if part.logprobs.shape[1] < width else part.logprobs[:, :width] for part in parts])
    return Rollout(prompt_ids, prompt_mask, response_ids.to(device), response_mask.to(device),
                   torch.cat([part.stopped for part in parts]), logprobs)


@dataclasses.dataclass
class PPOModels:
    """What an update hook sees: the unwrapped trained module (policy + critic), the reference (None when it is the
    policy with adapters disabled) and the reward model."""

    trained: PolicyAndCritic
    reference: torch.nn.Module | None
    reward_model: torch.nn.Module | None  # None when the run loads none


#: Logged with every update: rollouts so far, the x axis of the W&B charts.
EPISODE_METRIC = "train/episode"

#: Called with (update index, models) before the first update (index 0 or the resumed one) and after each update.
UpdateHook = Callable[[int, PPOModels], None]


def run(cfg: PPOConfig, *, on_update: UpdateHook | None = None) -> Path:
    """The PPO stage: read the inputs, build the models, then per update generate → score → advantages →
    optimise → log, evaluate, checkpoint; last, the held-out evaluation and the outputs."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    state = distributed_state()
    layout = cfg.batch_layout(state.num_processes)
    inputs = read_inputs(cfg, state)
    accelerator = Accelerator(gradient_accumulation_steps=layout.micro_batches)
    if is_deepspeed(accelerator):
        deepspeed_settings(accelerator, cfg, layout.minibatch // layout.micro_batches,
                           hidden_size(inputs.policy_cfg.name_or_path))

    with StageRun(cfg, rank=state.process_index, is_main_process=state.is_main_process,
                  x_axis=EPISODE_METRIC) as stage, StopRequest() as stop:
        models = build_models(cfg, accelerator, inputs, layout)
        loop = LoopState(kl_controller(cfg), inputs.score_stats, alarms=Alarms(cfg.alarms))
        start_update = 0
        if inputs.resume_from is not None:
            start_update = restore(accelerator, models.training.model, inputs.resume_from, models.training.unwrapped,
                                   models.training.optimizer, models.training.scheduler, loop)
            logger.info("ppo: resumed from %s (update %d)", inputs.resume_from, start_update)
        evaluator = Evaluator(cfg, models, inputs, stage.tracker)
        eval_before = evaluator.before_training(start_update, stage.output_dir)
        if start_update == 0:  # the checks of the initial samples passed (or were waived) before a resume
            loop.checks = check_initial_samples(cfg.checks, evaluator.records,
                                                scores_train=bool(cfg.rewards.reward_model_weight),
                                                stops=cfg.rollout.stop_at_stop_token)
            loop.alarms.evaluation(0, eval_before)
        if on_update is not None:
            on_update(start_update, models.view())

        prompts = PromptStream(cfg.seed, len(inputs.train_prompts.prompts))
        progress = tqdm(range(start_update, cfg.ppo.num_updates), initial=start_update, total=cfg.ppo.num_updates,
                        desc="ppo", disable=not state.is_main_process)
        for update in progress:
            result = ppo_update(cfg, models, inputs, prompts, loop, update)
            step = update + 1
            loop.record(cfg, result, step)
            if on_update is not None:
                on_update(step, models.view())
            stage.tracker.log({**result.metrics, EPISODE_METRIC: step * cfg.rollout.batch_size}, step=step)
            progress.set_postfix(score=f"{result.metrics['rollout/score_mean']:.3f}",
                                 kl=f"{result.metrics['rollout/kl']:.3f}")
            if step % cfg.samples_every == 0 or step == cfg.ppo.num_updates:
                log_samples(stage.tracker, inputs.contract, inputs.train_prompts, result.prompt_rows, result.rollout,
                            result.raw_scores, step)
            fired = loop.alarms.update(step, result.metrics) if result.bad is None else []
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.ppo.num_updates:
                fired += loop.alarms.evaluation(step, evaluator.run(step))
            sound_alarms(stage.tracker, step, fired, step * cfg.rollout.batch_size)
            checkpoint_or_stop(cfg, models, loop, stage.output_dir, step, stop, bad=result.bad, alarmed=bool(fired))
        progress.close()
        return finish(cfg, models, inputs, loop, stage, eval_before, evaluator.after_training())


@dataclasses.dataclass
class Inputs:
    """What the stage reads before any weights load: the model configs (the upstream outputs filled in), the
    tokenizers and the policy's text contract, the prompts, the score normalisation, the checkpoint to resume from
    and the sampling settings."""

    policy_cfg: Any
    reward_cfg: Any  # None: the run loads no reward model (`PPOConfig.uses_reward_model`), nor the two below
    tokenizer: Any
    contract: TextContract
    reward_tokenizer: Any
    reward_is_encoder: bool
    train_prompts: EvalPrompts
    eval_prompts: EvalPrompts
    data_stats: dict[str, Any]
    score_stats: dict[str, float] | None
    resume_from: Path | None
    settings: GenerationSettings
    reward_functions: list[WeightedReward]


def read_inputs(cfg: PPOConfig, state: Any) -> Inputs:
    """The stage's inputs, each checked (with the command that builds a missing upstream output) before any weights
    load. A resumed run's logs are cut back to its checkpoint first."""
    if not cfg.model.name_or_path:
        require_upstream(cfg.policy_path, stage="sft", run_dir=cfg.run_dir)
    if not cfg.reward_model.name_or_path and cfg.uses_reward_model:
        require_upstream(cfg.reward_path, stage="reward", run_dir=cfg.run_dir)
    if cfg.rewards.reward_model_weight:
        check_reward_gate(cfg.checks, read_manifest(cfg.reward_path), cfg.reward_path)
    policy_cfg = speed.model_config(cfg, dataclasses.replace(cfg.model, name_or_path=cfg.policy_path))
    check_model_source(policy_cfg, key="model.name_or_path")
    tokenizer = load_tokenizer(policy_cfg)
    tokenizer.padding_side = "left"
    contract = TextContract.from_tokenizer(tokenizer)
    reward_cfg, reward_tokenizer, reward_is_encoder = None, None, False
    if cfg.uses_reward_model:
        reward_cfg = speed.model_config(cfg, dataclasses.replace(cfg.reward_model, name_or_path=cfg.reward_path))
        check_model_source(reward_cfg, key="reward_model.name_or_path")
        reward_tokenizer = load_tokenizer(reward_cfg)
        reward_is_encoder = is_encoder(cfg.reward_path)
    train_prompts, eval_prompts, data_stats = load_prompts(cfg, contract)
    score_stats = load_score_stats(cfg) if cfg.uses_reward_model else None
    resume_from = latest_checkpoint(output_dir_of(cfg)) if cfg.checkpoint.resume else None
    if resume_from is not None and state.is_main_process:
        # The resumed run rewrites what came after its checkpoint; the logs must not hold those rows twice.
        truncate_logs_to(resume_from)
    state.wait_for_everyone()
    settings = GenerationSettings(
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k,
        top_p=cfg.rollout.top_p, pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=contract.stop_token_ids if cfg.rollout.stop_at_stop_token else (),
    )
    return Inputs(policy_cfg, reward_cfg, tokenizer, contract, reward_tokenizer, reward_is_encoder, train_prompts,
                  eval_prompts, data_stats, score_stats, resume_from, settings,
                  load_reward_functions(cfg.rewards.functions))


@dataclasses.dataclass
class Models:
    """The prepared models, as the optimise phase (`Training`) and the scoring phases (`Scoring`) use them; where
    the critic started ("reward" or "policy"); how many parameters train."""

    training: Training
    scoring: Scoring
    critic_source: str
    trainable: int
    flops: UpdateFlops
    gathers: WeightGathers  # counting under ZeRO-3 only

    def view(self) -> PPOModels:
        scorer = self.scoring.scorer
        return PPOModels(self.training.unwrapped, self.scoring.reference, scorer.model if scorer is not None else None)


def build_models(cfg: PPOConfig, accelerator: Any, inputs: Inputs, layout: BatchLayout) -> Models:
    """Policy (+ adapters), reference (a frozen copy, or none with LoRA), reward model (when the run uses one) and
    critic; policy and critic as one module under accelerate with one optimiser and its schedule; the speed paths
    the run takes."""
    # Loaded, not deep-copied: under ZeRO-3 the policy's parameters are already partitioned at load time.
    policy = load_causal_lm(inputs.policy_cfg)
    reference = None if is_lora(cfg) else frozen(load_causal_lm(inputs.policy_cfg))
    # Under ZeRO-3 every forward gathers weights from all processes: the same number of passes on each.
    zero3 = zero_stage(accelerator) == 3
    scorer = None
    if inputs.reward_cfg is not None:
        reward_model = frozen(load_sequence_scorer(inputs.reward_cfg,
                                                   pad_token_id=inputs.reward_tokenizer.pad_token_id))
        scorer = RewardScorer(reward_model, inputs.reward_tokenizer, policy_contract=inputs.contract,
                              is_encoder=inputs.reward_is_encoder, batch_size=cfg.rollout.micro_batch_size,
                              equal_count=zero3, by_length=cfg.speed_paths)
    critic, critic_source = None, "none"  # the critic-free estimators build, load and train none
    if cfg.has_critic:
        critic, critic_source = build_critic(cfg, inputs.tokenizer, inputs.reward_tokenizer,
                                             inputs.reward_is_encoder, scorer)
        critic = apply_peft(critic, cfg.critic_peft, task="score")
    policy = apply_peft(policy, cfg.peft, task="causal_lm")
    # After the adapters are added: a LoRA layer's own dropout (peft.lora_dropout) goes too.
    for model in (policy, critic):
        if model is not None:
            disable_dropout(model)
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    model = PolicyAndCritic(policy, critic)
    trainable, total = count_parameters(model)
    total_steps = cfg.ppo.num_updates * cfg.ppo.ppo_epochs * cfg.ppo.num_minibatches
    # DeepSpeed steps the optimiser on its own flattened partitions (on the CPU with offload): torch's default.
    optimizer, scheduler = optimiser_and_schedule(cfg, model, total_steps,
                                                  fused=fused_adamw(accelerator, accelerator.device.type))
    # The reward model's own module (prepared, it may be an engine): its pass counts only when its score is used.
    reward_module = scorer.model if scorer is not None and cfg.rewards.reward_model_weight else None
    model, optimizer = accelerator.prepare(model, optimizer)
    reference = prepare_frozen(accelerator, reference) if reference is not None else None
    if scorer is not None:
        scorer.model = prepare_frozen(accelerator, scorer.model)
    unwrapped = accelerator.unwrap_model(model)
    training_dtype = compute_dtype(accelerator, unwrapped.policy)
    paths = SpeedPaths.chosen(cfg, pack_trained=onednn_linears(accelerator, cfg.model),
                              pack_reward=onednn_linears(accelerator, cfg.reward_model), training_dtype=training_dtype)
    flops = UpdateFlops.of(unwrapped.policy, unwrapped.critic, reward_module, reward_is_encoder=inputs.reward_is_encoder,
                           reuse_logprobs=paths.reuse_logprobs, device=str(accelerator.device), dtype=training_dtype)
    training = Training(accelerator, model, unwrapped, optimizer, scheduler, paths,
                        micro_batch_size=layout.minibatch // layout.micro_batches, micro_batches=layout.micro_batches,
                        pad_token_id=inputs.tokenizer.pad_token_id)
    critic_head = score_module(unwrapped.critic) if unwrapped.critic is not None else None
    scoring = Scoring(accelerator, unwrapped, reference, scorer, critic_head, paths,
                      paths.generation(inputs.settings), inputs.contract, temperature=cfg.rollout.temperature or 1.0,
                      micro_batch_size=cfg.rollout.micro_batch_size, equal_count=zero3,
                      rewards=inputs.reward_functions, reward_model_weight=cfg.rewards.reward_model_weight)
    # The models, tokenizers and prompts live for the whole run.
    paths.settle_heap()
    logger.info("ppo: %d processes, %d rollouts each per update, minibatch %d in %d micro-batches; %d of %d "
                "parameters train; advantages: %s; critic: %s; reference: %s; speed paths: %s",
                accelerator.num_processes, layout.rollouts, layout.minibatch, layout.micro_batches, trainable, total,
                cfg.ppo.advantage_estimator, critic_source,
                "policy with adapters disabled" if reference is None else "frozen copy", paths.describe())
    return Models(training, scoring, critic_source, trainable, flops, weight_gathers(zero3, scoring))


def memory_per_process(accelerator: Any, models: Models) -> dict[str, list[float]]:
    """Each process's memory in MiB (`rlhf.memory.process_memory`: peak RSS, the trained weights, the optimiser's
    state, the reference's and the reward model's weights), by what, in process order."""
    scoring = models.scoring
    memory = process_memory(models.training.model, models.training.optimizer, reference=scoring.reference,
                            reward=scoring.scorer.model if scoring.scorer is not None else None)
    local = torch.tensor([list(memory.values())], dtype=torch.float64, device=accelerator.device)
    rows = accelerator.gather(local).tolist()
    return {key: [round(row[i], 3) for row in rows] for i, key in enumerate(memory)}


def kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    if cfg.ppo.kl_target is None:
        return FixedKLController(cfg.ppo.kl_coef)
    return AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)


@dataclasses.dataclass
class UpdateResult:
    """One update: its metrics (in the order they are logged), what was not finite when it was skipped, and what
    the samples table shows (the prompts' rows, the rollout, the raw scores)."""

    metrics: dict[str, float]
    bad: str | None
    prompt_rows: list[int]
    rollout: Rollout
    raw_scores: torch.Tensor
    generated_tokens: float


@dataclasses.dataclass
class LoopState:
    """What carries from one update to the next: the KL controller, the score normalisation, the skipped updates
    (in all, and in a row), the last update's metrics, and the time and tokens of the run so far."""

    kl_ctl: FixedKLController | AdaptiveKLController
    score_stats: dict[str, float] | None
    skipped: int = 0
    bad_streak: int = 0
    history: dict[str, float] = dataclasses.field(default_factory=dict)
    rollout_s: float = 0.0
    train_s: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0  # model FLOPs of the updates so far, all processes
    checks: dict[str, float] = dataclasses.field(default_factory=dict)  # what the checks before training measured
    alarms: Alarms | None = None

    def record(self, cfg: PPOConfig, result: UpdateResult, step: int) -> None:
        """Count the update (a skipped one too), and adapt the KL coefficient to a finished one."""
        self.skipped += result.bad is not None
        result.metrics["ppo/skipped_updates"] = self.skipped
        if result.bad is None:
            self.kl_ctl.update(result.metrics["rollout/kl"], cfg.rollout.batch_size)
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            logger.warning("ppo: update %d skipped: non-finite %s (%d in a row; %d stop the run)", step, result.bad,
                           self.bad_streak, cfg.ppo.max_bad_updates)
        self.history = result.metrics
        self.rollout_s += result.metrics["time/rollout_s"]
        self.train_s += result.metrics["time/train_s"]
        self.tokens += result.generated_tokens
        self.flops += sum(result.metrics[f"perf/flops_{phase}"] for phase in FLOP_PHASES)


def ppo_update(cfg: PPOConfig, models: Models, inputs: Inputs, prompts: PromptStream, loop: LoopState,
               update: int) -> UpdateResult:
    """One update: this process's share of the update's global sample indices (one random stream each; sample g
    answers prompt g // ``rollout.samples_per_prompt`` of the stream) is generated and scored, rewards shaped and
    advantages estimated (statistics over all processes), then the PPO epochs optimise; the metrics are reduced
    over all processes."""
    scoring, accelerator = models.scoring, models.training.accelerator
    local_batch = cfg.rollout.batch_size // accelerator.num_processes
    t0 = time.perf_counter()
    phase = {"generate_s": 0.0, "policy_value_s": 0.0, "reference_s": 0.0, "reward_s": 0.0}
    first = update * cfg.rollout.batch_size + accelerator.process_index * local_batch
    indices = list(range(first, first + local_batch))
    prompt_rows = [prompts[g // cfg.rollout.samples_per_prompt] for g in indices]
    scoring.unwrapped.eval()
    with torch.inference_mode(), scoring.inference():
        models.gathers.phase("generate")
        rollout = generate_rollout(cfg, scoring, [inputs.train_prompts.prompt_ids[i] for i in prompt_rows], indices)
        phase["generate_s"] = time.perf_counter() - t0
        models.gathers.phase("score")
        scored = score_rollout(scoring, rollout, [inputs.train_prompts.prompts[i] for i in prompt_rows], phase)
        if fault_injected("nan_scores", update + 1):
            scored.raw_scores[0] = float("nan")
        if cfg.rollout.score_norm == "first_rollout" and loop.score_stats is None:
            loop.score_stats = first_rollout_stats(accelerator, scored.raw_scores)
        shaped = rewards_and_advantages(cfg, accelerator, rollout, scored, loop.score_stats, loop.kl_ctl.value,
                                        models.critic_source)
        bad = non_finite_input(accelerator, rollout, scored, shaped)
    # Tensors made under inference_mode cannot be saved for backward; clones outside it can.
    batch = Batch(*(clone_tree(x) for x in (rollout, scored.old_logprobs, scored.ref_logprobs, shaped.old_values,
                                             shaped.advantages, shaped.returns)))
    # Nor can the weights ZeRO-3 gathered inside it: partitioned again, they are gathered by the training forward.
    release_inference_gathers(accelerator, models.training.model)
    rollout_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    models.gathers.phase("train")
    trained = optimise(cfg, models.training, batch, update, skip=bad, critic_source=models.critic_source,
                       score_stats=loop.score_stats, kl_coef=loop.kl_ctl.value)
    train_s = time.perf_counter() - t1
    models.gathers.phase(None)

    losses = trained.reduced(accelerator, cfg.ppo.num_minibatches)
    drawn = rollout_means(accelerator, rollout, scored, shaped, cfg.rollout.batch_size)
    signals = alarm_signals(accelerator, rollout, scored.raw_scores, cfg.alarms.ngram)
    generated = drawn["rollout/response_len"] * cfg.rollout.batch_size
    reward_lengths = scoring.scorer.last_lengths if models.flops.reward is not None else None
    counted = models.flops.count(rollout.attention_mask.sum(-1).tolist(), reward_lengths, trained.epochs)
    work = flops_metrics(accelerator, counted, {"generate": phase["generate_s"], "rollout": rollout_s,
                                                "train": train_s}, models.flops.peak)
    metrics = {
        **{k: drawn[k] for k in ROLLOUT_METRICS},
        **{k: drawn[k] for k in scored.function_scores},
        **{k: losses[k] for k in loss_metrics(cfg)},
        **({"ppo/explained_var": explained_variance_all(accelerator, shaped.old_values, shaped.returns,
                                                        rollout.response_mask)} if cfg.has_critic else {}),
        "ppo/kl_coef": loop.kl_ctl.value, "ppo/logprob_gap": losses["ppo/logprob_gap"],
        "ppo/lr": models.training.scheduler.get_last_lr()[0],
        "time/rollout_s": rollout_s, "time/train_s": train_s,
        **{f"time/{name}": seconds for name, seconds in phase.items()},
        # Tokens drawn (including those after a stop token) and optimiser steps: what the update did.
        "perf/sampled_tokens": drawn["sampled_tokens"] * cfg.rollout.batch_size,
        "ppo/optimizer_steps": trained.optimizer_steps, "ppo/epochs": trained.epochs,
        "perf/train_passes": losses["perf/train_passes"], "perf/train_padding": losses["perf/train_padding"],
        "perf/tokens_per_s": generated / max(rollout_s + train_s, 1e-9),
        **work,
        **gather_metrics(models),
        **signals,
    }
    return UpdateResult(metrics, trained.bad, prompt_rows, batch.rollout, scored.raw_scores, generated)


def weight_gathers(zero3: bool, scoring: Scoring) -> WeightGathers:
    """The count of the weights ZeRO-3 gathers per phase, installed under ZeRO-3 only, against the models each phase
    runs: the policy in generation, all of them (policy, critic, reference, reward model) in the scoring passes, the
    policy and critic in training."""
    if not zero3:
        return WeightGathers({})
    size = lambda model: count_parameters(model)[1] if model is not None else 0  # noqa: E731
    trained, scorer = scoring.unwrapped, scoring.scorer
    everything = size(trained) + size(scoring.reference) + (size(scorer.model) if scorer is not None else 0)
    return WeightGathers({"generate": size(trained.policy), "score": everything, "train": size(trained)}).install()


def gather_metrics(models: Models) -> dict[str, float]:
    """Under ZeRO-3, how many times this process gathered each phase's weights in the update; nothing without."""
    return {f"perf/weight_gathers_{phase}": times for phase, times in models.gathers.take().items()}


def alarm_signals(accelerator: Any, rollout: Rollout, raw_scores: torch.Tensor, ngram: int) -> dict[str, float]:
    """The alarms' rollout signals (`rlhf.ppo.alarms.rollout_signals`) over the global batch: every process's scores
    and responses, gathered."""
    mask = rollout.response_mask
    flags = torch.tensor([float(repeated_ngram(r, ngram)) for r in rollout.response_lists()], device=mask.device)
    local = torch.stack([raw_scores.float(), mask.sum(-1).float(), flags], dim=1)
    scores, lengths, repeated = accelerator.gather(local).double().T.tolist()
    return {"alarm/length_correlation": correlation(scores, lengths),
            "alarm/repetition": sum(repeated) / max(len(repeated), 1)}


def first_rollout_stats(accelerator: Any, raw_scores: torch.Tensor) -> dict[str, float] | None:
    """``rollout.score_norm=first_rollout``: the mean and standard deviation of the first rollout's scores over all
    processes, fixed from then on; None while a score is not finite (that update is skipped, and the next rollout's
    scores set them)."""
    mean, var = (x.item() for x in mean_var(accelerator.reduce(moments(raw_scores, torch.ones_like(raw_scores)),
                                                                 "sum")))
    if not (math.isfinite(mean) and math.isfinite(var)):
        return None
    return {"mean": mean, "std": math.sqrt(var)}


def non_finite_input(accelerator: Any, rollout: Rollout, scored: ScoredRollout, shaped: ShapedRollout) -> str | None:
    """What the optimise phase would take that holds a NaN or an infinity on any process (it would reach the
    weights: the update is skipped on all processes), or None."""
    mask = rollout.response_mask
    return first_non_finite(accelerator, {
        "reward-model scores": scored.raw_scores, "old log-probs": scored.old_logprobs[mask],
        "reference log-probs": scored.ref_logprobs[mask], "values": shaped.old_values[mask],
        "rewards": shaped.rewards[mask], "advantages": shaped.advantages[mask]})


def sound_alarms(tracker: Any, step: int, fired: list[tuple[str, str]], episode: int) -> None:
    """Each alarm that fired after update ``step``: a warning line, an ``alarm/fired/<name>`` metric (the report
    marks it on the curves) and a W&B alert."""
    for name, message in fired:
        logger.warning("ppo: reward-hacking alarm '%s' after update %d: %s", name, step, message)
        tracker.alert(f"rlhf alarm: {name}", f"after update {step}: {message}")
    if fired:
        tracker.log({**{f"alarm/fired/{name}": 1.0 for name, _ in fired}, EPISODE_METRIC: episode}, step=step)


def checkpoint_or_stop(cfg: PPOConfig, models: Models, loop: LoopState, output_dir: Path, step: int, stop: Any, *,
                       bad: str | None, alarmed: bool = False) -> None:
    """After update ``step``: stop with `TrainingDiverged` after ``ppo.max_bad_updates`` skipped updates in a row,
    save a checkpoint every ``checkpoint.save_every`` updates, on a stop request agreed by all processes save one
    and raise `StageInterrupted`, and when an alarm fired under ``alarms.stop`` save one and raise `AlarmStop`.
    Every exit leaves a checkpoint to resume from."""
    t = models.training

    def save() -> None:
        save_checkpoint(t.accelerator, t.model, output_dir, step, t.unwrapped, t.optimizer, t.scheduler, loop.kl_ctl,
                        loop.score_stats, keep_last=cfg.checkpoint.keep_last, alarms=loop.alarms.state_dict())

    if alarmed and cfg.alarms.stop and step < cfg.ppo.num_updates:
        save()
        raise AlarmStop(f"ppo stopped after update {step} by the reward-hacking alarms {sorted(loop.alarms.fired)} "
                        f"(alarms.stop=true); a checkpoint is in {checkpoint_dir(output_dir, step)}. Look at the "
                        "samples and curves (rlhf report), then change the run (e.g. ppo.kl_coef) or rerun with "
                        "checkpoint.resume=true and alarms.stop=false to go on")

    if loop.bad_streak >= cfg.ppo.max_bad_updates:
        save()
        raise TrainingDiverged(
            f"ppo: {loop.bad_streak} updates in a row (the last: update {step}) had non-finite {bad}; they were "
            f"skipped, and a checkpoint of the last good weights is in {checkpoint_dir(output_dir, step)}. Check the "
            "reward model's scores (rollout.score_clip bounds them), lower optim.learning_rate, then rerun with "
            "checkpoint.resume=true")
    stopping = stop.agreed(t.accelerator.device) and step < cfg.ppo.num_updates
    if (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0) or stopping:
        save()
    if stopping:
        raise StageInterrupted(f"ppo stopped by a signal after update {step}; a checkpoint was saved. Rerun with "
                               "checkpoint.resume=true to continue")


class Evaluator:
    """The held-out evaluation (`rlhf.evaluation.evaluate_policy`) of the current policy on this process's share of
    the held-out prompts, gathered, summarised and logged with a samples table."""

    def __init__(self, cfg: PPOConfig, models: Models, inputs: Inputs, tracker: Any):
        self.cfg, self.models, self.inputs, self.tracker = cfg, models, inputs, tracker
        self.prompts = inputs.eval_prompts
        self.use_gold = cfg.eval.gold_judge and all(isinstance(p, str) for p in self.prompts.prompts)
        self.records: list[dict[str, Any]] = []  # the last evaluation's, on every process

    def run(self, update: int) -> dict[str, float]:
        from accelerate.utils import gather_object

        if not self.prompts.prompts:
            return {}
        scoring, cfg = self.models.scoring, self.cfg
        accelerator = scoring.accelerator
        indices = list(range(accelerator.process_index, len(self.prompts.prompts), accelerator.num_processes))
        scoring.unwrapped.eval()
        with gathered_for_generation(accelerator, scoring.unwrapped.policy), scoring.inference():
            records = evaluate_policy(scoring.unwrapped.policy, scoring.reference_logprobs,
                                      scoring.scorer if cfg.eval.reward_model else None, self.prompts, indices,
                                      scoring.settings, contract=scoring.contract, rewards=scoring.rewards,
                                      seed=cfg.seed,
                                      device=accelerator.device, batch_size=cfg.rollout.micro_batch_size,
                                      gold_judge=self.use_gold,
                                      progress=f"held-out eval (update {update})" if accelerator.is_main_process
                                      else None)
        records = sorted(gather_object(records), key=lambda rec: rec["index"])
        self.records = records
        metrics = summarise_records(records)
        self.tracker.log({**metrics, EPISODE_METRIC: update * cfg.rollout.batch_size}, step=update)
        if cfg.eval.samples:
            columns = ["prompt", "response", *(["score"] if "score" in records[0] else []), "kl",
                       *(["gold_combined"] if self.use_gold else [])]
            self.tracker.log_table("eval_samples", columns,
                                   [[str(r[c]) if c == "prompt" else r[c] for c in columns]
                                    for r in records[: cfg.eval.samples]], step=update)
        return metrics

    def before_training(self, start_update: int, output_dir: Path) -> dict[str, float]:
        """The evaluation before the first update: run now, or read back from the logs of a resumed run."""
        if start_update == 0 or not self.prompts.prompts:
            return self.run(0)
        before = {k: v for row in read_metrics(output_dir) if row.get("step") == 0
                  for k, v in row.items() if k.startswith("eval/")}
        logger.info("ppo: before training %s", format_metrics(before))
        return before

    def after_training(self) -> dict[str, float]:
        return self.run(self.cfg.ppo.num_updates)


def finish(cfg: PPOConfig, models: Models, inputs: Inputs, loop: LoopState, stage: StageRun,
           eval_before: dict[str, float], eval_after: dict[str, float]) -> Path:
    """The summary (held-out metrics before and after, the last update's, the run's time and throughput), the
    policy and critic, the score normalisation, and the manifest: the stage is complete."""
    t = models.training
    accelerator = t.accelerator
    summary: dict[str, Any] = {f"final/{k.split('/', 1)[1]}": v for k, v in eval_after.items()}
    summary.update({f"initial/{k.split('/', 1)[1]}": v for k, v in eval_before.items()})
    summary.update({k: v for k, v in loop.history.items() if k.startswith(("rollout/", "ppo/"))})
    summary.update({"time/rollout_s": loop.rollout_s, "time/train_s": loop.train_s,
                    "perf/tokens_per_s": loop.tokens / max(loop.rollout_s + loop.train_s, 1e-9),
                    "perf/utilisation": utilisation(loop.flops, loop.rollout_s + loop.train_s,
                                                    models.flops.peak * accelerator.num_processes),
                    "trainable_parameters": models.trainable, "updates": cfg.ppo.num_updates})
    saved = save_outputs(accelerator, t.model, t.unwrapped, cfg, inputs.tokenizer, stage.output_dir)
    memory = memory_per_process(accelerator, models)
    summary["perf/peak_rss_mib"] = max(memory["peak_rss"])
    if accelerator.is_main_process and loop.score_stats is not None:
        write_json_atomic(stage.output_dir / REWARD_STATS_FILE, loop.score_stats)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("ppo: %s", format_metrics(summary))
    return stage.complete(summary, extra={"num_processes": accelerator.num_processes,
                                          "zero_stage": zero_stage(accelerator), "critic_init": models.critic_source,
                                          "reference": "adapters disabled" if models.scoring.reference is None
                                          else "copy",
                                          "policy_saved_as": saved, "score_norm": loop.score_stats,
                                          "checks": loop.checks, "alarms": loop.alarms.fired,
                                          "kl_coef_final": loop.kl_ctl.value, "data": inputs.data_stats,
                                          "memory_mib": memory,
                                          "peak_flops": {"per_process": models.flops.peak,
                                                         "source": models.flops.peak_source}})


@dataclasses.dataclass
class Scoring:
    """What scores a rollout: the unwrapped policy + critic (and the critic's head), the reference (None: the policy
    with its adapters disabled), the reward model's scorer (None: the run loads none); the speed paths taken
    (whether the rollout's log-probs serve as the old ones, packing, length groups); how responses are sampled and
    decoded (the policy's text contract); the sampling temperature; rows per
    pass, and whether every process must run as many passes (ZeRO-3); the reward functions, and the reward model's
    weight (0: its pass is left out)."""

    accelerator: Any
    unwrapped: PolicyAndCritic
    reference: torch.nn.Module | None
    scorer: RewardScorer | None
    critic_head: torch.nn.Module
    speed: SpeedPaths
    settings: GenerationSettings
    contract: TextContract
    temperature: float
    micro_batch_size: int
    equal_count: bool
    rewards: list[WeightedReward] = dataclasses.field(default_factory=list)
    reward_model_weight: float = 1.0

    def inference(self) -> contextlib.ExitStack:
        """The block generation and scoring run in (no weight changes inside it)."""
        return self.speed.inference(self.unwrapped, self.reference,
                                    self.scorer.model if self.scorer is not None else None)

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, r: int) -> torch.Tensor:
        """The reference's log-probs of the last ``r`` tokens at the sampling temperature. [B, r]."""
        if self.reference is not None:
            return policy_forward(self.reference, input_ids, attention_mask, r, temperature=self.temperature)[0]
        with self.unwrapped.policy.disable_adapter():
            return policy_forward(self.unwrapped.policy, input_ids, attention_mask, r,
                                  temperature=self.temperature)[0]


@dataclasses.dataclass
class ScoredRollout:
    """A rollout's old log-probs, the critic's values (in its own units), the reference's log-probs ([B, R] each,
    meaningful on the response tokens: `Rollout.response_mask`), the reward model's raw scores [B] (0 when its
    weight is 0), and each reward function's scores [B] by metric name with their weighted sum (None without)."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor
    raw_scores: torch.Tensor
    function_scores: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    function_total: torch.Tensor | None = None


def score_rollout(scoring: Scoring, rollout: Rollout, prompts: list[Any], seconds: dict[str, float]) -> ScoredRollout:
    """Old log-probs (from generation's own logits, or a policy pass), values (0 without a critic), the reference's
    log-probs and the reward model's scores of ``rollout`` (whose prompts, as data, are ``prompts``). Rows go through in groups of
    similar lengths, each without the columns that are padding in all its rows. Adds the time of each kind of pass
    to ``seconds`` (policy_value_s, reference_s, reward_s)."""
    unwrapped, device = scoring.unwrapped, rollout.response_ids.device
    batch, r = rollout.response_ids.shape
    old_values, ref_logprobs = (torch.zeros(batch, r, device=device) for _ in range(2))
    reuse = scoring.speed.reuse_logprobs
    old_logprobs = rollout.logprobs if reuse else torch.zeros(batch, r, device=device)
    lengths = rollout.attention_mask.sum(-1).tolist()
    # In the precision the training forward computes in (accelerate's autocast under mixed precision), so the first
    # ratio is 1 and the first KL 0.
    with scoring.accelerator.autocast():
        for group in scoring.speed.scoring_groups(lengths, scoring.micro_batch_size, equal_count=scoring.equal_count):
            rows = torch.tensor(group, device=device)
            part = rollout.select(rows)
            ids, att, width = part.input_ids, part.attention_mask, part.response_ids.shape[1]
            tp = time.perf_counter()
            if not reuse:
                lp, _, v = unwrapped(ids, att, width, scoring.temperature, False)
                old_logprobs[rows, :width] = lp
            elif unwrapped.critic is not None:
                v = token_values(unwrapped.critic, ids, att, width, head=scoring.critic_head)
            if unwrapped.critic is not None:  # without a critic the values stay 0
                old_values[rows, :width] = v
            tr = time.perf_counter()
            ref_logprobs[rows, :width] = scoring.reference_logprobs(ids, att, width)
            seconds["policy_value_s"] += tr - tp
            seconds["reference_s"] += time.perf_counter() - tr
    ts = time.perf_counter()
    raw_scores = torch.zeros(batch, device=device)
    if scoring.reward_model_weight:
        raw_scores = scoring.scorer.score(prompts, rollout.prompt_lists(), rollout.response_lists()).to(device)
    functions, total = reward_function_scores(scoring, rollout, prompts)
    seconds["reward_s"] = time.perf_counter() - ts
    return ScoredRollout(old_logprobs, old_values, ref_logprobs, raw_scores, functions, total)


def reward_function_scores(scoring: Scoring, rollout: Rollout, prompts: list[Any],
                           ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The reward functions' scores of the decoded responses (up to their stop token), by metric name, and their
    weighted sum; ``({}, None)`` without functions."""
    if not scoring.rewards:
        return {}, None
    contract, device = scoring.contract, rollout.response_ids.device
    responses = [contract.decode_response(ids)[0] for ids in rollout.response_lists()]
    scores = {name: t.to(device) for name, t in score_responses(scoring.rewards, prompts, responses).items()}
    total = torch.stack([reward.weight * scores[reward.metric] for reward in scoring.rewards]).sum(0)
    return scores, total


def generate_rollout(cfg: PPOConfig, scoring: Scoring, prompt_ids: list[list[int]], indices: list[int]) -> Rollout:
    """One response to each prompt, ``rollout.micro_batch_size`` prompts per generation pass, the prompt of global
    sample index ``indices[i]`` with that index's random stream; under ZeRO-3 with the policy's weights gathered once
    for all the passes."""
    parts = []
    step = cfg.rollout.micro_batch_size
    with gathered_for_generation(scoring.accelerator, scoring.unwrapped.policy):
        for start in range(0, len(indices), step):
            uniforms = sample_uniforms(cfg.seed, "rollout", indices[start:start + step], cfg.rollout.max_new_tokens)
            parts.append(generate(scoring.unwrapped.policy, prompt_ids[start:start + step], uniforms,
                                  scoring.settings, scoring.accelerator.device))
    return concat_rollouts(parts, scoring.settings.pad_token_id)


@dataclasses.dataclass
class ShapedRollout:
    """The critic's values in the units of the scores, the final scores [B], the KL-shaped per-token rewards, the
    advantages and the returns ([B, R] each)."""

    old_values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def rewards_and_advantages(cfg: PPOConfig, accelerator: Any, rollout: Rollout, scored: ScoredRollout,
                           score_stats: dict[str, float] | None, kl_coef: float,
                           critic_source: str) -> ShapedRollout:
    """Final scores, per-token rewards with the KL penalty (score on the last token; no penalty here when the KL is
    a loss term), then the advantages and returns of ``ppo.advantage_estimator`` (`estimate_advantages`)."""
    mask = rollout.response_mask
    old_values = critic_in_score_units(scored.old_values, critic_source, score_stats)
    # Without stopping every response runs to max_new_tokens: none is cut short, none is penalised.
    scores = final_scores(scored.raw_scores, rollout.stopped, score_stats,
                          missing_stop_penalty=cfg.rollout.missing_stop_penalty if cfg.rollout.stop_at_stop_token
                          else 0.0, clip=cfg.rollout.score_clip, model_weight=cfg.rewards.reward_model_weight,
                          extra=scored.function_total)
    kl = kl_per_token(scored.old_logprobs, scored.ref_logprobs, cfg.ppo.kl_estimator) * mask
    rewards = shaped_rewards(scores, kl, mask, kl_coef if cfg.ppo.kl_penalty == "reward" else 0.0)
    if cfg.ppo.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, stats=accelerator.reduce(moments(rewards, mask), "sum"))
    advantages, returns = estimate_advantages(cfg, accelerator, rewards, old_values, mask)
    return ShapedRollout(old_values, scores, rewards, advantages, returns)


def estimate_advantages(cfg: PPOConfig, accelerator: Any, rewards: torch.Tensor, values: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages and returns ([B, R] each) from the shaped rewards, by ``ppo.advantage_estimator``:

    - gae: GAE with the critic's values, whitened over the global batch (``ppo.whiten_advantages``);
    - grpo, rloo: each response's outcome (its rewards summed: the score, minus the KL penalty when it is in the
      reward) against the other responses to its prompt, on every token of the response; returns are 0 (no critic);
    - reinforce_pp: the rewards to go, whitened over the global batch.

    Statistics over all processes; a group of responses never straddles processes (`PPOConfig.batch_layout`)."""
    estimator = cfg.ppo.advantage_estimator
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, gamma=cfg.ppo.gamma,
                                       reduce=lambda stats: accelerator.reduce(stats, "sum"))
    if estimator in ("grpo", "rloo"):
        outcome, group = masked_sum(rewards, mask, dim=-1), cfg.rollout.samples_per_prompt
        advantages = (grpo_advantages(outcome, group, scale_by_std=cfg.ppo.grpo_scale_by_std) if estimator == "grpo"
                      else rloo_advantages(outcome, group))
        return per_token(advantages, mask), torch.zeros_like(rewards)
    advantages, returns = gae(rewards, values, mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        advantages = whiten(advantages, mask, stats=accelerator.reduce(moments(advantages, mask), "sum"))
    return advantages, returns


#: What each update's rollout drew and scored, means over the global batch, in the order they are logged.
ROLLOUT_METRICS = ("rollout/score_mean", "rollout/score_std", "rollout/kl", "rollout/response_len",
                   "rollout/eos_rate", "rollout/reward_mean")


def rollout_means(accelerator: Any, rollout: Rollout, scored: ScoredRollout, shaped: ShapedRollout,
                  batch_size: int) -> dict[str, float]:
    """`ROLLOUT_METRICS` over the global batch of ``batch_size`` responses (the reward model's raw scores, the KL
    per response, the length, the stop rate, the final scores), each reward function's mean score (``reward/*``)
    and ``sampled_tokens``, the tokens drawn per response (the longest response's length: generation runs every
    row until the last stops); one reduce."""
    mask = rollout.response_mask
    raw = scored.raw_scores
    per_sample = {
        "rollout/score_mean": raw, "score_squares": raw * raw,
        "rollout/kl": (kl_per_token(scored.old_logprobs, scored.ref_logprobs, "k1") * mask).sum(-1),
        "rollout/response_len": mask.sum(-1).float(), "rollout/eos_rate": rollout.stopped.float(),
        "rollout/reward_mean": shaped.scores,
        "sampled_tokens": torch.full_like(shaped.scores, float(rollout.response_ids.shape[1])),
        **scored.function_scores,
    }
    totals = accelerator.reduce(torch.stack(list(per_sample.values())).double().sum(-1), "sum") / batch_size
    means = dict(zip(per_sample, totals.tolist()))
    means["rollout/score_std"] = math.sqrt(max(means.pop("score_squares") - means["rollout/score_mean"] ** 2, 0.0))
    return means


#: Per-minibatch statistics of an update, in the order they are logged: `UpdateStats` sums them over micro-batches.
LOSS_METRICS = ("ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy",
                "ppo/value_clipfrac", "ppo/ratio")
#: What only a run with a critic logs.
CRITIC_METRICS = ("ppo/value_loss", "ppo/value_clipfrac", "ppo/explained_var")


def loss_metrics(cfg: PPOConfig) -> tuple[str, ...]:
    """The `LOSS_METRICS` a run of ``cfg`` has: the value loss's only with a critic; ``ppo/kl_loss`` when the KL is a
    loss term."""
    names = LOSS_METRICS if cfg.has_critic else tuple(n for n in LOSS_METRICS if n not in CRITIC_METRICS)
    return names + (("ppo/kl_loss",) if cfg.ppo.kl_penalty == "loss" else ())


@dataclasses.dataclass
class Training:
    """What the optimise phase works with: the prepared module (DDP or DeepSpeed engine) and the unwrapped policy +
    critic inside it, the optimiser and its schedule, the speed paths taken (packing, length-sorted micro-batches),
    this process's micro-batch size and micro-batches per minibatch, and the pad token of the rollouts."""

    accelerator: Any
    model: Any
    unwrapped: PolicyAndCritic
    optimizer: Any
    scheduler: Any
    speed: SpeedPaths
    micro_batch_size: int
    micro_batches: int
    pad_token_id: int


@dataclasses.dataclass
class UpdateStats:
    """What one update's optimisation did on this process. ``sums`` adds up, per `LOSS_METRICS` name, each
    micro-batch's share of its minibatch's token mean (so over processes and minibatches it gives the mean per
    minibatch); ``logprob_gap`` is the first minibatch's mean |training - rollout log-prob|, before any step;
    ``bad`` names what was not finite when the update was skipped; ``passes``, ``positions`` and ``tokens`` count
    the forward/backward passes, the token positions they computed (padding included) and the tokens among them."""

    sums: dict[str, torch.Tensor]
    logprob_gap: torch.Tensor
    optimizer_steps: int = 0
    epochs: int = 0
    bad: str | None = None
    passes: int = 0
    positions: int = 0
    tokens: torch.Tensor | None = None

    def count_pass(self, rollout: Rollout) -> None:
        """One pass over ``rollout``: its positions from the shapes, its tokens summed on the device (no sync)."""
        self.passes += 1
        self.positions += rollout.prompt_ids.shape[0] * (rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1])
        tokens = (rollout.prompt_mask.sum() + rollout.response_mask.sum()).double()
        self.tokens = tokens if self.tokens is None else self.tokens + tokens

    @classmethod
    def zeros(cls, device: Any, bad: str | None, names: tuple[str, ...] = LOSS_METRICS) -> "UpdateStats":
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls({name: zero() for name in names}, zero(), bad=bad)

    def reduced(self, accelerator: Any, num_minibatches: int) -> dict[str, float]:
        """Means over the minibatches run on all processes, the log-prob gap, the passes per process and the share
        of the positions trained that were padding: one reduce."""
        counts = torch.tensor([self.passes, self.positions], dtype=torch.float64, device=self.logprob_gap.device)
        tokens = self.tokens if self.tokens is not None else torch.zeros((), dtype=torch.float64, device=counts.device)
        totals = accelerator.reduce(torch.cat([torch.stack([*self.sums.values(), self.logprob_gap, tokens]), counts]),
                                    "sum")
        means = totals[:-4] / max(self.epochs * num_minibatches, 1)
        gap, tokens, passes, positions = totals[-4:].tolist()
        return {**dict(zip(self.sums, means.tolist())), "ppo/logprob_gap": gap,
                "perf/train_passes": passes / accelerator.num_processes,
                "perf/train_padding": 1 - tokens / positions if positions else 0.0}


def optimise(cfg: PPOConfig, training: Training, batch: Batch, update: int, *, skip: str | None,
             critic_source: str, score_stats: dict[str, float] | None, kl_coef: float = 0.0) -> UpdateStats:
    """PPO epochs over minibatches of the global batch (`minibatches`), micro-batches accumulating each
    minibatch's gradient. Nothing trains when ``skip`` names a non-finite input; non-finite
    gradients stop the update. ``ppo.target_kl`` ends the epochs early. The schedule passes the steps not taken.
    ``kl_coef`` weighs the KL loss term (``ppo.kl_penalty=loss``)."""
    accelerator = training.accelerator
    state = distributed_state()
    stats = UpdateStats.zeros(accelerator.device, skip, loss_metrics(cfg))
    training.unwrapped.train()
    # Every process holds the whole global batch, so a minibatch is the same rows on 1 or N processes.
    full = gather_batch(accelerator, batch, training.pad_token_id)
    seq_lengths = full.rollout.attention_mask.sum(-1)
    prompt_lengths, response_lengths = full.rollout.prompt_mask.sum(-1), full.rollout.response_mask.sum(-1)
    kl_before = stats.sums["ppo/approx_kl"].clone()
    for epoch in range(cfg.ppo.ppo_epochs):
        if stats.bad is not None:  # a skipped update, or non-finite gradients in an earlier epoch
            break
        if stats.epochs and cfg.ppo.target_kl is not None:
            # The mean approximate KL of the last epoch, the same on every process.
            epoch_kl = accelerator.reduce(stats.sums["ppo/approx_kl"] - kl_before, "sum").item()
            if epoch_kl / cfg.ppo.num_minibatches > cfg.ppo.target_kl:
                break
        kl_before = stats.sums["ppo/approx_kl"].clone()
        stats.epochs += 1
        for mb_index, (mb_tokens, mb_rows) in enumerate(minibatches(
                cfg, update, epoch, full.rollout.response_mask,
                order=lambda rows: training.speed.micro_batch_order(rows, seq_lengths))):
            passes = micro_batches(mb_rows, state.process_index, state.num_processes,
                                   max_rows=training.micro_batch_size, max_tokens=cfg.ppo.micro_batch_tokens,
                                   prompt_lengths=prompt_lengths, response_lengths=response_lengths)
            # The speed paths of this minibatch's forwards and backwards: its one optimiser step comes after them.
            with training.speed.training(training.unwrapped):
                for i, micro_rows in enumerate(passes):
                    mb = full.select(micro_rows)
                    stats.count_pass(mb.rollout)
                    if not micro_step(cfg, training, mb, mb_tokens, stats, update=update, last=i == len(passes) - 1,
                                      first_minibatch=epoch == 0 and mb_index == 0, critic_source=critic_source,
                                      score_stats=score_stats, kl_coef=kl_coef):
                        stats.bad = "gradients"  # this step is not taken, nor the rest of the update
                        break
            if stats.bad is not None:
                break
    # A linear or cosine schedule is laid out for every epoch of every update: the optimiser steps an update did not
    # take (target_kl, a skipped update) still pass, so the last update ends at the final rate.
    for _ in range(cfg.ppo.ppo_epochs * cfg.ppo.num_minibatches - stats.optimizer_steps):
        training.scheduler.step()
    return stats


def micro_step(cfg: PPOConfig, training: Training, mb: Batch, mb_tokens: torch.Tensor, stats: UpdateStats, *,
               update: int, last: bool, first_minibatch: bool, critic_source: str,
               score_stats: dict[str, float] | None, kl_coef: float = 0.0) -> bool:
    """Forward, losses and backward of one micro-batch, and the optimiser step after the ``last`` of its
    minibatch; its statistics go into ``stats``. False when the gradient was not finite (no step was taken)."""
    with accumulating(training.accelerator, training.model, last=last):
        logprobs, entropy, values = training.model(mb.rollout.input_ids, mb.rollout.attention_mask,
                                                   mb.old_logprobs.shape[1], cfg.rollout.temperature or 1.0, True)
        if fault_injected("inf_grad", update + 1):
            logprobs.register_hook(infinite_first_element)
        m = mb.rollout.response_mask
        if first_minibatch:
            stats.logprob_gap += (masked_sum((logprobs.detach() - mb.old_logprobs).abs(), m) / mb_tokens).double()
        loss, parts = micro_batch_loss(cfg, mb, logprobs, entropy, values, mb_tokens, critic_source=critic_source,
                                       score_stats=score_stats, kl_coef=kl_coef)
        if fault_injected("nan_loss", update + 1):
            loss = loss * float("nan")
        # DDP averages gradients over processes and accelerate (or DeepSpeed) divides by the configured
        # accumulation steps, however many passes the minibatch takes; undo both so the gradient is that of the
        # global minibatch loss.
        if not optimiser_step(training.accelerator, training.model, training.optimizer,
                              loss * training.accelerator.num_processes * training.micro_batches,
                              cfg.optim.max_grad_norm):
            return False
        if training.accelerator.sync_gradients:
            training.scheduler.step()
            stats.optimizer_steps += 1
    for name in stats.sums:
        stats.sums[name] += parts[name].double()
    return True


def micro_batch_loss(cfg: PPOConfig, mb: Batch, logprobs: torch.Tensor, entropy: torch.Tensor,
                     values: torch.Tensor | None, mb_tokens: torch.Tensor, *, critic_source: str,
                     score_stats: dict[str, float] | None, kl_coef: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """One micro-batch's loss, its part of the global minibatch's: the clipped policy loss (aggregated by
    ``ppo.loss_aggregation``), ``ppo.vf_coef`` x the clipped value loss (with a critic), ``ppo.entropy_coef`` x the
    entropy bonus, ``kl_coef`` x the KL to the reference (``ppo.kl_penalty=loss``); and the statistics, by name."""
    m = mb.rollout.response_mask
    how = cfg.ppo.loss_aggregation
    aggregation = functools.partial(aggregate, how=how, num_tokens=mb_tokens,
                                    num_sequences=cfg.rollout.batch_size // cfg.ppo.num_minibatches,
                                    max_tokens=cfg.rollout.max_new_tokens)
    pg_loss, pg_stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, m, clip_range=cfg.ppo.clip_range,
                                    num_tokens=mb_tokens, aggregate=None if how == "token_mean" else aggregation)
    entropy_loss, entropy_stats = entropy_bonus(entropy, m, num_tokens=mb_tokens)
    parts = {"ppo/policy_loss": pg_loss.detach(), "ppo/clipfrac": pg_stats["clipfrac"],
             "ppo/approx_kl": pg_stats["approx_kl"], "ppo/entropy": entropy_stats["entropy"],
             "ppo/ratio": pg_stats["ratio"]}
    loss = pg_loss
    if values is not None:
        values = critic_in_score_units(values, critic_source, score_stats)
        vf_loss, vf_stats = value_loss(values, mb.old_values, mb.returns, m, clip_range=cfg.ppo.value_clip_range,
                                       num_tokens=mb_tokens)
        loss = pg_loss + cfg.ppo.vf_coef * vf_loss
        parts.update({"ppo/value_loss": vf_loss.detach(), "ppo/value_clipfrac": vf_stats["clipfrac"]})
    if cfg.ppo.entropy_coef:
        loss = loss + cfg.ppo.entropy_coef * entropy_loss
    if cfg.ppo.kl_penalty == "loss":
        kl_term = kl_loss(logprobs, mb.ref_logprobs, m, aggregate=aggregation)
        loss = loss + kl_coef * kl_term
        parts["ppo/kl_loss"] = kl_term.detach()
    return loss, parts


def gather_batch(accelerator: Any, batch: Batch, pad_token_id: int) -> Batch:
    """The global rollout batch on every process, rows in global sample order (process 0's rows first, as the
    sample indices run), each process's part padded to the widest prompt and response of all. One process: the
    batch itself."""
    if accelerator.num_processes == 1:
        return batch

    def gathered(t: torch.Tensor, pad: float, pad_first: bool = False) -> torch.Tensor:
        if t.dtype == torch.bool:
            return gathered(t.long(), pad, pad_first).bool()
        return accelerator.gather(accelerator.pad_across_processes(t, dim=1, pad_index=pad, pad_first=pad_first))

    r = batch.rollout
    rollout = Rollout(gathered(r.prompt_ids, pad_token_id, True), gathered(r.prompt_mask, 0, True),
                      gathered(r.response_ids, pad_token_id), gathered(r.response_mask, 0),
                      accelerator.gather(r.stopped.long()).bool(),
                      None if r.logprobs is None else gathered(r.logprobs, 0.0))
    return Batch(rollout, *(gathered(t, 0.0) for t in (batch.old_logprobs, batch.ref_logprobs, batch.old_values,
                                                        batch.advantages, batch.returns)))


def minibatches(cfg: PPOConfig, update: int, epoch: int, response_mask: torch.Tensor, *,
                order: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One PPO epoch's minibatches of the global batch: ``(token count of the global minibatch, its rows)``. A
    permutation keyed by (seed, update, epoch) cuts the batch into ``ppo.num_minibatches`` parts; each part's rows
    are put in ``order`` (by length on the speed paths: micro-batches of similar lengths waste less compute on
    padding), to be dealt to the processes in turn (`micro_batches`), so every process trains on as many rows as
    the others and the minibatches do not depend on the number of processes. response_mask: [B, R]."""
    # The key of the one permutation is that of process 0 when each process shuffled its own rows, so one-process
    # runs (and their checkpoints) draw the minibatches they drew before.
    generator = torch.Generator().manual_seed(
        sample_seed(cfg.seed, "minibatch/0", update * cfg.ppo.ppo_epochs + epoch))
    permutation = torch.randperm(cfg.rollout.batch_size, generator=generator).to(response_mask.device)
    size = cfg.rollout.batch_size // cfg.ppo.num_minibatches
    for mb_rows in permutation.split(size):
        # Losses are token sums over the global minibatch token count (sharded == global loss).
        mb_tokens = response_mask[mb_rows].sum().float()
        yield mb_tokens, order(mb_rows)


def optimiser_step(accelerator: Any, model: Any, optimizer: Any, loss: torch.Tensor,
                   max_grad_norm: float | None) -> bool:
    """One micro-batch's backward and, at the end of its minibatch, the optimiser step unless the gradient is not
    finite. Returns False when it was not: no step was taken, the gradients are cleared, weights and optimiser
    state are those before the minibatch. Under DeepSpeed the engine steps inside the backward and makes this check
    itself before it steps (its overflow check, see `deepspeed_settings`); ``was_step_applied`` tells."""
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return True
    if is_deepspeed(accelerator):
        return bool(model.was_step_applied())
    # The norm of the all-reduced gradient: the same on every process.
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    if not torch.isfinite(torch.as_tensor(norm)):
        optimizer.zero_grad()
        return False
    optimizer.step()
    optimizer.zero_grad()
    return True


def deepspeed_settings(accelerator: Any, cfg: PPOConfig, micro_batch_size: int, width: int) -> None:
    """What DeepSpeed learns from the PPO config: the micro-batch size (no dataloader goes through prepare()), the
    gradient clipping, and an overflow check in bf16 too, so that a non-finite gradient skips the engine's step
    (it steps inside the backward, before our loop could look at the gradient); under ZeRO-3, the bucket, live and
    persistence sizes that the config leaves to DeepSpeed, sized by the policy's ``width``
    (`rlhf.runtime.zero3_memory_settings`)."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds_config["gradient_clipping"] = cfg.optim.max_grad_norm or 0.0
    if ds_config.get("bf16", {}).get("enabled") in (True, "auto"):
        ds_config["bf16"]["check_grad_overflow"] = True
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero.update(zero3_memory_settings(zero, width))


def compute_dtype(accelerator: Any, model: torch.nn.Module) -> torch.dtype:
    """The dtype the training forward computes in: the autocast dtype under accelerate's native mixed precision
    (the parameters stay float32 there), else the parameters' own."""
    if getattr(accelerator, "native_amp", False):
        return torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16
    return next(model.parameters()).dtype


def save_outputs(accelerator: Any, prepared: Any, unwrapped: PolicyAndCritic, cfg: PPOConfig, tokenizer: Any,
                 output_dir: Path) -> str | None:
    """policy/ (merged when LoRA) and value/ (with a critic) with the tokenizer. Under ZeRO-3 the weights are partitioned: they are
    gathered into one state dict and saved from it (LoRA then as an adapter, which AutoModelForCausalLM loads with
    its base). Returns how the policy was saved ("model" or "adapter") on the main process."""
    if zero_stage(accelerator) != 3:
        if not accelerator.is_main_process:
            return None
        saved = save_model(unwrapped.policy, tokenizer, output_dir / "policy", cfg.peft)
        if unwrapped.critic is not None:
            save_model(unwrapped.critic, tokenizer, output_dir / "value", cfg.critic_peft)
        return saved
    from peft import PeftModel

    state_dict = accelerator.get_state_dict(prepared)  # a collective: every process takes part
    if not accelerator.is_main_process:
        return None
    saved = "model"
    for name, module, folder in (("policy", unwrapped.policy, "policy"), ("critic", unwrapped.critic, "value")):
        if module is None:
            continue
        part = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
        module.save_pretrained(output_dir / folder, state_dict=part, safe_serialization=True)
        tokenizer.save_pretrained(output_dir / folder)
        if name == "policy" and isinstance(module, PeftModel):
            saved = "adapter"
    return saved


def final_scores(raw_scores: torch.Tensor, stopped: torch.Tensor, stats: dict[str, float] | None, *,
                 missing_stop_penalty: float, clip: float | None, model_weight: float = 1.0,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """The sequence scores PPO optimises: reward-model scores normalised by ``stats`` (mean/std) times
    ``model_weight``, plus ``extra`` (the reward functions' weighted scores), minus the penalty for responses that
    never produced a stop token, clipped to [-clip, clip]. [B] -> [B]."""
    scores = raw_scores.float()
    if stats is not None:
        scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
    if model_weight != 1.0:
        scores = scores * model_weight
    if extra is not None:
        scores = scores + extra
    scores = scores - missing_stop_penalty * (~stopped.bool()).float()
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def critic_in_score_units(values: torch.Tensor, critic_source: str, stats: dict[str, float] | None) -> torch.Tensor:
    """A critic started from the reward model outputs, at first, reward-model scores; PPO's returns are in the units
    of the normalised scores (``final_scores``). Read its outputs through the same normalisation, so its first values
    are the reward model's own estimates in those units instead of being off by the mean (and the scale) of the raw
    scores. The critic keeps learning in raw units: its saved weights still score like the reward model. A critic
    started from the policy (zero head) and un-normalised scores need nothing. [B, T] -> [B, T]."""
    if critic_source != "reward" or stats is None:
        return values
    return (values - stats["mean"]) / max(stats["std"], 1e-6)


def format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))


def first_non_finite(accelerator: Any, tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity on any process ("... on another process" when only
    another one has it), or None; one collective."""
    local = [name for name, t in tensors.items() if t.numel() and not bool(torch.isfinite(t).all())]
    flags = torch.tensor([float(name in local) for name in tensors], device=next(iter(tensors.values())).device)
    flags = accelerator.reduce(flags, "sum")
    for name, flag in zip(tensors, flags.tolist()):
        if flag > 0:
            return name if name in local else f"{name} (on another process)"
    return None


def infinite_first_element(grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook for the ``inf_grad`` fault: a finite loss whose gradient is not (its first element is inf)."""
    grad = grad.clone()
    grad.view(-1)[0] = float("inf")
    return grad


def clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, Rollout):
        return Rollout(*(None if t is None else t.clone()
                         for t in (getattr(x, f.name) for f in dataclasses.fields(x))))
    return x


def explained_variance_all(accelerator: Any, values: torch.Tensor, returns: torch.Tensor,
                           mask: torch.Tensor) -> float:
    """Explained variance of the critic over the whole rollout batch (all processes)."""
    return explained_variance_from_moments(accelerator.reduce(moments(returns, mask), "sum"),
                                           accelerator.reduce(moments(returns - values, mask), "sum"))


def log_samples(tracker: Any, contract: TextContract, prompts: EvalPrompts, prompt_rows: list[int],
                rollout: Rollout, scores: torch.Tensor, step: int, limit: int = 8) -> None:
    rows = []
    for i, response in enumerate(rollout.response_lists()[:limit]):
        text, stopped = contract.decode_response(response)
        rows.append([str(prompts.prompts[prompt_rows[i]]), text, round(scores[i].item(), 4), stopped])
    tracker.log_table("rollout_samples", ["prompt", "response", "score", "stopped"], rows, step=step)


def save_checkpoint(accelerator: Any, prepared: Any, output_dir: Path, step: int, unwrapped: PolicyAndCritic,
                    optimizer: Any, scheduler: Any, kl_ctl: Any, score_stats: dict[str, float] | None, *,
                    keep_last: int, alarms: dict[str, Any] | None = None) -> Path:
    """checkpoints/step_<N>/: weights and optimiser, scheduler, RNG, KL controller and counters; checkpoint.json last,
    so a checkpoint cut short is never taken for a complete one. Our state is safetensors + JSON; under DeepSpeed
    the weights and the sharded optimiser go through the engine's own checkpoint (deepspeed/, one shard per
    process)."""
    directory = checkpoint_dir(output_dir, step)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CHECKPOINT_STATE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if is_deepspeed(accelerator):
        prepared.save_checkpoint(str(directory / "deepspeed"), tag="state")  # a collective
    if accelerator.is_main_process:
        trainer: dict[str, Any] = {"scheduler": scheduler.state_dict(), "rng": rng_state(),
                                   "kl_controller": kl_ctl.state_dict(), "score_stats": score_stats, "update": step,
                                   "alarms": alarms}
        parts = {}
        if not is_deepspeed(accelerator):
            parts[MODEL_STATE] = dict(unwrapped.state_dict())
            trainer["optimizer"] = inner_optimizer(optimizer).state_dict()
        write_checkpoint(output_dir, step, {**parts, TRAINER_STATE: trainer}, keep_last=keep_last)
        logger.info("ppo: checkpoint %s", directory)
    accelerator.wait_for_everyone()
    fault_point("after_checkpoint", step)
    return directory


def restore(accelerator: Any, prepared: Any, directory: Path, unwrapped: PolicyAndCritic, optimizer: Any,
            scheduler: Any, loop: LoopState) -> int:
    """The checkpoint in ``directory`` into the models, the optimiser, the schedule and ``loop`` (KL controller,
    score normalisation, alarms, the main process's RNG); returns the update it was taken after."""
    trainer = load_state(directory, TRAINER_STATE)
    if is_deepspeed(accelerator):
        prepared.load_checkpoint(str(directory / "deepspeed"), tag="state")
    else:
        unwrapped.load_state_dict(load_state(directory, MODEL_STATE))
        inner_optimizer(optimizer).load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    loop.kl_ctl.load_state_dict(trainer["kl_controller"])
    loop.score_stats = trainer["score_stats"]
    if trainer.get("alarms"):  # checkpoints from before the alarms have none
        loop.alarms.load_state_dict(trainer["alarms"])
    if accelerator.is_main_process:
        set_rng_state(trainer["rng"])
    return int(trainer["update"])
