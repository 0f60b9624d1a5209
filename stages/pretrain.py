"""Pretrain a tiny base model from scratch: a BPE tokenizer trained on the corpus, then a GPT-2 causal LM (``clm``),
a BERT masked LM (``mlm``, the encoder backbone for reward models) or BERT's masked LM + next-sentence prediction
(``mlm_nsp``, Devlin et al. 2019, section 3.1).

The demo's shipped base model (``data/base-model/``) is this stage's output on ``configs/pretrain/demo.yaml``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from rlhf.checkpoint import checkpoint_dir, latest_checkpoint, output_dir_of, truncate_logs_to
from rlhf.config import PretrainConfig
from rlhf.data import prepare_dataset
from rlhf.runtime import StageRun, fused_adamw
from rlhf.signals import StageInterrupted, StopRequest, fault_point
from rlhf.train_state import load_state, rng_state, set_rng_state, write_checkpoint

Config = PretrainConfig
logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<pad>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_tokenizer(texts: list[str], cfg: PretrainConfig) -> Any:
    """A byte-level BPE tokenizer; pad differs from EOS so padding never hides the stop token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    causal = cfg.objective == "clm"
    specials = [EOS, PAD] if causal else list(BERT_SPECIALS)
    tok = Tokenizer(models.BPE(unk_token=None if causal else "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size,
        min_frequency=cfg.tokenizer.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if causal:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_model(cfg: PretrainConfig, tokenizer: Any) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, GPT2Config, GPT2LMHeadModel

    arch = cfg.arch
    if cfg.objective == "clm":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=arch.n_positions,
            n_embd=arch.n_embd,
            n_layer=arch.n_layer,
            n_head=arch.n_head,
            resid_pdrop=arch.dropout,
            embd_pdrop=arch.dropout,
            attn_pdrop=arch.dropout,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return GPT2LMHeadModel(config)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.n_embd,
        num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.n_head,
        intermediate_size=4 * arch.n_embd,
        max_position_embeddings=arch.n_positions,
        hidden_dropout_prob=arch.dropout,
        attention_probs_dropout_prob=arch.dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForPreTraining(config) if cfg.objective == "mlm_nsp" else BertForMaskedLM(config)


def packed_blocks(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Documents joined with EOS after each and cut into ``seq_len`` blocks: [num_blocks, seq_len]."""
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len)


def _sentences(text: str) -> list[str]:
    parts = [p.strip() for p in text.replace("!", ".").split(".")]
    return [p + " ." for p in parts if p]


def nsp_pairs(texts: list[str], seed: int) -> list[tuple[str, str, int]]:
    """(A, B, label) with label 0 when B follows A in the same document and 1 when B comes from another one,
    half each (BERT's next-sentence prediction)."""
    rng = random.Random(seed)
    docs = [s for s in (_sentences(t) for t in texts) if len(s) >= 2]
    pairs = []
    for i, sentences in enumerate(docs):
        cut = rng.randint(1, len(sentences) - 1)
        first = " ".join(sentences[:cut])
        if rng.random() < 0.5:
            pairs.append((first, " ".join(sentences[cut:]), 0))
        else:
            other = docs[(i + rng.randint(1, len(docs) - 1)) % len(docs)]
            pairs.append((first, " ".join(other[rng.randint(0, len(other) - 1):]), 1))
    return pairs


def encoder_examples(texts: list[str], tokenizer: Any, cfg: PretrainConfig, seed: int) -> list[dict[str, Any]]:
    if cfg.objective == "mlm":
        enc = tokenizer(texts, truncation=True, max_length=cfg.seq_len)
        return [{"input_ids": ids} for ids in enc["input_ids"]]
    pairs = nsp_pairs(texts, seed)
    enc = tokenizer([a for a, _, _ in pairs], [b for _, b, _ in pairs], truncation=True, max_length=cfg.seq_len,
                    return_token_type_ids=True)
    return [
        {"input_ids": ids, "token_type_ids": types, "next_sentence_label": label}
        for ids, types, (_, _, label) in zip(enc["input_ids"], enc["token_type_ids"], pairs)
    ]


def make_loader(cfg: PretrainConfig, tokenizer: Any, texts: list[str], *, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    if cfg.objective == "clm":
        blocks = packed_blocks(texts, tokenizer, cfg.seq_len)
        data = [{"input_ids": b, "labels": b} for b in blocks]
        return DataLoader(data, batch_size=cfg.micro_batch_size, shuffle=shuffle, generator=generator,
                          drop_last=shuffle, collate_fn=_stack)
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.mlm_probability)
    data = encoder_examples(texts, tokenizer, cfg, seed)
    return DataLoader(data, batch_size=cfg.micro_batch_size, shuffle=shuffle, generator=generator,
                      drop_last=shuffle, collate_fn=collator)


def _stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _forever(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        sampler = getattr(loader, "set_epoch", None)
        if callable(sampler):
            sampler(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loader: DataLoader, accelerator: Any) -> float:
    """Mean held-out loss. The random numbers it draws (the mlm collator's masks) leave training's stream as it was,
    so how often it runs never changes what training does."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            loss = model(**batch).loss
            total += loss.detach().float()
            count += 1
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train()
    return (total / count.clamp(min=1)).item()


def restore(directory: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
            next_step_batches: Any) -> tuple[int, float]:
    """Load a checkpoint's weights, optimiser and schedule, move the data stream past the steps it had trained
    (drawing the same batches again), then restore the random state. Returns (step, the run's first loss)."""
    trainer = load_state(directory, "trainer")
    model.load_state_dict(load_state(directory, "model"))
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    for _ in range(trainer["step"]):
        next_step_batches()
    set_rng_state(trainer["rng"])
    return int(trainer["step"]), float(trainer["first_loss"])


def optimiser_and_schedule(cfg: PretrainConfig, model: torch.nn.Module, accelerator: Any) -> tuple[Any, Any]:
    """AdamW (torch's fused kernel where it runs) and the learning-rate schedule over ``max_steps``."""
    from transformers import get_scheduler

    optim = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.learning_rate, betas=(optim.adam_beta1,
                                  optim.adam_beta2), eps=optim.adam_epsilon, weight_decay=optim.weight_decay,
                                  fused=fused_adamw(accelerator, accelerator.device.type) or None)
    scheduler = get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=math.ceil(
        optim.warmup_ratio * cfg.max_steps), num_training_steps=cfg.max_steps)
    return optimizer, scheduler


def train_step(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, batches: Iterator[Any],
               accumulation: int, max_grad_norm: float) -> float:
    """One optimiser step over ``accumulation`` micro-batches; returns the step's loss, the mean over processes."""
    step_loss = torch.zeros((), device=accelerator.device)
    for _ in range(accumulation):
        loss = model(**next(batches)).loss / accumulation
        accelerator.backward(loss)
        step_loss += loss.detach()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, "mean").item()


def checkpoint_or_stop(cfg: PretrainConfig, accelerator: Any, output_dir: Path, step: int, stop: Any, model: Any,
                       optimizer: Any, scheduler: Any, first_loss: float) -> None:
    """After optimiser step ``step``: every ``checkpoint.save_every`` steps, and on a stop request agreed by all
    processes, checkpoints/step_<N>/ (weights, optimiser, scheduler, RNG, the step and the first loss; main
    process); on a stop request then `StageInterrupted`."""
    stopping = stop.agreed(accelerator.device) and step < cfg.max_steps
    if not stopping and not (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0
                             and step < cfg.max_steps):
        return
    if accelerator.is_main_process:
        write_checkpoint(output_dir, step, {
            "model": dict(accelerator.unwrap_model(model).state_dict()),
            "trainer": {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_state(), "step": step, "first_loss": first_loss}},
            keep_last=cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    fault_point("after_checkpoint", step)
    if stopping:
        raise StageInterrupted(f"pretrain stopped by a signal at step {step}; the checkpoint is in "
                               f"{checkpoint_dir(output_dir, step)}. Rerun with checkpoint.resume=true to continue")


def run(cfg: PretrainConfig) -> Path:
    """Train the tokenizer and the model, save both with the manifest; returns the output directory."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator()
    accumulation = cfg.accumulation_steps(accelerator.num_processes)
    # Validate every row before a model exists, so bad data fails in seconds.
    data = prepare_dataset(
        cfg.data.path, "text", split=cfg.data.split, eval_path=cfg.data.eval_path, eval_split=cfg.data.eval_split,
        eval_fraction=cfg.data.eval_fraction, seed=cfg.seed, on_bad_row=cfg.data.on_bad_row,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    train_texts = [row["text"] for row in data.train]
    eval_texts = [row["text"] for row in data.eval]
    resume_from = latest_checkpoint(output_dir_of(cfg)) if cfg.checkpoint.resume else None
    if resume_from is not None and accelerator.is_main_process:
        # The resumed run rewrites what came after its checkpoint; the logs must not hold those rows twice.
        truncate_logs_to(resume_from)
    accelerator.wait_for_everyone()

    with StageRun(cfg, rank=accelerator.process_index, is_main_process=accelerator.is_main_process) as stage, \
            StopRequest() as stop:
        # 1. Tokenizer and model from scratch.
        tokenizer = train_tokenizer(train_texts, cfg)
        model = build_model(cfg, tokenizer)
        num_params = sum(p.numel() for p in model.parameters())
        logger.info("pretrain: %s model with %.2fM parameters, vocab %d", cfg.objective, num_params / 1e6,
                    len(tokenizer))

        # 2. Data: the same shuffled order on every process count (accelerate shards each global batch).
        train_loader = make_loader(cfg, tokenizer, train_texts, shuffle=True, seed=cfg.seed)
        eval_loader = make_loader(cfg, tokenizer, eval_texts, shuffle=False, seed=cfg.seed) if eval_texts else None

        # 3. Optimiser and schedule.
        optimizer, scheduler = optimiser_and_schedule(cfg, model, accelerator)
        # The scheduler stays unprepared: accelerate would step it once per process, but max_steps counts optimiser
        # steps of the global batch whatever the number of processes.
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        if eval_loader is not None:
            eval_loader = accelerator.prepare(eval_loader)

        # 4. Train (from a checkpoint: the tokenizer and the data order are rebuilt the same from the seed).
        started = time.perf_counter()
        model.train()
        batches = _forever(train_loader)
        first_loss = last_loss = float("nan")
        eval_loss = float("nan")
        start = 0
        if resume_from is not None:
            start, first_loss = restore(resume_from, accelerator.unwrap_model(model), optimizer, scheduler,
                                        lambda: [next(batches) for _ in range(accumulation)])
            logger.info("pretrain: resumed from %s (step %d)", resume_from, start)
        progress = tqdm(range(start, cfg.max_steps), desc="pretrain", initial=start, total=cfg.max_steps,
                        disable=not accelerator.is_main_process)
        for step in progress:
            last_loss = train_step(accelerator, model, optimizer, scheduler, batches, accumulation,
                                   cfg.optim.max_grad_norm)
            if step == 0:
                first_loss = last_loss
            done = step + 1
            if done % cfg.logging.log_every == 0 or done == cfg.max_steps:
                stage.tracker.log({"train/loss": last_loss, "train/lr": scheduler.get_last_lr()[0]}, step=done)
                progress.set_postfix(loss=f"{last_loss:.3f}")
            if eval_loader is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                eval_loss = evaluate_loss(model, eval_loader, accelerator)
                stage.tracker.log({"eval/loss": eval_loss}, step=done)
            checkpoint_or_stop(cfg, accelerator, stage.output_dir, done, stop, model, optimizer, scheduler,
                               first_loss)

        # 5. Save the unwrapped model and the tokenizer, then the manifest.
        accelerator.wait_for_everyone()
        metrics: dict[str, Any] = {"train/first_loss": first_loss, "train/loss": last_loss, "eval/loss": eval_loss,
                                   "num_parameters": num_params, "steps": cfg.max_steps,
                                   "time/train_s": time.perf_counter() - started}
        return finish(cfg, accelerator, stage, model, tokenizer, metrics, data.stats)


def finish(cfg: PretrainConfig, accelerator: Any, stage: StageRun, model: Any, tokenizer: Any,
           metrics: dict[str, Any], data_stats: dict[str, Any]) -> Path:
    """The trained model (unwrapped) and the tokenizer, saved by the main process, then the manifest."""
    if cfg.objective == "clm" and math.isfinite(metrics["eval/loss"]):
        metrics["eval/perplexity"] = math.exp(metrics["eval/loss"])
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(stage.output_dir)
        tokenizer.save_pretrained(stage.output_dir)
    return stage.complete(metrics, extra={"data": data_stats, "num_processes": accelerator.num_processes})
