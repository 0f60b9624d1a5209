"""The text contract: how a prompt and a response become token ids, the same way in every stage.

SFT, reward training, PPO scoring and evaluation all build sequences here, so a reward model is always scored on text
tokenised exactly as it was trained on:

- A string prompt is the tokenizer's beginning-of-sequence token (when it has one) followed by the prompt's tokens;
  a message-list prompt is rendered by the chat template with the generation prompt appended.
- A response is tokenised on its own (never jointly with the prompt, so that the ids PPO samples after the prompt
  are the ids the reward model sees) and ends with a stop token: EOS for plain text, the template's end-of-turn token
  (``<|im_end|>``, ``<|eot_id|>``, ...) for conversations.
- Everything up to and including the first stop token is the response; anything after it is dropped.

A tokenizer without a chat template gets :data:`DEFAULT_CHAT_TEMPLATE` when the data is conversational; the SFT stage
saves it with its tokenizer, so every later stage renders prompts with the same template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

from rlhf.errors import ConfigError, DataError

Messages = list[dict[str, Any]]
PromptLike = Union[str, Messages]

#: The template given to a tokenizer that has none: an "Human:/Assistant:" transcript in which every assistant turn
#: ends with the tokenizer's EOS token, so EOS is the end-of-turn stop token.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Human: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

#: End-of-turn tokens of common chat templates; those in the vocabulary join EOS as stop tokens.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>", "<|endoftext|>")


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


@dataclass
class TextContract:
    """Tokenisation of prompts and responses for one tokenizer (see the module doc)."""

    tokenizer: Any
    stop_token_ids: tuple[int, ...]
    #: Prepended to string prompts when the tokenizer has a BOS token but does not add it itself (GPT-2 and the demo
    #: base model, whose EOS doubles as the document start); None when it adds BOS itself (Llama) or has none (Qwen).
    prepend_bos_id: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "TextContract":
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token, so responses cannot end; "
                "set tokenizer.eos_token (e.g. in its tokenizer_config.json)"
            )
        stops = [tokenizer.eos_token_id]
        vocab = tokenizer.get_vocab()
        for token in END_OF_TURN_TOKENS:
            token_id = vocab.get(token)
            if token_id is not None and token_id not in stops:
                stops.append(token_id)
        bos = tokenizer.bos_token_id
        adds_bos_itself = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        return cls(tokenizer, tuple(stops), None if adds_bos_itself else bos)

    def ensure_chat_template(self) -> bool:
        """Give the tokenizer :data:`DEFAULT_CHAT_TEMPLATE` when it has none; returns True when it did."""
        if getattr(self.tokenizer, "chat_template", None):
            return False
        self.tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        return True

    def _render(self, messages: Messages, *, add_generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                "the data is conversational (message lists) but the tokenizer has no chat template; the SFT stage "
                "adds the default one (rlhf.text.DEFAULT_CHAT_TEMPLATE) — run SFT on this tokenizer first, or give "
                "the tokenizer a chat template"
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: PromptLike) -> list[int]:
        """Token ids of a prompt, ready for the response to follow."""
        if is_conversational(prompt):
            # The rendered template carries its own special tokens (BOS included, where the template has one).
            return self._encode(self._render(prompt, add_generation_prompt=True))
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [self.prepend_bos_id, *ids] if self.prepend_bos_id is not None else ids

    def response_ids(self, prompt: PromptLike, response: PromptLike) -> list[int]:
        """Token ids of a response to ``prompt``, ending with a stop token."""
        if is_conversational(prompt) or is_conversational(response):
            if not (is_conversational(prompt) and is_conversational(response)):
                raise DataError("prompt and response must both be strings or both be message lists")
            before = self._render(prompt, add_generation_prompt=True)
            after = self._render(prompt + response, add_generation_prompt=False)
            if not after.startswith(before):
                raise DataError(
                    "the chat template renders the prompt differently once the answer is appended, so the answer's "
                    "tokens cannot be separated from the prompt's; use a template whose generation prompt is a prefix "
                    "of the rendered conversation"
                )
            ids = self._encode(after[len(before):])
            cut = self.first_stop(ids)
            if cut is None:
                raise DataError(
                    f"the chat template ends an assistant turn with no stop token (known: "
                    f"{self.tokenizer.convert_ids_to_tokens(list(self.stop_token_ids))}); add the end-of-turn token "
                    "to the template"
                )
            return ids[: cut + 1]
        ids = self._encode(response)
        cut = self.first_stop(ids)
        return ids[: cut + 1] if cut is not None else [*ids, self.tokenizer.eos_token_id]

    def sequence(self, prompt: PromptLike, response: PromptLike) -> tuple[list[int], list[int]]:
        """``(input_ids, completion_mask)`` of prompt + response; the mask is 1 on the response's tokens."""
        p = self.prompt_ids(prompt)
        r = self.response_ids(prompt, response)
        return p + r, [0] * len(p) + [1] * len(r)

    def conversation(self, messages: Messages) -> tuple[list[int], list[int]]:
        """``(input_ids, assistant_mask)`` of a whole conversation, every assistant turn (through its stop token)
        masked 1. Built from rendered prefixes, segment by segment, so it needs no generation markers in the
        template and tokenises each answer exactly as :meth:`response_ids` does."""
        ids: list[int] = []
        mask: list[int] = []
        done = ""  # the rendered text whose tokens are in ids
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            if i == 0:
                raise DataError("a conversation cannot start with an assistant turn: there is no prompt to answer")
            before = self._render(messages[:i], add_generation_prompt=True)
            if not before.startswith(done):
                raise DataError(
                    "the chat template renders earlier turns differently as the conversation grows; cannot build an "
                    "assistant mask for it"
                )
            new = self._encode(before[len(done):]) if done else self.prompt_ids(messages[:i])
            answer = self.response_ids(messages[:i], [message])
            ids += new + answer
            mask += [0] * len(new) + [1] * len(answer)
            done = before + self._stop_text(self._render(messages[: i + 1], add_generation_prompt=False)[len(before):])
        if not any(mask):
            raise DataError("the conversation has no assistant turn to learn from")
        return ids, mask

    def _stop_text(self, answer_text: str) -> str:
        """``answer_text`` up to and including its first stop token."""
        ends = [answer_text.find(t) + len(t) for t in self.tokenizer.convert_ids_to_tokens(list(self.stop_token_ids))
                if t and t in answer_text]
        return answer_text[: min(ends)] if ends else answer_text

    def first_stop(self, ids: Sequence[int]) -> int | None:
        """Index of the first stop token in ``ids``, or None."""
        stops = set(self.stop_token_ids)
        for i, token in enumerate(ids):
            if token in stops:
                return i
        return None

    def decode_response(self, ids: Sequence[int]) -> tuple[str, bool]:
        """The response text (up to the first stop token, which is left out) and whether it stopped."""
        cut = self.first_stop(ids)
        body = list(ids if cut is None else ids[:cut])
        return self.tokenizer.decode(body, skip_special_tokens=True), cut is not None


