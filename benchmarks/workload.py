"""The fixed PPO throughput workload (``benchmarks/ppo_workload.json``) made concrete: the tokenizer, the
randomly initialised models and the prompts, built the same way for our benchmark and for the TRL baseline.

This module needs only torch, transformers and tokenizers (the baseline runs it in a separate virtualenv without
``rlhf``). Everything is seeded: two builds give identical files.

    python benchmarks/workload.py OUT_DIR      # writes OUT_DIR/{policy,reward,prompts.jsonl}
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKLOAD_FILE = Path(__file__).with_name("ppo_workload.json")
EOS, PAD = "<|endoftext|>", "<pad>"
#: EOS's logit advantage in the variable-length variant (see `boost_eos`): responses of up to 48 tokens then average
#: about 21, and one in seven runs to the limit. Both sides train that variant with a learning rate of 1e-12 (the
#: same work), so that the policy does not learn to avoid EOS and the lengths stay where they are.
VARIABLE_LENGTH_EOS_LOGIT = 5.5
VARIABLE_LENGTH_LEARNING_RATE = 1e-12



def _lexicon(seed: int, size: int = 6000) -> list[str]:
    """Made-up words of two to four syllables: a lexicon large enough to fill a BPE vocabulary of 8192."""
    rng = random.Random(seed)
    onsets = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "pl", "sh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "ck"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.randint(2, 4))))
    return sorted(words)


def load_workload(path: str | Path = WORKLOAD_FILE) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def corpus(n: int, seed: int) -> list[str]:
    """Sentences of made-up words, Zipf-distributed like natural text: enough for a BPE of the workload's size."""
    words = _lexicon(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, weights, k=rng.randint(20, 40))) for _ in range(n)]


def with_size(workload: dict[str, Any], *, layers: int | None = None, width: int | None = None,
              heads: int | None = None) -> dict[str, Any]:
    """The workload with a policy of another size (the reference, reward and value models follow the policy)."""
    arch = dict(workload["policy_and_reference"])
    for key, value in (("n_layer", layers), ("n_embd", width), ("n_head", heads)):
        if value:
            arch[key] = value
    if arch["n_embd"] % arch["n_head"]:
        raise ValueError(f"width {arch['n_embd']} is not a multiple of {arch['n_head']} heads; pass --heads")
    return dict(workload, policy_and_reference=arch)


def size_arguments(parser: Any) -> None:
    """The options both throughput benchmarks take to change the model size."""
    parser.add_argument("--layers", type=int, default=None, help="n_layer of every model (default: the workload's)")
    parser.add_argument("--width", type=int, default=None, help="n_embd of every model (default: the workload's)")
    parser.add_argument("--heads", type=int, default=None, help="n_head of every model (default: the workload's)")


def build_tokenizer(workload: dict[str, Any]) -> Any:
    """Byte-level BPE with the workload's vocabulary, pad distinct from EOS, left padding for generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab = workload["policy_and_reference"]["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(20000, workload["seed"]), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS,
                                        padding_side="left")
    return tokenizer


def build_models(workload: dict[str, Any], tokenizer: Any) -> tuple[Any, Any]:
    """The policy (GPT2LMHeadModel) and the reward model (GPT2ForSequenceClassification, same size), random init."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    arch = {k: v for k, v in workload["policy_and_reference"].items() if k != "architecture"}
    arch["vocab_size"] = len(tokenizer)
    common = dict(arch, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(workload["seed"])
    policy = GPT2LMHeadModel(GPT2Config(**common))
    if workload.get("eos_logit"):
        boost_eos(policy, tokenizer.eos_token_id, workload["eos_logit"], workload["seed"])
    torch.manual_seed(workload["seed"] + 1)
    reward = GPT2ForSequenceClassification(GPT2Config(**common, num_labels=1))
    return policy.eval(), reward.eval()


def boost_eos(policy: Any, eos_token_id: int, logit: float, seed: int) -> None:
    """Make a randomly initialised GPT-2 end its responses at random lengths (the variable-length variant of the
    workload): a unit direction u goes into the final layer norm's bias (times ``logit``) and into EOS's output
    embedding (tied to its input embedding), so that EOS's logit is about ``logit`` above the others with unit
    noise per position. Untouched, such a model samples EOS about once in its vocabulary size."""
    import torch

    generator = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(policy.config.n_embd, generator=generator), dim=0)
        policy.transformer.ln_f.bias += logit * u
        policy.lm_head.weight[eos_token_id] += u


