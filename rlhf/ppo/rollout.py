"""Rollout helpers: batched sampling with a KV cache under an explicit generation config, per-token log-probs and
values of the sampled responses, and reward-model scores tokenised as in reward training.

Sequences are ``[prompt (left-padded) | response (right-padded)]``: every prompt ends at the same column, so the
response tokens of all rows start together and position ids come from the attention mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlhf.ppo.losses import token_logprobs
from rlhf.ppo.sampling import sample_with_logprobs


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are sampled. Set explicitly by the config; a checkpoint's ``generation_config.json`` (with its
    repetition penalties and defaults) never applies, so samples come from the policy's own distribution."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    #: Decode into a KV cache reserved ahead (`reserved_cache`, a speed path): the same values, fewer copies.
    reserved_cache: bool = True


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of token lists left-padded to the longest. [B, P] each; mask is long (1 = token)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded prompt starts at 0. [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def truncate_after_stop(tokens: torch.Tensor, stop_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(response_mask, stopped)``: the mask is True up to and including the first stop token of each row (all of a
    row without one); ``stopped`` says whether the row has one. tokens: [B, T] -> [B, T] bool, [B] bool."""
    is_stop = torch.isin(tokens, torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=tokens.device))
    # Stops seen strictly before t; the first stop itself stays inside the response.
    before = torch.cumsum(is_stop.long(), dim=-1) - is_stop.long()
    return before == 0, is_stop.any(-1)


@dataclass
class Rollout:
    """Sampled responses: prompts [B, P] left-padded, responses [B, R] right-padded after the first stop token."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # bool, True on the response's tokens (the stop token included)
    stopped: torch.Tensor  # bool [B]: the response ends with a stop token
    # float32 [B, R]: log-prob of each sampled token at the sampling temperature (full softmax, as in training),
    # read off the logits generation computed anyway; 0 after the response. None when not recorded.
    logprobs: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """Rows ``rows``, without the columns that are padding in all of them (prompt side and response side).
        Position ids come from the masks, so the remaining positions compute what they did in the whole batch."""
        prompt_mask = self.prompt_mask[rows]
        response_mask = self.response_mask[rows]
        first = int((prompt_mask.sum(0) > 0).nonzero()[0])
        length = int(response_mask.sum(-1).max())
        return Rollout(self.prompt_ids[rows][:, first:], prompt_mask[:, first:], self.response_ids[rows][:, :length],
                       response_mask[:, :length], self.stopped[rows],
                       None if self.logprobs is None else self.logprobs[rows][:, :length])

    def response_lists(self) -> list[list[int]]:
        lengths = self.response_mask.sum(-1).tolist()
        return [row[:n] for row, n in zip(self.response_ids.tolist(), lengths)]

    def prompt_lists(self) -> list[list[int]]:
        return [[t for t, m in zip(ids, mask) if m] for ids, mask in
                zip(self.prompt_ids.tolist(), self.prompt_mask.tolist())]


def reserved_cache(model: Any, capacity: int) -> Any | None:
    """A KV cache for ``model`` whose layers keep their keys and values in buffers for ``capacity`` positions
    (`reserved_layer_class`), so that a decoding step writes in place instead of copying the whole cache into a new
    tensor (``torch.cat`` per layer and step: quadratic in the response length). None when the model's config asks
    for any other kind of layer than growing full attention (sliding window, chunked, shared or linear attention):
    the model then builds transformers' own cache, as it does without one."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    config = getattr(model, "config", None)
    if config is None:
        return None
    layers = DynamicCache(config=config).layers  # what the model builds for itself
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    layer_class = reserved_layer_class()
    return Cache(layers=[layer_class(capacity) for _ in layers])


def can_drop_rows(cache: Any) -> bool:
    """Whether every layer of a transformers KV cache can drop batch rows (`batch_select_indices`): the growing
    layers can; static ones cannot."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, DynamicLayer) for layer in layers)


@functools.cache
def reserved_layer_class() -> type:
    """A transformers ``DynamicLayer`` whose keys and values live in buffers reserved ahead (see `reserved_cache`).
    Its first update (the prompt) is a ``DynamicLayer``'s; the buffers are filled from it, and from then on each
    update writes its positions in place and the layer returns views of the filled part: the same values a
    ``DynamicLayer`` returns. A full buffer doubles. Keys that are not [batch, heads, positions, dim] stay growing."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.key_buffer: torch.Tensor | None = None
            self.value_buffer: torch.Tensor | None = None
            self.filled = 0

        def reserve(self, capacity: int) -> None:
            batch, heads, length, _ = self.keys.shape
            capacity = max(capacity, length)
            self.key_buffer = self.keys.new_empty(batch, heads, capacity, self.keys.shape[-1])
            self.value_buffer = self.values.new_empty(batch, heads, capacity, self.values.shape[-1])
            self.key_buffer[:, :, :length] = self.keys
            self.value_buffer[:, :, :length] = self.values
            self.filled = length
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if self.key_buffer is None:
                keys, values = super().update(key_states, value_states, *args, **kwargs)
                if keys.dim() == 4:
                    self.reserve(self.capacity)
                return keys, values
            start, end = self.filled, self.filled + key_states.shape[-2]
            if end > self.key_buffer.shape[-2]:
                self.reserve(2 * end)
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.filled = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.key_buffer is None:
                return super().batch_select_indices(indices)
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys = self.key_buffer[:, :, :self.filled]
            self.values = self.value_buffer[:, :, :self.filled]

    return ReservedLayer