def flatten_messages(messages: Messages) -> str:
    """A message list as plain "Role: content" text, for reward models without a chat template (encoders)."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


@dataclass
class RewardText:
    """How a reward model reads a (prompt, response) pair.

    A causal reward model shares the policy's text contract: prompt ids + response ids ending in the stop token,
    scored at that last token. An encoder reads the pair as the tokenizer's sentence pair (``[CLS] p [SEP] r
    [SEP]``), scored at its first token as BERT-style heads do.
    """

    tokenizer: Any
    contract: TextContract | None  # None for encoders

    @classmethod
    def for_model(cls, tokenizer: Any, *, is_encoder: bool) -> "RewardText":
        return cls(tokenizer, None if is_encoder else TextContract.from_tokenizer(tokenizer))

    def response_length(self, prompt: PromptLike, response: PromptLike) -> int:
        """The response's length in tokens, as this reward model reads it."""
        if self.contract is not None:
            return len(self.contract.response_ids(prompt, response))
        r = flatten_messages(response) if is_conversational(response) else response
        return len(self.tokenizer(r, add_special_tokens=False)["input_ids"])

    def ids(self, prompt: PromptLike, response: PromptLike) -> list[int]:
        if self.contract is not None:
            return self.contract.sequence(prompt, response)[0]
        p = flatten_messages(prompt) if is_conversational(prompt) else prompt
        r = flatten_messages(response) if is_conversational(response) else response
        return list(self.tokenizer(p, r)["input_ids"])
