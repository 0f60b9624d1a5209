"""The text contract: prompts and responses become the same token ids in every stage."""

from __future__ import annotations

import pytest
from support import chatml_tokenizer, plain_tokenizer

from rlhf.errors import DataError
from rlhf.text import DEFAULT_CHAT_TEMPLATE, RewardText, TextContract


@pytest.fixture(scope="module")
def plain():
    return TextContract.from_tokenizer(plain_tokenizer())


@pytest.fixture(scope="module")
def chat():
    return TextContract.from_tokenizer(chatml_tokenizer())


def test_plain_sequence_token_by_token(plain):
    tok = plain.tokenizer
    ids, mask = plain.sequence("the lamp", " is great .")
    prompt = tok("the lamp", add_special_tokens=False)["input_ids"]
    response = tok(" is great .", add_special_tokens=False)["input_ids"]
    assert ids == [tok.eos_token_id, *prompt, *response, tok.eos_token_id]  # EOS doubles as BOS, then ends it
    assert mask == [0] * (1 + len(prompt)) + [1] * (len(response) + 1)
    assert plain.stop_token_ids == (tok.eos_token_id,)


def test_response_is_cut_after_first_stop_token(plain):
    eos = plain.tokenizer.eos_token
    ids = plain.response_ids("x", f" is great .{eos} and more")
    assert ids[-1] == plain.tokenizer.eos_token_id and ids.count(plain.tokenizer.eos_token_id) == 1
    text, stopped = plain.decode_response(ids)
    assert (text, stopped) == (" is great .", True)
    assert plain.decode_response(ids[:-1]) == (" is great .", False)


def test_chat_prompt_and_response(chat):
    tok = chat.tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert chat.stop_token_ids == (im_end, endoftext)
    prompt = [{"role": "user", "content": "tell me about the lamp ."}]
    answer = [{"role": "assistant", "content": "the lamp is great ."}]
    p = chat.prompt_ids(prompt)
    assert tok.decode(p) == "<|im_start|>user\ntell me about the lamp .<|im_end|>\n<|im_start|>assistant\n"
    r = chat.response_ids(prompt, answer)
    assert tok.decode(r) == "the lamp is great .<|im_end|>"  # the template's trailing newline is not the answer's
    ids, mask = chat.sequence(prompt, answer)
    assert ids == p + r and mask == [0] * len(p) + [1] * len(r)


def test_multi_turn_assistant_mask_token_by_token(chat):
    tok = chat.tokenizer
    messages = [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "the fan is quiet ."}, {"role": "user", "content": "and ?"},
                {"role": "assistant", "content": "it is worth the money ."}]
    ids, mask = chat.conversation(messages)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == full.rstrip("\n")  # everything but the newline after the last stop token
    trained = [tok.decode([i]) for i, m in zip(ids, mask) if m]
    assert "".join(trained) == "the fan is quiet .<|im_end|>it is worth the money .<|im_end|>"
    # Each masked span is exactly what response_ids gives for that turn: SFT learns what PPO will sample.
    first = chat.response_ids(messages[:2], [messages[2]])
    start = mask.index(1)
    assert ids[start:start + len(first)] == first


def test_default_template_for_tokenizer_without_one():
    contract = TextContract.from_tokenizer(plain_tokenizer())
    prompt = [{"role": "user", "content": "hello there"}]
    with pytest.raises(DataError, match="has no chat template"):
        contract.prompt_ids(prompt)
    assert contract.ensure_chat_template() is True
    assert contract.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    ids, mask = contract.sequence(prompt, [{"role": "assistant", "content": "the lamp is great ."}])
    assert contract.tokenizer.decode(ids) == "Human: hello there\n\nAssistant: the lamp is great .<|endoftext|>"
    assert contract.ensure_chat_template() is False


def test_template_that_is_not_prefix_stable_is_refused():
    tokenizer = chatml_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} >>{% endif %}")
    contract = TextContract.from_tokenizer(tokenizer)
    with pytest.raises(DataError, match="renders the prompt differently once the answer is appended"):
        contract.response_ids([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}])


def test_sft_rm_and_scoring_tokenise_identically(plain, chat):
    from stages.reward import encode_pair
    from stages.sft import encode_example

    for contract, prompt, response in [(plain, "the lamp", " is great ."),
                                       (chat, [{"role": "user", "content": "hello"}],
                                        [{"role": "assistant", "content": "it is cheap ."}])]:
        sft_ids = encode_example(contract, {"prompt": prompt, "completion": response})["input_ids"]
        rm_ids = encode_pair(RewardText(contract.tokenizer, contract),
                             {"prompt": prompt, "chosen": response, "rejected": response})["chosen_ids"]
        scoring_ids = contract.prompt_ids(prompt) + contract.response_ids(prompt, response)
        assert sft_ids == rm_ids == scoring_ids
