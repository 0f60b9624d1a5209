"""Typed stage configs: dataclasses loaded from YAML, overridden by ``key.sub=value`` arguments, strictly validated.

Every field is declared with :func:`option`, which carries its one-line doc, whether it is *semantic* (changes the
result, so it enters the stage's fingerprint) and its numeric range. Unknown keys are errors naming the closest valid
key; values are checked against the field's type (``Literal`` modes against their allowed set) and range. Derived
values are properties, never stored fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from rlhf.errors import ConfigError

C = TypeVar("C")

_MISSING = dataclasses.MISSING


#: This checkout's root: configs and data named relative to it are found from any working directory.
REPO_ROOT = Path(__file__).resolve().parents[1]


def option(
    default: Any = _MISSING,
    *,
    doc: str,
    semantic: bool | Callable[[Any], bool] = True,
    default_factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """Declare a config field with its doc, its semantic flag and an optional numeric range. ``semantic`` may be a
    predicate of the config holding the field: the field then enters the fingerprint only where it holds (an option
    that matters under one setting only, so adding it leaves the fingerprints of configs without it unchanged)."""
    metadata = {"doc": doc, "semantic": semantic, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(factory: Any, doc: str) -> Any:
    """A nested config part (``factory`` builds its default, e.g. a class or a lambda with stage defaults); its own
    fields carry their semantic flags."""
    return field(default_factory=factory, metadata={"doc": doc, "semantic": True, "section": True})


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = option(
        "data/base-model",
        doc="Local model directory, stage output or hub model id (its content enters the fingerprint as an input).",
        semantic=False,
    )
    revision: str | None = option(None, doc="Hub revision (branch, tag or commit) when name_or_path is a hub id.")
    tokenizer_name_or_path: str | None = option(
        None, doc="Tokenizer location when it differs from the model's (an input, like name_or_path).", semantic=False
    )
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", doc="Weights and compute dtype.")
    gradient_checkpointing: bool = option(
        False, doc="Recompute activations in the backward pass to save memory.", semantic=False
    )
    attn_implementation: str | None = option(
        None, doc="Attention kernel (eager, sdpa, flash_attention_2); None lets transformers choose.", semantic=False
    )
    trust_remote_code: bool = option(False, doc="Allow model code from the checkpoint to run. Off unless you trust it.")
    fused_activations: bool = option(
        True,
        doc="Run the tanh-approximate GELU that transformers writes out in Python (gelu_new, gelu_fast: GPT-2 and "
            "others) with torch's fused kernel: the same function, differing only in rounding (benchmarks/README.md "
            "has the timings).",
        semantic=False,
    )
    onednn_linears: bool = option(
        True,
        doc="On the CPU in float32, run the linear layers of at least 2^17 weights through oneDNN with their "
            "weights packed once per optimiser step (and per PPO rollout) instead of torch's default MKL path: the "
            "same function, differing only in rounding (benchmarks/README.md has the timings). No effect on GPUs, "
            "in other dtypes or under DeepSpeed.",
        semantic=False,
    )


@dataclass
class PeftConfig:
    """Which parameters to train: all, LoRA adapters, a prefix, or the top blocks only."""

    method: Literal["full", "lora", "prefix", "partial"] = option("full", doc="Tuning method.")
    lora_r: int = option(8, doc="LoRA rank.", ge=1)
    lora_alpha: float = option(16.0, doc="LoRA scaling numerator (scale = alpha / r).", gt=0)
    lora_dropout: float = option(0.0, doc="Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] | None = option(
        None, doc="Module names LoRA wraps; None means every linear layer except the output head."
    )
    num_virtual_tokens: int = option(16, doc="Prefix length for prefix tuning.", ge=1)
    trainable_top_blocks: int = option(1, doc="Partial tuning: how many of the top transformer blocks train.", ge=0)
    trainable_modules: list[str] = option(
        default_factory=list, doc="Partial tuning: extra parameter-name substrings that also train (e.g. lm_head)."
    )
    save: Literal["merged", "adapter"] = option("merged", doc="Save LoRA merged into the weights, or as an adapter.")


@dataclass
class DataConfig:
    """Where the data comes from and how bad rows are handled."""

    path: str = option(
        "data/demo/sft.jsonl",
        doc="jsonl/json/parquet/csv file, save_to_disk directory or hub name (its content enters the fingerprint).",
        semantic=False,
    )
    split: str = option("train", doc="Split to read from a saved or hub dataset.")
    eval_path: str | None = option(
        None, doc="Separate held-out data; None splits eval_fraction off path.", semantic=False
    )
    eval_split: str | None = option(None, doc="Split of eval_path (or of path) used for evaluation.")
    eval_fraction: float = option(0.05, doc="Fraction held out for evaluation when there is no eval data.", ge=0, lt=1)
    prompt_marker: str = option(
        "\n\nAssistant:", doc="Where implicit-prompt preference texts split into prompt and answer (the last one)."
    )
    margin_from_scores: bool = option(
        False, doc="UltraFeedback layout: a pair's margin is score_chosen - score_rejected (the reward model's "
                   "loss then asks for at least that gap); off, the scores are not used.")
    on_bad_row: Literal["error", "drop"] = option("drop", doc="What to do with rows whose content is unusable.")
    max_bad_fraction: float = option(0.05, doc="Fail anyway when more than this fraction of rows is bad.", ge=0, le=1)
    max_length: int | None = option(None, doc="Longest row in tokens; longer rows are bad rows (never truncated).", ge=1)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    learning_rate: float = option(5e-4, doc="Peak learning rate.", gt=0)
    weight_decay: float = option(0.0, doc="AdamW weight decay.", ge=0)
    adam_beta1: float = option(0.9, doc="AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = option(0.999, doc="AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = option(1e-8, doc="AdamW epsilon.", gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = option("cosine", doc="Decay after warmup.")
    warmup_ratio: float = option(0.0, doc="Fraction of the steps spent warming up linearly.", ge=0, le=1)
    max_grad_norm: float = option(1.0, doc="Clip the global gradient norm to this; 0 disables clipping.", ge=0)


@dataclass
class LoggingConfig:
    """Where metrics go. Secrets come from the environment only."""

    report_to: list[str] = option(
        default_factory=lambda: ["jsonl", "wandb", "tensorboard"],
        doc="Trackers: jsonl (always on), wandb (offline without credentials; `wandb sync` uploads it later), "
            "tensorboard. [jsonl] writes metrics.jsonl alone.", semantic=False
    )
    project: str = option("rlhf", doc="W&B project.", semantic=False)
    entity: str | None = option(None, doc="W&B entity (team or user).", semantic=False)
    group: str | None = option(None, doc="W&B group; the pipeline sets one per run.", semantic=False)
    run_name: str | None = option(None, doc="Display name of the tracker run.", semantic=False)
    log_every: int = option(10, doc="Log training metrics every N optimiser steps.", semantic=False, ge=1)
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("INFO", doc="Log level.", semantic=False)


@dataclass
class CheckpointConfig:
    """Intermediate checkpoints inside the stage's output directory."""

    save_every: int = option(0, doc="Save a resumable checkpoint every N steps; 0 saves only at the end.",
                             semantic=False, ge=0)
    keep_last: int = option(2, doc="How many intermediate checkpoints to keep.", semantic=False, ge=1)
    resume: bool = option(False, doc="Continue from the newest complete checkpoint in the output directory.",
                          semantic=False)


