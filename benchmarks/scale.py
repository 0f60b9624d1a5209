"""PPO at the 100M class: memory and speed per process under one process, DDP, ZeRO-2, ZeRO-3 and LoRA.

    python benchmarks/scale.py [--workdir DIR] [--runs NAME ...] [--updates 5]

Two families of about 110-126M parameters, randomly initialised and built here (no hub), with the demo's tokenizer
and a vocabulary of 32768 rows:

- ``gpt2``: GPT-2, 12 layers x 768, 12 heads (110M);
- ``qwen2``: Qwen2, 12 layers x 768, 12 query heads and 4 key-value heads, a gated MLP of 2048, RoPE, untied head
  (126M).

For each family a few SFT and reward steps (one process) give PPO its policy, reference, critic start and reward
model; then PPO (``configs/recipes/scale-100m/ppo.yaml``) runs ``--updates`` updates of 8 rollouts (32 prompt tokens
at most, 16 new) in each setting of
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
import math
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
    # Four times the tokens of a training pass (8 rows of up to 96 tokens): what a token costs, for the memory model.
    "gpt2-1proc-long": ("gpt2", 1, {}, ["rollout.max_new_tokens=64", "ppo.micro_batch_size=8"]),
    "qwen2-1proc": ("qwen2", 1, {}, []),
    "qwen2-zero3": ("qwen2", 2, {**ZERO_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, []),
}
UPSTREAM = ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4",
            "logging.report_to=[jsonl]"]
#: The PPO config every run starts from (the demo's settings, with the measurement's batch, lengths and checks).
RECIPE = REPO / "configs" / "recipes" / "scale-100m" / "ppo.yaml"
PHASES = ("generate_s", "policy_value_s", "reference_s", "reward_s", "train_s")
STATE = ("trained_weights", "optimizer", "reference_weights", "reward_weights")
GATHERS = ("weight_gathers_generate", "weight_gathers_score", "weight_gathers_train")


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
    args = ["--config", str(RECIPE), f"run_dir={workdir / family}", f"output_dir={out}", f"model.name_or_path={sft}",
            f"reward_model.name_or_path={reward}", f"ppo.num_updates={updates}", *extra]
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


def parameters(model_dir: Path) -> int:
    """Elements of the weights saved in ``model_dir`` (their shapes, read without loading the weights)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def shape_of(manifest: dict[str, Any], sft: Path, reward: Path) -> dict[str, Any]:
    """What the memory model (`rlhf.memory_model.Shape`) needs of a run: parameter counts, the policy's layers,
    width and vocabulary, the token positions of a training pass, and the weights a ZeRO-3 pass keeps live."""
    from rlhf.runtime import ZERO3_SIZED_BY_HIDDEN

    config = json.loads((sft / "config.json").read_text())
    width = config.get("hidden_size") or config["n_embd"]
    cfg = manifest["config"]
    return {"policy": parameters(sft), "critic": parameters(reward), "reward": parameters(reward),
            "layers": config.get("num_hidden_layers") or config["n_layer"], "width": width,
            "vocab": config["vocab_size"],
            "pass_tokens": cfg["ppo"]["micro_batch_size"] * (cfg["rollout"]["max_prompt_len"]
                                                              + cfg["rollout"]["max_new_tokens"]),
            "trainable": manifest["metrics"]["trainable_parameters"],
            "max_live_parameters": ZERO3_SIZED_BY_HIDDEN["stage3_max_live_parameters"](width)}


def measure(name: str, out: Path, sft: Path, reward: Path) -> dict[str, Any]:
    """A run's figures: wall time, s/update and its phases (medians after the first update), tokens/s,
    utilisation, per process the peak RSS and model state (MiB), and its shape for the memory model."""
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
        # Under ZeRO-3: the times each phase gathered its models' weights (rank 0, median over the updates).
        **{key: statistics.median(r[f"perf/{key}"] for r in rows) for key in GATHERS if f"perf/{key}" in rows[0]},
        "shape": shape_of(manifest, sft, reward),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | procs | ZeRO | tuning | s/update | generate / score / train s | tokens/s | utilisation | "
             "peak RSS / process (MiB) | model state / process (MiB): trained + optimiser + reference + reward | "
             "weights gathered per update: generate / score / train |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        score = r["policy_value_s"] + r["reference_s"] + r["reward_s"]
        gathers = " / ".join(f"{r[key]:.2f}" for key in GATHERS) if GATHERS[0] in r else ""
        lines.append(
            f"| {r['run']} | {r['processes']} | {r['zero_stage']} | {r['peft']} | {r['s_per_update']:.1f} | "
            f"{r['generate_s']:.1f} / {score:.1f} / {r['train_s']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['utilisation']:.3f} | {r['peak_rss_mib']:.0f} | {r['model_state_mib']:.0f}: "
            f"{r['trained_weights_mib']:.0f} + {r['optimizer_mib']:.0f} + {r['reference_weights_mib']:.0f} + "
            f"{r['reward_weights_mib']:.0f} | {gathers} |")
    return "\n".join(lines)


