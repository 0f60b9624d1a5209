"""PPO at the 100M class: memory and speed per process under one process, DDP, ZeRO-2, ZeRO-3 and LoRA.

    python benchmarks/scale.py [--workdir DIR] [--runs NAME ...] [--updates 5]

Two families of about 110-126M parameters, randomly initialised and built here (no hub), with the demo's tokenizer
and a vocabulary of 32768 rows:

- ``gpt2``: GPT-2, 12 layers x 768, 12 heads (110M);
- ``qwen2``: Qwen2, 12 layers x 768, 12 query heads and 4 key-value heads, a gated MLP of 2048, RoPE, untied head
  (126M).

For each family a few SFT and reward steps (one process) give PPO its policy, reference, critic start and reward
model; then PPO runs ``--updates`` updates of 8 rollouts (32 prompt tokens at most, 16 new) in each setting of
`RUNS`, on this machine's CPU cores with float32 weights (two processes are two ``torchrun`` processes with one core
each; DeepSpeed takes its ZeRO settings from the environment, as ``accelerate launch`` with
configs/accelerate/zero{2,3}.yaml exports them). Per run, from its manifest and metrics: the wall time, s/update
(median of the updates after the first) and its phases, generated tokens/s, the run's utilisation of the measured
matmul peak, and per process the peak RSS and the model state held (trained weights, optimiser state, reference
and reward model weights; `rlhf.memory`). Output: a markdown table on stdout and ``WORKDIR/scale.md`` /
``scale.json``. A complete run with the same command is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VOCAB = 32768

#: DeepSpeed's settings as `accelerate launch` exports them from configs/accelerate/zero{2,3}.yaml, without bf16.
ZERO_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true", "ACCELERATE_MIXED_PRECISION": "no"}
#: Run name -> (family, processes, environment, overrides).
RUNS: dict[str, tuple[str, int, dict[str, str], list[str]]] = {
    "gpt2-1proc": ("gpt2", 1, {}, []),
    "gpt2-ddp": ("gpt2", 2, {"ACCELERATE_USE_CPU": "1"}, []),
    "gpt2-zero2": ("gpt2", 2, {**ZERO_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, []),
    "gpt2-zero3": ("gpt2", 2, {**ZERO_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, []),
    "gpt2-lora-ddp": ("gpt2", 2, {"ACCELERATE_USE_CPU": "1"}, ["peft.method=lora"]),
    "gpt2-lora-zero3": ("gpt2", 2, {**ZERO_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, ["peft.method=lora"]),
    "qwen2-1proc": ("qwen2", 1, {}, []),
    "qwen2-zero3": ("qwen2", 2, {**ZERO_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, []),
}
UPSTREAM = ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4",
            "logging.report_to=[jsonl]"]
PPO = ["rollout.batch_size=8", "rollout.max_prompt_len=32", "rollout.max_new_tokens=16", "rollout.micro_batch_size=8",
       "rollout.score_norm=none", "ppo.ppo_epochs=1", "ppo.num_minibatches=1", "ppo.micro_batch_size=4",
       "eval.num_prompts=8", "eval.gold_judge=false", "samples_every=1000", "logging.report_to=[jsonl]",
       # Three SFT and reward steps of random models: the checks of a trained pair do not apply.
       "checks.reward_gate=false", "checks.min_score_std=0", "checks.min_eos_rate=0", "upstream_configs={}"]
PHASES = ("generate_s", "policy_value_s", "reference_s", "reward_s", "train_s")
STATE = ("trained_weights", "optimizer", "reference_weights", "reward_weights")


def build_model(family: str, out: Path) -> Path:
    """The family's randomly initialised causal LM with the demo's tokenizer, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "base-model")
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=768, n_layer=12, n_head=12,
                                           **ids))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12,
                                             num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048,
                                             max_position_embeddings=256, tie_word_embeddings=False, **ids))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``command`` from the repository with its output in ``log``; the wall time. A failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed with status {done.returncode}; see {log}:\n"
                         f"{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def upstream(family: str, workdir: Path) -> tuple[Path, Path]:
    """The family's SFT and reward outputs (a few steps each, one process), built unless complete."""
    from rlhf.checkpoint import read_manifest

    base = build_model(family, workdir / "models" / family)
    run_dir = workdir / family
    for stage in ("sft", "reward"):
        if read_manifest(run_dir / stage) is None:
            model = base if stage == "sft" else run_dir / "sft"
            seconds = run_logged([sys.executable, f"launch/{stage}.py", f"run_dir={run_dir}",
                                  f"model.name_or_path={model}", *UPSTREAM], workdir / "logs" / f"{family}-{stage}.log")
            print(f"{family} {stage}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return run_dir / "sft", run_dir / "reward"


def ppo_run(name: str, workdir: Path, updates: int, sft: Path, reward: Path) -> Path:
    """One PPO run of `RUNS` into ``WORKDIR/<name>``; its output directory."""
    from rlhf.checkpoint import read_manifest

    family, processes, env, extra = RUNS[name]
    out = workdir / name
    args = [f"run_dir={workdir / family}", f"output_dir={out}", f"model.name_or_path={sft}",
            f"reward_model.name_or_path={reward}", f"ppo.num_updates={updates}", *PPO, *extra]
    command_file = out.parent / f"{name}.command.json"
    if read_manifest(out) is not None and command_file.is_file() and json.loads(command_file.read_text()) == args:
        return out
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29561"]
    environment = dict(os.environ, **env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
    seconds = run_logged([*launcher, "launch/ppo.py", *args], workdir / "logs" / f"{name}.log", environment)
    command_file.write_text(json.dumps(args))
    (out / "wall_s.json").write_text(json.dumps(round(seconds, 1)))
    print(f"{name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return out


def measure(name: str, out: Path) -> dict[str, Any]:
    """A run's figures: wall time, s/update and its phases (medians after the first update), tokens/s,
    utilisation, and per process the peak RSS and model state (MiB)."""
    from rlhf.checkpoint import read_manifest
    from rlhf.tracking import read_metrics

    manifest = read_manifest(out)
    rows = [r for r in read_metrics(out) if "time/train_s" in r][1:]
    memory = manifest["memory_mib"]
    state = [sum(memory[key][rank] for key in STATE) for rank in range(len(memory["peak_rss"]))]
    return {
        "run": name, "processes": manifest["num_processes"], "zero_stage": manifest["zero_stage"],
        "peft": manifest["config"]["peft"]["method"], "parameters": manifest["metrics"]["trainable_parameters"],
        "wall_s": json.loads((out / "wall_s.json").read_text()),
        "s_per_update": statistics.median(r["time/rollout_s"] + r["time/train_s"] for r in rows),
        **{phase: statistics.median(r[f"time/{phase}"] for r in rows) for phase in PHASES},
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in rows),
        "utilisation": manifest["metrics"]["perf/utilisation"],
        "peak_flops_per_process": manifest["peak_flops"]["per_process"],
        "peak_rss_mib": max(memory["peak_rss"]), "model_state_mib": max(state),
        **{f"{key}_mib": max(memory[key]) for key in STATE},
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | procs | ZeRO | tuning | s/update | generate / score / train s | tokens/s | utilisation | "
             "peak RSS / process (MiB) | model state / process (MiB): trained + optimiser + reference + reward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        score = r["policy_value_s"] + r["reference_s"] + r["reward_s"]
        lines.append(
            f"| {r['run']} | {r['processes']} | {r['zero_stage']} | {r['peft']} | {r['s_per_update']:.1f} | "
            f"{r['generate_s']:.1f} / {score:.1f} / {r['train_s']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['utilisation']:.3f} | {r['peak_rss_mib']:.0f} | {r['model_state_mib']:.0f}: "
            f"{r['trained_weights_mib']:.0f} + {r['optimizer_mib']:.0f} + {r['reference_weights_mib']:.0f} + "
            f"{r['reward_weights_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "scale")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--updates", type=int, default=5)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = []
    failed = []
    for name in args.runs:
        sft, reward = upstream(RUNS[name][0], args.workdir)
        try:
            results.append(measure(name, ppo_run(name, args.workdir, args.updates, sft, reward)))
        except SystemExit as exc:  # one setting that fails does not cost the others; its log is named
            print(exc, file=sys.stderr)
            failed.append(f"| {name} | failed: see {args.workdir / 'logs' / (name + '.log')} |")
    text = "\n".join([table(results), *failed])
    print(text)
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    (args.workdir / "scale.md").write_text(text + "\n")
    (args.workdir / "scale.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