@dataclass
class StageConfig:
    """Fields every stage has."""

    run_dir: str = option("runs/demo", doc="Run directory; the stage writes <run_dir>/<stage>.", semantic=False)
    output_dir: str | None = option(None, doc="Write here instead of <run_dir>/<stage>.", semantic=False)
    seed: int = option(0, doc="Seed of this stage; each process derives its own from it.", ge=0)
    full_determinism: bool = option(
        False, doc="Deterministic kernels everywhere (slower); seeds alone already fix the data order.", semantic=False
    )
    threads: int | None = option(
        None, doc="torch intra-op threads; None: on CPU the cores divided by this machine's processes, on GPU torch's "
                  "default.", semantic=False, ge=1)
    logging: LoggingConfig = section(LoggingConfig, "Trackers and log level.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Intermediate checkpoints and resuming.")

    #: The stage name (pretrain, sft, reward, ppo, evaluate); set by each subclass.
    stage: typing.ClassVar[str] = "stage"

    def validate(self) -> None:
        """Cross-field checks; subclasses extend this and raise ConfigError with the key to change."""

    def input_paths(self) -> dict[str, str]:
        """The files and directories this stage reads (models, data), by name; their fingerprints enter the
        stage's fingerprint in place of the path strings, so moving a run directory keeps it up to date."""
        return {}


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        (arg,) = typing.get_args(tp)
        return f"list[{_type_name(arg)}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting where the meaning is unambiguous)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{extra}")
        return value
    if origin in (list, Sequence):
        (arg,) = typing.get_args(tp)
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(arg)}, got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            # YAML 1.1 reads "1e-5" as a string; a float field takes it as the number it means.
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        limit = meta.get(bound)
        if limit is not None and not ok(value, limit):
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {word} {limit}")


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """All leaf keys of a config class in dotted form, in declaration order."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            paths.extend(field_paths(tp, f"{prefix}{f.name}."))
        else:
            paths.append(prefix + f.name)
    return paths


def _unknown_key(cls: type, key: str, source: str) -> ConfigError:
    valid = field_paths(cls)
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not hint:
        # A right leaf name under the wrong section ("learning_rate" instead of "optim.learning_rate").
        leaf = key.rsplit(".", 1)[-1]
        hint = [p for p in valid if p.rsplit(".", 1)[-1] == leaf][:1]
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown config key {key!r} in {source}{suggestion} (--help lists every key)")


def _build(cls: type[C], data: Mapping[str, Any], source: str, root: type, prefix: str = "", base: Any = None) -> C:
    """``base`` (default: ``cls()``) with the keys of ``data`` replaced; nested sections start from the parent's
    default for them, so a stage's own section defaults survive a partial override."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    base = cls() if base is None else base
    for key in data:
        if key not in known:
            raise _unknown_key(root, prefix + str(key), source)
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        key = prefix + name
        tp = hints[name]
        if _is_config(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, source, root, key + ".",
                                  getattr(base, name))
        else:
            value = _coerce(data[name], tp, key)
            _check_range(value, f.metadata, key)
            kwargs[name] = value
    obj = dataclasses.replace(base, **kwargs)
    # Defaults are checked too, so a subclass cannot ship an out-of-range default unnoticed.
    for name, f in known.items():
        if name not in data and not _is_config(hints[name]):
            _check_range(getattr(obj, name), f.metadata, prefix + name)
    return obj


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` and read the value as YAML (so ``true``, ``3``, ``[a, b]`` and ``null`` work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), *, data: Mapping | None = None
) -> C:
    """Build ``cls`` from a YAML file (or a mapping) plus ``key.sub=value`` overrides, validated."""
    tree: dict[str, Any] = dict(data or {})
    source = "the given mapping" if data is not None else "defaults"
    if path is not None:
        tree = read_yaml(path)
        source = str(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    if overrides:
        source = f"{source} (with overrides)" if path is not None else "the overrides"
    cfg = _build(cls, tree, source, cls)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data."""
    return dataclasses.asdict(cfg)


def semantic_dict(cfg: Any) -> dict[str, Any]:
    """Only the fields that change the result: what enters the fingerprint."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = semantic_dict(value)
        elif _is_semantic(f, cfg):
            out[f.name] = value
    return out


def _is_semantic(f: dataclasses.Field, cfg: Any) -> bool:
    flag = f.metadata.get("semantic", True)
    return bool(flag(cfg)) if callable(flag) else bool(flag)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def format_help(cls: type, prog: str) -> str:
    """Every field with its type, default, semantic flag and doc: the launchers' ``--help``."""
    lines = [
        f"usage: {prog} [--config FILE.yaml] [--print-config] [key.sub=value ...]",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "Keys (semantic ones change the result and the stage's fingerprint; the others do not):",
    ]

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            tp = hints[f.name]
            value = getattr(obj, f.name)
            if _is_config(tp):
                lines.append(f"  [{prefix}{f.name}] {f.metadata.get('doc', '')}")
                walk(value, prefix + f.name + ".")
                continue
            flag = "semantic" if f.metadata.get("semantic", True) else "not semantic"
            lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {value!r}  ({flag})")
            lines.append(f"      {f.metadata.get('doc', '')}")

    walk(cls(), "")
    return "\n".join(lines) + "\n"


def parse_cli(cls: type[C], argv: Sequence[str] | None, *, default_config: str | Path | None, prog: str) -> C:
    """The launchers' command line: ``[--config FILE] [--print-config] [key=value ...]``; ``--help`` exits."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        sys.stdout.write(format_help(cls, prog))
        raise SystemExit(0)
    config_path: str | Path | None = default_config
    print_config = False
    overrides = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path")
            config_path = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--print-config":
            print_config = True
        elif arg.startswith("--"):
            raise ConfigError(f"unknown option {arg!r}; options are --config, --print-config, --help, then key=value")
        else:
            overrides.append(arg)
        i += 1
    cfg = load_config(cls, config_path, overrides)
    if print_config:
        sys.stdout.write(to_yaml(cfg))
        raise SystemExit(0)
    return cfg


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


def check_batch_divides(batch_size: int, micro_batch_size: int, *, prefix: str) -> None:
    """The part of :func:`accumulation_steps` that holds for any number of processes, checked when the config loads
    (before any data or model does)."""
    if batch_size % micro_batch_size:
        raise ConfigError(
            f"{prefix}batch_size={batch_size} is not a multiple of {prefix}micro_batch_size={micro_batch_size}, so "
            f"no number of processes splits it evenly; change {prefix}batch_size or {prefix}micro_batch_size"
        )


def accumulation_steps(batch_size: int, micro_batch_size: int, num_processes: int, *, prefix: str) -> int:
    """Micro-batches per optimiser step on each process for a global batch of ``batch_size``; the error names the
    keys (under ``prefix``) to change."""
    per_step = micro_batch_size * num_processes
    if batch_size % per_step:
        raise ConfigError(
            f"{prefix}batch_size={batch_size} is not a multiple of {prefix}micro_batch_size={micro_batch_size} x "
            f"{_processes(num_processes)}; change {prefix}batch_size or {prefix}micro_batch_size"
        )
    return batch_size // per_step


@dataclass
class TokenizerTrainConfig:
    """A BPE tokenizer trained from scratch on the corpus (pretraining only)."""

    vocab_size: int = option(1024, doc="Vocabulary size including special tokens.", ge=64)
    min_frequency: int = option(2, doc="Merges need a pair seen at least this often.", ge=1)


@dataclass
class ArchitectureConfig:
    """Size of a model built from scratch (GPT-2 for clm, BERT for mlm and mlm_nsp)."""

    n_layer: int = option(4, doc="Transformer blocks.", ge=1)
    n_embd: int = option(128, doc="Hidden size.", ge=8)
    n_head: int = option(4, doc="Attention heads; must divide n_embd.", ge=1)
    n_positions: int = option(128, doc="Longest sequence the model can take.", ge=8)
    dropout: float = option(0.0, doc="Dropout in embeddings, attention and MLP.", ge=0, lt=1)


@dataclass
class PretrainConfig(StageConfig):
    """Pretrain a tiny base model from scratch on a text corpus (the demo's base model, or an encoder backbone)."""

    stage: typing.ClassVar[str] = "pretrain"

    objective: Literal["clm", "mlm", "mlm_nsp"] = option(
        "clm", doc="clm: GPT-2 causal LM; mlm: BERT masked LM; mlm_nsp: BERT masked LM + next-sentence prediction."
    )
    data: DataConfig = section(
        lambda: DataConfig(path="data/demo/corpus.jsonl", eval_fraction=0.02), "The corpus: rows with a 'text' column."
    )
    tokenizer: TokenizerTrainConfig = section(TokenizerTrainConfig, "Tokenizer training.")
    arch: ArchitectureConfig = section(ArchitectureConfig, "Model size.")
    optim: OptimConfig = section(lambda: OptimConfig(learning_rate=3e-3, warmup_ratio=0.05), "Optimiser.")
    max_steps: int = option(300, doc="Optimiser steps.", ge=1)
    batch_size: int = option(32, doc="Global batch in sequences per optimiser step (any number of processes).", ge=1)
    micro_batch_size: int = option(32, doc="Sequences per forward pass on one process.", ge=1, semantic=False)
    seq_len: int = option(128, doc="Tokens per training sequence (documents are packed).", ge=8)
    mlm_probability: float = option(0.15, doc="Fraction of tokens masked for mlm objectives.", gt=0, lt=1)
    eval_every: int = option(100, doc="Evaluate the held-out loss every N steps (and at the end).", ge=1,
                             semantic=False)

    def validate(self) -> None:
        check_batch_divides(self.batch_size, self.micro_batch_size, prefix="")
        if self.arch.n_embd % self.arch.n_head:
            raise ConfigError(
                f"arch.n_head={self.arch.n_head} must divide arch.n_embd={self.arch.n_embd}; change one of them"
            )
        if self.seq_len > self.arch.n_positions:
            raise ConfigError(
                f"seq_len={self.seq_len} exceeds arch.n_positions={self.arch.n_positions}; lower seq_len or "
                "raise arch.n_positions"
            )

    def input_paths(self) -> dict[str, str]:
        return {"data": self.data.path}

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimiser step on each process, so that the global batch stays ``batch_size``."""
        return accumulation_steps(self.batch_size, self.micro_batch_size, num_processes, prefix="")


@dataclass
class TrainerConfig:
    """Batching and schedule of the TRL-trained stages (SFT and reward)."""

    num_epochs: float = option(1.0, doc="Passes over the training data (ignored when max_steps is set).", gt=0)
    max_steps: int | None = option(None, doc="Optimiser steps; overrides num_epochs.", ge=1)
    batch_size: int = option(32, doc="Global batch in examples per optimiser step (any number of processes).", ge=1)
    micro_batch_size: int = option(8, doc="Examples per forward pass on one process.", ge=1, semantic=False)
    eval_every: int = option(50, doc="Evaluate on the held-out split every N steps (and at the end).", ge=1,
                             semantic=False)
    group_by_length: bool = option(
        False, doc="Batch examples of similar length together (shuffled in groups of 50 batches), so less compute "
                   "goes to padding; batches are then less random.")
    sort_micro_batches: bool = option(
        True, doc="Order each optimiser step's examples by length before cutting them into micro-batches: the step "
                  "trains on the same random examples (same gradient up to rounding) with less padding. Helps when "
                  "micro_batch_size is below batch_size.", semantic=False)

    def validate(self) -> None:
        check_batch_divides(self.batch_size, self.micro_batch_size, prefix="train.")

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimiser step on each process, so that the global batch stays ``batch_size``."""
        return accumulation_steps(self.batch_size, self.micro_batch_size, num_processes, prefix="train.")


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning of a causal LM on prompt/completion or conversational data (TRL SFTTrainer)."""

    stage: typing.ClassVar[str] = "sft"

    model: ModelConfig = section(ModelConfig, "The base model.")
    peft: PeftConfig = section(PeftConfig, "Which parameters train.")
    data: DataConfig = section(lambda: DataConfig(path="data/demo/sft.jsonl", max_length=128),
                               "prompt/completion or messages data.")
    optim: OptimConfig = section(lambda: OptimConfig(learning_rate=1e-3, warmup_ratio=0.05), "Optimiser.")
    train: TrainerConfig = section(lambda: TrainerConfig(num_epochs=2.0, batch_size=32, micro_batch_size=32),
                                   "Batching and schedule.")
    completion_only_loss: bool = option(
        True, doc="Loss on completions / assistant turns only (their stop token included)."
    )
    packing: bool = option(False, doc="Pack several examples into each sequence of data.max_length tokens.")

    def validate(self) -> None:
        self.train.validate()
        if self.packing and self.data.max_length is None:
            raise ConfigError("packing=true needs data.max_length (the packed sequence length)")

    def input_paths(self) -> dict[str, str]:
        return {"model": self.model.name_or_path, "tokenizer": self.model.tokenizer_name_or_path or "",
                "data": self.data.path, "eval_data": self.data.eval_path or ""}


@dataclass
class RewardConfig(StageConfig):
    """Reward-model training on preference pairs with a Bradley-Terry loss (TRL RewardTrainer)."""

    stage: typing.ClassVar[str] = "reward"

    model: ModelConfig = section(
        lambda: ModelConfig(name_or_path=""),
        "The backbone: empty means this run's SFT output; or any causal LM or encoder (BERT-style) directory.",
    )
    peft: PeftConfig = section(PeftConfig, "Which parameters train (the score head always trains).")
    data: DataConfig = section(lambda: DataConfig(path="data/demo/preferences.jsonl", max_length=160),
                               "Preference pairs.")
    optim: OptimConfig = section(lambda: OptimConfig(learning_rate=5e-4, warmup_ratio=0.05), "Optimiser.")
    train: TrainerConfig = section(lambda: TrainerConfig(num_epochs=2.0, batch_size=32, micro_batch_size=32),
                                   "Batching and schedule.")
    center_rewards_coefficient: float | None = option(
        None, doc="Weight of the penalty on squared rewards that centres them near 0 (Eisenstein et al. 2023).", ge=0
    )
    gold_judge: bool = option(
        False, doc="Also report, on the held-out pairs, how often the reward model orders them as the demo's gold "
                   "judge does (plain-text demo data only).", semantic=False)
    min_eval_accuracy: float = option(
        0.6, doc="The gate recorded in the manifest: held-out pair accuracy at least this, or PPO refuses the reward "
                 "model (its checks.reward_gate=false proceeds anyway). Chance is 0.5.", ge=0, le=1, semantic=False)

    @property
    def backbone_path(self) -> str:
        """The model to start from: ``model.name_or_path``, or this run's SFT output when that is empty."""
        return self.model.name_or_path or str(Path(self.run_dir) / "sft")

    def validate(self) -> None:
        self.train.validate()
        if self.peft.method == "prefix":
            # A prefix changes what the score head reads at every position; PPO could not score with it either.
            raise ConfigError("peft.method=prefix is for the SFT stage only; use full, lora or partial for the reward "
                              "model")

    def input_paths(self) -> dict[str, str]:
        return {"model": self.backbone_path, "tokenizer": self.model.tokenizer_name_or_path or "",
                "data": self.data.path, "eval_data": self.data.eval_path or ""}


#: DPO's preference losses (TRL ``DPOTrainer``'s ``loss_type``), each with what it optimises. h = beta x (the
#: chosen response's log-ratio to the reference - the rejected one's).
DPO_LOSSES = {
    "sigmoid": "DPO (Rafailov et al. 2023): -log sigmoid(h), the Bradley-Terry likelihood of the labels under the "
               "implicit reward; with label_smoothing e, conservative DPO (labels flipped with probability e)",
    "ipo": "IPO (Azar et al. 2023): (h / beta - 1 / (2 beta))^2, a squared loss that pulls the log-ratio gap to a "
           "fixed target instead of pushing it without bound; beta is IPO's tau",
    "hinge": "SLiC-HF (Zhao et al. 2023): max(0, 1 - h), a hinge on the normalised likelihood gap",
    "robust": "Robust DPO (Chowdhury et al. 2024): the DPO loss de-biased for labels flipped with probability "
              "label_smoothing (in [0, 0.5))",
    "sigmoid_norm": "DPO on length-normalised log-ratios (per-token means), which removes the pull toward longer "
                    "chosen responses",
    "apo_zero": "APO-zero (D'Oosterlinck et al. 2024): raises the chosen responses' likelihood and lowers the "
                "rejected ones', each against the reference, for chosen responses better than the policy's own",
    "simpo": "SimPO (Meng et al. 2024), reference-free (no reference model is loaded): -log sigmoid(beta x the "
             "chosen response's mean token log-prob - beta x the rejected one's - simpo_gamma), a length-normalised "
             "reward margin of at least simpo_gamma; SimPO's paper trains with beta 2 to 10, not DPO's 0.1; "
             "label_smoothing makes it conservative as for sigmoid",
}


#: SimPO's target reward margin when ``simpo_gamma`` is not set (TRL CPOConfig's default).
SIMPO_GAMMA = 0.5


@dataclass
class DPOConfig(StageConfig):
    """Direct preference optimisation of the SFT policy on preference pairs (TRL DPOTrainer; loss_type simpo: TRL's
    experimental CPOTrainer, reference-free), no reward model."""

    stage: typing.ClassVar[str] = "dpo"

    model: ModelConfig = section(
        lambda: ModelConfig(name_or_path=""),
        "The policy to start from, and the reference: empty means this run's SFT output; or any causal LM.",
    )
    peft: PeftConfig = section(PeftConfig, "Which parameters train (LoRA: the reference is the policy with its "
                                           "adapters disabled, no copy loaded; full or partial: one frozen copy).")
    data: DataConfig = section(lambda: DataConfig(path="data/demo/preferences.jsonl", max_length=160),
                               "Preference pairs (every layout the reward stage reads).")
    optim: OptimConfig = section(lambda: OptimConfig(learning_rate=5e-5, warmup_ratio=0.05), "Optimiser.")
    train: TrainerConfig = section(lambda: TrainerConfig(num_epochs=1.0, batch_size=32, micro_batch_size=32),
                                   "Batching and schedule.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "simpo"] = option(
        "sigmoid", doc="The preference loss: " + "; ".join(f"{k}: {v}" for k, v in DPO_LOSSES.items()) + ".")
    beta: float = option(0.1, doc="How far the policy may move from the reference: the implicit reward is beta x "
                                  "the log-ratio; larger keeps the policy closer. With simpo (no reference) the "
                                  "reward is beta x the mean token log-prob.", gt=0)
    label_smoothing: float = option(
        0.0, doc="Probability that a label is flipped (loss_type robust; with sigmoid or simpo, the conservative "
                 "loss).", ge=0, lt=0.5)
    sft_loss_weight: float = option(
        0.0, doc="Weight of the chosen responses' token-mean negative log-likelihood added to the preference loss "
                 "(RPO, Pang et al. 2024): keeps the chosen responses likely, their stop token included, where the "
                 "preference loss alone lowers the likelihood of both responses; 0 leaves it out. With simpo it is "
                 "TRL CPOTrainer's cpo_alpha (CPO-SimPO).", ge=0)
    simpo_gamma: float = option(
        SIMPO_GAMMA,
        doc="loss_type simpo only: the target reward margin gamma, subtracted inside the sigmoid from beta x (the "
            "chosen response's mean token log-prob - the rejected one's); 0 is SimPO without a margin. Enters the "
            "fingerprint with simpo only.", ge=0, semantic=lambda cfg: cfg.loss_type == "simpo")

    @property
    def policy_path(self) -> str:
        """The policy to start from: ``model.name_or_path``, or this run's SFT output when that is empty."""
        return self.model.name_or_path or str(Path(self.run_dir) / "sft")

    def validate(self) -> None:
        self.train.validate()
        if self.peft.method == "prefix":
            raise ConfigError("peft.method=prefix is for the SFT stage only; use full, lora or partial for DPO")
        if self.data.margin_from_scores:
            raise ConfigError("data.margin_from_scores has no effect in DPO (its losses take no margin); remove it")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust", "simpo"):
            raise ConfigError(f"label_smoothing applies to loss_type sigmoid, robust or simpo, not {self.loss_type}; "
                              "set label_smoothing=0 or change loss_type")
        if self.simpo_gamma != SIMPO_GAMMA and self.loss_type != "simpo":
            raise ConfigError(f"simpo_gamma applies to loss_type simpo only, not {self.loss_type}; remove simpo_gamma "
                              "or set loss_type=simpo")

    def input_paths(self) -> dict[str, str]:
        return {"model": self.policy_path, "tokenizer": self.model.tokenizer_name_or_path or "",
                "data": self.data.path, "eval_data": self.data.eval_path or ""}


@dataclass
class RolloutConfig:
    """How PPO samples and scores responses."""

    batch_size: int = option(64, doc="Responses per update across all processes (prompts x samples_per_prompt).",
                             ge=1)
    samples_per_prompt: int = option(
        1, doc="Responses sampled per prompt (a group, which the critic-free estimators compare within); batch_size "
               "must be a multiple, and so must each process's share of it.", ge=1)
    max_prompt_len: int = option(64, doc="Prompts longer than this many tokens keep their last max_prompt_len.", ge=1)
    max_new_tokens: int = option(48, doc="Longest response in tokens.", ge=1)
    temperature: float = option(1.0, doc="Sampling temperature; training log-probs use the same one. 0 is greedy.",
                                ge=0)
    top_k: int = option(0, doc="Sample among the top k tokens only; 0 disables.", ge=0)
    top_p: float = option(1.0, doc="Nucleus sampling mass; 1 disables.", gt=0, le=1)
    stop_at_stop_token: bool = option(
        True, doc="End a response at its first stop token (EOS, end of turn); false always samples max_new_tokens "
                  "(throughput benchmarks) and penalises none (missing_stop_penalty applies only when stopping)."
    )
    missing_stop_penalty: float = option(
        1.0, doc="Subtracted from the score of a response that reached max_new_tokens without a stop token (with "
                 "stop_at_stop_token only).", ge=0
    )
    score_norm: Literal["none", "reward_stats", "first_rollout"] = option(
        "reward_stats",
        doc="Normalise the reward model's scores: none; reward_stats (mean/std stored by the reward stage); "
            "first_rollout (mean/std of the first rollout's scores, then fixed). Not applied to the reward functions' "
            "scores; without a reward model in training (rewards.reward_model_weight=0) it has no effect.",
    )
    score_clip: float | None = option(None, doc="Clip normalised scores to [-score_clip, score_clip].", gt=0)
    micro_batch_size: int = option(64, doc="Sequences per generation and scoring pass on one process.", ge=1,
                                   semantic=False)
    generation_logprobs: bool = option(
        True, doc="Take the rollout's log-probs from generation's own logits instead of a second policy pass, when "
                  "the training forward computes in float32 (they agree to float32 rounding; with bf16/fp16 weights "
                  "or under mixed precision's autocast they would not, and the second pass runs).", semantic=False)


@dataclass
class RewardsConfig:
    """What a response's score is made of: the reward model's and rule-based reward functions' (rlhf/rewards.py)."""

    functions: dict[str, float] = option(
        default_factory=dict,
        doc="Reward functions, 'module:function' -> weight: each scores the decoded responses (f(prompts, "
            "responses) -> one number each); its weighted scores add to the score, and its mean is logged as "
            "reward/<function>.")
    reward_model_weight: float = option(
        1.0, doc="Weight of the reward model's normalised score; 0 trains on the functions alone (the reward model "
                 "then scores only the held-out evaluation; with eval.reward_model=false too, none is loaded).", ge=0)


@dataclass
class PPOAlgoConfig:
    """The PPO update: epochs, minibatches, clipping, KL control and advantage estimation."""

    num_updates: int = option(100, doc="Rollout + optimisation rounds.", ge=1)
    ppo_epochs: int = option(2, doc="Passes over each rollout batch.", ge=1)
    num_minibatches: int = option(2, doc="Minibatches (optimiser steps) per PPO epoch; must divide the batch.", ge=1)
    micro_batch_size: int = option(32, doc="Sequences per forward/backward pass on one process.", ge=1,
                                   semantic=False)
    micro_batch_tokens: int | None = option(
        None, doc="Pack each process's forward/backward passes by tokens instead of rows: at most this many token "
                  "positions per pass (its rows x their longest prompt + response, padding included), short rows "
                  "sharing a pass; the number of passes per minibatch varies, the same on every process, and the "
                  "gradient is the same. Must hold the longest row (rollout.max_prompt_len + "
                  "rollout.max_new_tokens). None: ppo.micro_batch_size rows per pass.", ge=1, semantic=False)
    clip_range: float = option(0.2, doc="Policy ratio clip epsilon.", gt=0)
    value_clip_range: float = option(0.2, doc="Value clip epsilon around the rollout's values.", gt=0)
    vf_coef: float = option(0.1, doc="Weight of the value loss in the joint loss.", ge=0)
    entropy_coef: float = option(0.0, doc="Weight of the entropy bonus: the loss adds -entropy_coef x the mean "
                                          "per-token entropy of the policy (with its gradient).", ge=0)
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = option(
        "gae",
        doc="gae: PPO with a critic; grpo: each response's score against its group's mean and std (Shao et al. "
            "2024); rloo: against the mean of the other responses to its prompt (Kool et al. 2019); reinforce_pp: "
            "REINFORCE++, rewards to go whitened over the batch (Hu 2025). The last three build no critic; grpo "
            "and rloo need rollout.samples_per_prompt >= 2 (rlhf/ppo/estimators.py).")
    grpo_scale_by_std: bool = option(True, doc="grpo: divide by the group's score std; false centres only (Dr. "
                                               "GRPO, Liu et al. 2025).")
    kl_penalty: Literal["reward", "loss"] = option(
        "reward", doc="Where the KL to the reference enters: reward (-kl_coef x kl_estimator on every token, as in "
                      "PPO) or loss (kl_coef x the k3 estimate as a loss term, as in GRPO).")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = option(
        "token_mean",
        doc="How per-token losses become one: token_mean (every token weighs the same), seq_mean_token_mean (every "
            "response weighs the same), seq_mean_token_sum_norm (token sums over max_new_tokens x responses: Dr. "
            "GRPO's constant normaliser).")
    gamma: float = option(1.0, doc="Discount.", ge=0, le=1)
    lam: float = option(0.95, doc="GAE lambda.", ge=0, le=1)
    kl_coef: float = option(0.05, doc="KL penalty coefficient (initial value when kl_target is set).", ge=0)
    kl_estimator: Literal["k1", "k3"] = option("k1", doc="Per-token KL estimator in the reward.")
    kl_target: float | None = option(None, doc="Adaptive KL (Ziegler et al.): the KL per sequence to steer to.", gt=0)
    kl_horizon: float = option(10000.0, doc="Adaptive KL horizon in samples.", gt=0)
    target_kl: float | None = option(
        None, doc="Early stop within an update: when an epoch's mean approximate KL between the rollout policy and the "
                  "updated one exceeds this, the update's remaining PPO epochs are skipped (ppo/epochs counts those "
                  "run). None runs every epoch.", gt=0)
    whiten_advantages: bool = option(True, doc="Whiten GAE's advantages over the rollout batch (all processes); "
                                               "REINFORCE++ always whitens, GRPO and RLOO never do.")
    whiten_rewards: bool = option(False, doc="Scale per-token rewards to unit variance before GAE.")
    max_bad_updates: int = option(
        3, doc="Updates with non-finite scores, rewards, advantages or gradients are skipped; this many in a row stop "
               "the run with a checkpoint of the last good weights.", ge=1, semantic=False)
    critic_learning_rate: float | None = option(None, doc="Critic learning rate; None uses optim.learning_rate.",
                                                gt=0)
    critic_init: Literal["auto", "reward", "policy"] = option(
        "auto",
        doc="Critic start: reward (the reward model; it must be causal and share the policy's tokenizer), policy "
            "(the policy with a zero-initialised head), auto (reward when possible).",
    )


@dataclass
class AlarmsConfig:
    """Reward-hacking alarms during PPO (rlhf/ppo/alarms.py): each rollout signal is a mean over the last
    ``window`` updates; None switches an alarm off. When one fires: a warning line, an alarm/<name> metric (a marker
    on the report's curves), a W&B alert when W&B is on, and with ``stop`` a checkpoint and the end of the run."""

    window: int = option(5, doc="Updates each rollout signal is averaged over.", ge=1, semantic=False)
    ngram: int = option(4, doc="Length in tokens of the n-grams whose repetition the repetition alarm counts.", ge=1,
                        semantic=False)
    max_length_correlation: float | None = option(
        0.7, doc="Fire when the correlation of the reward-model score with response length rises above this.",
        semantic=False)
    max_repetition: float | None = option(
        0.4, doc="Fire when more than this share of responses repeat an n-gram.", ge=0, le=1, semantic=False)
    min_eos_rate: float | None = option(0.7, doc="Fire when fewer than this share of responses stop.", ge=0, le=1,
                                        semantic=False)
    min_entropy_ratio: float | None = option(
        0.4, doc="Fire when the policy's entropy falls below this fraction of the first update's.", ge=0,
        semantic=False)
    max_kl: float | None = option(10.0, doc="Fire when the KL to the reference (nats per response) exceeds this.",
                                  ge=0, semantic=False)
    gold_drop: float | None = option(
        0.05, doc="Held-out evaluations with a gold judge: fire when the gold score falls this far below its best "
                  "while the reward-model score is above its value at that best.", ge=0, semantic=False)
    stop: bool = option(False, doc="Stop the run with a checkpoint when an alarm fires (exit status 2).",
                        semantic=False)


@dataclass
class ChecksConfig:
    """Checks of the upstream outputs before PPO spends compute: the reward stage's gate (before any weights load),
    then the reward model's scores and the SFT policy's stops on the initial held-out evaluation (before the first
    update). A failed check stops the run with what to change; each key here proceeds anyway."""

    reward_gate: bool = option(
        True, doc="Refuse a reward model whose held-out accuracy failed its stage's gate (reward.min_eval_accuracy, "
                  "in its manifest); false proceeds anyway.", semantic=False)
    min_score_std: float = option(
        0.01, doc="Refuse to start when the reward model's scores of the initial held-out SFT samples spread less "
                  "than this (standard deviation, raw score units; from 8 samples): a constant score teaches "
                  "nothing; 0 disables.",
        ge=0, semantic=False)
    min_eos_rate: float = option(
        0.5, doc="Refuse to start when a smaller share of the initial held-out SFT samples stop (EOS; with "
                 "rollout.stop_at_stop_token): a policy that does not stop is scored on cut-off text and learns "
                 "length; 0 disables.", ge=0, le=1,
        semantic=False)


@dataclass
class EvalConfig:
    """Held-out evaluation during PPO: generate on held-out prompts and score them."""

    every: int = option(0, doc="Evaluate every N updates (and before the first and after the last); 0: only "
                               "before and after.", ge=0, semantic=False)
    num_prompts: int = option(512, doc="Held-out prompts per evaluation.", ge=1)
    gold_judge: bool = option(True, doc="Also score with the demo's gold judge (plain-text demo prompts only).")
    reward_model: bool = option(
        True,
        doc="Score the held-out responses with the reward model (eval/score_mean). False, with "
            "rewards.reward_model_weight=0, loads no reward model at all: a run on reward functions alone needs none. "
            "The reward functions always score the held-out responses too (eval/reward/<function>).")
    samples: int = option(16, doc="Rows of the sample table logged per evaluation.", ge=0, semantic=False)


class BatchLayout(typing.NamedTuple):
    """How one process's share of a PPO update's rollouts splits: ``rollouts`` per process, ``minibatch`` rows per
    optimiser step, in ``micro_batches`` forward/backward passes."""

    rollouts: int
    minibatch: int
    micro_batches: int


@dataclass
class PPOConfig(StageConfig):
    """Policy optimisation with PPO against a learned reward model (our own implementation)."""

    stage: typing.ClassVar[str] = "ppo"

    model: ModelConfig = section(
        lambda: ModelConfig(name_or_path=""), "The policy: empty means this run's SFT output; or any causal LM."
    )
    reward_model: ModelConfig = section(
        lambda: ModelConfig(name_or_path=""), "The reward model: empty means this run's reward output."
    )
    peft: PeftConfig = section(PeftConfig, "Which policy parameters train (LoRA: the reference is the policy with "
                                           "adapters disabled).")
    critic_peft: PeftConfig = section(PeftConfig, "Which critic parameters train (the value head always trains).")
    data: DataConfig = section(
        lambda: DataConfig(path="data/demo/prompts.jsonl", eval_path="data/demo/eval_prompts.jsonl"),
        "Prompts (rows with a prompt, messages, or a preference pair whose prompt is used) and held-out prompts.",
    )
    optim: OptimConfig = section(lambda: OptimConfig(learning_rate=1e-5, lr_scheduler="linear"), "Optimiser.")
    rollout: RolloutConfig = section(RolloutConfig, "Sampling and scoring.")
    rewards: RewardsConfig = section(RewardsConfig, "The reward model's weight and rule-based reward functions.")
    ppo: PPOAlgoConfig = section(PPOAlgoConfig, "The PPO update.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation.")
    checks: ChecksConfig = section(ChecksConfig, "Checks of the reward model and the SFT policy before the first "
                                                 "update.")
    alarms: AlarmsConfig = section(AlarmsConfig, "Reward-hacking alarms during training.")
    samples_every: int = option(10, doc="Log a table of (prompt, response, score) every N updates.", ge=1,
                                semantic=False)
    speed_paths: bool = option(
        True,
        doc="Take the speed paths (rlhf/ppo/speed.py: oneDNN packing, log-probs reused from generation, a reserved "
            "KV cache, fused activations, length-grouped passes, a frozen heap), each the same computation up to "
            "float rounding; false runs the plain path.",
        semantic=False,
    )
    upstream_configs: dict[str, str] = option(
        default_factory=lambda: {"sft": "configs/sft/demo.yaml", "reward": "configs/reward/demo.yaml"},
        doc="Configs that build this run's missing SFT / reward outputs first (one process only); {} disables.",
        semantic=False,
    )

    @property
    def policy_path(self) -> str:
        return self.model.name_or_path or str(Path(self.run_dir) / "sft")

    @property
    def reward_path(self) -> str:
        return self.reward_model.name_or_path or str(Path(self.run_dir) / "reward")

    @property
    def uses_reward_model(self) -> bool:
        """Whether the run loads the reward model: for training (its weight above 0) or the held-out evaluation."""
        return bool(self.rewards.reward_model_weight) or self.eval.reward_model

    @property
    def has_critic(self) -> bool:
        """Whether the advantages need a learned value function (GAE) or come from the rewards alone."""
        return self.ppo.advantage_estimator == "gae"

    def batch_layout(self, num_processes: int) -> "BatchLayout":
        """Rollouts per process, minibatch per process and micro-batches per minibatch; raises ConfigError with the
        keys to change when the global batch does not split evenly."""
        batch = self.rollout.batch_size
        if batch % num_processes:
            raise ConfigError(f"rollout.batch_size={batch} is not a multiple of the {num_processes} processes; change "
                              "rollout.batch_size")
        local = batch // num_processes
        if local % self.ppo.num_minibatches:
            raise ConfigError(
                f"rollout.batch_size={batch} over {_processes(num_processes)} gives {local} rollouts each, which "
                f"ppo.num_minibatches={self.ppo.num_minibatches} does not divide; change one of them"
            )
        group = self.rollout.samples_per_prompt
        if local % group:
            raise ConfigError(
                f"rollout.batch_size={batch} over {_processes(num_processes)} gives {local} responses each, which "
                f"rollout.samples_per_prompt={group} does not divide (a prompt's responses stay on one process); "
                "change one of them"
            )
        minibatch = local // self.ppo.num_minibatches
        micro = min(self.ppo.micro_batch_size, minibatch)
        if minibatch % micro:
            raise ConfigError(
                f"each process's minibatch has {minibatch} rollouts, which ppo.micro_batch_size={micro} does not "
                "divide; change ppo.micro_batch_size"
            )
        return BatchLayout(local, minibatch, minibatch // micro)

    def validate(self) -> None:
        for key, peft in (("peft", self.peft), ("critic_peft", self.critic_peft)):
            if peft.method == "prefix":
                raise ConfigError(f"{key}.method=prefix is not supported by PPO; use full, lora or partial")
        group, estimator = self.rollout.samples_per_prompt, self.ppo.advantage_estimator
        if self.rollout.batch_size % group:
            raise ConfigError(f"rollout.batch_size={self.rollout.batch_size} is not a multiple of "
                              f"rollout.samples_per_prompt={group}; change one of them")
        if not self.rewards.reward_model_weight and not self.rewards.functions:
            raise ConfigError("rewards.reward_model_weight=0 with no rewards.functions leaves nothing to train on; "
                              "add a reward function or set the weight above 0")
        if not self.uses_reward_model and self.ppo.critic_init == "reward":
            raise ConfigError("ppo.critic_init=reward needs the reward model, which this run does not load "
                              "(rewards.reward_model_weight=0, eval.reward_model=false); set ppo.critic_init=policy")
        if estimator in ("grpo", "rloo") and group < 2:
            raise ConfigError(f"ppo.advantage_estimator={estimator} compares the responses to one prompt: set "
                              "rollout.samples_per_prompt to 2 or more (e.g. 4)")
        longest = self.rollout.max_prompt_len + self.rollout.max_new_tokens
        if self.ppo.micro_batch_tokens is not None and self.ppo.micro_batch_tokens < longest:
            raise ConfigError(
                f"ppo.micro_batch_tokens={self.ppo.micro_batch_tokens} cannot hold the longest row a rollout can "
                f"have, rollout.max_prompt_len + rollout.max_new_tokens = {longest} tokens; raise it to {longest} "
                "or more"
            )
        if self.data.max_length is not None:
            # Prompts are never dropped for their length here: they keep their last rollout.max_prompt_len tokens.
            raise ConfigError(
                f"data.max_length={self.data.max_length} has no effect in PPO; remove it and set "
                "rollout.max_prompt_len (longer prompts keep their last tokens) and rollout.max_new_tokens instead"
            )

    def input_paths(self) -> dict[str, str]:
        return {"model": self.policy_path, "tokenizer": self.model.tokenizer_name_or_path or "",
                "reward_model": self.reward_path if self.uses_reward_model else "", "data": self.data.path,
                "eval_data": self.data.eval_path or ""}


@dataclass
class EvaluateConfig(StageConfig):
    """Held-out comparison of the SFT policy and the trained policies (PPO, DPO): reward-model and gold scores, win
    rates, KL."""

    stage: typing.ClassVar[str] = "evaluate"

    sft_model: ModelConfig = section(lambda: ModelConfig(name_or_path=""),
                                     "The SFT policy (also the reference for the KL): empty means this run's SFT output.")
    ppo_model: ModelConfig = section(lambda: ModelConfig(name_or_path=""),
                                     "The PPO policy: empty means this run's ppo/policy.")
    dpo_model: ModelConfig = section(lambda: ModelConfig(name_or_path=""),
                                     "The DPO policy: empty means this run's dpo output.")
    reward_model: ModelConfig = section(lambda: ModelConfig(name_or_path=""),
                                        "The reward model: empty means this run's reward output.")
    policies: list[str] = option(
        default_factory=lambda: ["ppo"],
        doc="The trained policies compared with the SFT policy, each on the same prompts and random streams: ppo, "
            "dpo, or both (then DPO's gold win rate over PPO too).")
    reward_scores: bool = option(
        True, doc="Score the responses with the reward model (and the win rates under it); false needs no reward "
                  "model, e.g. for a run of SFT and DPO only.")
    data: DataConfig = section(
        lambda: DataConfig(path="data/demo/eval_prompts.jsonl", eval_fraction=0.0),
        "Held-out prompts (rows with a prompt, messages, or preference pairs whose prompts are used).",
    )
    num_prompts: int = option(512, doc="Prompts evaluated (the first ones of data.path).", ge=1)
    max_prompt_len: int | None = option(None, doc="Keep the last N prompt tokens; None: as PPO was trained.", ge=1)
    max_new_tokens: int | None = option(None, doc="Longest response; None: as PPO was trained.", ge=1)
    temperature: float | None = option(None, doc="Sampling temperature; None: as PPO was trained.", ge=0)
    top_k: int | None = option(None, doc="Top-k sampling; None: as PPO was trained.", ge=0)
    top_p: float | None = option(None, doc="Nucleus sampling; None: as PPO was trained.", gt=0, le=1)
    gold_judge: bool = option(True, doc="Also score with the demo's gold judge (plain-text demo prompts only).")
    batch_size: int = option(64, doc="Prompts per generation pass.", ge=1, semantic=False)
    samples: int = option(32, doc="Rows of the (prompt, SFT response, PPO response) sample table.", ge=0,
                          semantic=False)

    @property
    def sft_path(self) -> str:
        return self.sft_model.name_or_path or str(Path(self.run_dir) / "sft")

    @property
    def ppo_run_path(self) -> str:
        """The PPO stage output whose training settings are the defaults (only when ppo_model is empty)."""
        return str(Path(self.run_dir) / "ppo")

    @property
    def ppo_path(self) -> str:
        return self.ppo_model.name_or_path or str(Path(self.ppo_run_path) / "policy")

    @property
    def dpo_path(self) -> str:
        return self.dpo_model.name_or_path or str(Path(self.run_dir) / "dpo")

    def policy_path(self, policy: str) -> str:
        return self.ppo_path if policy == "ppo" else self.dpo_path

    def validate(self) -> None:
        unknown = [p for p in self.policies if p not in ("ppo", "dpo")]
        if unknown or not self.policies or len(set(self.policies)) != len(self.policies):
            raise ConfigError(f"policies={self.policies}: list ppo, dpo or both, once each")

    @property
    def reward_path(self) -> str:
        return self.reward_model.name_or_path or str(Path(self.run_dir) / "reward")

    def input_paths(self) -> dict[str, str]:
        # This run's PPO output as a whole (its fingerprint names the policy and the training settings read from it).
        ppo = self.ppo_model.name_or_path or self.ppo_run_path
        return {"sft": self.sft_path, "ppo": ppo if "ppo" in self.policies else "",
                "dpo": self.dpo_path if "dpo" in self.policies else "",
                "reward_model": self.reward_path if self.reward_scores else "", "data": self.data.path}