#: Models on paper, for the memory model's predictions on 8 GPUs: Qwen2.5-1.5B and -7B (layers, width, vocabulary,
#: parameters), a reward model and critic of the policy's size, bf16 weights, micro-batches of 4 rows of 1024 tokens.
PAPER = {"1.5B": (28, 1536, 151936, 1_543_714_304), "7B": (28, 3584, 152064, 7_615_616_512)}
PAPER_SETTINGS = {"DDP": (0, False), "ZeRO-2": (2, False), "ZeRO-3": (3, False), "LoRA + DDP": (0, True),
                  "LoRA + ZeRO-3": (3, True)}


def on_paper(constants: Any) -> str:
    """GiB per GPU on 8 GPUs, by setting, for the `PAPER` models (no gradient checkpointing; the process runtime
    of the CPU fit left out, a GPU's CUDA context and allocator slack not modelled)."""
    from rlhf.memory_model import MIB, Setting, Shape, predict
    from rlhf.runtime import ZERO3_SIZED_BY_HIDDEN

    # Activations: 34 bytes per token, layer and unit of width in 16 bits (Korthikanti et al. 2022, without
    # recomputation, attention scores not kept: fused attention), 68 in float32 units; the CPU runs cannot measure
    # them (their peak falls at the optimiser step, see benchmarks/README.md). ZeRO-3's overhead fitted on the CPU
    # is left out: it is not traced to a component, so how it grows with the model is not known.
    gpu = type(constants)(runtime_mib=0.0, activation_bytes=68.0, zero3_bytes=0.0)
    lines = ["| model | " + " | ".join(PAPER_SETTINGS) + " |", "|---|" + "---|" * len(PAPER_SETTINGS)]
    for name, (layers, width, vocab, params) in PAPER.items():
        cells = []
        for zero, lora in PAPER_SETTINGS.values():
            # LoRA r=16 on the attention and MLP projections of policy and critic (`critic_peft.method=lora`):
            # about 0.5% of each one's weights.
            shape = Shape(policy=params, critic=params, reward=params, layers=layers, width=width, vocab=vocab,
                          pass_tokens=4 * 1024, weight_bytes=2, trainable=int(0.01 * params) if lora else None,
                          max_live_parameters=ZERO3_SIZED_BY_HIDDEN["stage3_max_live_parameters"](width))
            cells.append(f"{predict(shape, Setting(8, zero, lora), gpu)['peak'] * MIB / 2 ** 30:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_memory_model(workdir: Path) -> str:
    """Fit the memory model's constants on the GPT-2 runs of ``WORKDIR/scale.json``, keep those results in
    ``benchmarks/scale_results.json`` (the memory model's test reads them), and a table of predicted against
    measured peak RSS for every run (Qwen2's held out of the fit)."""
    from rlhf.memory_model import fit, predict, scale_run_shape

    runs = json.loads((workdir / "scale.json").read_text())
    constants = fit([(*scale_run_shape(r), r["peak_rss_mib"]) for r in runs if r["run"].startswith("gpt2")])
    (HERE / "scale_results.json").write_text(json.dumps(runs, indent=1) + "\n")
    lines = [f"fitted on the GPT-2 runs: {constants}", "",
             "| run | measured peak RSS (MiB) | predicted | predicted / measured |", "|---|---|---|---|"]
    for r in runs:
        predicted = predict(*scale_run_shape(r), constants)["peak"]
        measured = r["peak_rss_mib"]
        lines.append(f"| {r['run']} | {measured:.0f} | {predicted:.0f} | {predicted / measured:.2f} |")
    return "\n".join([*lines, "", "On paper, GiB per GPU on 8 GPUs:", "", on_paper(constants)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "scale")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--fit", action="store_true",
                        help="only fit the memory model on the results so far (WORKDIR/scale.json)")
    args = parser.parse_args(argv)
    if args.fit:
        print(fit_memory_model(args.workdir))
        return
    started = time.perf_counter()
    results = []
    failed = []
    for name in args.runs:
        sft, reward = upstream(RUNS[name][0], args.workdir)
        try:
            results.append(measure(name, ppo_run(name, args.workdir, args.updates, sft, reward), sft, reward))
        except SystemExit as exc:  # one setting that fails does not cost the others; its log is named
            print(exc, file=sys.stderr)
            failed.append(f"| {name} | failed: see {args.workdir / 'logs' / (name + '.log')} |")
    text = "\n".join([table(results), *failed])
    print(text)
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    (args.workdir / "scale.md").write_text(text + "\n")
    # The runs of earlier invocations stay, each under its name, replaced by this one's.
    saved = args.workdir / "scale.json"
    earlier = {r["run"]: r for r in json.loads(saved.read_text())} if saved.is_file() else {}
    saved.write_text(json.dumps(list({**earlier, **{r["run"]: r for r in results}}.values()), indent=1) + "\n")


if __name__ == "__main__":
    main()
