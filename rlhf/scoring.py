"""Scoring (prompt, response) pairs with a reward model, tokenised exactly as in reward training.

When the reward model reads the policy's tokens (a causal model whose vocabulary contains the policy's with the same
ids, and the same template and BOS rule), a sampled response's ids are scored as they are: prompt ids + response ids
through the stop token, which is what :meth:`rlhf.text.TextContract.sequence` gave the reward stage. Otherwise the
response is decoded and re-encoded with the reward model's own text contract (:class:`rlhf.text.RewardText`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf.errors import CheckpointError
from rlhf.models import score_sequences
from rlhf.text import PromptLike, RewardText, TextContract


def shares_tokenizer(policy_tokenizer: Any, reward_tokenizer: Any) -> bool:
    """Whether policy token ids can be fed to the reward model unchanged."""
    policy_vocab = policy_tokenizer.get_vocab()
    reward_vocab = reward_tokenizer.get_vocab()
    if any(reward_vocab.get(token) != index for token, index in policy_vocab.items()):
        return False
    if getattr(policy_tokenizer, "chat_template", None) != getattr(reward_tokenizer, "chat_template", None):
        return False
    policy_contract = TextContract.from_tokenizer(policy_tokenizer)
    reward_contract = TextContract.from_tokenizer(reward_tokenizer)
    return (policy_contract.prepend_bos_id == reward_contract.prepend_bos_id
            and set(policy_contract.stop_token_ids) <= set(reward_contract.stop_token_ids))


def check_vocabulary_fits(model: torch.nn.Module, tokenizer: Any, *, shares_tokens: bool) -> None:
    """Raise CheckpointError when ``tokenizer`` (the one whose ids the reward model reads) has ids past the reward
    model's embedding table, which would fail deep inside the first scoring pass (a device-side assert on GPU)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    largest = max([*tokenizer.get_vocab().values(), tokenizer.pad_token_id or 0])
    if largest < rows:
        return
    where = getattr(model, "name_or_path", "") or "the reward model"
    reads = ("the policy's token ids as they are (its tokenizer matches the policy's)" if shares_tokens
             else "the ids of its own tokenizer")
    raise CheckpointError(
        f"reward_model.name_or_path: {where} has {rows} token embeddings, but it reads {reads}, which go up to "
        f"{largest}; use a reward model trained on this tokenizer (the reward stage resizes the embeddings), or "
        "resize its embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save it again"
    )


class RewardScorer:
    """A frozen reward model and the way it reads the policy's samples."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, policy_contract: TextContract, is_encoder: bool,
                 batch_size: int = 64, equal_count: bool = False, by_length: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.policy_contract = policy_contract
        self.text = RewardText.for_model(tokenizer, is_encoder=is_encoder)
        self.shares_tokens = not is_encoder and shares_tokenizer(policy_contract.tokenizer, tokenizer)
        self.batch_size = batch_size
        # The same number of passes on every process (DeepSpeed ZeRO-3), else groups of similar lengths.
        self.equal_count = equal_count
        self.by_length = by_length  # False: passes over plain chunks in order (the PPO stage's plain path)
        self.last_lengths: list[int] = []  # the token counts of the sequences the last `score` call read
        check_vocabulary_fits(model, policy_contract.tokenizer if self.shares_tokens else tokenizer,
                              shares_tokens=self.shares_tokens)

    def sequences(self, prompts: Sequence[PromptLike], prompt_ids: Sequence[Sequence[int]],
                  response_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """The token ids the reward model reads for each (prompt, sampled response)."""
        if self.shares_tokens:
            return [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        out = []
        for prompt, response in zip(prompts, response_ids):
            text, _ = self.policy_contract.decode_response(response)
            response_text: PromptLike = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            out.append(self.text.ids(prompt, response_text))
        return out

    def score(self, prompts: Sequence[PromptLike], prompt_ids: Sequence[Sequence[int]],
              response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores of the pairs, float32 on CPU. [B]. ``last_lengths`` keeps the lengths of the sequences read."""
        seqs = self.sequences(prompts, prompt_ids, response_ids)
        self.last_lengths = [len(seq) for seq in seqs]
        return score_sequences(self.model, seqs, pad_token_id=self.tokenizer.pad_token_id,
                               batch_size=self.batch_size, equal_count=self.equal_count, by_length=self.by_length)
