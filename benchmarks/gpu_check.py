"""SFT, reward and PPO training under ZeRO-2 and ZeRO-3 on one GPU, on a randomly initialised GPT-2 (12 x 768)
built here, printing one JSON line: per run the exit status, the wall time and the final figures. The reward run
starts from the SFT output of the same ZeRO stage; PPO uses both, saves a DeepSpeed checkpoint, and a second launch
resumes from it for two more updates."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "base-model")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    out = root / "gpt2-12x768"
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


STAGE_ARGS = {
    "sft": ["train.max_steps=20", "train.batch_size=32", "train.micro_batch_size=16"],
    "reward": ["train.max_steps=20", "train.batch_size=32", "train.micro_batch_size=16"],
    "ppo": ["model.name_or_path=", "reward_model.name_or_path=", "reward_model.dtype=bfloat16", "upstream_configs={}",
            "rollout.batch_size=32", "rollout.max_new_tokens=32", "rollout.micro_batch_size=32",
            "ppo.num_minibatches=2", "ppo.micro_batch_size=8", "eval.num_prompts=64", "eval.gold_judge=false",
            "checkpoint.save_every=2"],
}
REPORTED = ("train/loss", "eval/loss", "eval/accuracy", "final/score_mean", "final/kl", "rollout/kl",
            "ppo/policy_loss", "ppo/value_loss", "time/rollout_s", "time/train_s", "perf/tokens_per_s")


def launch(stage: str, zero: str, run_dir: Path, model: str, *extra: str) -> dict:
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "configs" / "accelerate" / f"{zero}.yaml"),
           "--num_processes", "1", str(REPO / "launch" / f"{stage}.py"), f"run_dir={run_dir}",
           f"model.name_or_path={model}", "model.dtype=bfloat16", "logging.log_every=5", *STAGE_ARGS[stage], *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    result = {"rc": done.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    manifest = run_dir / stage / "manifest.json"
    if manifest.is_file():
        metrics = json.loads(manifest.read_text())["metrics"]
        result.update({k: metrics[k] for k in REPORTED if k in metrics})
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-1500:]
    return result


def main() -> None:
    import torch

    report: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                    "torch": torch.__version__}
    # Each launch costs ~35 s of start-up on a GPU machine (imports, process group, DeepSpeed engine); a progress
    # line after every run keeps what finished when a time limit cuts the check short.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root)
        for zero in ("zero3", "zero2"):
            run_dir = root / zero
            runs = [("sft", ("sft", zero, run_dir, str(model))),
                    ("reward", ("reward", zero, run_dir, str(run_dir / "sft"))),
                    ("ppo", ("ppo", zero, run_dir, "", "ppo.num_updates=4")),
                    ("ppo_resume", ("ppo", zero, run_dir, "", "ppo.num_updates=6", "checkpoint.resume=true"))]
            for name, args in runs:
                report[f"{name}_{zero}"] = launch(*args)
                print(json.dumps({"progress": f"{name}_{zero}", **report[f"{name}_{zero}"]}), flush=True)
                if report[f"{name}_{zero}"]["rc"] != 0:
                    break
    report["ok"] = all(v.get("rc") == 0 for k, v in report.items() if isinstance(v, dict)) and len(report) == 10
    print(json.dumps(report, sort_keys=True))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
