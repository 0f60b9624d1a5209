"""Loading tokenizers and models, wrapping them for parameter-efficient tuning, and saving what a stage produces.

Weights load as safetensors only and ``trust_remote_code`` stays off unless the config turns it on. A directory that
is not a model (or holds a prefix-tuning adapter, which only its own stage can use) fails with a message that says
what the directory is and what to do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from safetensors import SafetensorError

from rlhf.config import ModelConfig, PeftConfig
from rlhf.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"


def _is_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def describe_model_dir(path: str | Path) -> Literal["model", "lora_adapter", "prefix_adapter", "adapter", "other"]:
    """What a local directory holds."""
    p = Path(path)
    adapter = p / ADAPTER_CONFIG
    if adapter.is_file():
        try:
            kind = json.loads(adapter.read_text(encoding="utf-8")).get("peft_type", "")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{adapter} is not a readable adapter config (JSON object); save the adapter "
                                  "again") from None
        return {"LORA": "lora_adapter", "PREFIX_TUNING": "prefix_adapter"}.get(kind, "adapter")
    if (p / "config.json").is_file():
        return "model"
    return "other"


def check_model_source(model: ModelConfig, *, key: str = "model.name_or_path") -> None:
    """Fail early, with the fix, when a local model path is missing or is not something a stage can load."""
    path = model.name_or_path
    if not _is_local(path):
        return  # a hub id: from_pretrained reports what is wrong with it
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{key}: {path} does not exist; point it at a model directory or a stage output")
    kind = describe_model_dir(p)
    if kind == "prefix_adapter":
        raise CheckpointError(
            f"{key}: {path} holds a prefix-tuning adapter, which later stages cannot use yet (its virtual tokens "
            "change how every sequence is scored); train that stage with peft.method=full, lora or partial"
        )
    if kind == "other":
        raise CheckpointError(
            f"{key}: {path} is not a model directory (no config.json or {ADAPTER_CONFIG}); point it at the output "
            "of a stage or a save_pretrained directory"
        )
    if kind == "model" and not model.trust_remote_code and _needs_remote_code(p / "config.json"):
        trust_key = key.rpartition(".")[0] + ".trust_remote_code"
        raise CheckpointError(
            f"{key}: {path} ships its own model code (auto_map in config.json for a model type transformers does "
            f"not know), which runs only with {trust_key}=true; set that only if you trust the code in {path}"
        )
    for weights in sorted(p.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem is not None:
            raise CheckpointError(
                f"{key}: {weights} {problem}; the save or download was cut short or the file is damaged. Save or "
                "download the model again"
            )


def _needs_remote_code(config_file: Path) -> bool:
    """Whether loading the model of ``config_file`` would run code shipped with it: an ``auto_map`` for a model
    type transformers has no class of its own for."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # from_pretrained reports an unreadable config with its own words
    return bool(isinstance(config, dict) and config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING)


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: its header must be readable JSON and the file
    exactly as long as the header says (8-byte header length, header, then the tensors' bytes). Reads the header
    only, so a truncated file fails here, before a stage creates its output, rather than deep inside loading."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"is truncated ({size} bytes, not even a header)"
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            return f"is truncated: its header alone should be {header_len} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "has an unreadable header (not safetensors JSON)"
    if not isinstance(header, dict):
        return "has an unreadable header (not safetensors JSON)"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"is truncated: its header describes {expected} bytes, the file has {size}"
    return None


def is_encoder(model_dir: str) -> bool:
    """Whether a checkpoint is a bidirectional encoder (BERT-style) rather than a causal LM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    archs = " ".join(config.architectures or [])
    return not getattr(config, "is_decoder", False) and ("Masked" in archs or "PreTraining" in archs or
                                                          config.model_type in ("bert", "roberta", "deberta-v2",
                                                                                "distilbert", "electra",
                                                                                "modernbert"))


def hidden_size(model_dir: str) -> int:
    """The width of a checkpoint's model (its config's ``hidden_size``, which GPT-2 maps from ``n_embd``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return int(getattr(config, "hidden_size", None) or max(getattr(config, "hidden_sizes", [0])))


def load_tokenizer(model: ModelConfig) -> Any:
    """The tokenizer of ``model``; one without a pad token pads with EOS (our losses use masks, never pad ids)."""
    from transformers import AutoTokenizer

    source = model.tokenizer_name_or_path or model.name_or_path
    if describe_model_dir(source) in ("lora_adapter", "adapter") and not (Path(source) / "tokenizer_config.json").exists():
        source = _adapter_base(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {source}: {exc}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            # EOS is the stop token every response ends with (rlhf.text), so padding with it is the only fallback.
            raise CheckpointError(
                f"the tokenizer in {source} has neither a pad nor an EOS token, so responses can neither end nor be "
                f"padded; set eos_token (and pad_token) in {Path(source) / 'tokenizer_config.json'}, or point "
                "model.tokenizer_name_or_path at a tokenizer that has them"
            )
        logger.warning("tokenizer of %s has no pad token; padding with EOS (%r)", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_base(path: str | Path) -> str:
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config["base_model_name_or_path"]


def _load_kwargs(model: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "dtype": DTYPES[model.dtype],
        "use_safetensors": True,
    }
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    return kwargs


def _from_pretrained(auto_cls: Any, model: ModelConfig, **extra: Any) -> Any:
    check_model_source(model)
    source = model.name_or_path
    try:
        if describe_model_dir(source) in ("lora_adapter", "adapter"):
            from peft import PeftModel

            base = auto_cls.from_pretrained(_adapter_base(source), **_load_kwargs(model), **extra)
            loaded = PeftModel.from_pretrained(base, source).merge_and_unload()
        else:
            loaded = auto_cls.from_pretrained(source, **_load_kwargs(model), **extra)
    except OSError as exc:
        raise CheckpointError(
            f"cannot load a model from {source}: {exc}. If the weights are a .bin/.pt file, convert them to "
            "safetensors (only safetensors are loaded, so loading never runs pickled code)"
        ) from None
    except SafetensorError as exc:
        raise CheckpointError(
            f"cannot load the weights in {source}: {exc}; the safetensors file is damaged. Save or download the "
            "model again"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"cannot load {source} as {auto_cls.__name__}: {exc}") from None
    if model.fused_activations:
        fuse_activations(loaded)
    return loaded


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace each tanh-approximate GELU module that transformers computes as a chain of Python tensor operations
    (``gelu_new``, ``gelu_fast``: eight elementwise passes forward and more backward, each saving a tensor for
    autograd) by torch's fused kernel of the same formula, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). The
    outputs differ only in rounding. Returns how many modules were replaced."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                replaced += 1
    return replaced


def load_causal_lm(model: ModelConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, model)


def load_sequence_scorer(model: ModelConfig, *, pad_token_id: int) -> torch.nn.Module:
    """A model with a one-output score head (a reward model or a critic); a causal LM checkpoint gets a fresh
    head, a reward-stage output keeps its trained one."""
    from transformers import AutoModelForSequenceClassification

    scorer = _from_pretrained(AutoModelForSequenceClassification, model, num_labels=1)
    scorer.config.pad_token_id = pad_token_id
    return scorer


def transformer_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The longest ``ModuleList`` of the model (its transformer blocks) and its qualified name."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ConfigError("peft.method=partial: the model has no list of transformer blocks to choose from")
    return best


def freeze_all_but_top(model: torch.nn.Module, peft: PeftConfig, *, always_train: tuple[str, ...] = ()) -> list[str]:
    """Partial tuning: train only the top ``trainable_top_blocks`` blocks, parameters whose name contains one of
    ``trainable_modules``, and ``always_train`` (e.g. a fresh score head). Returns the trained parameter names."""
    list_name, blocks = transformer_blocks(model)
    if peft.trainable_top_blocks > len(blocks):
        raise ConfigError(
            f"peft.trainable_top_blocks={peft.trainable_top_blocks} exceeds the model's {len(blocks)} blocks"
        )
    first = len(blocks) - peft.trainable_top_blocks
    prefixes = tuple(f"{list_name}.{i}." for i in range(first, len(blocks)))
    wanted = tuple(peft.trainable_modules) + always_train
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(prefixes) or any(w in name for w in wanted)
        if param.requires_grad:
            trained.append(name)
    if not trained:
        raise ConfigError("peft.method=partial leaves no parameter to train; raise peft.trainable_top_blocks")
    return trained


def apply_peft(model: torch.nn.Module, peft: PeftConfig, *, task: Literal["causal_lm", "score"]) -> torch.nn.Module:
    """Wrap ``model`` for the tuning method of ``peft``; full tuning returns it unchanged."""
    if peft.method == "full":
        return model
    head = ("score",) if task == "score" else ()
    if peft.method == "partial":
        freeze_all_but_top(model, peft, always_train=head)
        return model
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    task_type = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    if peft.method == "lora":
        config = LoraConfig(
            task_type=task_type,
            r=peft.lora_r,
            lora_alpha=peft.lora_alpha,
            lora_dropout=peft.lora_dropout,
            target_modules=peft.target_modules or "all-linear",
            # The score head is new: without training it a LoRA reward model stays at chance.
            modules_to_save=list(head) or None,
        )
    else:
        if task == "score":
            raise ConfigError("peft.method=prefix is for the SFT stage only; use lora, partial or full here")
        config = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"peft.target_modules={peft.target_modules}: {exc}") from None


def save_model(model: torch.nn.Module, tokenizer: Any, output_dir: str | Path, peft: PeftConfig) -> str:
    """Save ``model`` and ``tokenizer`` into ``output_dir``: LoRA merged into the weights (default) or as an adapter;
    prefix tuning always as an adapter. Returns what was saved: "model" or "adapter"."""
    from peft import PeftModel

    out = Path(output_dir)
    saved = "model"
    if isinstance(model, PeftModel):
        if peft.method == "lora" and peft.save == "merged":
            model = model.merge_and_unload()
        else:
            saved = "adapter"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return saved


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    # Under DeepSpeed ZeRO-3 a partitioned parameter is empty here; ds_numel is its full size.
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


#: What one more forward pass costs in `length_groups`, in token positions per row of the longest sequence: a pass
#: over a group pays for its fixed per-call work (Python, dispatch, weight packing) about what 4 such rows cost.
PASS_COST_ROWS = 4


def length_groups(lengths: Sequence[int], max_rows: int, *, equal_count: bool = False) -> list[list[int]]:
    """Row indices in groups for passes over whole sequences padded to each group's longest: rows sorted by length,
    at most ``max_rows`` per group, cut where that saves more padded positions than one more pass costs
    (`PASS_COST_ROWS` rows of the longest sequence), by dynamic programming over the sorted lengths. Rows of equal
    length give groups of ``max_rows`` (the first one holds what is left over), as plain chunks would.

    ``equal_count``: the plain chunks of the sorted rows (``ceil(n / max_rows)`` groups whatever the lengths), for
    passes that must run as many times on every process (DeepSpeed ZeRO-3 gathers the weights inside each forward)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    if equal_count or n == 0:
        return [order[start:start + max_rows] for start in range(0, n, max_rows)]
    sorted_lengths = [lengths[i] for i in order]
    pass_cost = PASS_COST_ROWS * sorted_lengths[-1]
    # best[j]: the least cost of the first j sorted rows; cut[j]: where their last group starts.
    best = [0] * (n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + (j - i) * sorted_lengths[j - 1] + pass_cost, i)
                              for i in range(max(0, j - max_rows), j))
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def chunks_in_order(count: int, max_rows: int) -> list[list[int]]:
    """Row indices 0..count-1 in consecutive groups of ``max_rows`` (the last one shorter): passes without length
    grouping."""
    return [list(range(start, min(start + max_rows, count))) for start in range(0, count, max_rows)]


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, pad_token_id: int,
                    batch_size: int = 64, equal_count: bool = False, by_length: bool = True) -> torch.Tensor:
    """Scores of token-id sequences, right-padded in groups of similar lengths (`length_groups`: less padding; with
    ``by_length=False`` in chunks of ``batch_size`` in order); the head reads the last real token. [N] float32, in
    the order of ``sequences``."""
    model.eval()
    device = next(model.parameters()).device
    if by_length:
        groups = length_groups([len(s) for s in sequences], batch_size, equal_count=equal_count)
    else:
        groups = chunks_in_order(len(sequences), batch_size)
    order = [i for group in groups for i in group]
    scores = []
    for group in groups:
        chunk = [sequences[i] for i in group]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    if not scores:
        return torch.zeros(0)
    result = torch.empty(len(sequences))
    result[torch.tensor(order)] = torch.cat(scores)
    return result


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout anywhere in ``model``: PPO's ratio must compare the same function at rollout and training time,
    and a reference must score the same way every time."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` for inference only: no parameter trains, no dropout, eval mode."""
    model.requires_grad_(False)
    disable_dropout(model)
    return model.eval()