@functools.cache
def cache_argument() -> str:
    """The name of the KV cache among a model's arguments and outputs: ``cache`` from transformers 5 (formerly
    ``past_key_values``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@torch.inference_mode()
def generate(model: Any, prompts: Sequence[Sequence[int]], uniforms: torch.Tensor, settings: GenerationSettings,
             device: Any) -> Rollout:
    """Sample one response per prompt with a KV cache, token by token, row ``b`` consuming ``uniforms[b, t]`` at
    step t (see :mod:`rlhf.ppo.sampling`); stops early once every row has produced a stop token. The log-prob of
    each sampled token (at the temperature, without top-k/top-p truncation: what `policy_forward` gives) comes from
    the same logits, so the rollout needs no second policy pass for its old log-probs.

    Rows that have stopped leave the running batch, so a batch of responses of mixed lengths costs about what its
    real tokens cost, not B times the longest.

    prompts: B token lists; uniforms: [B, >= max_new_tokens].
    """
    prompt_ids, prompt_mask = left_pad(prompts, settings.pad_token_id, device)
    batch = prompt_ids.shape[0]
    pad = settings.pad_token_id
    stops = torch.as_tensor(settings.stop_token_ids, dtype=torch.long, device=device)
    uniforms = uniforms.to(device)
    mask = prompt_mask
    positions = position_ids(mask)
    cache = reserved_cache(model, prompt_ids.shape[1] + settings.max_new_tokens) if settings.reserved_cache else None
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **({} if cache is None else {cache_argument(): cache}))
    cache_key = "cache" if "cache" in out else "past_key_values"
    cache = out[cache_key]
    droppable = can_drop_rows(cache)
    next_logits = out.logits[:, -1]
    # The running rows: their original row numbers, and which of them have produced a stop token.
    rows = torch.arange(batch, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for step in range(settings.max_new_tokens):
        token, logprob = sample_with_logprobs(next_logits, uniforms[rows, step], temperature=settings.temperature,
                                              top_k=settings.top_k, top_p=settings.top_p)
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(torch.full((batch,), pad, dtype=token.dtype, device=device).index_copy(0, rows, token))
        logprobs.append(torch.zeros(batch, dtype=logprob.dtype, device=device).index_copy(0, rows, logprob))
        finished |= torch.isin(token, stops)
        done = int(finished.sum())
        if done == len(rows) or step == settings.max_new_tokens - 1:
            break
        if droppable and 8 * done >= len(rows):
            # Finished rows leave the batch (and the cache) once they are an eighth of it: a row's own tokens do
            # not depend on the others, and the steps that remain cost in proportion to the rows still running.
            keep = (~finished).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, mask, positions, token, finished = rows[keep], mask[keep], positions[keep], token[keep], finished[keep]
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token.unsqueeze(-1), attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_key: cache})
        cache = out[cache_key]
        next_logits = out.logits[:, -1]
    del cache, out
    response_ids = torch.stack(tokens, dim=1)
    response_mask, stopped = truncate_after_stop(response_ids, settings.stop_token_ids)
    response_ids = response_ids.masked_fill(~response_mask, settings.pad_token_id)
    sampled_logprobs = torch.stack(logprobs, dim=1).masked_fill(~response_mask, 0.0)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, stopped, sampled_logprobs)


def policy_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_response_tokens: int,
                   *, temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and optionally entropies) of the last ``num_response_tokens`` tokens of ``input_ids`` under
    ``model`` at ``temperature``, float32. Only the positions that predict them go through the output head, as one
    contiguous block (a sliced view makes the head, without gradients, a batched product with the weight expanded
    per row: 1.4x slower on a CPU). [B, R] each."""
    r = num_response_tokens
    length = input_ids.shape[1]
    keep = torch.arange(length - r - 1, length - 1, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   use_cache=False, logits_to_keep=keep).logits
    return token_logprobs(logits, input_ids[:, -r:], temperature, with_entropy=with_entropy)


def score_module(model: torch.nn.Module) -> torch.nn.Module:
    """The one-output head of a sequence-classification model (``score`` in decoder families), wrapped or not."""
    named = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] == "score"]
    if not named:
        raise ValueError(f"{type(model).__name__} has no 'score' head; a critic needs a decoder with a score head")
    return min(named, key=lambda item: len(item[0]))[1]


def token_values(critic: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 num_response_tokens: int, *, head: torch.nn.Module | None = None) -> torch.Tensor:
    """The critic's value of the state before each of the last ``num_response_tokens`` tokens (read at the
    previous position, like a log-prob), float32. The critic is a sequence-classification model; its head runs on
    every position and a hook keeps the per-token outputs before the model pools them. [B, R]."""
    head = score_module(critic) if head is None else head
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
               use_cache=False)
    finally:
        handle.remove()
    r = num_response_tokens
    return captured[-1][:, -r - 1:-1, 0].float()