def prompt_texts(workload: dict[str, Any], tokenizer: Any) -> list[str]:
    """``num_prompts`` texts of at least ``prompt_tokens`` tokens each; both sides keep the last prompt_tokens."""
    texts = []
    for text in corpus(4 * workload["num_prompts"], workload["seed"] + 2):
        if len(tokenizer(text)["input_ids"]) >= workload["prompt_tokens"]:
            texts.append(text)
        if len(texts) == workload["num_prompts"]:
            break
    return texts


def build(out_dir: str | Path, workload: dict[str, Any] | None = None) -> Path:
    """Write ``policy/`` and ``reward/`` (model + tokenizer) and ``prompts.jsonl`` under ``out_dir`` (once)."""
    workload = workload or load_workload()
    out = Path(out_dir)
    done = out / "workload.json"
    if done.is_file() and json.loads(done.read_text()) == workload:
        return out
    tokenizer = build_tokenizer(workload)
    policy, reward = build_models(workload, tokenizer)
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    with (out / "prompts.jsonl").open("w") as handle:
        for text in prompt_texts(workload, tokenizer):
            handle.write(json.dumps({"prompt": text}) + "\n")
    done.write_text(json.dumps(workload))
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nominal_flops_per_update(workload: dict[str, Any]) -> float:
    """Model FLOPs one update needs, from the workload alone (2 x parameters x tokens per forward pass, 3x that for
    forward + backward), counting the matmul parameters of the transformer blocks and the LM head.

    Per update: generation (prompt pass + one token per step, KV cache), the policy's log-prob pass, the
    reference, reward and value forwards over prompt + response, and ``ppo_epochs`` forward + backward passes of
    the policy and the value model."""
    arch = workload["policy_and_reference"]
    d, layers, vocab = arch["n_embd"], arch["n_layer"], arch["vocab_size"]
    block = 12 * d * d * layers  # attention (4 d^2) + MLP (8 d^2) per layer
    lm = block + d * vocab
    scorer = block + d  # reward / value: blocks and a one-output head
    rollouts, p, r = workload["rollouts_per_update"], workload["prompt_tokens"], workload["response_tokens"]
    seq = p + r
    generation = 2 * lm * rollouts * (p + r)
    forwards = 2 * rollouts * seq * (lm + lm + scorer + scorer)  # policy log-probs, reference, reward, value
    training = 3 * 2 * rollouts * seq * (lm + scorer) * workload["ppo_epochs"]
    return float(generation + forwards + training)


def compute_device() -> str:
    """Where the benchmarks' models run: the GPU when there is one (both trainers put them there), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak_gflops(threads: int, dtype: str = "float32", seconds: float = 1.5) -> float:
    """The matmul rate (GFLOP/s) of this CPU at ``threads`` threads in float32, or of the GPU when there is one in
    ``dtype``: the best of repeated n^3 products (n = 1024 on a CPU, 8192 on a GPU)."""
    import torch

    device = compute_device()
    dtype = dtype if device == "cuda" else "float32"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    torch.set_num_threads(previous)
    return best


def device_report() -> dict[str, Any]:
    """Where the run was; on a GPU also the card's name and this process's peak GPU memory."""
    device = compute_device()
    if device != "cuda":
        return {"device": device}
    import torch

    return {"device": device, "gpu": torch.cuda.get_device_name(0),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)}


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (every process and the kernel), from ``/proc/stat``."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class LoadMonitor:
    """How much CPU other processes used while a benchmark ran: the machine's busy time from ``/proc/stat`` minus
    this process's (and its children's), over the window between `start` and `stop`. Unlike a ``ps`` snapshot it
    sees short-lived and bursty competitors. ``contended`` when others used more than ``threshold`` of one core."""

    def __init__(self, threshold: float = 0.10) -> None:
        self.threshold = threshold
        self._start: tuple[float, float, float] | None = None

    def start(self) -> "LoadMonitor":
        self._start = (time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds())
        return self

    def stop(self) -> dict[str, Any]:
        assert self._start is not None, "call start() first"
        wall = time.monotonic() - self._start[0]
        others = (_busy_cpu_seconds() - self._start[1]) - (_own_cpu_seconds() - self._start[2])
        load = max(others, 0.0) / max(wall, 1e-9)
        result = {"contended": load > self.threshold, "other_cpu_load": round(load, 3), "busy": []}
        if result["contended"]:
            result["busy"] = busy_processes()
        return result


def busy_processes() -> list[str]:
    """Processes other than this one and its children showing more than 20% CPU in ``ps`` (named in reports)."""
    own = os.getpid()
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,comm", "--no-headers"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and own not in (int(parts[0]), int(parts[1])) and float(parts[2]) > 20.0:
            busy.append(f"{parts[3]}({parts[0]}) {float(parts[2]):.0f}%")
    return busy


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/workload.py OUT_DIR")
    print(build(sys.argv[1]))
